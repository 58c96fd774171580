"""The web console's locks, over real HTTP against a real `cxr-node web` subprocess on 127.0.0.1:
no page without a session, no form without its CSRF token, no outbox action for a viewer, no image
outside the study in its URL, throttled password guessing, sessions that end, and every view of
a patient's study in the audit trail (and its DICOM audit export)."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time

import pytest
from conftest import cli
from dicomgen import make_cr, uid
from helpers_web import Client, WebConsole, add_user, hidden, node_config

PASSWORDS = {"ada": "admin-password-1", "rad": "radiologist-pw-2", "vic": "viewer-password-3"}


def _seed(cfg_root, data_dir) -> dict:
    """Two processed studies, each with a film in the spool and an overlay in the outbox, and a
    dead outbox item: rows written with the project's own models, files with dicomgen."""
    from cxr_node.config import load
    from cxr_node.db.models import ImageResult, Instance, OutboxItem, Study, utcnow
    from cxr_node.db.session import Database

    settings = load(cfg_root / "cxr-node.toml")
    db = Database(settings.database.url)
    now = utcnow()
    out = {}
    with db.transaction() as s:
        for key, pid, prio in (("a", "PID-A", "urgent"), ("b", "PID-B<i>x</i>", "routine")):
            study, film, sc = uid(), uid(), uid()
            make_cr(settings.storage.spool_dir / study / f"{film}.dcm", study_uid=study, sop_uid=film, rows=96, cols=96,
                    patient_id=pid)
            make_cr(settings.storage.outbox_dir / study / f"{sc}.dcm", study_uid=study, sop_uid=sc, rows=96, cols=96,
                    patient_id=pid)
            s.add(Study(study_uid=study, state="processed", version=1, patient_id=pid, instance_count=1,
                        first_received_at=now, last_received_at=now, state_changed_at=now, priority=prio,
                        processed_version=1))
            s.add(Instance(sop_instance_uid=film, study_uid=study, series_uid=uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                           transfer_syntax="1.2.840.10008.1.2.1", path=f"{study}/{film}.dcm", bytes=1, patient_id=pid,
                           triage_eligible=True, study_version=1, calling_aet="MODALITY", received_at=now))
            s.add(ImageResult(study_uid=study, study_version=1, sop_instance_uid=film, analysed=True, model_version="t",
                              top_label="COVID", urgent=prio == "urgent", priority=prio,
                              probabilities={"COVID": 0.9, "Normal": 0.1}, sc_sop_instance_uid=sc, created_at=now))
            s.add(OutboxItem(destination="pacs", sop_instance_uid=sc, sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                             transfer_syntax="1.2.840.10008.1.2.1", study_uid=study, study_version=1, kind="sc",
                             path=f"{study}/{sc}.dcm", state="dead", attempts=15, next_attempt_at=now,
                             last_error="gave up", created_at=now))
            out[key] = {"study": study, "film": film, "sc": sc, "pid": pid}
    from cxr_node.web import users

    for name, role in (("rad", "radiologist"), ("vic", "viewer")):  # ada comes from the CLI (the fixture)
        users.add(db, name, role, PASSWORDS[name])
    db.dispose()
    return out


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    root = tmp_path_factory.mktemp("websec")
    cfg = node_config(root)
    seeded = _seed(root, root / "data")
    add_user(cfg, "ada", "admin", PASSWORDS["ada"])
    web = WebConsole(cfg, root / "web.log").start()
    web.cfg, web.seeded, web.db_path = cfg, seeded, root / "data" / "cxr-node.db"
    yield web
    assert web.stop() == 0 and "web console stopped" in web.log  # SIGTERM: a graceful stop, status 0
    assert "PID-A" not in web.log and "PID-B" not in web.log  # patient IDs never reach the log


def _client(web, name: str | None = None) -> Client:
    c = Client(web.url)
    if name:
        r = c.login(name, PASSWORDS[name])
        assert r.status == 303 and r.location == "/", r.text[:500]
    return c


