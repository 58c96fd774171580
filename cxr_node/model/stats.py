"""Small statistics shared by evaluation and the node's own reports (no torch)."""

from __future__ import annotations

import math


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (95% by default); (nan, nan) if n == 0."""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean_ci(values, n_boot: int = 2000, seed: int = 0) -> list[float]:  # noqa: ANN001 - array-like
    """Percentile bootstrap 95% interval of the mean of ``values``."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
