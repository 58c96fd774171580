"""Inference: a checkpoint loaded once -> frozen :class:`Prediction` records with Grad-CAM maps.

    predictor = Predictor("cxr_node/models/cxr-densenet121.pt", device="cpu")
    x = predictor.preprocess("film.dcm")           # (1, S, S) tensor, the checkpoint's preprocessing
    [pred] = predictor.predict([x])                 # or a (B, 1, S, S) batch
    pred.top_label, pred.probabilities, pred.cam, pred.ood_score
    finding = predictor.policy.apply(pred)         # + urgent flag and priority (cxr_node.model.policy)

Probabilities are ``softmax(logits / temperature)`` with the checkpoint's temperature. A
:class:`Prediction` holds only what the model said; the urgent flag and priority are the triage
policy's (:class:`cxr_node.model.policy.TriagePolicy`, the checkpoint's operating points), and whether a
film is analysed at all is :mod:`cxr_node.eligibility.rules`'s. A Predictor is not thread-safe (Grad-CAM hooks live on it): give each worker its own, or
serialise calls.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cxr_node.errors import CheckpointError, PreprocessError
from cxr_node.model.checkpoint import GRADCAM_LAYERS, load_classifier, read_verified, resolve_device
from cxr_node.model.policy import TriagePolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]
    top_label: str
    top_probability: float
    model_version: str
    model_arch: str
    weights_sha256: str
    cam: np.ndarray | None = None  # (S, S) float32 in [0, 1], read-only; for ``cam_label``
    cam_label: str | None = None
    ood_score: float | None = None  # distance of the film's features from the training films'
    #: p(abnormal), "something is wrong on this film" (cxr_node.model.abnormality); None for a
    #: checkpoint without an abnormality head (v2), whose labels are then the only outputs
    abnormal: float | None = None

    def probability(self, label: str) -> float:
        return self.probabilities[self.labels.index(label)]

    def as_dict(self, include_cam: bool = False) -> dict[str, Any]:
        d = {"probabilities": dict(zip(self.labels, self.probabilities)), "top_label": self.top_label,
             "top_probability": self.top_probability, "model_version": self.model_version, "model_arch": self.model_arch,
             "weights_sha256": self.weights_sha256, "cam_label": self.cam_label,
             "ood_score": None if self.ood_score is None else round(self.ood_score, 3),
             "abnormal": self.abnormal}
        if include_cam and self.cam is not None:
            d["cam"] = self.cam.tolist()
        return d


OOD_KIND = "ood-reference"
#: Layer whose output (the pooled penultimate features) the out-of-domain score reads, per arch.
FEATURE_LAYERS = {"densenet121": "class_layers.flatten"}


def cam_layer(meta: dict[str, Any]) -> str:
    """Grad-CAM target: the checkpoint's ``cam_layer``, else the last feature map when it is at least
    7x7, else DenseNet121's third dense block (twice the resolution: 8x8 at 128 px)."""
    if meta.get("cam_layer"):
        return str(meta["cam_layer"])
    arch = str(meta["arch"])
    if arch == "densenet121" and int(meta["input_size"]) // 32 < 7:
        return "features.denseblock3"
    return GRADCAM_LAYERS[arch]


class OodReference:
    """Class-conditional Gaussian model of a classifier's penultimate features on its training films
    (shared covariance, Ledoit-Wolf shrinkage): the score of a film is its smallest Mahalanobis
    distance to a class mean. Stored as a verified checkpoint of kind ``ood-reference`` bound to the
    classifier's weights hash; ``threshold`` was chosen on validation films and negatives."""

    def __init__(self, path: str | os.PathLike[str], classifier_sha256: str | None = None) -> None:
        ck = read_verified(path)
        meta = ck["meta"]
        if meta.get("kind") != OOD_KIND:
            raise CheckpointError(f"{path}: not an out-of-domain reference (kind {meta.get('kind')!r})")
        for key in ("classifier_sha256", "threshold", "feature_layer"):
            if key not in meta:
                raise CheckpointError(f"{path}: out-of-domain reference metadata lacks {key!r}")
        if classifier_sha256 and meta["classifier_sha256"] != classifier_sha256:
            raise CheckpointError(f"{path}: out-of-domain reference was fitted for classifier "
                                  f"{meta['classifier_sha256'][:12]}..., not {classifier_sha256[:12]}...")
        self.path = str(path)
        self.meta = meta
        self.weights_sha256 = ck["sha256"]
        self.threshold = float(meta["threshold"])
        self.feature_layer = str(meta["feature_layer"])
        self.means = ck["state_dict"]["means"].double()          # (K, D)
        self.precision = ck["state_dict"]["precision"].double()  # (D, D)

    def score(self, features: torch.Tensor) -> np.ndarray:
        """(B, D) features -> (B,) scores (smallest Mahalanobis distance to a class mean)."""
        f = features.detach().double().cpu()
        d = f[:, None, :] - self.means[None]                                   # (B, K, D)
        m = torch.einsum("bkd,de,bke->bk", d, self.precision, d).clamp_min(0)  # squared distances
        return m.min(dim=1).values.sqrt().numpy()


