"""Audit rows that could not reach the database, kept on disk until they can.

When the database is down the receiver still answers every peer (0xA700 for a store, success for
an echo) and each of those answers is an audit event. Instead of only logging them, the event goes
into an append-only JSON-lines file (fsynced, owner-only) under ``data_dir/audit-backlog/``, one
file per node. A scheduler job replays the file into the hash-chained trail once the database is
back: each row keeps its original time, and its ``detail`` says ``"audit_backlog": true`` so an
admin can see it was written late. Rows are replayed in one transaction and the file is removed
only after the commit, so a failed replay loses nothing and is tried again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from cxr_node.audit import trail as audit
from cxr_node.db.models import utcnow

log = logging.getLogger(__name__)


class AuditBacklog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.replaying = self.path.with_suffix(self.path.suffix + ".replaying")
        self._lock = threading.Lock()

    def add(self, event: str, outcome: str, fields: dict[str, Any], ts: dt.datetime | None = None) -> bool:
        """Append one event durably; False (and an ERROR line) if even the disk refuses it."""
        rec = {"event": event, "outcome": outcome, "ts": (ts or utcnow()).isoformat(), "fields": fields}
        line = json.dumps(rec, default=str, separators=(",", ":")) + "\n"
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    os.write(fd, line.encode("utf-8"))
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as e:
            log.error("audit event %s lost: database and audit backlog %s both failed (%s)", event, self.path,
                      e.strerror or e)
            return False
        return True

    def pending(self) -> int:
        """Events waiting to be replayed."""
        n = 0
        for p in (self.replaying, self.path):
            try:
                with open(p, "rb") as f:
                    n += sum(1 for line in f if line.strip())
            except FileNotFoundError:
                pass
        return n

    def replay(self, db) -> int:  # noqa: ANN001 - a cxr_node.db.session.Database
        """Write waiting events into the audit trail; returns how many. Raises SQLAlchemyError while
        the database is still down (the file stays for the next try)."""
        with self._lock:
            if not self.replaying.exists():
                if not self.path.exists() or self.path.stat().st_size == 0:
                    return 0
                os.replace(self.path, self.replaying)  # new failures go to a fresh file meanwhile
        records = []
        for i, line in enumerate(self.replaying.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                records.append((rec["event"], rec["outcome"], dt.datetime.fromisoformat(rec["ts"]),
                                dict(rec["fields"])))
            except (ValueError, KeyError, TypeError) as e:  # a torn last line after a crash
                log.warning("audit backlog %s line %d unreadable, skipped: %s", self.replaying, i, e)
        with db.transaction() as s:
            for event, outcome, ts, fields in records:
                fields["detail"] = {**(fields.get("detail") or {}), "audit_backlog": True}
                audit.record(s, event, outcome, ts=ts, **fields)
        self.replaying.unlink()
        if records:
            log.warning("audit backlog: wrote %d event(s) kept while the database was unreachable", len(records))
        return len(records)