def _events(web, event: str, study: str | None = None) -> list[dict]:
    """Audit rows of one type, oldest first, read from the database as `cxr-node audit` gives them."""
    from cxr_node.audit import trail as audit
    from cxr_node.config import load
    from cxr_node.db.session import Database

    db = Database(load(web.cfg).database.url)
    try:
        with db.session() as s:
            return audit.as_dicts(audit.query(s, audit.AuditQuery(events=(event,), study_uid=study)))
    finally:
        db.dispose()


def _outbox_states(web) -> list[str]:
    with sqlite3.connect(web.db_path) as c:
        return [r[0] for r in c.execute("select state from outbox order by id")]


def test_every_page_without_a_session_goes_to_login(console):
    a = console.seeded["a"]
    c = _client(console)
    for path in ("/", "/?patient_id=PID-A", f"/study/{a['study']}", f"/study/{a['study']}/image/{a['sc']}.png",
                 "/audit", "/audit?format=csv", "/outbox", "/model", "/status", "/stations"):
        r = c.get(path)
        assert r.status == 303, path
        assert r.location.startswith("/login?next="), path
        assert b"PID-A" not in r.body
    r = c.get("/api/studies")
    assert r.status == 401 and json.loads(r.body) == {"error": "log in first (POST /login)"}
    for path in ("/outbox/retry", "/outbox/purge", "/logout"):
        r = c.post(path, {"all_dead": "1", "confirm": "yes"})
        assert r.status == 303 and r.location == "/login", path
    assert _outbox_states(console) == ["dead", "dead"]
    # /healthz answers without a session and says nothing about patients or studies
    r = c.get("/healthz")
    assert r.status == 200 and json.loads(r.body) == {"status": "ok", "database": "ok"}
    assert r.headers["content-security-policy"].startswith("default-src 'self'")
    # a wrong or made-up session cookie is no session
    c.jar.set_cookie(_cookie("cxr_session", "made-up-token"))
    assert c.get("/").status == 303


def _cookie(name: str, value: str):
    import http.cookiejar

    return http.cookiejar.Cookie(0, name, value, None, False, "127.0.0.1", False, False, "/", True, False, None,
                                 False, None, None, {})


def test_the_session_cookie_is_httponly_and_samesite(console):
    c = Client(console.url)
    token = hidden(c.get("/login").text, "csrf_token")
    r = c.post("/login", {"username": "rad", "password": PASSWORDS["rad"], "csrf_token": token})
    cookie = r.headers["set-cookie"]
    assert "cxr_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Secure" not in cookie  # plain HTTP here; with [web] certificate it is Secure
    r = c.get("/")
    assert r.status == 200 and "PID-A" in r.text and r.headers["cache-control"] == "no-store"


def test_every_page_renders_for_a_viewer(console):
    """The read-only pages answer a viewer, with what they are for (and bad filters say why)."""
    a = console.seeded["a"]
    c = _client(console, "vic")
    work = c.get("/?priority=urgent").text
    assert a["study"] in work and console.seeded["b"]["study"] not in work
    rows = c.get("/?refresh=1").text  # what the page's script fetches every 20 s: the table only
    assert "PID-B&lt;i&gt;x&lt;/i&gt;" in rows and "<i>x" not in rows
    assert "<html" not in rows and rows.index(a["study"]) < rows.index(console.seeded["b"]["study"])
    api = json.loads(c.get("/api/studies?station=MODALITY").body)
    assert api["total"] == 2 and [s["priority"] for s in api["studies"]] == ["urgent", "routine"]
    assert api["studies"][0]["delivery"] == "dead" and api["studies"][0]["analysed"] == 1
    assert c.get("/?date=yesterday").status == 400 and c.get("/audit?since=soon").status == 400
    assert "pending" in c.get("/outbox").text and "dead (" in c.get("/outbox").text
    status = c.get("/status").text
    assert 'id="health-database">ok<' in status and "processed 2" in status
    stations = c.get("/stations").text
    assert 'id="no-stations"' in stations  # the seeded studies came from no station row
    from cxr_node.config import BUNDLED_CHECKPOINT
    from cxr_node.model.checkpoint import read_checkpoint

    ck = read_checkpoint(BUNDLED_CHECKPOINT)
    model = c.get("/model").text
    assert ck["sha256"] in model and f'id="model-version">{ck["meta"]["version"]}<' in model


