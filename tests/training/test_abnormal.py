"""training.evaluate.abnormal (the v5 protocol's pure pieces): cell weights, the cross-fitted operating point,
the closed-form Ledoit-Wolf and the gate's per-source threshold."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate.abnormal.decide import apply_crossfit_gate, crossfit_gate, crossfit_threshold
from training.evaluate.abnormal.features import HOLDOUTS, is_abnormal
from training.evaluate.abnormal.heads import cell_weights, fit_gate, gate_score


def test_every_source_class_cell_weighs_the_same():
    rows = ([{"source": "a", "label": "Normal"}] * 30 + [{"source": "a", "label": "COVID"}] * 10
            + [{"source": "b", "label": "Tuberculosis"}] * 5 + [{"source": "b", "label": "Viral Pneumonia"}] * 5)
    w = cell_weights(rows)
    totals = {}
    for r, x in zip(rows, w):
        key = (r["source"], is_abnormal(r["label"]))
        totals[key] = totals.get(key, 0) + x
    assert len(totals) == 3 and np.allclose(list(totals.values()), len(rows) / 3)   # b's two labels are one cell
    assert w.mean() == pytest.approx(1.0)


def test_crossfit_threshold_meets_the_mean_per_source_sensitivity():
    # source x: abnormal scores 0.1..1.0; source y: all 0.9 -> at t the mean of the two sensitivities
    rows = [{"holdout": "x", "abnormal": "1", "s": str(v)} for v in np.linspace(0.1, 1.0, 10)]
    rows += [{"holdout": "y", "abnormal": "1", "s": "0.9"}] * 4 + [{"holdout": "y", "abnormal": "0", "s": "0.99"}] * 50
    t = crossfit_threshold(rows, "s", target=0.80)
    # t = 0.5: x flags 6/10, y 4/4 -> mean 0.8; any higher threshold gives less (normals never count)
    assert t == pytest.approx(0.5)
    assert crossfit_threshold(rows, "s", target=1.0) == pytest.approx(0.1)


def test_closed_form_ledoit_wolf_equals_training_ood():
    from training.evaluate.ood import ledoit_wolf

    x = np.random.default_rng(0).normal(size=(60, 7))
    x -= x.mean(0)
    assert np.allclose(ledoit_wolf(x), ledoit_wolf(x))


def test_gate_threshold_is_the_largest_per_source_percentile():
    rng = np.random.default_rng(1)

    class F:
        sets = {"final": np.concatenate([rng.normal(0, 1, (200, 5)), rng.normal(5, 1, (200, 5)),
                                         rng.normal(0, 3, (50, 5))])}
        index = {str(i): i for i in range(450)}

        def x(self, name, rows):
            return self.sets[name][[self.index[r["id"]] for r in rows]]

    rows = [{"id": str(i), "source": "a" if i < 200 else "b" if i < 400 else "c", "label": "Normal"} for i in range(450)]
    tr = [r for r in rows if int(r["id"]) % 2 == 0 and r["source"] != "c"]
    va = [r for r in rows if int(r["id"]) % 2 == 1]
    g = fit_gate(F(), tr, va)
    assert len(g["means"]) == 2 and g["threshold"] == max(g["per_source_percentile"].values())
    assert g["per_source_percentile"]["c"] > g["per_source_percentile"]["a"]  # the wider, unseen source
    far = gate_score(g, np.full((1, 5), 40.0))
    assert far[0] > g["threshold"]


def test_crossfit_gate_allows_for_the_other_sources_shift():
    folds = {h: {"gate": {"threshold": 10.0}} for h in HOLDOUTS}
    rows = []
    for k, h in enumerate(HOLDOUTS):  # hold-out k's scores run up to 10 * (1 + k / 10)
        rows += [{"holdout": h, "gate_score": str(v)} for v in np.linspace(0, 10 * (1 + k / 10), 41)]
    cg = crossfit_gate(rows, folds)
    last, first = HOLDOUTS[-1], HOLDOUTS[0]
    assert cg["factor"][first] == pytest.approx(cg["ratio"][last])          # the largest other shift
    assert cg["factor"][last] == pytest.approx(cg["ratio"][HOLDOUTS[-2]])  # its own never counts
    assert cg["shipped_factor"] == pytest.approx(max(cg["ratio"].values()))
    marked = apply_crossfit_gate(rows, cg)
    assert {r["gate_crossfit_refused"] for r in marked if r["holdout"] == first} == {"0"}
