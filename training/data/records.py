"""Dataset readers, the grouped stratified split, and the uint8 cache of preprocessed films.

A dataset is a list of :class:`Record` (path, label, group). It comes from either

* a folder-per-class tree: ``DIR/<label>/*.{png,jpg,jpeg,dcm}`` (each file its own group), or
* a manifest CSV with at least ``path,label`` (paths relative to the CSV's folder, or absolute);
  rows that share a non-empty ``group``, ``patient_id`` or ``near_dup_group`` are one group and stay
  in one split. The merged manifests written by ``python -m training.data.sources build`` add
  ``source``, ``site``, ``split`` (used as the split when every kept row has one) and ``exclude``
  (a reason; rows with one are skipped here but still count for grouping).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

FILE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    path: str  # absolute
    label: str
    group: str  # records sharing a group stay in one split
    relpath: str  # as named in the manifest / relative to the tree root
    source: str = ""  # merged manifests: the source folder's name (e.g. "nih")
    site: str = ""  # merged manifests: hospital / site, where known
    split: str = ""  # merged manifests: the builder's split (train/val/test)


def read_dataset(source: str | os.PathLike[str]) -> list[Record]:
    """Records from a folder-per-class tree or a manifest CSV, in a stable order."""
    src = Path(source)
    if src.is_dir():
        manifest = src / "manifest.csv"
        if manifest.is_file():
            return read_manifest(manifest)
        return read_tree(src)
    if src.is_file() and src.suffix.lower() == ".csv":
        return read_manifest(src)
    raise FileNotFoundError(f"{src}: not a folder-per-class directory or a manifest .csv file")


def read_tree(root: Path) -> list[Record]:
    recs = []
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(cls_dir.rglob("*")):
            if f.is_file() and f.suffix.lower() in FILE_SUFFIXES:
                rel = f.relative_to(root).as_posix()
                recs.append(Record(str(f.resolve()), cls_dir.name, f"file:{rel}", rel))
    if not recs:
        raise FileNotFoundError(f"{root}: no class folders with .png/.jpg/.dcm files")
    return recs


class UnionFind:
    """Disjoint sets of string keys (path halving; the smaller key names a set)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def read_manifest(csv_path: Path, include_excluded: bool = False) -> list[Record]:
    """Records of a manifest CSV. Rows with a non-empty ``exclude`` column (a reason written by
    ``training.data.sources``) are skipped unless ``include_excluded``; they still join groups, so a
    kept film is grouped with its dropped copies' patients."""
    csv_path = Path(csv_path)
    root = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames or "label" not in reader.fieldnames:
            raise ValueError(f"{csv_path}: manifest needs columns path,label (has {reader.fieldnames})")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{csv_path}: manifest has no rows")
    uf = UnionFind()
    for i, r in enumerate(rows):
        node = f"row:{i}"
        uf.find(node)
        for col in ("group", "patient_id", "near_dup_group"):
            v = (r.get(col) or "").strip()
            if v:
                src = (r.get("source") or "").strip()  # patient ids are per source
                uf.union(node, f"{col}:{src}:{v}" if src and col != "group" else f"{col}:{v}")
    recs = []
    for i, r in enumerate(rows):
        if (r.get("exclude") or "").strip() and not include_excluded:
            continue
        rel = r["path"].strip()
        p = Path(rel)
        p = p if p.is_absolute() else root / p
        label = r["label"].strip()
        if not label:
            raise ValueError(f"{csv_path}: row {i + 2} has an empty label")
        split = (r.get("split") or "").strip()
        if split and split not in SPLITS:
            raise ValueError(f"{csv_path}: row {i + 2} has split {split!r}; expected one of {', '.join(SPLITS)}")
        recs.append(Record(str(p), label, uf.find(f"row:{i}"), rel, source=(r.get("source") or "").strip(),
                           site=(r.get("site") or "").strip(), split=split))
    if not recs:
        raise ValueError(f"{csv_path}: every row is excluded")
    return recs


def manifest_split(records: Sequence[Record]) -> dict[str, str] | None:
    """relpath -> split from the manifest's own ``split`` column, if every record has one."""
    if records and all(r.split for r in records):
        return {r.relpath: r.split for r in records}
    return None


def manifest_sha256(records: Sequence[Record]) -> str:
    """Hash of the training data listing: sorted (relpath, label) lines."""
    h = hashlib.sha256()
    for rel, label in sorted((r.relpath, r.label) for r in records):
        h.update(f"{rel}\t{label}\n".encode("utf-8"))
    return h.hexdigest()


def grouped_stratified_split(records: Sequence[Record], fractions: Sequence[float] = (0.70, 0.15, 0.15),
                             seed: int = 42, stratum: Callable[[Record], str] | None = None) -> dict[str, str]:
    """relpath -> split name. Per stratum (default: the label; ``training.data.sources`` uses
    source/label), groups are shuffled with ``seed`` and dealt to the splits so each split gets about
    its fraction of that stratum's images; a group never straddles splits. Groups with mixed strata
    are assigned by their most common stratum."""
    key = stratum or (lambda r: r.label)
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1 (got {fractions})")
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.group].append(r)
    by_label: dict[str, list[str]] = defaultdict(list)
    for g, rs in groups.items():
        by_label[Counter(key(r) for r in rs).most_common(1)[0][0]].append(g)
    rng = np.random.default_rng(seed)
    assign: dict[str, str] = {}
    for label in sorted(by_label):
        gs = sorted(by_label[label])
        rng.shuffle(gs)
        total = sum(len(groups[g]) for g in gs)
        targets = [f * total for f in fractions]
        counts = [0, 0, 0]
        # largest groups first so they do not overshoot late; stable by shuffled order
        for g in sorted(gs, key=lambda g: -len(groups[g])):
            n = len(groups[g])
            # the split furthest below its target (relative) takes it
            deficits = [(targets[i] - counts[i]) / max(targets[i], 1e-9) for i in range(3)]
            i = int(np.argmax(deficits))
            counts[i] += n
            for r in groups[g]:
                assign[r.relpath] = SPLITS[i]
    return assign


