"""The objects cxr-node writes, built by its own builders from a made-up film, so that the
conformance statement (:mod:`cxr_node.dicom.conformance`) lists what the code writes, not what
someone remembered: the Secondary Capture's attributes and the SR's content tree.

Nothing here is sent anywhere or saved; the film is 64 x 64 synthetic pixels with made-up
identifiers (``SAMPLE^PATIENT``), and the model identity is the bundled checkpoint's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian

_ROOT = "2.25.1"  # made-up UIDs for the made-up film


@dataclass(frozen=True)
class Samples:
    source: Dataset          # the film "received"
    sc: Dataset              # its Secondary Capture, as build_sc makes it
    sr: Dataset              # the study's SR: the film analysed, a second film refused
    labels: tuple[str, ...]  # the bundled model's classes


def film() -> Dataset:
    """A CR chest PA film as a modality sends it (header and 64 x 64 pixels)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, f"{_ROOT}.3.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{_ROOT}.1", f"{_ROOT}.2"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "SAMPLE^PATIENT", "P1", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261206", "120000", "A1", "1"
    ds.ReferringPhysicianName, ds.StudyDescription = "REFERRER^SAMPLE", "XR CHEST PA"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CR", 1, 7
    ds.BodyPartExamined, ds.ViewPosition, ds.PatientOrientation = "CHEST", "PA", ["L", "F"]
    ds.Manufacturer, ds.StationName, ds.ImagerPixelSpacing = "SAMPLE", "CR ROOM 1", [0.2, 0.2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", 64, 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(64 * 64, dtype=np.uint16) % 4096).tobytes()
    return ds


def build() -> Samples:
    """The SC and SR that cxr-node's builders make for :func:`film` with the bundled model."""
    from cxr_node.config import BUNDLED_CHECKPOINT
    from cxr_node.eligibility.refusal import Refusal, RefusalCode
    from cxr_node.encode.identity import ModelIdentity
    from cxr_node.encode.sc import build_sc
    from cxr_node.encode.sr import AnalysedFilm, RefusedFilm, build_sr
    from cxr_node.model.checkpoint import read_checkpoint
    from cxr_node.model.infer import Prediction
    from cxr_node.model.policy import TriagePolicy

    ck = read_checkpoint(BUNDLED_CHECKPOINT)
    meta: dict[str, Any] = {**ck["meta"], "weights_sha256": ck["sha256"]}  # as load_checkpoint gives it
    labels = tuple(meta["labels"])
    model = ModelIdentity.from_meta(meta)
    probs = tuple([0.9] + [0.1 / (len(labels) - 1)] * (len(labels) - 1))
    pred = TriagePolicy.from_meta(meta).apply(Prediction(
        labels=labels, probabilities=probs, top_label=labels[0], top_probability=probs[0],
        model_version=model.version, model_arch=model.arch, weights_sha256=model.weights_sha256,
        cam=np.full((8, 8), 0.5, dtype=np.float32), cam_label=labels[0]))
    source = film()
    sc = build_sc(source, np.full((64, 64), 0.5, dtype=np.float32), pred, model, instance_number=1)
    lateral = film()
    lateral.SOPInstanceUID, lateral.ViewPosition = f"{_ROOT}.3.2", "LL"
    sr = build_sr([AnalysedFilm(source, sc, pred)], model, study_version=1,
                  refused=[RefusedFilm(lateral, Refusal(RefusalCode.HEADER, "ViewPosition is LL"))])
    return Samples(source, sc, sr, labels)


def content_tree(sr: Dataset) -> list[tuple[int, str, str, str]]:
    """The SR's content items in document order: (depth, relationship, value type, concept name),
    consecutive repeats (one probability per class) written once with a count."""
    rows: list[tuple[int, str, str, str]] = []

    def name(item: Dataset) -> str:
        c = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
        return f"({c.CodeValue}, {c.CodingSchemeDesignator}, \"{c.CodeMeaning}\")" if c else "-"

    def value(item: Dataset) -> str:
        if item.ValueType == "CODE" and "ConceptCodeSequence" in item:
            c = item.ConceptCodeSequence[0]
            return f" = ({c.CodeValue}, {c.CodingSchemeDesignator}, \"{c.CodeMeaning}\")"
        return ""

    def walk(items, depth: int) -> None:
        for item in items:
            rows.append((depth, item.get("RelationshipType", ""), item.ValueType, name(item) + value(item)))
            if "ContentSequence" in item:
                walk(item.ContentSequence, depth + 1)

    rows.append((0, "", sr.ValueType, name(sr)))
    walk(sr.ContentSequence, 1)
    return rows
