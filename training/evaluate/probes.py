"""Out-of-domain probe sets: images that are not frontal human chest films, written as files.

    python -m training.evaluate.probes --out runs/probes [--dicom-samples DIR] [--laterals DIR]

Two disjoint sets, so the refusal threshold is chosen on one and measured on the other:

* ``val``: scikit-image photographs A, noise and gradients, text pages (seeds A), inverted chest
  films (a MONOCHROME1 film shown without inversion);
* ``test``: other scikit-image photographs and patterns (B), noise and text pages with other
  seeds, CT and MR slices (pydicom's test files) rendered as 2-D films, the tibia radiograph
  (pydicom-data ``RG3_J2KI``), and, when given, real DICOM negatives (e.g. a veterinary thorax) and
  lateral chest views.

The lung segmenter was trained with photographs of set A's kind as negatives, never with set B,
CT/MR, radiographs of other body parts or laterals: those measure the principle, not the list.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from training.train.lungseg import text_page

PHOTOS_A = ("camera", "astronaut", "coffee", "coins", "moon", "page", "brick", "grass")
PHOTOS_B = ("horse", "hubble_deep_field", "retina", "cell", "clock", "immunohistochemistry",
            "shepp_logan_phantom", "chelsea", "rocket", "cat", "logo", "microaneurysms", "colorwheel",
            "checkerboard", "binary_blobs", "text", "gravel")


def _gray(name: str) -> np.ndarray:
    from skimage import color, data

    a = getattr(data, name)()
    if a.ndim == 3:
        a = color.rgb2gray(a[..., :3])
    a = a.astype(np.float32)
    return (a - a.min()) / (np.ptp(a) + 1e-6)


def _png(a: np.ndarray, path: Path, min_size: int = 256) -> None:
    from PIL import Image

    img = Image.fromarray(np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8))
    if min(img.size) < min_size:
        s = min_size / min(img.size)
        img = img.resize((round(img.size[0] * s), round(img.size[1] * s)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _synthetic(kind: str, rng: np.random.Generator, size: int = 320) -> np.ndarray:
    import scipy.ndimage as ndi

    if kind == "noise":
        a = rng.random((size, size)).astype(np.float32)
        return ndi.gaussian_filter(a, float(rng.uniform(0, 4)))
    if kind == "gradient":
        yy, xx = np.mgrid[0:size, 0:size] / size
        return (np.sin(xx * rng.uniform(2, 30)) * np.cos(yy * rng.uniform(2, 30)) + 1) / 2
    if kind == "text":
        return text_page(rng, size)
    raise ValueError(kind)


def write_probes(out: Path, chest_films_for_inversion: dict[str, Sequence[Path]] | None = None,
                 dicom_samples: Path | None = None, laterals: Path | None = None, n_synthetic: int = 12) -> dict:
    """Write both sets under ``out/val`` and ``out/test``; returns {set: {kind: [paths]}}."""
    from pydicom.data import get_testdata_file

    out = Path(out)
    made: dict[str, dict[str, list[Path]]] = {"val": {}, "test": {}}

    def add(split: str, kind: str, path: Path) -> None:
        made[split].setdefault(kind, []).append(path)

    for split, names, seed in (("val", PHOTOS_A, 11), ("test", PHOTOS_B, 23)):
        for name in names:
            p = out / split / "photo" / f"{name}.png"
            _png(_gray(name), p)
            add(split, "photograph or pattern", p)
        rng = np.random.default_rng(seed)
        for kind in ("noise", "gradient", "text"):
            for i in range(n_synthetic):
                p = out / split / kind / f"{kind}-{i}.png"
                _png(_synthetic(kind, rng), p)
                add(split, {"noise": "noise", "gradient": "pattern", "text": "text page"}[kind], p)
        for i, film in enumerate((chest_films_for_inversion or {}).get(split, [])):
            from PIL import Image

            a = np.asarray(Image.open(film).convert("L"), dtype=np.float32) / 255.0
            p = out / split / "inverted" / f"inverted-{i}.png"
            _png(1.0 - a, p)
            add(split, "inverted chest film", p)
    for name, kind in (("CT_small.dcm", "CT slice"), ("MR_small.dcm", "MR slice"), ("RG3_J2KI.dcm", "tibia radiograph")):
        src = get_testdata_file(name)
        if src:
            p = out / "test" / "dicom" / name
            p.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, p)
            add("test", kind, p)
    if dicom_samples and (Path(dicom_samples) / "dx_image.dcm").is_file():
        p = out / "test" / "dicom" / "dx_image.dcm"
        shutil.copyfile(Path(dicom_samples) / "dx_image.dcm", p)
        add("test", "veterinary thorax (dog, lateral)", p)
    if laterals:
        for f in sorted(Path(laterals).glob("*.png")):
            add("test", "lateral chest view", f)
    return made


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate.probes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dicom-samples", help="folder with real DICOM negatives (dx_image.dcm: a dog thorax)")
    ap.add_argument("--laterals", help="folder of lateral chest views (PNG)")
    a = ap.parse_args(argv)
    made = write_probes(Path(a.out), dicom_samples=a.dicom_samples, laterals=a.laterals)
    for split, kinds in made.items():
        print(split, {k: len(v) for k, v in kinds.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
