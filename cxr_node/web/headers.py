"""What a reader knows a study by, read from the spooled films' headers: patient name, accession
number, study date and description, station name. The database keeps only what cxr-node needs
to process studies (patient ID, accession), so the console reads the rest from the first
spooled film of each study on the page, header only, and caches it (spooled files never change).

Patient names are shown to logged-in users on the console's pages, never written to a log.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_TAGS = ("PatientName", "PatientID", "AccessionNumber", "StudyDate", "StudyTime", "StudyDescription",
         "StationName", "InstitutionName", "BodyPartExamined", "ViewPosition")


def _text(ds: Any, keyword: str) -> str:  # noqa: ANN401 - a pydicom Dataset
    try:
        v = ds.get(keyword)
    except Exception:  # pydicom converts lazily and raises many types for malformed values
        return ""
    text = str(v or "").strip()
    return "".join(c if c.isprintable() else "?" for c in text)[:128]


def patient_name(raw: str) -> str:
    """A DICOM person name (``FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX``) as a reader writes it:
    ``FAMILY, Given Middle``."""
    parts = [p.strip() for p in raw.split("=")[0].split("^")]
    family, given = (parts + ["", ""])[:2]
    rest = " ".join(p for p in [given] + parts[2:3] if p)
    return f"{family}, {rest}" if family and rest else family or rest


def study_date(raw: str) -> str:
    """``YYYYMMDD`` -> ``YYYY-MM-DD`` (anything else as it is)."""
    return f"{raw[:4]}-{raw[4:6]}-{raw[6:8]}" if len(raw) == 8 and raw.isdigit() else raw


@functools.lru_cache(maxsize=4096)
def _read(path: str) -> dict[str, str]:
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(_TAGS))
    except Exception as e:  # a missing or unreadable file: the page shows what the database has
        log.debug("header of a spooled film cannot be read (%s)", type(e).__name__)
        return {}
    return {k: _text(ds, k) for k in _TAGS}


def read(path: Path | None) -> dict[str, str]:
    """The reader-facing header fields of one spooled film ({} when the file is gone or unreadable):
    ``patient_name`` (formatted), ``patient_id``, ``accession``, ``study_date`` (ISO), ``study_time``,
    ``study_description``, ``station_name``, ``institution``, ``body_part``, ``view``."""
    if path is None or not path.is_file():
        return {}
    h = _read(str(path))
    if not h:
        return {}
    return {"patient_name": patient_name(h["PatientName"]), "patient_id": h["PatientID"],
            "accession": h["AccessionNumber"], "study_date": study_date(h["StudyDate"]),
            "study_time": h["StudyTime"], "study_description": h["StudyDescription"],
            "station_name": h["StationName"], "institution": h["InstitutionName"],
            "body_part": h["BodyPartExamined"], "view": h["ViewPosition"]}
