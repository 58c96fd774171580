"""What the node knows of one association: who called, from where, and what it delivered.

Made by the Storage SCP (:mod:`cxr_node.receive.scp`) when an association is requested; ingest
(:mod:`cxr_node.receive.ingest`) records its fields on every audit row it writes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AssociationInfo:
    id: str
    calling_aet: str
    called_aet: str
    host: str
    port: int
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0
    rejected: bool = False
    abort_reason: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fields(self) -> dict[str, Any]:
        return {"association_id": self.id, "calling_aet": self.calling_aet, "called_aet": self.called_aet,
                "host": self.host, "port": self.port}

    def counts(self) -> dict[str, int]:
        return {"stored": self.stored, "duplicates": self.duplicates, "failed": self.failed, "bytes": self.bytes}