def save_split(assign: Mapping[str, str], records: Sequence[Record], out_dir: Path, seed: int,
               source: str) -> tuple[Path, Path]:
    """Write split.csv (relpath,label,group,split) and split.json (seed, counts, source)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "split.csv", out_dir / "split.json"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group", "split"])
        for r in records:
            w.writerow([r.relpath, r.label, r.group, assign[r.relpath]])
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for r in records:
        c = counts[assign[r.relpath]]
        c[r.label] = c.get(r.label, 0) + 1
    json_path.write_text(json.dumps({"seed": seed, "fractions": [0.70, 0.15, 0.15], "source": source,
                                     "manifest_sha256": manifest_sha256(records), "counts": counts},
                                    indent=2) + "\n", encoding="utf-8")
    return csv_path, json_path


def load_split(path: Path) -> dict[str, str]:
    """relpath -> split from a split.csv written by :func:`save_split`."""
    with open(path, newline="", encoding="utf-8") as f:
        return {row["path"]: row["split"] for row in csv.DictReader(f)}


def find_split_file(checkpoint: Path) -> Path | None:
    p = Path(checkpoint).resolve().parent / "split.csv"
    return p if p.is_file() else None


def select(records: Sequence[Record], assign: Mapping[str, str] | None, split: str | None) -> list[Record]:
    if split in (None, "all"):
        return list(records)
    if assign is None:
        raise ValueError(f"--split {split} needs a split file (split.csv next to the checkpoint, or --split-file)")
    missing = [r.relpath for r in records if r.relpath not in assign]
    if len(missing) == len(records):
        raise ValueError("none of the dataset's files is named in the split file: wrong data or split file")
    return [r for r in records if assign.get(r.relpath) == split]


# --------------------------------------------------------------------------- uint8 cache


_PACK: Any = None  # training.data.filmpack.FilmPack, set by use_pack()


def use_pack(path: str | os.PathLike[str] | None) -> None:
    """Read films from a film pack (``python -m training.data.pack``) instead of the source images, for
    the rest of the process (train, calibrate, evaluate and lso take ``--film-pack``)."""
    global _PACK
    if not path:
        _PACK = None
        return
    from training.data.filmpack import FilmPack

    _PACK = FilmPack(path)
    log.info("reading films from pack %s (%d films, %s)", path, len(_PACK), _PACK.codec)


def _from_pack(records: Sequence[Record], params: Mapping[str, Any]) -> np.ndarray:
    if not _PACK.matches(params):
        raise SystemExit(f"film pack {_PACK.path} was made with other preprocessing parameters "
                         f"({json.dumps(_PACK.params, sort_keys=True)}) than this run's "
                         f"({json.dumps(dict(params), sort_keys=True)}): build a pack with this run's --preprocess")
    missing = [r.path for r in records if r.path not in _PACK]
    if missing:
        raise SystemExit(f"film pack {_PACK.path} lacks {len(missing)} of {len(records)} films, e.g. {missing[0]}: "
                         "build it from the same manifest (or use its --manifest-out)")
    size = int(params["input_size"])
    arr = np.zeros((len(records), size, size), dtype=np.uint8)
    for i, r in enumerate(records):
        arr[i] = _PACK.get(r.path)
    return arr


def _cache_key(records: Sequence[Record], params: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(dict(params), sort_keys=True).encode())
    for r in records:
        h.update(f"{r.path}\n".encode())
    return h.hexdigest()[:16]


def build_cache(records: Sequence[Record], params: Mapping[str, Any], cache_dir: Path,
                show_progress: bool = True) -> np.ndarray:
    """Preprocess every record once (cxr_node.model.preprocess.base_transform) into a uint8 array
    ``(N, S, S)`` stored as ``cache_dir/cache-<key>.npy``; reused when the key matches."""
    if _PACK is not None:
        return _from_pack(records, params)
    from cxr_node.model.preprocess import base_transform, to_uint8

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(records, params)
    path = cache_dir / f"cache-{key}.npy"
    if path.is_file():
        arr = np.load(path, mmap_mode="r")
        if arr.shape[0] == len(records):
            log.info("using preprocessed cache %s (%d films)", path, len(records))
            return np.asarray(arr)
    size = int(params["input_size"])
    arr = np.zeros((len(records), size, size), dtype=np.uint8)
    tf = base_transform(params)
    it: Iterable[int] = range(len(records))
    if show_progress:
        from tqdm import tqdm

        it = tqdm(it, desc="preprocess", unit="film", mininterval=5.0)
    for i in it:
        arr[i] = to_uint8(tf(records[i].path)[0])
    tmp = cache_dir / f".cache-{key}.tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)
    log.info("wrote preprocessed cache %s (%d films, %.1f MB)", path, len(records), arr.nbytes / 1e6)
    return arr
