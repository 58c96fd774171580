"""Network factory and checkpoints with a hash and metadata.

A checkpoint file is a plain dict, loadable with ``torch.load(weights_only=True)``::

    {"format": "cxr-node-checkpoint", "format_version": 1,
     "state_dict": {...tensors...},            # fp32, or fp16 for the bundled model
     "sha256": "<hex>",                         # over the canonical serialisation of state_dict
     "meta": {labels, arch, input_size, preprocess, thresholds, temperature, metrics,
              data_manifest_sha256, version, critical_labels, ...}}

:func:`load_checkpoint` verifies all of it and raises :class:`CheckpointError` naming what is
wrong. Nothing is built at import time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from cxr_node.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "cxr-node-checkpoint"
FORMAT_VERSION = 1
ARCHS = ("densenet121", "resnet50", "efficientnet-b0", "efficientnet-b3")
#: Grad-CAM target layer per architecture (last spatial feature map before pooling).
GRADCAM_LAYERS = {
    "densenet121": "class_layers.relu",
    "resnet50": "layer4",
    "efficientnet-b0": "_bn1",
    "efficientnet-b3": "_bn1",
}
REQUIRED_META = ("labels", "arch", "input_size", "preprocess", "thresholds", "temperature", "metrics",
                 "data_manifest_sha256", "version")


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A 2-D, 1-channel classifier with ``num_classes`` logits, randomly initialised."""
    from monai.networks import nets

    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (got {num_classes})")
    if arch == "densenet121":
        return nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=num_classes)
    if arch == "resnet50":
        return nets.resnet50(spatial_dims=2, n_input_channels=1, num_classes=num_classes)
    if arch in ("efficientnet-b0", "efficientnet-b3"):
        return nets.EfficientNetBN(arch, pretrained=False, spatial_dims=2, in_channels=1, num_classes=num_classes)
    raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")


def output_features(model: nn.Module) -> int:
    """Number of logits the model's last linear layer produces."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise CheckpointError("model has no linear output layer")
    return int(last.out_features)


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a canonical serialisation: for each key in sorted order, the key, dtype, shape
    and the tensor's raw little-endian bytes (contiguous, on CPU)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"state_dict entry {key!r} is not a tensor")
        t = t.detach().to("cpu").contiguous()
        h.update(key.encode("utf-8"))
        h.update(b"\0")
        h.update(str(t.dtype).encode("ascii"))
        h.update(b"\0")
        h.update(",".join(str(s) for s in t.shape).encode("ascii"))
        h.update(b"\0")
        # view as bytes; works for every dtype incl. bf16/fp16 and 0-d tensors
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        h.update(b"\1")
    return h.hexdigest()


def _plain(value: Any, where: str) -> Any:
    """Check metadata holds only plain types (what ``weights_only=True`` loads safely)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"metadata {where}: keys must be strings (got {k!r})")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalar
        return value.item()
    raise ValueError(f"metadata {where}: {type(value).__name__} is not a plain dict/list/str/number")


def make_checkpoint(model_or_state: nn.Module | Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                    fp16: bool = False) -> dict[str, Any]:
    """The checkpoint dict for ``model`` (weights copied to CPU; floats halved if ``fp16``)."""
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        v = v.detach().to("cpu").clone()
        if fp16 and v.is_floating_point():
            v = v.half()
        out[k] = v
    required = REQUIRED_META if meta.get("kind", "classifier") == "classifier" else ("kind", "version")
    missing = [k for k in required if k not in meta]
    if missing:
        raise CheckpointError(f"cannot save checkpoint: metadata lacks {', '.join(missing)}")
    meta = _plain(dict(meta), "meta")
    meta.pop("weights_sha256", None)  # added by load_checkpoint; the digest lives beside meta
    halves = any(v.dtype == torch.float16 for v in out.values())
    meta["weights_dtype"] = "float16" if halves else "float32"
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "state_dict": out,
            "sha256": state_dict_sha256(out), "meta": meta}


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is read by the daemon's own user
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: str | os.PathLike[str], model_or_state: nn.Module | Mapping[str, torch.Tensor],
                    meta: Mapping[str, Any], fp16: bool = False) -> Path:
    return atomic_torch_save(make_checkpoint(model_or_state, meta, fp16), path)


