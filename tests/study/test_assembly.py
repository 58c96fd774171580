"""Study assembly: complete after quiet_seconds, reopen on a late instance, resume after restart."""

from __future__ import annotations

import time

from conftest import storescu
from dicomgen import make_cr, uid


def _state(node, study):
    with node.db() as c:
        return c.execute("select state, version, instance_count from studies where study_uid=?", (study,)).fetchone()


def test_quiet_period_completes_late_instance_reopens(node_factory, tmp_path):
    # no model: processing must fail cleanly, audited, and receiving carries on
    n = node_factory("asm", quiet_seconds=1.5, extra='[model]\ncheckpoint = "/nonexistent/model.pt"\n').start()
    study = uid()
    a, b = (make_cr(tmp_path / f"{x}.dcm", study_uid=study, seed=i) for i, x in enumerate("ab"))
    assert storescu(n.port, a, b).returncode == 0
    assert _state(n, study)[0] == "receiving"
    n.wait_for_event("study.queued", study_uid=study)
    (failed,) = n.wait_for_event("study.failed", study_uid=study)
    assert "/nonexistent/model.pt not found" in failed["reason"]
    states = [(r["event"], r["detail"]["version"]) for r in n.audit("--study", study)
              if r["event"].startswith("study.")]
    assert states == [("study.receiving", 1), ("study.complete", 1), ("study.queued", 1),
                      ("study.processing", 1), ("study.failed", 1)]
    assert _state(n, study) == ("failed", 1, 2)

    late = make_cr(tmp_path / "late.dcm", study_uid=study, seed=9)
    assert storescu(n.port, late).returncode == 0
    (reopened,) = n.events("study.reopened", study_uid=study)
    assert reopened["detail"] == {"from": "failed", "to": "receiving", "version": 2}
    deadline = time.monotonic() + 20
    while not [r for r in n.events("study.queued", study_uid=study) if r["detail"]["version"] == 2]:
        assert time.monotonic() < deadline, "version 2 never queued"
        time.sleep(0.3)
    assert _state(n, study)[1:] == (2, 3)
    with n.db() as c:
        versions = dict(c.execute("select sop_instance_uid, study_version from instances where study_uid=?", (study,)))
    assert sorted(versions.values()) == [1, 1, 2]


def test_study_resumes_after_restart(node_factory, tmp_path):
    n = node_factory("resume", quiet_seconds=4).start()
    study = uid()
    assert storescu(n.port, make_cr(tmp_path / "r.dcm", study_uid=study)).returncode == 0
    n.kill()  # before the quiet period is over
    assert _state(n, study)[0] == "receiving"
    n.start()
    n.wait_for_event("study.queued", study_uid=study, timeout=20)
    assert _state(n, study)[1:] == (1, 1)
    (queued,) = n.events("study.queued", study_uid=study)
    assert queued["detail"]["from"] == "complete"  # resumed from the persisted receiving state
