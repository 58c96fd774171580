"""The daemon's memory over a long run: glibc allocator settings.

RSS grew over a long run (1.1 GB -> 1.7 GB after about 300 studies) and fell back on restart. On
glibc, every thread that allocates gets a malloc arena of its own (up to 8 per core): association
threads, the scheduler's worker threads and torch's threads each leave freed memory in their own
arenas, where it stays counted in RSS (allocator high water, not a leak; bench/soak.py). Two
settings keep it flat:

* at start-up, at most :data:`ARENA_MAX` arenas (``mallopt(M_ARENA_MAX)``, as MALLOC_ARENA_MAX
  would, but without relying on the environment of whoever starts the daemon);
* after each batch of studies, ``malloc_trim(0)``: freed pages go back to the system.

``CXR_NODE_MALLOC_TUNING=0`` turns both off (the soak benchmark's reference run). Elsewhere than
glibc both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

ARENA_MAX = 2
_M_ARENA_MAX = -8  # glibc malloc.h
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.malloc_trim, lib.mallopt  # noqa: B018 - glibc has both; musl and others do not
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def enabled() -> bool:
    return os.environ.get("CXR_NODE_MALLOC_TUNING", "1") != "0" and _glibc() is not None


def tune_allocator() -> bool:
    """Cap the number of malloc arenas; call before the daemon starts its threads."""
    if not enabled():
        log.info("allocator settings off (CXR_NODE_MALLOC_TUNING=0 or not glibc)")
        return False
    ok = bool(_glibc().mallopt(_M_ARENA_MAX, ARENA_MAX))
    log.debug("malloc arenas capped at %d: %s", ARENA_MAX, ok)
    return ok


def release_free_memory() -> None:
    """Return freed heap pages to the system (after a batch of studies)."""
    if enabled():
        _glibc().malloc_trim(0)


#: Objects made per study; a count that grows with the studies analysed is a leak.
PER_STUDY_TYPES = ("FileDataset", "Dataset", "DataElement", "Tensor", "Association", "AssociationInfo", "Session",
                   "StudyWork", "Film", "Prediction", "LungFields", "Thread")


def census() -> dict:
    """What the process holds (``kill -USR1`` on the daemon logs it): RSS and peak, threads, and
    Python objects by type, for telling a leak (counts growing with the studies) from allocator
    high water (counts flat, RSS up). Walks every object the garbage collector tracks: a
    diagnostic, not for every study."""
    import collections
    import gc
    import threading
    from pathlib import Path

    gc.collect()
    counts = collections.Counter(type(o).__name__ for o in gc.get_objects())
    mem = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            mem[line.split(":")[0]] = int(line.split()[1]) // 1024
    return {"rss_mib": mem.get("VmRSS"), "peak_mib": mem.get("VmHWM"), "threads": threading.active_count(),
            "objects": sum(counts.values()), "per_study": {t: counts.get(t, 0) for t in PER_STUDY_TYPES},
            "top": dict(counts.most_common(8)), "allocator_tuning": enabled()}
