"""Nothing lost: SIGKILL the daemon in the middle of a multi-file, multi-association send."""

from __future__ import annotations

import re
import subprocess
import time

from conftest import require_tool, storescu
from dicomgen import make_cr
from pydicom import dcmread

SENDERS, FILES_EACH = 3, 15


def _successes(output: str) -> list[str]:
    """Files storescu got a Success response for (it sends one file at a time, in order)."""
    ok, current = [], None
    for line in output.splitlines():
        m = re.match(r"I: Sending file: (.+)$", line)
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            ok.append(current)
            current = None
    return ok


def test_sigkill_mid_send_loses_nothing_that_got_success(node_factory, tmp_path):
    exe = require_tool("storescu", "dcmtk")
    n = node_factory("crash").start()
    batches = [[make_cr(tmp_path / f"s{s}" / f"{i}.dcm", rows=1000, cols=1000, seed=s * 100 + i)
                for i in range(FILES_EACH)] for s in range(SENDERS)]
    senders = [subprocess.Popen([exe, "-v", "-aet", f"MOD{s}", "-aec", "CXRNODE", "127.0.0.1", str(n.port),
                                 *map(str, b)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for s, b in enumerate(batches)]
    spool = n.data_dir / "spool"
    deadline = time.monotonic() + 60
    while len(list(spool.rglob("*.dcm"))) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    n.kill()  # SIGKILL: no chance to clean up
    outputs = [p.communicate(timeout=60)[0] for p in senders]
    succeeded = [f for out in outputs for f in _successes(out)]
    assert 1 <= len(succeeded) < SENDERS * FILES_EACH, "the kill did not land mid-send"

    # Before restart: the spool holds only whole, readable files (temp files live in incoming/).
    for f in spool.rglob("*"):
        if f.is_file():
            assert f.suffix == ".dcm", f"stray file in spool: {f}"
            ds = dcmread(f)
            assert len(ds.PixelData) == ds.Rows * ds.Columns * 2

    n.start()
    assert not [p for p in (n.data_dir / "incoming").rglob("*") if p.is_file()], "partial temp files survived"
    with n.db() as c:
        in_db = {r[0] for r in c.execute("select sop_instance_uid from instances")}
    for f in succeeded:
        ds = dcmread(f, stop_before_pixels=True)
        spooled = spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert spooled.is_file(), f"{f} got Success but is not in the spool"
        assert ds.SOPInstanceUID in in_db, f"{f} got Success but is not in the database"
    # every spooled file is in the database (recovered at start-up if the crash beat the commit)
    assert len(list(spool.rglob("*.dcm"))) == len(in_db)

    # the modalities retry everything: all arrive, nothing twice
    for s, b in enumerate(batches):
        p = storescu(n.port, *b, aet=f"MOD{s}")
        assert p.returncode == 0, p.stderr
    assert len(list(spool.rglob("*.dcm"))) == SENDERS * FILES_EACH
    assert len(n.events("instance.duplicate")) >= len(succeeded)