def test_forms_without_their_csrf_token_are_refused(console):
    c = _client(console, "ada")
    token = c.csrf("/outbox")
    for data in ({"all_dead": "1", "confirm": "yes"}, {"all_dead": "1", "confirm": "yes", "csrf_token": "x" * 43}):
        r = c.post("/outbox/retry", data)
        assert r.status == 403 and "security token" in r.text
        assert c.post("/outbox/purge", {**data, "dead": "1"}).status == 403
        assert c.post("/logout", {k: v for k, v in data.items() if k == "csrf_token"}).status == 403
    assert _outbox_states(console) == ["dead", "dead"]
    # the login form has its own token, bound to a cookie
    fresh = Client(console.url)
    fresh.get("/login")
    r = fresh.post("/login", {"username": "ada", "password": PASSWORDS["ada"]})
    assert r.status == 403 and "cxr_session" not in r.headers.get("set-cookie", "")
    # with the token: a confirmation page first, then the retry
    r = c.post("/outbox/retry", {"all_dead": "1", "csrf_token": token})
    assert r.status == 200 and "back to pending" in r.text and hidden(r.text, "confirm") == "yes"
    assert _outbox_states(console) == ["dead", "dead"]
    ids = [str(i) for i in range(1, 2)]
    r = c.post("/outbox/retry", {"id": ids, "confirm": "yes", "csrf_token": token})
    assert r.status == 303 and "1+item" in r.location
    assert _outbox_states(console) == ["pending", "dead"]
    (row,) = _events(console, "outbox.requeued")
    assert row["detail"]["user"] == "ada"


def test_a_viewer_and_a_radiologist_cannot_retry_or_purge_the_outbox(console):
    for name in ("vic", "rad"):
        c = _client(console, name)
        token = c.csrf("/")
        if name == "vic":  # a viewer reads the outbox, without its buttons
            page = c.get("/outbox").text
            assert "Retry every dead item" not in page and "Retry and purge are for admins" in page
        else:  # a radiologist has the worklist and studies, not the outbox or the whole audit trail
            assert c.get("/outbox").status == 403 and c.get("/audit").status == 403
            assert c.get("/audit?format=csv").status == 403
            # a page of the console saying what the role may not do, with its menu and a way back
            r = c.get("/audit")
            assert r.headers["content-type"].startswith("text/html") and "<h1>Not allowed</h1>" in r.text
            assert "may not see the audit trail" in r.text and '<a href="/">Back to the worklist</a>' in r.text
            assert 'href="/stations"' in r.text
            assert 'href="/audit"' not in c.get("/").text
        r = c.post("/outbox/retry", {"id": ["2"], "confirm": "yes", "csrf_token": token})
        assert r.status == 403 and f"the {'viewer' if name == 'vic' else 'radiologist'} role may not" in r.text
        assert c.post("/outbox/purge", {"dead": "1", "confirm": "yes", "csrf_token": token}).status == 403
        assert c.get("/api/studies").status == 200  # but they may read
    assert _outbox_states(console)[1] == "dead"


