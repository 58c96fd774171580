"""The DICOM Conformance Statement is the code's: docs/conformance.md is what `cxr-node
conformance` writes from the accepted contexts, the status table and the builders, and the
Implementation Class UID and Version Name it states are the ones peers see on the wire."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import REPO, free_port, require_tool, wait_port

from cxr_node.dicom import uids


def test_the_checked_in_statement_is_what_the_code_writes():
    from cxr_node.dicom.conformance import statement

    doc = statement()
    shipped = (REPO / "docs" / "conformance.md").read_text()
    assert shipped == doc, ("docs/conformance.md differs from the code: regenerate it with "
                            "`cxr-node conformance > docs/conformance.md` and review the diff")
    # it reads the real tables: every status the receiver sends, every accepted transfer syntax
    from cxr_node.dicom.status import RECEIVER
    from cxr_node.receive.scp import TRANSFER_SYNTAXES

    assert all(f"| 0x{code:04X} |" in doc for code in RECEIVER)
    assert all(f"`{ts}`" in doc for ts in TRANSFER_SYNTAXES)
    assert "TID 1500" in doc and "(122157, DCM, \"Probability\")" in doc and "| PatientName | copied from the film |" in doc
    assert uids.IMPLEMENTATION_CLASS_UID in doc and uids.implementation_version_name() in doc


def test_peers_see_our_implementation_class_uid_and_version_name(tmp_path: Path):
    """As SCU (C-ECHO to dcmtk storescp) and as SCP (dcmtk echoscu to the receiver's own AE)."""
    from cxr_node.config import Destination, parse
    from cxr_node.outbox.send import echo
    from cxr_node.receive.scp import build_ae

    storescp, echoscu = require_tool("storescp", "dcmtk"), require_tool("echoscu", "dcmtk")
    settings = parse({"node": {"host": "127.0.0.1", "port": free_port()}}, base_dir=tmp_path)
    port = free_port()
    log = tmp_path / "storescp.log"
    with log.open("w") as f:
        peer = subprocess.Popen([storescp, "-d", "-od", str(tmp_path), str(port)], stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc=peer)
        assert echo(settings, Destination("peer", "STORESCP", "127.0.0.1", port, False)) == 0
    finally:
        peer.terminate()
        peer.wait(timeout=10)
    seen = log.read_text()
    assert f"Their Implementation Class UID:    {uids.IMPLEMENTATION_CLASS_UID}" in seen, seen[-2000:]
    assert f"Their Implementation Version Name: {uids.implementation_version_name()}" in seen

    ae = build_ae(settings)
    server = ae.start_server(("127.0.0.1", settings.node.port), block=False)
    try:
        p = subprocess.run([echoscu, "-d", "-aec", "CXRNODE", "127.0.0.1", str(settings.node.port)],
                           capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
    assert p.returncode == 0, p.stderr
    out = p.stdout + p.stderr
    assert f"Their Implementation Class UID:    {uids.IMPLEMENTATION_CLASS_UID}" in out, out[-2000:]
    assert f"Their Implementation Version Name: {uids.implementation_version_name()}" in out
