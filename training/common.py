"""Shared by calibrate / evaluate / export: records of a split -> logits under a checkpoint."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.data import records as D

log = logging.getLogger(__name__)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")
    for noisy in ("PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def split_records(data: str, checkpoint: Path, split: str | None, split_file: str | None,
                  labels: Sequence[str]) -> list[D.Record]:
    """The dataset's records in ``split`` (``all`` or None: every record), checked against ``labels``."""
    records = D.read_dataset(data)
    unknown = sorted({r.label for r in records} - set(labels))
    if unknown:
        raise SystemExit(f"{data}: classes {unknown} are not labels of the checkpoint ({', '.join(labels)})")
    assign = None
    if split not in (None, "all"):
        sf = Path(split_file) if split_file else D.find_split_file(checkpoint)
        if sf is None or not sf.is_file():
            raise SystemExit(f"--split {split}: no split file (looked for split.csv next to {checkpoint}; "
                             "pass --split-file)")
        assign = D.load_split(sf)
        log.info("split %s from %s", split, sf)
    sel = D.select(records, assign, split)
    if not sel:
        raise SystemExit(f"no images in split {split!r} of {data}")
    return sel


def logits_for(records: Sequence[D.Record], model: Any, params: dict, device: Any, cache_dir: str | None,
               batch_size: int = 64) -> np.ndarray:
    """Preprocess (cached as uint8, exactly as training) and run the model; (N, K) logits."""
    if cache_dir:
        cache = D.build_cache(records, params, Path(cache_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="cxr-eval-") as tmp:
            cache = D.build_cache(records, params, Path(tmp))
    amp = getattr(device, "type", str(device)) == "cuda"
    return predict_logits(model, cache, range(len(records)), params, device, batch_size=batch_size, amp=amp)


def split_logits(args: Any) -> tuple[dict, list[str], list[D.Record], np.ndarray, np.ndarray]:
    """What calibrate and evaluate share: load ``args.checkpoint`` (verified), take ``args.split`` of
    ``args.data`` and run the model over it. Returns (meta, labels, records, y, logits)."""
    import torch

    from cxr_node.model.checkpoint import load_checkpoint, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = Path(args.checkpoint)
    device = resolve_device(args.device)
    model, meta = load_checkpoint(ckpt, device)
    labels = list(meta["labels"])
    if args.split == "test":
        prev = (meta.get("metrics") or {}).get("test")
        if prev:
            log.warning("this checkpoint already records a test evaluation (%s): the test split should be "
                        "touched once", prev.get("evaluated_at", "?"))
    recs = split_records(args.data, ckpt, args.split, args.split_file, labels)
    y = np.array([labels.index(r.label) for r in recs])
    return meta, labels, recs, y, logits_for(recs, model, meta["preprocess"], device, args.cache_dir)


def parse_preprocess(items: Sequence[str], input_size: int) -> dict[str, Any]:
    """``KEY=VALUE`` options -> a complete, validated parameter dict (``cxr_node.model.preprocess.make_params``)."""
    from cxr_node.errors import PreprocessError
    from cxr_node.model.preprocess import check_params, make_params

    over: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"--preprocess {it!r}: expected KEY=VALUE (VALUE as JSON), e.g. clahe_clip_limit=0.02")
        k, v = it.split("=", 1)
        try:
            over[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            over[k.strip()] = v
    if "input_size" in over and over["input_size"] != input_size:
        raise SystemExit("--preprocess input_size=...: use --input-size")
    over["input_size"] = input_size
    try:
        return check_params(make_params(**over))
    except (ValueError, PreprocessError) as e:
        raise SystemExit(f"--preprocess: {e}") from None


def predict_logits(model, cache: np.ndarray, indices: Sequence[int], params: dict, device, batch_size: int = 64,
                   amp: bool = False, channels_last: bool = False) -> np.ndarray:
    """Logits (N, K) for cached films, in order, no augmentation."""
    import torch

    from cxr_node.model.preprocess import normalize_transform

    norm = normalize_transform(params)
    model.eval()
    out = []
    idx = np.asarray(indices, dtype=np.int64)
    with torch.inference_mode():
        for s in range(0, len(idx), batch_size):
            b = torch.from_numpy(cache[idx[s:s + batch_size]].astype(np.float32) / 255.0)[:, None]
            x = norm(b).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, enabled=amp):
                out.append(model(x).float().cpu().numpy())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out)
