"""Who made a result: the model's identity, and UIDs derived deterministically from it.

Every UID cxr-node mints is a UUID-derived UID (PS3.5 B.2, root ``2.25``) of a name built from
the model's Device UID and the source's UIDs, so a retry or a restart produces the same UIDs
and a PACS never receives a second copy. The Device UID itself is derived from the sha256 of
the model's weights: new weights, new device.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from cxr_node import __version__

MANUFACTURER = "cxr-node project"
DEVICE_NAME = "cxr-node"
_NAMESPACE = uuid.UUID("6b1f5c9e-2f4b-5d0e-9a57-0c8d1f6b2a11")


def derived_uid(*parts: str) -> str:
    """A stable UID (``2.25.<uuid5 as integer>``, at most 44 characters) for a name."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, '/'.join(parts)).int}"


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    arch: str
    weights_sha256: str
    labels: tuple[str, ...]
    thresholds: Mapping[str, float] = field(default_factory=dict)
    #: which operating points these results used: "model" (the checkpoint's own) or "site <station> vN"
    #: (cxr-node calibrate-site); the SR's algorithm parameters and the SC legend name it
    calibration: str = "model"
    temperature: float | None = None  # the site calibration's temperature (None: the checkpoint's)
    #: the operating point on p(abnormal) these results used (None: the model has no abnormality output);
    #: whose it is says ``calibration`` ("model": not yet calibrated at this site)
    abnormal_threshold: float | None = None

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "ModelIdentity":
        return cls(name=f"cxr-node {meta['arch']}", version=str(meta["version"]), arch=str(meta["arch"]),
                   weights_sha256=str(meta["weights_sha256"]), labels=tuple(meta["labels"]),
                   thresholds={k: float(v) for k, v in dict(meta.get("thresholds", {})).items()},
                   abnormal_threshold=float(meta["abnormality"]["threshold"]) if meta.get("abnormality") else None)

    @property
    def device_uid(self) -> str:
        return derived_uid("device", self.weights_sha256)

    @property
    def software_versions(self) -> list[str]:
        return [f"cxr-node {__version__}", f"model {self.version}"]

    def sc_series_uid(self, study_uid: str) -> str:
        return derived_uid(self.device_uid, study_uid, "sc-series")

    def sc_uid(self, source_sop_uid: str) -> str:
        return derived_uid(self.device_uid, source_sop_uid, "sc")

    def sr_series_uid(self, study_uid: str) -> str:
        return derived_uid(self.device_uid, study_uid, "sr-series")

    def sr_uid(self, study_uid: str, study_version: int) -> str:
        return derived_uid(self.device_uid, study_uid, str(study_version), "sr")

    def tracking_uid(self, source_sop_uid: str) -> str:
        return derived_uid(self.device_uid, source_sop_uid, "tracking")


def contributing_equipment(model: ModelIdentity):
    """Contributing Equipment item (Purpose: Processing Algorithm) with the weights' Device UID."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    eq = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=Code("109103", "DCM", "Processing Algorithm"),
        manufacturer_model_name=model.name[:64],
        software_versions=model.software_versions,
    )
    eq.DeviceUID = model.device_uid
    return eq


#: Patient and study attributes of Type 2 (present, maybe empty) that highdicom copies from the
#: source. Real films sometimes lack them; an empty value is what DICOM says to send then.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "AccessionNumber", "StudyID")


#: Enumerated values highdicom checks when it copies them (its constructors raise ValueError for
#: any other, which failed the whole study with no result: issue 30); another value is sent empty
_ENUMERATED = {"PatientSex": ("M", "F", "O", "")}


def with_type2(source):
    """A shallow copy of ``source`` with missing Type 2 patient/study attributes present and empty,
    and enumerated ones highdicom would refuse (``PatientSex`` ``X``) empty."""
    missing = [kw for kw in _TYPE2 if kw not in source]
    bad = [kw for kw, ok in _ENUMERATED.items() if kw in source and str(source.get(kw) or "").strip() not in ok]
    if not missing and not bad:
        return source
    ds = source.copy()
    for kw in missing + bad:
        setattr(ds, kw, "")
    return ds
