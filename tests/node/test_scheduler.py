"""The scheduler's hand-offs, in process: a stage that finishes while the daemon shuts down must not
deadlock APScheduler's shutdown (it holds its job-store lock while it waits for running jobs)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cxr_node.config import parse
from cxr_node.node.scheduler import build_scheduler


class SlowProcessor:
    """Analyses one study slowly, then has nothing more: its results wake the outbox."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.calls = 0
        self.released: list[str] = []

    def process_queued(self, limit: int) -> int:
        self.calls += 1
        if self.calls == 1:
            self.started.set()
            time.sleep(1.0)
            return 1
        return 0

    def release_held(self, why: str) -> int:
        self.released.append(why)
        return 1


class Outbox:
    def __init__(self) -> None:
        self.drains = 0

    def drain(self) -> int:
        self.drains += 1
        return 0


class NoDb:
    pass


@pytest.fixture
def scheduler(tmp_path: Path, monkeypatch):
    """The real scheduler over a slow processor and a counting outbox; the outbox polls every 10 min."""
    import cxr_node.node.scheduler as sch

    monkeypatch.setattr(sch.studies, "complete_quiet_studies", lambda db, quiet: [])
    monkeypatch.setattr(sch.studies, "retry_failed", lambda db: [])  # no database here (NoDb)
    settings = parse({"storage": {"data_dir": str(tmp_path)}, "outbox": {"poll_seconds": 600},
                      "retention": {"days": 0}}, tmp_path)
    proc, outbox = SlowProcessor(), Outbox()
    sched = build_scheduler(settings, NoDb(), proc, outbox)
    sched.start()
    yield sched, proc, outbox
    if sched.running:
        sched.shutdown(wait=True)


def test_shutdown_while_a_stage_wakes_the_next_does_not_deadlock(scheduler):
    sched, proc, _ = scheduler
    assert proc.started.wait(10)
    done = threading.Event()
    threading.Thread(target=lambda: (sched.shutdown(wait=True), done.set()), daemon=True).start()
    assert done.wait(10), "scheduler shutdown deadlocked on a wake-up from a finishing job"
    # the round in progress ends, and what the worker still holds goes back to the queue, not
    # analysed to the end while the node is stopping
    assert proc.released and "stopped" in proc.released[0]
    assert proc.calls == 1


def test_finished_stage_wakes_the_outbox_before_its_poll(scheduler):
    _, _, outbox = scheduler
    deadline = time.monotonic() + 10
    while outbox.drains < 2 and time.monotonic() < deadline:  # 1: at start-up; 2: the wake-up
        time.sleep(0.05)
    assert outbox.drains >= 2