def test_feedback_needs_the_role_and_the_token_and_a_known_film(console):
    """A viewer may not label; a form without its token stores nothing; a film of another study or
    an unknown label is refused with what was wrong; a radiologist's label is stored with her name."""
    a, b = console.seeded["a"], console.seeded["b"]
    vic, rad = _client(console, "vic"), _client(console, "rad")
    vt, rt = vic.csrf("/"), rad.csrf("/")
    assert 'id="feedback-form"' not in vic.get(f"/study/{a['study']}").text
    r = vic.post(f"/study/{a['study']}/feedback", {"label": "COVID", "csrf_token": vt})
    assert r.status == 403 and "the viewer role may not" in r.text
    assert rad.post(f"/study/{a['study']}/feedback", {"label": "COVID"}).status == 403
    r = rad.post(f"/study/{a['study']}/feedback", {"label": "COVID", "sop_instance_uid": b["film"], "csrf_token": rt})
    assert r.status == 303 and "Not+stored" in r.location and "not+a+film+of+study" in r.location
    r = rad.post(f"/study/{a['study']}/feedback", {"label": "Tuberculosis", "csrf_token": rt})
    assert r.status == 303 and "unknown+label" in r.location
    assert rad.post(f"/study/{a['study']}/feedback", {"label": "COVID", "sop_instance_uid": "../../etc",
                                                      "csrf_token": rt}).status == 400
    assert not _events(console, "feedback.added")
    r = rad.post(f"/study/{a['study']}/feedback", {"label": "normal", "csrf_token": rt})
    assert r.status == 303 and "Stored+Normal+for+the+study" in r.location
    (row,) = _events(console, "feedback.added", a["study"])
    assert row["detail"]["reader"] == "rad" and row["detail"]["source"] == "web" and row["patient_id"] == "PID-A"
    # station plots only for stations this node knows, and only by fixed names
    assert vic.get("/stations/MODALITY/plot/../../x.png").status == 404
    assert vic.get("/stations/NOSUCH/plot/roc.png").status == 404
    assert vic.get("/stations").status == 200


def test_images_only_of_the_study_in_the_url(console):
    a, b = console.seeded["a"], console.seeded["b"]
    c = _client(console, "vic")
    ok = c.get(f"/study/{a['study']}/image/{a['sc']}.png")
    assert ok.status == 200 and ok.headers["content-type"] == "image/png" and ok.body[:8] == b"\x89PNG\r\n\x1a\n"
    assert c.get(f"/study/{a['study']}/image/{a['film']}.png").status == 200  # the film itself, from the spool
    # images fetched without the study page are a view of the study too (once per session and study)
    by_image = [e for e in _events(console, "web.study_viewed", a["study"]) if e["detail"]["via"] == "image"]
    assert len(by_image) == 1 and by_image[0]["detail"]["user"] == "vic" and by_image[0]["patient_id"] == "PID-A"
    refused = [
        f"/study/{a['study']}/image/{b['sc']}.png",          # another study's overlay
        f"/study/{b['study']}/image/{a['sc']}.png",
        f"/study/{a['study']}/image/{b['film']}.png",        # another study's film
        f"/study/{a['study']}/image/..%2F..%2Fcxr-node.db",
        f"/study/{a['study']}/image/..%2F{b['study']}%2F{b['sc']}.png",
        f"/study/{a['study']}/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/study/..%2F..%2F..%2Fetc/image/passwd.png",
        f"/study/{a['study']}/image/{a['sc']}.dcm",
        f"/study/{a['study']}/image/{a['sc']}",
        f"/study/{a['study']}/image/1.2.3.png",
        f"/study/{a['study']}%2F..%2F{b['study']}/image/{b['sc']}.png",
    ]
    for path in refused:
        r = c.get(path)
        assert r.status in (400, 404), path
        assert not r.body.startswith(b"\x89PNG") and b"DICM" not in r.body and b"root:" not in r.body, path
    assert c.get("/study/1.2.3.4.5").status == 404
    assert c.get("/study/..%2F..%2Fetc%2Fpasswd").status == 404


def test_five_wrong_passwords_slow_the_next_attempt(console):
    from cxr_node.config import load
    from cxr_node.db.session import Database
    from cxr_node.web import users

    db = Database(load(console.cfg).database.url)
    users.add(db, "eve", "viewer", "eves-password-4")
    db.dispose()
    c = Client(console.url)
    for _ in range(5):
        r = c.login("eve", "wrong password!")
        assert r.status == 401 and "Wrong user name or password" in r.text
    t0 = time.monotonic()
    r = c.login("eve", "eves-password-4")  # the right password, too soon
    assert r.status == 429 and int(r.headers["retry-after"]) >= 10 and time.monotonic() - t0 < 5
    assert "cxr_session" not in r.headers.get("set-cookie", "")
    failed = [e for e in _events(console, "web.login_failed") if e["detail"]["user"] == "eve"]
    assert [e["reason"] for e in failed[:5]] == ["wrong password"] * 5
    assert failed[5]["reason"].startswith("throttled") and failed[5]["host"] == "127.0.0.1"
    # an unknown name gets the same answer as a wrong password
    r = Client(console.url).login("nobody", "whatever-pass")
    assert r.status == 401 and "Wrong user name or password" in r.text
    # other users are not locked out by eve's failures
    assert _client(console, "rad").get("/").status == 200


