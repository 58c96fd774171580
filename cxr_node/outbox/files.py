"""The outbox's one file layout: every result object is ``<outbox_dir>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``.

Written by :class:`cxr_node.outbox.queue.Outbox`, read back by resend, the pipeline (a revised
SR names its predecessor), retention and the web console; all of them take the path from here.
"""

from __future__ import annotations

from pathlib import Path


def result_path(study_uid: str, sop_instance_uid: str) -> Path:
    """The object's path relative to the outbox directory (the UIDs are validated upstream)."""
    return Path(study_uid) / f"{sop_instance_uid}.dcm"
