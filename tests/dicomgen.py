"""Synthetic DICOM files for tests and benchmarks (generated, never copied from anywhere)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import ComputedRadiographyImageStorage

ROOT = "1.2.826.0.1.3680043.10.1394."  # a test-only UID prefix


def uid() -> str:
    return generate_uid(prefix=ROOT)


def make_cr(path: Path, *, study_uid: str | None = None, series_uid: str | None = None,
            sop_uid: str | None = None, rows: int = 256, cols: int = 256, patient_name: str = "Test^Patient",
            patient_id: str = "PID-TEST", sop_class: str = ComputedRadiographyImageStorage,
            meta_sop_class: str | None = None, seed: int = 0, omit: tuple[str, ...] = ()) -> Path:
    """A CR chest PA film, Explicit VR LE, 16-bit MONOCHROME2 with random pixels.

    rows*cols*2 bytes of pixel data: 2290x2290 is about 10 MB.
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
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    for kw in omit:
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
    return path


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
