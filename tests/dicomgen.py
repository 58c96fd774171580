"""Synthetic DICOM files for tests and benchmarks: generated headers, with pixels that are either
noise or pydicom-data's RG1_UNCR chest film resized (see make_cr); no file is committed."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import ComputedRadiographyImageStorage

ROOT = "1.2.826.0.1.3680043.10.1394."  # a test-only UID prefix


def uid() -> str:
    return generate_uid(prefix=ROOT)


@functools.lru_cache(maxsize=8)
def chest_pixels(rows: int, cols: int) -> np.ndarray:
    """RG1_UNCR (pydicom-data, a real PA chest film, MONOCHROME1) as MONOCHROME2 12-bit, rows x cols."""
    import torch
    import torch.nn.functional as F
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    a = dcmread(get_testdata_file("RG1_UNCR.dcm")).pixel_array.astype(np.float32)
    lo, hi = np.percentile(a, [0.5, 99.5])
    a = 1.0 - np.clip((a - lo) / (hi - lo), 0, 1)   # MONOCHROME1 -> MONOCHROME2
    t = F.interpolate(torch.tensor(a)[None, None], size=(rows, cols), mode="area" if rows <= a.shape[0] else "bilinear")
    return np.rint(t[0, 0].numpy() * 4095).astype(np.uint16)


def make_cr(path: Path, *, study_uid: str | None = None, series_uid: str | None = None,
            sop_uid: str | None = None, rows: int = 256, cols: int = 256, patient_name: str = "Test^Patient",
            patient_id: str = "PID-TEST", sop_class: str = ComputedRadiographyImageStorage,
            meta_sop_class: str | None = None, seed: int = 0, omit: tuple[str, ...] = (),
            pixels: str = "chest", raw: dict[str, tuple[str, bytes]] | None = None) -> Path:
    """A CR chest PA film, Explicit VR LE, 16-bit MONOCHROME2 (12 bits stored).

    ``pixels="chest"``: a real chest film (pydicom-data's RG1_UNCR, resized, with a little noise
    drawn from ``seed`` so every file differs): cxr-node analyses it. ``pixels="random"``: uniform
    noise, which cxr-node refuses (no lung fields). rows*cols*2 bytes: 2290x2290 is about 10 MB.
    ``raw``: keyword -> (VR, bytes) written as they are, bypassing pydicom's checks: a malformed
    header as a fuzzer or a broken modality sends it (``{"NumberOfFrames": ("IS", b"abc ")}``).
    """
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or uid()
    ds.StudyInstanceUID = study_uid or uid()
    ds.SeriesInstanceUID = series_uid or uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.StudyDate = "20261123"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixels == "chest":
        film = chest_pixels(rows, cols).astype(np.int32) + rng.integers(-20, 21, size=(rows, cols))
        ds.PixelData = np.clip(film, 0, 4095).astype(np.uint16).tobytes()
    elif pixels == "random":
        ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    else:
        raise ValueError(f"pixels must be 'chest' or 'random' (got {pixels!r})")
    for kw in omit:
        delattr(ds, kw)
    for kw in raw or {}:
        if kw in ds:
            delattr(ds, kw)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = meta_sop_class or sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID if "SOPInstanceUID" not in omit else uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    if meta_sop_class and meta_sop_class != sop_class:
        # pydicom rewrites the meta from the dataset, so put the disagreeing class in by hand
        if len(meta_sop_class) != len(sop_class):
            raise ValueError("meta_sop_class must have the same length as sop_class")
        data = path.read_bytes()
        end = _meta_end(data)
        path.write_bytes(data[:end].replace(sop_class.encode(), meta_sop_class.encode()) + data[end:])
    for kw, (vr, value) in (raw or {}).items():
        _insert_raw(path, keyword_dict[kw], vr, value)
    return path


def _insert_raw(path: Path, tag: int, vr: str, value: bytes) -> None:
    """Put a short-form Explicit VR LE element into the file's dataset at its place in tag order,
    bytes as given (pydicom would convert, and refuse, a malformed value on writing)."""
    import struct

    data = path.read_bytes()
    pos = _meta_end(data)
    while pos < len(data):  # walk the top-level elements to the first one with a greater tag
        group, elem = struct.unpack("<HH", data[pos:pos + 4])
        if (group << 16 | elem) > tag:
            break
        evr = data[pos + 4:pos + 6]
        if evr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR"):
            length = struct.unpack("<I", data[pos + 8:pos + 12])[0]
            pos += 12 + length
        else:
            pos += 8 + struct.unpack("<H", data[pos + 6:pos + 8])[0]
    element = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode() + struct.pack("<H", len(value)) + value
    path.write_bytes(data[:pos] + element + data[pos:])


def make_garbage(path: Path) -> Path:
    """Valid Part 10 file meta, then bytes that are not a dataset."""
    good = make_cr(path, rows=8, cols=8)
    meta_end = _meta_end(good.read_bytes())
    data = good.read_bytes()[:meta_end] + b"\x08\x00\x18\x00ZZ\x10\x00" + b"not a dataset at all" * 4
    path.write_bytes(data)
    return path


def make_truncated(path: Path) -> Path:
    """A whole CR file cut off in the middle of its pixel data."""
    good = make_cr(path, rows=64, cols=64)
    data = good.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    return path


def _meta_end(data: bytes) -> int:
    """Offset of the first dataset byte after the preamble and the group 0002 file meta."""
    import struct

    # 128-byte preamble + "DICM", then (0002,0000) UL group length (explicit VR LE)
    assert data[128:132] == b"DICM"
    group_len = struct.unpack("<I", data[140:144])[0]
    return 144 + group_len


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta: what travels over the network in a C-STORE."""
    data = Path(path).read_bytes()
    return data[_meta_end(data):]


__all__ = ["uid", "make_cr", "make_garbage", "make_truncated", "dataset_bytes", "CTImageStorage"]
