"""DICOM TLS against dcmtk's TLS-enabled storescu and storescp, with certificates made here by
openssl: a trusted client is served, an untrusted one (or one without TLS) is refused, and
cxr-node calls a TLS peer with its own certificate."""

from __future__ import annotations

import subprocess

import pytest
from conftest import StoreSCP, cli, require_tool, storescu, wait_port
from dicomgen import make_cr
from helpers_peers import make_pki
from pydicom import dcmread


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), ("node", "modality", "pacs"), rogue=True)


def _tls_section(d) -> str:
    return (f'[tls]\ncertificate = "{d / "node.pem"}"\nprivate_key = "{d / "node.key"}"\n'
            f'ca_certificates = "{d / "ca.pem"}"\nrequire_client_certificate = true\n')


def test_receiver_serves_trusted_clients_only(node_factory, certs, tmp_path):
    node = node_factory("tls", extra=_tls_section(certs)).start()
    good = make_cr(tmp_path / "good.dcm")
    ok = storescu(node.port, good, args=("+tls", str(certs / "modality.key"), str(certs / "modality.pem"),
                                         "+cf", str(certs / "ca.pem")))
    assert ok.returncode == 0, ok.stderr
    sop = dcmread(good).SOPInstanceUID
    assert node.events("instance.stored", sop_instance_uid=sop)

    rogue = storescu(node.port, make_cr(tmp_path / "rogue.dcm"),
                     args=("+tls", str(certs / "rogue.key"), str(certs / "rogue.pem"), "+cf", str(certs / "ca.pem")))
    assert rogue.returncode != 0
    plain = storescu(node.port, make_cr(tmp_path / "plain.dcm"))
    assert plain.returncode != 0
    assert len(node.events("instance.stored")) == 1  # only the trusted client's instance
    # still serving trusted clients after the refusals
    again = storescu(node.port, make_cr(tmp_path / "again.dcm"), args=(
        "+tls", str(certs / "modality.key"), str(certs / "modality.pem"), "+cf", str(certs / "ca.pem")))
    assert again.returncode == 0, again.stderr


def test_sender_calls_a_tls_peer_with_its_certificate(certs, tmp_path):
    exe = require_tool("storescp", "dcmtk")
    scp = StoreSCP(tmp_path / "pacs")  # for the free port and tool check
    proc = subprocess.Popen([exe, "+tls", str(certs / "pacs.key"), str(certs / "pacs.pem"), "+cf",
                             str(certs / "ca.pem"), "-aet", "TLSPACS", str(scp.port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(scp.port, proc=proc)
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[storage]\ndata_dir = "{tmp_path}"\n' + _tls_section(certs) +
                       f'[[destinations]]\nname = "tlspacs"\nae_title = "TLSPACS"\nhost = "127.0.0.1"\n'
                       f'port = {scp.port}\ntls = true\n'
                       f'[[destinations]]\nname = "plain"\nae_title = "TLSPACS"\nhost = "127.0.0.1"\nport = {scp.port}\n')
        ok = cli("echo", "--to", "tlspacs", config=cfg)
        assert "over TLS): status 0x0000 Success" in ok.stdout
        plain = cli("echo", "--to", "plain", "--timeout", "5", config=cfg, check=False)
        assert plain.returncode == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_silent_peer_does_not_block_tls_receiver_and_failures_are_audited(node_factory, certs, tmp_path):
    """pynetdicom handshakes in its accept loop: one TCP peer that says nothing would hold every other
    peer off. cxr-node handshakes per connection, with association_request_timeout, and audits each TLS
    refusal."""
    import socket
    import time

    node = node_factory("tls-silent", extra_node="acse_timeout = 4\nassociation_request_timeout = 4",
                        extra=_tls_section(certs)).start()
    silent = socket.create_connection(("127.0.0.1", node.port))
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        ok = storescu(node.port, make_cr(tmp_path / "ok.dcm"), timeout=30, args=(
            "+tls", str(certs / "modality.key"), str(certs / "modality.pem"), "+cf", str(certs / "ca.pem")))
        assert ok.returncode == 0, ok.stderr
        assert time.monotonic() - t0 < 3.5  # served while the silent peer still holds its connection
        rogue = storescu(node.port, make_cr(tmp_path / "rogue.dcm"), args=(
            "+tls", str(certs / "rogue.key"), str(certs / "rogue.pem"), "+cf", str(certs / "ca.pem")))
        assert rogue.returncode != 0
        rows = node.wait_for_event("association.rejected", timeout=15,
                                   reason="TLS handshake timed out")  # the silent one, after the timeout
    finally:
        silent.close()
    tls_rows = [r for r in node.events("association.rejected") if (r["detail"] or {}).get("stage") == "tls"]
    assert rows and all(r["host"] == "127.0.0.1" and r["outcome"] == "failure" for r in tls_rows)
    assert any("TLS handshake failed" in r["reason"] and "CERTIFICATE" in r["reason"].upper() for r in tls_rows)


def test_pdu_limit_holds_over_tls(node_factory, certs):
    """The PDU length check sits under TLS too: a trusted client declaring a 1 GiB P-DATA PDU is
    aborted at its header."""
    import socket
    import ssl

    from test_hardening import associate_rq, read_pdu

    node = node_factory("tls-pdu", extra=_tls_section(certs) + "[model]\npreload = false\n").start()
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(str(certs / "modality.pem"), str(certs / "modality.key"))
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", node.port), timeout=10),
                         server_hostname="127.0.0.1") as sock:
        sock.sendall(associate_rq(b"TLSBIG"))
        assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
        sock.sendall(bytes([0x04, 0]) + (1 << 30).to_bytes(4, "big"))
        assert read_pdu(sock) == (0x07, bytes([0, 0, 0x02, 0x06]))  # A-ABORT
    (row,) = node.wait_for_event("association.aborted", calling_aet="TLSBIG")
    assert "1073741824 bytes is longer than the 131072 bytes we accept" in row["reason"]
