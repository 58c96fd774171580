"""DICOMweb destinations against real HTTP servers on 127.0.0.1: a refusing STOW-RS server started
here (200, 202 with FailedSOPSequence, 409, 4xx, 5xx, a timeout) driven through the real Outbox and
its database, credentials from a file and from the environment (sent, never in a reason or audit
row), and the config rules. The real Orthanc (its DICOMweb plugin) with the daemon is in
tests/e2e/test_delivery.py."""

from __future__ import annotations

import base64
import json

import pytest
from dicomgen import make_cr, uid
from helpers_peers import Answer, HTTPPeer

from cxr_node import config
from cxr_node.db import migrate
from cxr_node.db.models import AuditEvent
from cxr_node.db.session import Database
from cxr_node.errors import ConfigError, NetworkError
from cxr_node.outbox import stow
from cxr_node.outbox.queue import DEAD, DONE, PENDING, Outbox

SECRET = "s3cr3t-Pa55word-never-logged"


@pytest.fixture
def peer():
    p = HTTPPeer()
    yield p
    p.stop()


def _outbox(tmp_path, dest: dict) -> Outbox:
    settings = config.parse({"storage": {"data_dir": str(tmp_path / "data")}, "destinations": [dest],
                             "outbox": {"retry_base_seconds": 10, "max_attempts": 3}}, base_dir=tmp_path)
    migrate.upgrade(settings.database.url)
    box = Outbox(settings, Database(settings.database.url))
    box.prepare()
    return box


def _queue(box: Outbox, n: int, tmp_path) -> list[str]:
    """n real Part 10 files in the outbox, queued; their SOP Instance UIDs."""
    from pydicom import dcmread

    study = uid()
    objs = []
    for i in range(n):
        ds = dcmread(make_cr(tmp_path / f"f{i}.dcm", study_uid=study, rows=64, cols=64, seed=i))
        objs.append(box.write(ds, "sc"))
    with box.db.transaction() as s:
        box.enqueue(s, objs, study, 1)
    return [o.sop_instance_uid for o in objs]


def _drain(box: Outbox) -> dict[str, object]:
    box.drain()
    return {r.sop_instance_uid: r for r in box.list()}


def _audit(box: Outbox) -> list[AuditEvent]:
    with box.db.session() as s:
        return list(s.query(AuditEvent).filter(AuditEvent.event.like("outbox.%")))


def _failed(uid_: str, reason: int) -> dict:
    return {"00081155": {"vr": "UI", "Value": [uid_]}, "00081197": {"vr": "US", "Value": [reason]}}


