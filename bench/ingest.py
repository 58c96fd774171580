"""Ingest throughput: dcmtk storescu -> dcmtk storescp (reference) vs storescu -> cxr-node.

Both receivers run on 127.0.0.1 in the same go, with 1 association and with N parallel ones,
alternating reference and cxr-node runs for --rounds rounds; the script prints medians and the
ratio cxr-node / storescp (goal: <= 1.25). cxr-node does strictly more work per file (fsync,
rename, database commit), storescp does none of that.

    .venv/bin/python bench/ingest.py [--files 100] [--size-mb 10] [--parallel 4] [--rounds 2]
                                     [--baseline DIR]

``--baseline DIR`` also runs the cxr-node code checked out in DIR (``git archive REV | tar -x -C
DIR``), in the same rounds, so that a change's cost is read as two ratios to the same storescp.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import conftest
from conftest import Node, free_port, wait_port
from dicomgen import make_cr


def send(port: int, aec: str, batches: list[list[Path]]) -> float:
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port), *map(str, b)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for b in batches]
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err[-2000:]}")
    return time.perf_counter() - t0


def run_storescp(work: Path, batches: list[list[Path]]) -> float:
    out = work / "storescp-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "--max-pdu", "131072", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
        return send(port, "STORESCP", batches)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(out, ignore_errors=True)


@contextlib.contextmanager
def _code_from(code: Path | None):
    """Run ``python -m cxr_node`` (the Node fixture's cwd) from ``code`` instead of this checkout."""
    saved = conftest.REPO
    conftest.REPO = code or saved
    try:
        yield
    finally:
        conftest.REPO = saved


def _knows_release_rule(code: Path | None) -> bool:
    """Whether the code run has ``[study] complete_on_release`` (this checkout has)."""
    return code is None or any("complete_on_release" in p.read_text() for p in (code / "cxr_node").rglob("*.py"))


def run_cxr_node(work: Path, batches: list[list[Path]], code: Path | None = None) -> float:
    root = work / "node"
    shutil.rmtree(root, ignore_errors=True)
    # receiving alone, as in every run since the first: the model is not preloaded (it would load
    # torch on the same 2 cores during the measurement) and studies complete after the default
    # 30 s quiet period, after the files are in
    # studies complete on their association's release since issue 22: turned off here, so that no
    # study is analysed while the next batch arrives (older code does not know the key)
    off = "complete_on_release = false\n" if _knows_release_rule(code) else ""
    node = Node(root, log_level="WARNING", extra="[model]\npreload = false\n", study_extra=off)
    with _code_from(code):
        node.start()
    try:
        elapsed = send(node.port, "CXRNODE", batches)
        stored = len(list((node.data_dir / "spool").rglob("*.dcm")))
        expected = sum(len(b) for b in batches)
        if stored != expected:
            raise RuntimeError(f"cxr-node stored {stored} of {expected} files")
        return elapsed
    finally:
        node.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--size-mb", type=float, default=10.0)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="where to put the generated files (default: tmp)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another checkout of cxr-node to run in the same rounds (the code before a change)")
    args = ap.parse_args()
    if not shutil.which("storescu") or not shutil.which("storescp"):
        print("needs dcmtk (apt-get install dcmtk)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="cxr-bench-", dir=args.workdir))
    try:
        side = int((args.size_mb * 1e6 / 2) ** 0.5)
        files = [make_cr(work / "files" / f"{i:04d}.dcm", rows=side, cols=side, seed=i)
                 for i in tqdm(range(args.files), desc="generating files", unit="file")]
        total_mb = sum(f.stat().st_size for f in files) / 1e6
        results = {}
        for assocs in (1, args.parallel):
            batches = [files[i::assocs] for i in range(assocs)]
            ref, ours, base = [], [], []
            for _ in tqdm(range(args.rounds), desc=f"{assocs} association(s)", unit="round"):
                ref.append(run_storescp(work, batches))
                if args.baseline:
                    base.append(run_cxr_node(work, batches, args.baseline.resolve()))
                ours.append(run_cxr_node(work, batches))
            results[assocs] = (statistics.median(ref), statistics.median(ours), ref, ours)
            if base:
                results[f"{assocs} baseline"] = (statistics.median(ref), statistics.median(base), ref, base)

        print(f"\ningest benchmark {dt.date.today()} on {platform.node()} ({platform.machine()}, "
              f"{_cpus()} CPUs): {args.files} files, {total_mb:.0f} MB, {args.rounds} rounds (medians)")
        print(f"{'associations':>12} {'storescp s':>11} {'cxr-node s':>11} {'MB/s ours':>10} {'ratio':>6}")
        for assocs, (ref, ours, refs, ourss) in results.items():
            print(f"{assocs!s:>12} {ref:>11.2f} {ours:>11.2f} {total_mb / ours:>10.0f} {ours / ref:>6.2f}"
                  f"   (storescp {', '.join(f'{x:.2f}' for x in refs)}; cxr-node {', '.join(f'{x:.2f}' for x in ourss)})")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
