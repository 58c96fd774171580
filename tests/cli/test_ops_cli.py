"""What a new admin meets on the command line (issue 22): `check-config` says where the data will
live, `cxr-node web` logs success only once it listens, `triage` checks its inputs before loading
the model and says a problem once, highdicom's per-module lines are DEBUG, a semicolon CSV is told
to use commas. Each as a subprocess, as an admin runs it."""

from __future__ import annotations

import socket
import subprocess
import time

from conftest import PY, REPO, cli, free_port, wait_port


def _config(tmp_path, extra: str = ""):
    cfg = tmp_path / "etc" / "cxr-node.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f'[storage]\ndata_dir = "../var"\n[model]\npreload = false\n{extra}')
    return cfg


def test_check_config_says_where_the_data_will_live(tmp_path):
    cfg = _config(tmp_path)
    out = cli("check-config", config=cfg).stdout
    line = next(x for x in out.splitlines() if x.strip().startswith("data_dir"))
    assert str(tmp_path / "var") in line and "the data lives here" in line
    assert f"relative to {tmp_path / 'etc'}" in line


def test_web_on_a_busy_port_never_says_it_listens(tmp_path):
    cfg = _config(tmp_path)
    cli("db", "upgrade", config=cfg)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = cli("web", "--port", str(port), config=cfg, check=False, timeout=120)
    assert p.returncode == 1 and f"could not listen on 127.0.0.1:{port}" in p.stderr
    assert "listening" not in p.stderr and "startup complete" not in p.stderr

    port = free_port()
    proc = subprocess.Popen([PY, "-m", "cxr_node", "--config", str(cfg), "web", "--port", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(port, proc=proc, timeout=60)
        time.sleep(0.5)
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert f"web console listening on http://127.0.0.1:{port}" in log
    assert "Application startup complete" not in log


def test_triage_refuses_a_text_file_at_once_and_says_it_once(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("patient list, see ward 3\n")
    t0 = time.monotonic()
    p = cli("triage", str(notes), check=False)
    took = time.monotonic() - t0
    assert p.returncode == 1
    said = "notes.txt: cannot use this file: a text file, not an image"
    assert (p.stdout + p.stderr).count("a text file, not an image") == 1 and said in p.stderr
    assert "loaded" not in p.stderr and took < 15  # no model load (torch alone takes seconds)


def test_highdicom_module_copies_are_debug(tmp_path):
    code = ("import logging, sys; from cxr_node.logs import configure; configure(sys.argv[1]); "
            "logging.getLogger('highdicom.base').info('copy attributes of module %s', 'x'); "
            "logging.getLogger('highdicom.base').warning('a real warning')")
    info = subprocess.run([PY, "-c", code, "INFO"], cwd=REPO, capture_output=True, text=True, timeout=60).stderr
    assert "copy attributes of module" not in info and "WARNING highdicom.base: a real warning" in info
    debug = subprocess.run([PY, "-c", code, "DEBUG"], cwd=REPO, capture_output=True, text=True, timeout=60).stderr
    assert "DEBUG highdicom.base: copy attributes of module" in debug


def test_a_semicolon_csv_is_told_to_use_commas(tmp_path):
    cfg = _config(tmp_path)
    cli("db", "upgrade", config=cfg)
    f = tmp_path / "labels.csv"
    f.write_text("study_uid;label\n1.2.3;COVID\n")
    p = cli("feedback", "import", str(f), config=cfg, check=False)
    assert p.returncode != 0 and "separated by semicolons" in p.stderr and "use commas" in p.stderr