def read_verified(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a cxr-node checkpoint file of any kind and verify its structure and weights hash."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types
        raise CheckpointError(f"{path}: not a loadable checkpoint (torch.load weights_only=True failed: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cxr-node checkpoint (format marker {FORMAT!r} missing)")
    if ck.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ck.get('format_version')!r} is not "
                              f"{FORMAT_VERSION}")
    for k in ("state_dict", "sha256", "meta"):
        if k not in ck:
            raise CheckpointError(f"{path}: checkpoint lacks {k!r}")
    if not isinstance(ck["meta"], dict):
        raise CheckpointError(f"{path}: checkpoint metadata is not a dict")
    sd = ck["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{path}: checkpoint state_dict is empty or not a dict")
    try:
        digest = state_dict_sha256(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if digest != ck["sha256"]:
        raise CheckpointError(f"{path}: weights sha256 mismatch (stored {str(ck['sha256'])[:12]}..., "
                              f"computed {digest[:12]}...): the weights were altered or corrupted")
    return ck


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and verify a classifier checkpoint's structure, metadata and hash (no model built)."""
    ck = read_verified(path)
    meta = ck["meta"]
    if meta.get("kind", "classifier") != "classifier":
        raise CheckpointError(f"{path}: a {meta['kind']} checkpoint, not a classifier")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: checkpoint metadata lacks {', '.join(missing)}")
    labels = meta["labels"]
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels) \
            or len(set(labels)) != len(labels):
        raise CheckpointError(f"{path}: metadata 'labels' must be a list of at least 2 distinct names (got {labels!r})")
    if meta["arch"] not in ARCHS:
        raise CheckpointError(f"{path}: metadata 'arch' {meta['arch']!r} is not one of {', '.join(ARCHS)}")
    th = meta["thresholds"]
    if not isinstance(th, dict) or any(k not in labels for k in th):
        raise CheckpointError(f"{path}: metadata 'thresholds' must map label names to numbers (got {th!r})")
    t = meta["temperature"]
    if not isinstance(t, (int, float)) or not t > 0:
        raise CheckpointError(f"{path}: metadata 'temperature' must be a positive number (got {t!r})")
    pp = meta["preprocess"]
    if not isinstance(pp, dict) or pp.get("input_size") != meta["input_size"]:
        raise CheckpointError(f"{path}: metadata 'preprocess' must be a dict whose input_size equals "
                              f"'input_size' ({meta['input_size']!r})")
    return ck


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Build the network named in the metadata, load the verified weights (as fp32), eval mode.

    Returns ``(model, meta)``; ``meta`` is a copy of the checkpoint metadata plus ``weights_sha256``."""
    model, meta, _ = load_classifier(path, device)
    return model, meta


def load_classifier(path: str | os.PathLike[str], device: str | torch.device = "cpu"):
    """:func:`load_checkpoint` plus the checkpoint's abnormality head
    (:class:`cxr_node.model.abnormality.AbnormalityHead`, or None). The sha256 covers the head too."""
    from cxr_node.model.abnormality import AbnormalityHead, split_state

    ck = read_checkpoint(path)
    meta = dict(ck["meta"])
    meta["weights_sha256"] = ck["sha256"]
    own, extra = split_state(ck["state_dict"])
    abnormality = AbnormalityHead.from_checkpoint(extra, meta, where=str(path))
    model = build_model(meta["arch"], len(meta["labels"]))
    n_out = output_features(model)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in own.items()}
    # the output layer must agree with the label count before anything else
    head = [v for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2]
    if head and head[-1].shape[0] != len(meta["labels"]):
        raise CheckpointError(f"{path}: output layer has {head[-1].shape[0]} units but metadata names "
                              f"{len(meta['labels'])} labels")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit arch {meta['arch']!r}: "
                              f"{str(e).splitlines()[0]}") from e
    if n_out != len(meta["labels"]):
        raise CheckpointError(f"{path}: model has {n_out} outputs but metadata names {len(meta['labels'])} labels")
    model.to(device).eval()
    return model, meta, abnormality


def resolve_device(device: str | None) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without CUDA is an error."""
    d = (device or "auto").lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' requested but CUDA is not available (use --device cpu or auto)")
    if d not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda (got {device!r})")
    return torch.device(d)