def test_200_sends_multipart_with_basic_credentials_from_a_file(tmp_path, peer):
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    box = _outbox(tmp_path, {"name": "cloud", "kind": "dicomweb", "url": peer.url + "/dicom-web",
                             "auth": "basic", "username": "cxr", "secret_file": str(secret)})
    uids = _queue(box, 2, tmp_path)
    rows = _drain(box)
    assert all(rows[u].state == DONE and rows[u].last_status == 200 for u in uids)
    (req,) = peer.received
    assert req.method == "POST" and req.path == "/dicom-web/studies"
    assert req.headers["Content-Type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert req.headers["Authorization"] == "Basic " + base64.b64encode(f"cxr:{SECRET}".encode()).decode()
    boundary = req.headers["Content-Type"].split("boundary=")[1].encode()
    parts = req.body.split(b"--" + boundary)[1:-1]
    assert len(parts) == 2 and all(b"Content-Type: application/dicom\r\n\r\n" in p for p in parts)
    stored = [(box.dir / r.path).read_bytes() for r in rows.values()]
    assert sorted(p.split(b"\r\n\r\n", 1)[1][:-2] for p in parts) == sorted(stored)  # the bytes on disk
    blob = json.dumps([(e.reason, e.detail) for e in _audit(box)]) + (tmp_path / "data").joinpath("x").as_posix()
    assert SECRET not in blob and "cxr:" not in blob


def test_202_maps_each_failed_instance_and_409_4xx_5xx(tmp_path, peer, monkeypatch):
    monkeypatch.setenv("CXR_TEST_TOKEN", SECRET)
    box = _outbox(tmp_path, {"name": "cloud", "kind": "dicomweb", "url": peer.url, "auth": "bearer",
                             "secret_env": "CXR_TEST_TOKEN", "timeout": 2})
    a, b, c = _queue(box, 3, tmp_path)
    peer.answers = [Answer(202, {"00081198": {"vr": "SQ", "Value": [_failed(b, 0xA700), _failed(c, 0xA900)]},
                                 "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [a]}}]}})]
    rows = _drain(box)
    assert peer.received[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert rows[a].state == DONE
    assert rows[b].state == PENDING and "0xA700 out of resources" in rows[b].last_error  # retried
    assert rows[c].state == DEAD and "0xA900" in rows[c].last_error and "FailedSOPSequence" in rows[c].last_error
    dead = [e for e in _audit(box) if e.event == "outbox.dead"]
    assert len(dead) == 1 and dead[0].sop_instance_uid == c and dead[0].status == 202

    for answer, state, words in [
            (Answer(503, b"busy"), PENDING, "HTTP 503 server error"),
            (Answer(200, {}, delay=4), PENDING, "within 2s"),                # a timeout: retried
            (Answer(409, {"00081198": {"vr": "SQ", "Value": [_failed(b, 0x0122)]}}), DEAD, "0x0122"),
    ]:
        box.retry([rows[b].id])
        peer.answers, peer.received = [answer], []
        row = _drain(box)[b]
        assert row.state == state and words in row.last_error, (answer.status, row.last_error)
    box.retry([rows[b].id])
    peer.answers = [Answer(401, b"invalid token", content_type="text/plain")]
    row = _drain(box)[b]
    assert row.state == DEAD and row.last_error.startswith("HTTP 401 not authenticated") and "invalid token" in row.last_error
    assert (dead := [e for e in _audit(box) if e.event == "outbox.dead"])[-1].reason == row.last_error
    assert SECRET not in json.dumps([(e.reason, e.detail) for e in _audit(box)])


def test_missing_secret_is_a_dead_letter_naming_the_variable(tmp_path, peer, monkeypatch):
    monkeypatch.delenv("CXR_TEST_NONE", raising=False)
    box = _outbox(tmp_path, {"name": "cloud", "kind": "dicomweb", "url": peer.url, "auth": "bearer",
                             "secret_env": "CXR_TEST_NONE"})
    (u,) = _queue(box, 1, tmp_path)
    row = _drain(box)[u]
    assert row.state == DEAD and "CXR_TEST_NONE is not set" in row.last_error and not peer.received


def test_echo_probes_qido(tmp_path, peer):
    settings = config.parse({"destinations": [{"name": "w", "kind": "dicomweb", "url": peer.url + "/dw"}]},
                            base_dir=tmp_path)
    peer.answers = [Answer(200, b"[]")]
    assert "HTTP 200" in stow.echo(settings.destination("w"))
    assert peer.received[0].method == "GET" and peer.received[0].path == "/dw/studies?limit=1"
    peer.answers = [Answer(404, b"no such path", content_type="text/plain")]
    with pytest.raises(NetworkError, match="404 not found .check url"):
        stow.echo(settings.destination("w"))


@pytest.mark.parametrize("dest, words", [
    ({"name": "w", "kind": "dicomweb"}, "url: is required for kind 'dicomweb'"),
    ({"name": "w", "kind": "dicomweb", "url": "ftp://x"}, "must be an http:// or https:// URL"),
    ({"name": "w", "kind": "dicomweb", "url": "https://u:pw@x"}, "must not hold a password"),
    ({"name": "w", "kind": "dicomweb", "url": "https://x", "ae_title": "X"}, "does not apply to kind 'dicomweb'"),
    ({"name": "w", "kind": "dicomweb", "url": "https://x", "auth": "bearer"}, "needs secret_file or secret_env"),
    ({"name": "w", "kind": "dicomweb", "url": "https://x", "auth": "basic", "secret_env": "T"}, "username"),
    ({"name": "w", "ae_title": "X", "host": "h"}, "port: is required for kind 'dimse'"),
])
def test_config_rules(tmp_path, dest, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        config.parse({"destinations": [dest]}, base_dir=tmp_path)


def test_outcomes_of_a_200_with_warning_and_of_a_list_answer():
    r = stow.Response(200, {}, json.dumps([{"00081199": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": ["1.2"]}, "00081196": {"vr": "US", "Value": [0xB000]}}]}}]).encode())
    (oc,) = stow.outcomes(r, ["1.2"], "x")
    assert oc.kind == "sent" and "WarningReason 0xB000" in oc.reason
    (oc,) = stow.outcomes(stow.Response(429, {}, b""), ["1.2"], "x")
    assert oc.kind == "transient"
    (oc,) = stow.outcomes(stow.Response(413, {}, b"too big"), ["1.2"], "x")
    assert oc.kind == "permanent" and "request too large" in oc.reason


def test_https_with_a_private_ca_and_a_client_certificate(tmp_path):
    from helpers_peers import make_pki, server_context

    d = make_pki(tmp_path / "pki", ("server", "client"))
    ctx = server_context(d, "server")  # the archive wants our client certificate
    peer = HTTPPeer(tls=ctx)
    try:
        tls = {"name": "cloud", "kind": "dicomweb", "url": peer.url, "ca_certificates": str(d / "ca.pem"),
               "client_certificate": str(d / "client.pem"), "client_key": str(d / "client.key"), "timeout": 5}
        box = _outbox(tmp_path / "a", tls)
        (u,) = _queue(box, 1, tmp_path)
        assert _drain(box)[u].state == DONE and len(peer.received) == 1
        # without the client certificate the server refuses the handshake: retried, and said so
        box = _outbox(tmp_path / "b", {k: v for k, v in tls.items() if not k.startswith("client")})
        (u,) = _queue(box, 1, tmp_path)
        row = _drain(box)[u]
        assert row.state == PENDING and len(peer.received) == 1
        # the system's CAs do not know ours: the server is not trusted
        box = _outbox(tmp_path / "c", {k: v for k, v in tls.items() if k != "ca_certificates"})
        (u,) = _queue(box, 1, tmp_path)
        row = _drain(box)[u]
        assert row.state == PENDING and "TLS" in row.last_error and "certificate" in row.last_error.lower()
    finally:
        peer.stop()


def test_check_config_names_the_secret_source_never_the_secret(tmp_path):
    from conftest import cli

    secret = tmp_path / "token"
    secret.write_text(SECRET)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{tmp_path / "d"}"\n[[destinations]]\nname = "cloud"\nkind = "dicomweb"\n'
                   f'url = "https://archive.example.org/dicom-web"\nauth = "bearer"\nsecret_file = "{secret}"\n'
                   '[[notifications]]\nname = "ris"\nkind = "hl7v2"\nhost = "127.0.0.1"\nport = 2575\n'
                   '[triage]\ntriggers = ["abnormal", "COVID"]\n')
    out = cli("check-config", config=cfg).stdout
    assert "destination cloud: DICOMweb https://archive.example.org/dicom-web, bearer credentials from" in out
    assert str(secret) in out and SECRET not in out
    assert "notify      ris: hl7v2 MLLP 127.0.0.1:2575" in out and "triggers    abnormal, COVID" in out


def test_check_config_warns_of_a_certificate_file_that_is_not_there(tmp_path):
    """A CA bundle, client certificate or secret file the entry names but the node cannot read: every
    send would fail, so check-config says which entry and which file (and a file that is there, not)."""
    from conftest import cli

    ca = tmp_path / "ris-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{tmp_path / "d"}"\n'
                   f'[[destinations]]\nname = "cloud"\nkind = "dicomweb"\nurl = "https://archive.example.org/dicom-web"\n'
                   f'ca_certificates = "{tmp_path / "gone.pem"}"\n'
                   f'[[notifications]]\nname = "ris"\nkind = "hl7v2"\nhost = "127.0.0.1"\nport = 2576\ntls = true\n'
                   f'ca_certificates = "{ca}"\nclient_certificate = "{tmp_path / "node.pem"}"\n')
    p = cli("check-config", config=cfg)
    assert p.returncode == 0 and "notify      ris: hl7v2 MLLP over TLS 127.0.0.1:2576" in p.stdout
    warned = [line for line in p.stderr.splitlines() if "sends to it will fail" in line]
    assert warned == [f"cxr-node: warning: cloud: ca_certificates {tmp_path / 'gone.pem'} does not exist (or is not "
                      "a file): sends to it will fail",
                      f"cxr-node: warning: ris: client_certificate {tmp_path / 'node.pem'} does not exist (or is "
                      "not a file): sends to it will fail"]
