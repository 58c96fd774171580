"""Hostile and careless peers against the real daemon on real sockets: connection storms and
silent connections, an oversized PDU, patient names in library warnings, log forging through an
AE title, an over-long UID in a C-STORE request, a second instance started by mistake, and the
model loaded at start-up while the node already answers.

Peers that misbehave on purpose are raw TCP sockets speaking hand-made PDUs (PS3.8 9.3); the
well-behaved ones are dcmtk and pynetdicom. Hostile peers connect from other loopback addresses
(127.0.0.2), so that the per-host limit that stops them leaves 127.0.0.1 free for the real sender.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time

from conftest import PY, REPO, StoreSCP, cli, echoscu, storescu
from dicomgen import make_cr, uid
from helpers_model import make_checkpoint
from pydicom import dcmread

QUIET = '[model]\npreload = false\n'  # no model in memory: RSS and timings measure the receiver only
HOSTILE = "127.0.0.2"


# --------------------------------------------------------------------------- hand-made PDUs

def _item(item_type: int, body: bytes) -> bytes:
    return bytes([item_type, 0]) + len(body).to_bytes(2, "big") + body


def associate_rq(calling: bytes, called: bytes = b"CXRNODE", max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification / Implicit VR Little Endian, AE titles as given
    (not checked: that is the point)."""
    app = _item(0x10, b"1.2.840.10008.3.1.1.1")
    pc = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2"))
    user = _item(0x50, _item(0x51, max_pdu.to_bytes(4, "big")) + _item(0x52, b"1.2.826.0.1.3680043.10.1394.9"))
    body = (1).to_bytes(2, "big") + b"\0\0" + called.ljust(16) + calling.ljust(16) + bytes(32) + app + pc + user
    return bytes([0x01, 0]) + len(body).to_bytes(4, "big") + body


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    head = _read_exactly(sock, 6)
    return head[0], _read_exactly(sock, int.from_bytes(head[2:6], "big"))


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def raw_association(port: int, calling: bytes = b"RAWSCU", source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(associate_rq(calling))
    pdu_type, _ = read_pdu(sock)
    assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got PDU type 0x{pdu_type:02X}"
    return sock


def release(sock: socket.socket) -> None:
    sock.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-RELEASE-RQ
    assert read_pdu(sock)[0] == 0x06  # A-RELEASE-RP
    sock.close()


# --------------------------------------------------------------------------- 1. connection slots

def test_connection_storm_and_silent_peers_do_not_lock_out_a_sender(node_factory, films):
    """Before: 17 connect-and-close (or 16 silent connections) gave every sender "local limit
    exceeded" for about 30 s, and nothing was logged or audited."""
    node = node_factory("storm", extra_node="association_request_timeout = 3", extra=QUIET).start()
    for _ in range(50):  # connect and close at once
        socket.create_connection(("127.0.0.1", node.port), source_address=(HOSTILE, 0)).close()
    silent = [socket.create_connection(("127.0.0.1", node.port), source_address=(HOSTILE, 0)) for _ in range(20)]
    try:
        t0 = time.monotonic()
        p = storescu(node.port, films["RG1_UNCR"], timeout=60)
        took = time.monotonic() - t0
        assert p.returncode == 0, p.stderr
        assert "Received Store Response (Success)" in p.stderr
        assert took < 5, f"storescu took {took:.1f}s"
        print(f"\nstorescu stored RG1_UNCR in {took:.2f}s after 50 connect-close and 20 silent connections")

        # the silent ones are closed by the node after association_request_timeout (3 s)
        for s in silent:
            s.settimeout(10)
            assert s.recv(1) == b"", "a silent connection was left open"
    finally:
        for s in silent:
            s.close()
    rows = node.wait_for_event("connection.refused", host=HOSTILE)
    assert len(rows) == 1, "refusals are audited once per host and minute"
    assert rows[0]["outcome"] == "failure" and "max_connections_per_host" in rows[0]["reason"]
    assert "closed: 127.0.0.2 already has 8 connections open" in node.log
    assert not node.events("association.rejected"), "the real sender was never refused"


def test_a_peer_that_stalls_inside_a_pdu_is_cut_after_network_timeout(node_factory, films):
    """The accepted socket's stall timeout (SO_RCVTIMEO since bench/recv.py showed Python's
    settimeout costing a poll per 4 kB read): a peer that sends half an A-ASSOCIATE-RQ and stops
    loses the connection after [node] network_timeout, and a real sender still stores meanwhile."""
    node = node_factory("stall", extra_node="network_timeout = 2", extra=QUIET).start()
    s = socket.create_connection(("127.0.0.1", node.port))
    try:
        s.sendall(bytes([0x01, 0x00]) + (200).to_bytes(4, "big") + b"\x00\x01")  # 8 of 206 bytes
        t0 = time.monotonic()
        s.settimeout(15)
        assert s.recv(1) == b"", "the stalled connection was left open"
        took = time.monotonic() - t0
        assert 1.5 < took < 6, f"closed after {took:.1f} s, expected about network_timeout (2 s)"
    finally:
        s.close()
    p = storescu(node.port, films["RG1_UNCR"], timeout=60)
    assert p.returncode == 0 and "Received Store Response (Success)" in p.stderr, p.stderr


def test_pynetdicom_limit_rejections_are_audited(node_factory):
    """max_associations still holds for real associations, and its rejections are audited now."""
    node = node_factory("limit", extra_node="max_associations = 2\nmax_connections_per_host = 10", extra=QUIET).start()
    held = [raw_association(node.port) for _ in range(2)]
    try:
        p = echoscu(node.port)
        assert p.returncode != 0 and "Local Limit Exceeded" in p.stderr, p.stderr
    finally:
        for s in held:
            release(s)
    (row,) = node.wait_for_event("association.rejected")
    assert "local limit exceeded" in row["reason"] and "max_associations" in row["reason"]
    assert echoscu(node.port).returncode == 0


# --------------------------------------------------------------------------- 2. PDU length

def test_oversized_pdu_is_aborted_before_it_is_buffered(node_factory):
    """Before: a P-DATA PDU declaring 256 MiB was read into memory (RSS 95 -> 621 MB)."""
    node = node_factory("bigpdu", extra=QUIET).start()
    sock = raw_association(node.port, calling=b"BIGPDU")
    base = node.rss_kib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], node.rss_kib())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    size = 256 << 20
    sent = 0
    chunk = bytes(1 << 20)
    try:
        sock.sendall(bytes([0x04, 0]) + size.to_bytes(4, "big"))
        while sent < size:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the node cut the connection: expected
    finally:
        time.sleep(0.5)
        done.set()
        sampler.join()
    growth_mib = (peak[0] - base) / 1024
    print(f"\nRSS {base / 1024:.0f} MiB -> peak {peak[0] / 1024:.0f} MiB (+{growth_mib:.1f} MiB) "
          f"while sending a 256 MiB PDU; {sent >> 20} MiB went out before the node cut it")
    assert growth_mib < 32
    assert sent < size, "the node read the whole PDU"
    sock.close()
    (row,) = node.wait_for_event("association.aborted", calling_aet="BIGPDU")
    assert row["outcome"] == "failure"
    assert "268435456 bytes is longer than the 131072 bytes we accept" in row["reason"]
    assert echoscu(node.port).returncode == 0  # still serving


