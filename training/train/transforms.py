"""Training-only random transforms (serving is deterministic: :mod:`cxr_node.model.preprocess`).

Randomness only through each transform's own generator (``self.R``), so pipelines are seedable
with ``set_random_state`` (MONAI's habit); the array transform does the work, the dictionary
wrapper maps one draw over keys.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform


class RandWindowJitter(Randomizable, Transform):
    """With probability ``prob``, a random window on a [0, 1] image: ``clip((x - lo) / (hi - lo))``.

    ``lo`` is drawn from [0, ``max_shift``] and ``hi`` from [1 - ``max_shift``, 1], and a random gamma
    from ``gamma_range`` follows: it imitates another site's window/level choice. Only ``self.R`` is used.
    """

    def __init__(self, prob: float = 0.5, max_shift: float = 0.08, gamma_range: Sequence[float] = (0.8, 1.25)) -> None:
        self.prob = float(prob)
        self.max_shift = float(max_shift)
        self.gamma_range = (float(gamma_range[0]), float(gamma_range[1]))
        self._do = False
        self._lo, self._hi, self._gamma = 0.0, 1.0, 1.0

    def randomize(self, data: Any = None) -> None:
        self._do = self.R.random_sample() < self.prob
        if self._do:
            self._lo = float(self.R.uniform(0.0, self.max_shift))
            self._hi = float(self.R.uniform(1.0 - self.max_shift, 1.0))
            self._gamma = float(np.exp(self.R.uniform(np.log(self.gamma_range[0]), np.log(self.gamma_range[1]))))

    def __call__(self, img: np.ndarray | torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize()
        t = torch.as_tensor(img, dtype=torch.float32)
        if not self._do:
            return t
        t = ((t - self._lo) / (self._hi - self._lo)).clamp(0.0, 1.0)
        return t.pow(self._gamma)


class RandWindowJitterd(Randomizable, MapTransform):
    """Dictionary version of :class:`RandWindowJitter`: one draw applied to every key."""

    def __init__(self, keys: KeysCollection, prob: float = 0.5, max_shift: float = 0.08,
                 gamma_range: Sequence[float] = (0.8, 1.25), allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.jitter = RandWindowJitter(prob, max_shift, gamma_range)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> "RandWindowJitterd":
        super().set_random_state(seed, state)
        self.jitter.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        self.jitter.randomize()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            d[key] = self.jitter(d[key], randomize=False)
        return d
