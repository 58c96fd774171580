"""Durable storage of received instances.

An instance is written to a temp file under ``<data_dir>/incoming/`` (same filesystem as the
spool), fsynced, then renamed to ``<data_dir>/spool/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``
and the directory fsynced. Readers of the spool therefore only ever see whole files; a crash
leaves at most a temp file in ``incoming/``, which ``Spool.prepare()`` removes at start-up.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from pathlib import Path

from cxr_node.errors import SpoolError

from cxr_node.dicom.uids import is_valid_uid

log = logging.getLogger(__name__)

_PART_SUFFIX = ".part"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, spool_dir: Path, incoming_dir: Path) -> None:
        self.spool_dir = spool_dir
        self.incoming_dir = incoming_dir

    def prepare(self) -> list[Path]:
        """Create the directories (owner-only) and remove partial temp files; return those removed."""
        removed = []
        for d in (self.spool_dir, self.incoming_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for p in self.incoming_dir.iterdir():
            if p.is_file():
                p.unlink()
                removed.append(p)
        return removed

    def relative_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                          ("SOPInstanceUID", sop_instance_uid)):
            if not is_valid_uid(uid):
                raise ValueError(f"{name} {uid!r} is not a valid UID")
        return Path(study_uid) / series_uid / f"{sop_instance_uid}.dcm"

    def write_temp(self, data: bytes | memoryview, name_hint: str) -> Path:
        """Write ``data`` to a new temp file and fsync it. Raises SpoolError; leaves nothing behind."""
        tmp = self.incoming_dir / f"{name_hint}.{uuid.uuid4().hex}{_PART_SUFFIX}"
        fd = -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except OSError as e:
            self._discard(tmp)
            raise SpoolError(_describe(e, "writing")) from e
        finally:
            if fd >= 0:
                os.close(fd)
        return tmp

    def commit(self, tmp: Path, relative: Path) -> Path:
        """Atomically move a temp file to its place in the spool and fsync the directories."""
        final = self.spool_dir / relative
        try:
            created = [p for p in (final.parent.parent, final.parent) if not p.exists()]
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            for p in created:  # make new directory entries durable too
                _fsync_dir(p.parent)
        except OSError as e:
            self._discard(tmp)
            raise SpoolError(_describe(e, "renaming into the spool")) from e
        return final

    def remove(self, relative: Path) -> None:
        try:
            (self.spool_dir / relative).unlink()
        except FileNotFoundError:
            pass

    def discard(self, tmp: Path) -> None:
        self._discard(tmp)

    @staticmethod
    def _discard(tmp: Path) -> None:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:  # the start-up sweep of incoming/ will get it
            log.error("could not remove temp file %s: %s", tmp, e)

    def iter_files(self):
        """Every spooled ``.dcm`` file, as paths relative to the spool directory."""
        for p in self.spool_dir.rglob("*.dcm"):
            yield p.relative_to(self.spool_dir)


def _describe(e: OSError, doing: str) -> str:
    if e.errno == errno.ENOSPC:
        return f"disk full while {doing} (free space on the data_dir filesystem)"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded while {doing}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write while {doing}: {e.strerror} (check data_dir ownership)"
    return f"I/O error while {doing}: {e.strerror or e}"