def test_oversized_pdu_is_answered_with_a_abort(node_factory):
    node = node_factory("abort", extra=QUIET).start()
    sock = raw_association(node.port)
    sock.sendall(bytes([0x04, 0]) + (1 << 30).to_bytes(4, "big"))
    assert read_pdu(sock) == (0x07, bytes([0, 0, 0x02, 0x06]))  # A-ABORT: service provider, invalid parameter
    sock.close()


# --------------------------------------------------------------------------- 3. names in warnings

def test_names_without_caret_never_reach_a_log_through_the_whole_pipeline(node_factory, tmp_path):
    """highdicom warns 'The string "Smith John" is unlikely to represent the intended person name'
    and pydicom logs what it warns: the name was in the daemon log twice."""
    patient, referrer = "Quokkafield Zebediah", "Wombatson Kettleby"  # no caret: highdicom warns
    ckpt = make_checkpoint(tmp_path / "model.pt", input_size=64)
    with StoreSCP(tmp_path / "pacs") as pacs:
        node = node_factory("names", quiet_seconds=1, log_level="DEBUG", extra=(
            f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n[outbox]\npoll_seconds = 0.3\n'
            f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.ae_title}"\nhost = "127.0.0.1"\nport = {pacs.port}\n'))
        node.start()
        study = uid()
        f = make_cr(tmp_path / "named.dcm", study_uid=study, patient_name=patient, rows=128, cols=128)
        ds = dcmread(f)
        ds.ReferringPhysicianName = referrer
        ds.save_as(f)
        assert storescu(node.port, f).returncode == 0
        deadline = time.monotonic() + 120
        while len(node.events("outbox.sent", study_uid=study)) < 2 and time.monotonic() < deadline:
            time.sleep(0.4)
        assert len(node.events("outbox.sent", study_uid=study)) == 2, node.log[-3000:]
        sent = [dcmread(p, stop_before_pixels=True) for p in pacs.out_dir.iterdir()]
    assert any(str(d.get("PatientName", "")) == patient for d in sent)  # the name did travel, in the data
    node.stop()
    # highdicom's person-name warning (one per Secondary Capture, nothing an admin can act on) is dropped
    assert "UserWarning from highdicom (sop.py" not in node.log, node.log[-2000:]
    texts = {p.name: p.read_text(errors="replace") for p in node.root.rglob("*.log")}
    texts["audit"] = cli("audit", "--format", "json", config=node.config).stdout
    for where, text in texts.items():  # no name got through
        for word in (*patient.split(), *referrer.split()):
            assert word not in text, f"{word} in {where}"


# --------------------------------------------------------------------------- 4. log forging

def test_control_characters_from_peers_cannot_forge_log_lines(node_factory):
    node = node_factory("forge", log_level="DEBUG", extra=QUIET).start()
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    sock.sendall(associate_rq(b"EVIL\nINJECTED\x1b["))
    try:
        read_pdu(sock)
    except ConnectionError:
        pass  # accepted, rejected or aborted: any answer will do, the log is what is checked
    sock.close()
    node.wait_log("INJECTED")
    node.stop()
    lines = node.log.splitlines()
    assert not [ln for ln in lines if ln.startswith("INJECTED")], "a peer forged a log line"
    assert "\x1b" not in node.log
    assert any("EVIL\\nINJECTED\\x1b[" in ln for ln in lines)  # logged, escaped


# --------------------------------------------------------------------------- 5. over-long UID

def test_overlong_request_uid_gets_c000_with_a_reason(node_factory, tmp_path):
    """Before: the association was aborted with no status and an audit row without a reason."""
    from pydicom import config as pydicom_config
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    node = node_factory("longuid", extra=QUIET).start()
    long_uid = "1.2.826.0.1.3680043.10.1394." + "1" * 52  # 80 characters
    ds = dcmread(make_cr(tmp_path / "long.dcm"))
    ds.SOPInstanceUID = long_uid
    ds.file_meta.MediaStorageSOPInstanceUID = long_uid
    ae = AE(ae_title="LONGUID")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    old_ui, old_mode = _config.VALIDATORS["UI"], pydicom_config.settings.writing_validation_mode
    _config.VALIDATORS["UI"] = lambda v: (True, "")  # our SCU must be able to send it
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
        assert assoc.is_established
        rsp = assoc.send_c_store(ds)
        assert assoc.is_established, "the association was aborted"
        assoc.release()
    finally:
        _config.VALIDATORS["UI"], pydicom_config.settings.writing_validation_mode = old_ui, old_mode
    assert rsp.Status == 0xC000
    assert "Affected SOP Instance UID invalid (80 chars)" in rsp.ErrorComment
    (row,) = node.wait_for_event("instance.failed", calling_aet="LONGUID")
    assert row["status"] == 0xC000 and "Affected SOP Instance UID invalid (80 chars)" in row["reason"]
    assert node.wait_for_event("association.released", calling_aet="LONGUID")
    assert not node.events("association.aborted")


# --------------------------------------------------------------------------- 6. exposure

def test_exposure_warning_for_the_shipped_defaults():
    from pathlib import Path

    from cxr_node.config import exposure_warning, load, parse

    shipped = exposure_warning(load(REPO / "config" / "cxr-node.toml"))
    assert shipped and "every interface" in shipped and "allowed_calling_aets" in shipped
    assert exposure_warning(parse({"node": {"host": "127.0.0.1"}}, Path("/srv"))) is None
    assert exposure_warning(parse({"node": {"allowed_hosts": ["10.0.0.0/8"]}}, Path("/srv"))) is None
    assert exposure_warning(parse({"node": {"allowed_calling_aets": ["CR1"]}}, Path("/srv"))) is None
    lan = exposure_warning(parse({"node": {"host": "10.1.2.3"}}, Path("/srv")))
    assert lan and "10.1.2.3" in lan


def test_serve_does_not_warn_on_loopback(node_factory):
    node = node_factory("loop", extra=QUIET).start()
    assert "accepts any calling AE title" not in node.log


# --------------------------------------------------------------------------- 7. second instance

def test_second_instance_exits_without_touching_the_live_nodes_files(node_factory, tmp_path):
    node = node_factory("live", extra=QUIET).start()
    incoming = next(p for p in (node.data_dir / "incoming").iterdir()
                    if p.is_dir() and p.name.endswith(f"-{node.port}"))
    planted = incoming / "in-flight.part"  # a write the live node has in progress
    planted.write_bytes(b"partial")
    second = subprocess.run([PY, "-m", "cxr_node", "--config", str(node.config), "serve"], capture_output=True,
                            text=True, timeout=60, cwd=REPO)
    assert second.returncode == 1
    assert "already serving as this node" in second.stderr and ".lock-" in second.stderr, second.stderr
    assert f"pid {node.proc.pid}" in second.stderr
    assert planted.exists(), "the second instance swept the live node's temp files"
    assert echoscu(node.port).returncode == 0

    # another data_dir, same port: refused at bind, before its own sweep
    other = node_factory("other", port=node.port, extra=QUIET)
    other.upgrade()
    other_incoming = other.data_dir / "incoming" / incoming.name
    other_incoming.mkdir(parents=True)
    (other_incoming / "x.part").write_bytes(b"x")
    third = subprocess.run([PY, "-m", "cxr_node", "--config", str(other.config), "serve"], capture_output=True,
                           text=True, timeout=60, cwd=REPO)
    assert third.returncode == 1 and f"cannot listen on 127.0.0.1:{node.port}" in third.stderr, third.stderr
    assert (other_incoming / "x.part").exists(), "swept before binding"

    assert node.stop() == 0  # the lock goes with the process: a restart works
    node.start()
    assert echoscu(node.port).returncode == 0


# --------------------------------------------------------------------------- 8. model at start-up

def test_model_is_loaded_at_start_up_while_the_node_already_answers(node_factory):
    node = node_factory("preload")  # the bundled model, preload on (the default)
    node.start()
    t0 = time.monotonic()
    echo = echoscu(node.port)
    echo_s = time.monotonic() - t0
    loaded_before_echo = "loaded from" in node.log
    assert echo.returncode == 0 and echo_s < 3, (echo_s, echo.stderr)
    node.wait_log("loaded from", timeout=180)  # no study sent: loaded because of the start-up
    log = node.log
    assert log.index("loading the model in the background") < log.index("loaded from")
    assert not loaded_before_echo, "the model loaded before the echo was answered: cannot tell them apart"
    assert node.stop(signal.SIGTERM) == 0


def test_sigterm_while_the_model_loads_exits_0(node_factory):
    """Exiting while torch initialises in the preload thread could abort the interpreter
    ("terminate called without an active exception", status 134): SIGTERM at several moments of
    the load."""
    node = node_factory("early-term")
    for delay in (0, 0.3, 0.6, 1.0, 1.5):
        node.start(upgrade=delay == 0)
        time.sleep(delay)
        assert node.stop(signal.SIGTERM, timeout=180) == 0, node.log[-2000:]
    assert "terminate called" not in node.log
    assert "waiting for the model load to finish" in node.log