def test_study_views_are_audited_with_who_and_which_patient(console):
    a = console.seeded["a"]
    c = _client(console, "rad")
    r = c.get(f"/study/{a['study']}")
    assert r.status == 200 and "PID-A" in r.text and f"/study/{a['study']}/image/{a['sc']}.png" in r.text
    assert 'id="feedback-form"' in r.text  # a radiologist may label the study
    views = _events(console, "web.study_viewed", a["study"])
    assert views[-1]["patient_id"] == "PID-A" and views[-1]["detail"]["user"] == "rad"
    assert views[-1]["host"] == "127.0.0.1"
    assert "viewed in the web console by rad from 127.0.0.1" in c.get(f"/study/{a['study']}").text  # its story
    # the audit page (a viewer's or an admin's) is itself audited, and exports CSV and JSON
    c = _client(console, "vic")
    rows = json.loads(c.get(f"/audit?study={a['study']}&format=json").body)
    assert any(x["event"] == "web.study_viewed" and x["detail"]["user"] == "rad" for x in rows)
    csv_text = c.get(f"/audit?study={a['study']}&format=csv").text
    assert csv_text.splitlines()[0].startswith("id,time,event,outcome") and "web.study_viewed" in csv_text
    page = c.get("/audit").text
    assert "Hash chain intact" in page
    used = _events(console, "web.audit_viewed")
    assert {u["detail"]["format"] for u in used} >= {"json", "csv", "html"}
    assert all(u["detail"]["user"] == "vic" for u in used)
    # DICOM audit messages: who saw which patient's study (110103 Accessed), logins (110114)
    p = cli("audit", "export", "--format", "dicom-audit", "--event", "web.study_viewed", "--event", "web.login",
            config=console.cfg)
    access = [m for m in p.stdout.splitlines() if 'csd-code="110103"' in m and 'UserID="rad"' in m]
    assert access and 'ParticipantObjectID="PID-A"' in access[-1] and 'NetworkAccessPointID="127.0.0.1"' in access[-1]
    assert a["study"] in access[-1]
    logins = [m for m in p.stdout.splitlines() if 'csd-code="110114"' in m]
    assert logins and 'csd-code="110122"' in logins[0] and 'UserIsRequestor="true"' in logins[0]


def test_idle_sessions_end_and_disabled_users_are_out_at_once(console):
    import hashlib

    c = _client(console, "vic")
    assert c.get("/").status == 200
    (token,) = [k.value for k in c.jar if k.name == "cxr_session"]
    sid = hashlib.sha256(token.encode()).hexdigest()

    def last_seen(value: str | None = None) -> str:
        with sqlite3.connect(console.db_path) as db:
            if value:
                db.execute("update web_sessions set last_seen_at = ? where id = ?", (value, sid))
            return db.execute("select last_seen_at from web_sessions where id = ?", (sid,)).fetchone()[0]

    ago = lambda minutes: (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=minutes)  # noqa: E731
                           ).replace(tzinfo=None).isoformat(" ")
    old = last_seen(ago(25))  # 25 minutes without a request (idle_minutes is 30)
    assert c.get("/?refresh=1").status == 200  # the page's own refresh is not use...
    assert last_seen() == old
    assert c.get("/").status == 200  # ...a page the user opens is
    assert last_seen() > old
    last_seen(ago(60))  # an hour without a request
    r = c.get("/")
    assert r.status == 303 and r.location.startswith("/login")
    ended = _events(console, "web.logout")
    assert any(e["reason"] == "idle timeout" and e["detail"]["user"] == "vic" for e in ended)
    c = _client(console, "vic")
    assert c.get("/").status == 200
    # a session left alone ends at someone's next login (audited), even if it is never used again
    stale = _client(console, "vic")
    (token,) = [k.value for k in stale.jar if k.name == "cxr_session"]
    sid = hashlib.sha256(token.encode()).hexdigest()
    last_seen(ago(60))
    _client(console, "rad")
    with sqlite3.connect(console.db_path) as db:
        assert db.execute("select count(*) from web_sessions where id = ?", (sid,)).fetchone()[0] == 0
    assert any(e["reason"] == "expired (ended at a later login)" and e["detail"]["user"] == "vic"
               for e in _events(console, "web.logout"))
    cli("user", "disable", "vic", config=console.cfg)
    assert c.get("/").status == 303
    assert c.login("vic", PASSWORDS["vic"]).status == 401


