"""The film pack's format: preprocessed films (uint8, one codec) keyed by path, with the
preprocessing parameters they were made with. Written by ``python -m training.data.pack``
(:mod:`training.data.pack`), read by :func:`training.data.records.use_pack`.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

FORMAT = "cxr-node film pack 1"


def encode_film(img: np.ndarray, codec: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if codec == "png":
        Image.fromarray(img).save(buf, "PNG")
    elif codec.startswith("jpeg:"):
        Image.fromarray(img).save(buf, "JPEG", quality=int(codec.split(":", 1)[1]))
    else:
        raise ValueError(f"unknown codec {codec!r} (png, jpeg:QUALITY)")
    return buf.getvalue()


def check_codec(codec: str) -> str:
    if codec == "png":
        return codec
    if codec.startswith("jpeg:") and codec.split(":", 1)[1].isdigit() and 50 <= int(codec.split(":", 1)[1]) <= 100:
        return codec
    raise argparse.ArgumentTypeError(f"{codec!r}: expected png or jpeg:QUALITY (50-100)")


class FilmPack:
    """A pack opened for reading: ``pack.get(path)`` -> (S, S) uint8, ``path in pack``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with np.load(self.path, allow_pickle=False) as z:
            if str(z["format"]) != FORMAT:
                raise ValueError(f"{self.path}: not a film pack ({z['format']!s})")
            self.params = json.loads(str(z["params"]))
            self.codec = str(z["codec"])
            keys = [str(k) for k in z["keys"]]
            self.offsets = z["offsets"].astype(np.int64)
            self.blob = z["blob"]
        self.index = {k: i for i, k in enumerate(keys)}

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def matches(self, params: Mapping[str, Any]) -> bool:
        return json.dumps(dict(params), sort_keys=True) == json.dumps(self.params, sort_keys=True)

    def get(self, key: str) -> np.ndarray:
        from PIL import Image

        i = self.index[key]
        raw = self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes()
        return np.asarray(Image.open(io.BytesIO(raw)).convert("L"), dtype=np.uint8)


def write_pack(path: Path, keys: Sequence[str], images: Sequence[bytes], params: Mapping[str, Any], codec: str) -> None:
    offsets = np.zeros(len(images) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in images])
    blob = np.frombuffer(b"".join(images), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, format=np.array(FORMAT), params=np.array(json.dumps(dict(params), sort_keys=True)),
             codec=np.array(codec), keys=np.array(list(keys)), offsets=offsets, blob=blob)
    tmp.replace(path)