def default_ood_path(checkpoint: str | os.PathLike[str]) -> Path:
    p = Path(checkpoint)
    return p.with_name(p.name[:-3] + ".ood.pt" if p.name.endswith(".pt") else p.name + ".ood.pt")


class Predictor:
    """Loads and verifies a checkpoint once; :meth:`predict` runs batches."""

    def __init__(self, checkpoint: str | os.PathLike[str], device: str | None = "cpu",
                 ood_reference: str | os.PathLike[str] | None = None) -> None:
        self.device = resolve_device(device)
        self.checkpoint = str(checkpoint)
        self.model, self.meta, self.abnormality = load_classifier(checkpoint, self.device)
        self.weights_sha256: str = self.meta["weights_sha256"]
        self.labels: tuple[str, ...] = tuple(self.meta["labels"])
        self.params: dict[str, Any] = dict(self.meta["preprocess"])
        self.temperature = float(self.meta["temperature"])
        self.version = str(self.meta["version"])
        self.arch = str(self.meta["arch"])
        self.policy = TriagePolicy.from_meta(self.meta, self.abnormality)
        self.target_layer = cam_layer(self.meta)
        self._cams: dict[str, Any] = {}  # one GradCAM (and its hooks) per target layer, made once
        self._preprocess = None
        self._features: torch.Tensor | None = None
        ood_path = Path(ood_reference) if ood_reference else default_ood_path(checkpoint)
        self.ood: OodReference | None = None
        if ood_path.is_file():
            self.ood = OodReference(ood_path, self.weights_sha256)
            layer = dict(self.model.named_modules()).get(self.ood.feature_layer)
            if layer is None:
                raise CheckpointError(f"{ood_path}: feature layer {self.ood.feature_layer!r} is not in the model")
            layer.register_forward_hook(self._keep_features)
        elif ood_reference:
            raise CheckpointError(f"{ood_reference}: out-of-domain reference not found")
        else:
            log.warning("no out-of-domain reference beside %s: films are checked by their lung fields only", checkpoint)
        if self.ood is None and self.arch in FEATURE_LAYERS:  # features for site heads all the same
            dict(self.model.named_modules())[FEATURE_LAYERS[self.arch]].register_forward_hook(self._keep_features)
        #: the pooled penultimate features (B, D) of the last :meth:`predict` batch (site heads), or None
        self.last_features: np.ndarray | None = None
        self._head_inputs: dict[str, torch.Tensor] = {}
        if self.abnormality is not None:
            modules = dict(self.model.named_modules())
            for name in self.abnormality.feature_layers:
                if name not in modules:
                    raise CheckpointError(f"{checkpoint}: abnormality feature layer {name!r} is not in the model")
                modules[name].register_forward_hook(self._keep_head_input(name))

    def _keep_head_input(self, name: str):
        from cxr_node.model.abnormality import pooled

        def hook(module, args, output) -> None:
            self._head_inputs[name] = pooled(output)
        return hook

    def _abnormal(self) -> np.ndarray | None:
        """p(abnormal) of the last forward pass, or None without an abnormality head."""
        if self.abnormality is None:
            return None
        f = torch.cat([self._head_inputs[n] for n in self.abnormality.feature_layers], dim=1)
        return self.abnormality.probability(f.cpu().numpy().astype(np.float64))

    def _keep_features(self, module, args, output) -> None:
        self._features = output.detach()

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"])

    def preprocess(self, src: Any) -> torch.Tensor:
        """A path (DICOM/PNG/JPEG) or pydicom Dataset -> (1, S, S) tensor; PreprocessError if unusable."""
        if self._preprocess is None:
            from cxr_node.model.preprocess import preprocess_transform

            self._preprocess = preprocess_transform(self.params)
        try:
            out = self._preprocess(src)
        except PreprocessError:
            raise
        except Exception as e:  # MONAI wraps transform errors; unwrap ours, re-raise others with context
            cause = e
            while cause is not None and not isinstance(cause, PreprocessError):
                cause = cause.__cause__ or cause.__context__
            if isinstance(cause, PreprocessError):
                raise cause from None
            raise PreprocessError(f"preprocessing failed: {type(e).__name__}: {e}") from e
        return torch.as_tensor(out, dtype=torch.float32)

    def preprocess_with_display(self, src: Any) -> tuple[torch.Tensor, np.ndarray]:
        """Like :meth:`preprocess`, plus the film for display (H, W) in [0, 1]; decodes once."""
        from cxr_node.model.preprocess import preprocess_with_display

        return preprocess_with_display(src, self.params)

    def _gradcam(self):
        if self.target_layer not in self._cams:
            from monai.visualize import GradCAM

            self._cams[self.target_layer] = GradCAM(nn_module=self.model, target_layers=self.target_layer)
        return self._cams[self.target_layer]

    def _stack(self, images: torch.Tensor | Sequence[torch.Tensor | np.ndarray]) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            x = images if images.ndim == 4 else images[None]
        else:
            if len(images) == 0:
                raise ValueError("predict() needs at least one image")
            x = torch.stack([torch.as_tensor(i, dtype=torch.float32) for i in images])
        s = self.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, s, s):
            raise ValueError(f"images must be (B, 1, {s}, {s}) preprocessed tensors (got {tuple(x.shape)})")
        return x.to(self.device, dtype=torch.float32)

    def logits(self, images: torch.Tensor | Sequence[torch.Tensor | np.ndarray]) -> torch.Tensor:
        x = self._stack(images)
        with torch.inference_mode():
            return self.model(x).float()

    def predict(self, images: torch.Tensor | Sequence[torch.Tensor | np.ndarray], explain: bool = True
                ) -> list[Prediction]:
        """Predictions for a batch of preprocessed images (from :meth:`preprocess`)."""
        x = self._stack(images)
        self._features = None
        with torch.inference_mode():
            logits = self.model(x).float()
        feats = self._features  # before Grad-CAM runs the model again on parts of the batch
        abnormal = self._abnormal()
        self.last_features = None if feats is None else feats.float().cpu().numpy().astype(np.float64)
        ood = self.ood.score(feats) if self.ood is not None and feats is not None else None
        probs = torch.softmax(logits / self.temperature, dim=1).cpu().numpy().astype(np.float64)
        top = probs.argmax(axis=1)
        cams: list[np.ndarray | None] = [None] * len(x)
        if explain:
            cam = self._gradcam()
            # GradCAM with one class index per call: group the batch by top class
            for k in np.unique(top):
                sel = np.nonzero(top == k)[0]
                with torch.enable_grad():
                    maps = cam(x[torch.as_tensor(sel, device=x.device)].clone(), class_idx=int(k))
                maps = maps.detach().float().cpu().numpy()
                for j, i in enumerate(sel):
                    m = np.nan_to_num(maps[j, 0].astype(np.float32), nan=0.0)
                    m.setflags(write=False)
                    cams[i] = m
        out = []
        for i in range(len(x)):
            p = tuple(float(v) for v in probs[i])
            out.append(Prediction(labels=self.labels, probabilities=p, top_label=self.labels[top[i]],
                                  top_probability=p[top[i]], model_version=self.version, model_arch=self.arch,
                                  weights_sha256=self.weights_sha256, cam=cams[i],
                                  cam_label=self.labels[top[i]] if explain else None,
                                  ood_score=None if ood is None else float(ood[i]),
                                  abnormal=None if abnormal is None else float(abnormal[i])))
        return out

    def features(self, images: Sequence[torch.Tensor | np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Pooled penultimate features (N, D) of preprocessed images (site heads: cxr_node.onboarding.site_adaptation)."""
        layer = dict(self.model.named_modules())[FEATURE_LAYERS[self.arch]]
        got: list[torch.Tensor] = []
        hook = layer.register_forward_hook(lambda m, a, o: got.append(o.detach().float().cpu()))
        try:
            for s in range(0, len(images), batch_size):
                with torch.inference_mode():
                    self.model(self._stack(images[s:s + batch_size]))
        finally:
            hook.remove()
        return torch.cat(got).numpy().astype(np.float64)

