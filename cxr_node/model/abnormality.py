"""The abnormality output: p(abnormal), "something is wrong on this film", from a logistic head on the
classifier's pooled features (the v5 model; training/results/v5/PROTOCOL.md).

A checkpoint that has one carries the head's numbers as tensors in its state_dict under
``abnormality.`` (so the weights' sha256 covers them: a new head is a new Device UID) and, in its
metadata, ``abnormality``::

    {"labels": ["Normal", "Abnormal"], "feature_layers": ["class_layers.flatten", ...],
     "threshold": 0.41, "rule": "how the operating point was chosen", "l2": 100.0}

``feature_layers`` are pooled (a 4-D output is averaged over its spatial axes) and concatenated in
that order. The classifier's own labels stay as secondary *pattern* outputs. Pure numpy at run time;
torch only to read and write the tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from cxr_node.errors import CheckpointError
from cxr_node.model.adaptation import LogisticHead

PREFIX = "abnormality."
LABELS = ("Normal", "Abnormal")
_TENSORS = ("mean", "scale", "weight", "bias")


@dataclass(frozen=True)
class AbnormalityHead:
    head: LogisticHead
    feature_layers: tuple[str, ...]
    threshold: float
    rule: str = ""

    def probability(self, features: np.ndarray) -> np.ndarray:
        """(N, D) pooled features (``feature_layers`` concatenated) -> (N,) p(abnormal)."""
        s = self.head.logits(features)
        s = s - s.max(axis=1, keepdims=True)
        e = np.exp(s)
        return e[:, 1] / e.sum(axis=1)

    def meta(self) -> dict[str, Any]:
        return {"labels": list(LABELS), "feature_layers": list(self.feature_layers), "threshold": float(self.threshold),
                "rule": self.rule, "l2": float(self.head.l2)}

    def state_tensors(self) -> dict[str, Any]:
        import torch

        h = self.head
        return {PREFIX + k: torch.as_tensor(np.asarray(getattr(h, k)), dtype=torch.float32) for k in _TENSORS}

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any], meta: Mapping[str, Any], where: str = "checkpoint"
                        ) -> "AbnormalityHead | None":
        """The head of a checkpoint (its ``abnormality.*`` tensors and metadata), or None if it has none."""
        keys = [k for k in state if k.startswith(PREFIX)]
        m = meta.get("abnormality")
        if not keys and m is None:
            return None
        if m is None or not isinstance(m, Mapping):
            raise CheckpointError(f"{where}: abnormality tensors without 'abnormality' metadata")
        missing = [k for k in _TENSORS if PREFIX + k not in state]
        if missing:
            raise CheckpointError(f"{where}: abnormality head lacks {', '.join(PREFIX + k for k in missing)}")
        if list(m.get("labels", [])) != list(LABELS):
            raise CheckpointError(f"{where}: abnormality labels must be {list(LABELS)} (got {m.get('labels')!r})")
        layers = m.get("feature_layers")
        if not layers or not all(isinstance(x, str) for x in layers):
            raise CheckpointError(f"{where}: abnormality metadata needs 'feature_layers' (a list of layer names)")
        t = m.get("threshold")
        if not isinstance(t, (int, float)) or math.isnan(float(t)) or not 0.0 <= float(t) <= 1.0:
            raise CheckpointError(f"{where}: abnormality threshold must be a number in [0, 1] (got {t!r})")
        arr = {k: state[PREFIX + k].detach().double().cpu().numpy() for k in _TENSORS}
        d = arr["mean"].shape[0]
        if arr["scale"].shape != (d,) or arr["weight"].shape != (2, d) or arr["bias"].shape != (2,):
            raise CheckpointError(f"{where}: abnormality head shapes do not agree (mean {arr['mean'].shape}, "
                                  f"weight {arr['weight'].shape})")
        head = LogisticHead(LABELS, arr["mean"], arr["scale"], arr["weight"], arr["bias"], float(m.get("l2", 0.0)))
        return cls(head, tuple(layers), float(t), str(m.get("rule", "")))


def split_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the network's own tensors, the ``abnormality.*`` tensors) of a state_dict."""
    own = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    return own, {k: v for k, v in state.items() if k.startswith(PREFIX)}


def pooled(output: Any) -> Any:
    """A layer's output as (B, C): spatial mean of a 4-D map, as is for 2-D."""
    o = output.detach().float()
    return o.mean(dim=(2, 3)) if o.ndim == 4 else o