def test_the_web_unit_verifies(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO, require_tool

    exe = require_tool("systemd-analyze", "systemd")
    unit = (REPO / "systemd" / "cxr-node-web.service").read_text()
    for needed in ("User=cxr-node", "Restart=on-failure", "ExecStart=/opt/cxr-node/.venv/bin/cxr-node web",
                   "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/cxr-node"):
        assert needed in unit
    script = Path(sys.executable).with_name("cxr-node")
    assert os.access(script, os.X_OK), f"{script} missing: install the package (pip install -e .)"
    local = tmp_path / "cxr-node-web.service"
    local.write_text(unit.replace("/opt/cxr-node/.venv/bin/cxr-node", str(script)))
    p = subprocess.run([exe, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "cxr-node-web.service" not in p.stderr, p.stderr
    sec = subprocess.run([exe, "security", "--offline=true", str(local)], capture_output=True, text=True, timeout=60)
    if sec.returncode == 0 or "Overall exposure level" in sec.stdout:
        exposure = float(sec.stdout.split("Overall exposure level for")[1].split(":")[1].split()[0])
        assert exposure <= 4.0, sec.stdout[-2000:]


def test_with_tls_the_cookie_is_secure(tmp_path):
    import ssl
    import subprocess

    from conftest import require_tool

    openssl = require_tool("openssl", "openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem"), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    cfg = node_config(tmp_path / "tls", extra='[web]\ncertificate = "../cert.pem"\nprivate_key = "../key.pem"\n')
    add_user(cfg, "ada", "admin", PASSWORDS["ada"])
    web = WebConsole(cfg, tmp_path / "web.log")
    web.scheme = "https"
    web.start()
    try:
        c = Client(web.url, ssl_context=ssl.create_default_context(cafile=str(tmp_path / "cert.pem")))
        r = c.login("ada", PASSWORDS["ada"])
        assert r.status == 303
        session = [x for x in r.headers["set-cookie"].split("\n") if x.startswith("cxr_session=")][0]
        assert "Secure" in session and "HttpOnly" in session
        r = c.get("/")
        assert r.status == 200 and r.headers["strict-transport-security"].startswith("max-age=")
        plain = Client(f"http://127.0.0.1:{web.port}")  # no plain HTTP on the TLS port
        with pytest.raises(Exception):  # noqa: B017 - any failure will do: plain HTTP must not be served
            plain.get("/healthz")
        # a second console on the same port says so and exits 1
        busy = cli("web", "--port", str(web.port), config=cfg, check=False, timeout=60)
        assert busy.returncode == 1 and f"could not listen on 127.0.0.1:{web.port}" in busy.stderr
    finally:
        web.stop()


def test_web_settings_from_the_config(tmp_path):
    from cxr_node.config import parse
    from cxr_node.errors import ConfigError

    s = parse({}, base_dir=tmp_path)
    assert (s.web.host, s.web.port, s.web.certificate, s.web.tls) == ("127.0.0.1", 8080, None, False)
    s = parse({"web": {"port": 9443, "certificate": "c.pem", "private_key": "k.pem"}}, base_dir=tmp_path)
    assert s.web.port == 9443 and s.web.certificate == tmp_path / "c.pem" and s.web.tls
    with pytest.raises(ConfigError, match=r"\[web\] private_key: certificate and private_key must be given together"):
        parse({"web": {"certificate": "c.pem"}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"\[web\] port: must be an integer from 1 to 65535"):
        parse({"web": {"port": 0}}, base_dir=tmp_path)
    assert parse({}, base_dir=tmp_path).web.trusted_proxies == ()
    assert [str(n) for n in parse({"web": {"trusted_proxies": ["10.0.0.5", "192.168.1.0/24"]}},
                                  base_dir=tmp_path).web.trusted_proxies] == ["10.0.0.5/32", "192.168.1.0/24"]
    with pytest.raises(ConfigError, match=r"\[web\] trusted_proxies: must be a list of CIDR networks"):
        parse({"web": {"trusted_proxies": ["the proxy"]}}, base_dir=tmp_path)
    from cxr_node.config import web_warning

    assert web_warning(parse({}, base_dir=tmp_path)) is None
    assert "unencrypted" in web_warning(parse({"web": {"host": "0.0.0.0"}}, base_dir=tmp_path))
    assert web_warning(parse({"web": {"host": "0.0.0.0", "certificate": "c", "private_key": "k"}},
                             base_dir=tmp_path)) is None


def test_user_add_reads_the_password_from_stdin_and_refuses_bad_input(tmp_path, monkeypatch, capsys):
    """In-process through the CLI's main() (the fixture's `add_user` runs it as a subprocess)."""
    import io

    from cxr_node.cli import main

    cfg = node_config(tmp_path / "u")

    def user(*args: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))  # not a terminal: the first line is the password
        rc = main(["--config", str(cfg), "user", *args])
        out, err = capsys.readouterr()
        return rc, out, err

    rc, _, err = user("add", "ann", "--role", "viewer", stdin="short\n")
    assert rc == 2 and "at least 10 characters" in err
    assert user("add", "ann", "--role", "viewer")[0] == 2  # nothing on stdin
    assert "user name '../x'" in user("add", "../x", "--role", "viewer", stdin="long enough pw\n")[2]
    with pytest.raises(SystemExit):
        user("add", "ann", "--role", "god", stdin="long enough pw\n")
    assert user("add", "ann", "--role", "viewer", stdin="long enough pw\n")[0] == 0
    rc, _, err = user("add", "ann", "--role", "admin", stdin="long enough pw\n")
    assert rc == 1 and "exists already" in err
    assert user("passwd", "ann", stdin="another long pw\n")[0] == 0
    listed = json.loads(user("list", "--format", "json")[1])
    assert [(u["name"], u["role"], u["disabled"]) for u in listed] == [("ann", "viewer", False)]
    with sqlite3.connect(tmp_path / "u" / "data" / "cxr-node.db") as db:
        (h,) = db.execute("select password_hash from web_users").fetchone()
    assert h.startswith("$argon2id$") and "long" not in h
    user("list")
    events = [e["event"] for e in json.loads(cli("audit", "--format", "json", config=cfg).stdout)]
    assert events == ["user.added", "user.password_changed"]


def test_login_follows_only_local_next_paths(console):
    for nxt, expected in (("/study/1.2.3", "/study/1.2.3"), ("//evil.example", "/"), ("/\t/evil.example", "/"),
                          ("https://evil.example/", "/"), ("/\\evil.example", "/")):
        c = Client(console.url)
        token = hidden(c.get("/login").text, "csrf_token")
        r = c.post("/login", {"username": "ada", "password": PASSWORDS["ada"], "csrf_token": token, "next": nxt})
        assert r.status == 303 and r.location == expected, nxt



def test_oversized_bodies_are_refused_with_or_without_a_length(console):
    """A body over 256 KiB gets 413 whether it says its length or streams it in chunks (no
    Content-Length to check first), and the console keeps serving."""
    import http.client
    from urllib.parse import urlsplit

    big = ("username=ada&password=x&pad=" + "x" * (300 * 1024)).encode()
    u = urlsplit(console.url)
    for chunked in (False, True):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if chunked:
            conn.putrequest("POST", "/login")
            for k, v in {**headers, "Transfer-Encoding": "chunked"}.items():
                conn.putheader(k, v)
            conn.endheaders()
            for i in range(0, len(big), 16384):
                part = big[i:i + 16384]
                try:
                    conn.send(b"%x\r\n%s\r\n" % (len(part), part))
                except (BrokenPipeError, ConnectionResetError):
                    break
            else:
                conn.send(b"0\r\n\r\n")
        else:
            conn.request("POST", "/login", body=big, headers=headers)
        r = conn.getresponse()
        assert r.status == 413 and b"too large" in r.read(), chunked
        conn.close()
    assert Client(console.url).get("/login").status == 200  # still serving


def test_behind_a_trusted_proxy_the_forwarded_client_is_audited(tmp_path, console):
    """[web] trusted_proxies: that proxy's X-Forwarded-For names the client in the audit trail (and
    the login throttle), and X-Forwarded-Proto https makes the cookies Secure. Without it (the
    module's console) the same headers are ignored: a client cannot pick the address it is audited as."""
    cfg = node_config(tmp_path / "proxy", extra='[web]\ntrusted_proxies = ["127.0.0.1/32"]\n')
    add_user(cfg, "ada", "admin", PASSWORDS["ada"])
    web = WebConsole(cfg, tmp_path / "web.log").start()
    web.cfg = cfg
    try:
        via = Client(web.url, headers={"X-Forwarded-For": "203.0.113.7"})
        assert via.login("ada", "wrong password!").status == 401
        r = via.login("ada", PASSWORDS["ada"])
        session = [x for x in r.headers["set-cookie"].split("\n") if x.startswith("cxr_session=")][0]
        assert r.status == 303 and "Secure" not in session  # the proxy spoke plain HTTP to its client
        assert [e["host"] for e in _events(web, "web.login_failed")] == ["203.0.113.7"]
        assert _events(web, "web.login")[-1]["host"] == "203.0.113.7"
        tls_proxy = Client(web.url, headers={"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"})
        r = tls_proxy.get("/login")
        assert "Secure" in r.headers["set-cookie"] and r.headers["strict-transport-security"].startswith("max-age")
    finally:
        web.stop()
    forged = Client(console.url, headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"})
    r = forged.login("nobody", "whatever-pass")
    assert r.status == 401 and "Secure" not in r.headers.get("set-cookie", "")
    assert _events(console, "web.login_failed")[-1]["host"] == "127.0.0.1"


def test_a_shadow_mode_study_says_so_and_names_the_patient(console):
    """Issue 19: a study whose station is in shadow mode is marked on its page (its results were
    kept, not sent); the patient's name from the film's header heads the page, escaped."""
    from cxr_node.audit import trail as audit
    from cxr_node.config import load
    from cxr_node.db.session import Database

    a, b = console.seeded["a"], console.seeded["b"]
    db = Database(load(console.cfg).database.url)
    try:
        with db.transaction() as s:
            audit.record(s, "study.shadow", study_uid=b["study"], patient_id=b["pid"],
                         reason="station MODALITY is in shadow mode: 1 result object(s) kept, none sent",
                         detail={"version": 1, "station": "MODALITY", "objects": 1})
    finally:
        db.dispose()
    rad = _client(console, "rad")
    page = rad.get(f"/study/{b['study']}").text
    assert 'id="shadow"' in page and "Shadow mode" in page
    assert "Test, Patient" in page and "PID-B&lt;i&gt;x&lt;/i&gt;" in page and "<i>x</i>" not in page
    assert 'id="shadow"' not in rad.get(f"/study/{a['study']}").text
    worklist = rad.get("/").text
    assert "Test, Patient" in worklist and "1 film, analysed" in worklist and "COVID 90%" in worklist
