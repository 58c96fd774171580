"""One interface for every channel the outbox sends on: ``send(settings, destination, files)``
returns one :class:`~cxr_node.dicom.status.SendOutcome` per file (sent, transient, permanent), and
``echo`` checks a destination answers. The queue (retries, backoff, dead letters, audit) is the
same whatever the kind: C-STORE (cxr_node.outbox.send) or DICOMweb STOW-RS (cxr_node.outbox.stow).
Notifications (HL7 v2, FHIR) have their own queue with the same rules (cxr_node.outbox.notify).
"""

from __future__ import annotations

from typing import Sequence

from cxr_node.config import Destination, Settings
from cxr_node.config.channels import DICOMWEB
from cxr_node.dicom.status import PERMANENT, SendOutcome
from cxr_node.outbox.send import FileToSend, store_files


def send(settings: Settings, dest: Destination, files: Sequence[FileToSend]) -> list[SendOutcome]:
    if dest.kind != DICOMWEB:
        return store_files(settings, dest, files)
    from cxr_node.outbox import stow

    out: list[SendOutcome | None] = [None] * len(files)
    ready: list[tuple[int, str, bytes]] = []
    for i, f in enumerate(files):
        try:
            ready.append((i, f.sop_instance_uid, f.path.read_bytes()))
        except OSError as e:
            out[i] = SendOutcome(PERMANENT, None, f"result file unreadable: {e.strerror} (`cxr-node reprocess` "
                                 "makes new ones)")
    for (i, _, _), oc in zip(ready, stow.store(dest, [(u, b) for _, u, b in ready])):
        out[i] = oc
    return out  # type: ignore[return-value]


def echo(settings: Settings, dest: Destination, timeout: float) -> tuple[bool, str]:
    """(answered, one line) for ``cxr-node echo --to``: C-ECHO, or a QIDO-RS probe for DICOMweb."""
    if dest.kind == DICOMWEB:
        import dataclasses

        from cxr_node.outbox import stow

        return True, stow.echo(dataclasses.replace(dest, timeout=timeout))
    from cxr_node.outbox.send import echo as c_echo

    status = c_echo(settings, dest, timeout=timeout)
    return status == 0, (f"C-ECHO {dest.name} ({dest.ae_title}@{dest.host}:{dest.port}{' over TLS' if dest.tls else ''}): "
                         f"status 0x{status:04X} " + ("Success" if status == 0 else "failed"))
