"""Cost of the C-STORE handler's checks per film (issue 18, point 3), in one go.

    .venv/bin/python bench/store_check.py [--size-mb 10] [--repeat 20]

Before: ``ingest.read_header`` decoded the whole Part 10 stream (pixel data included). After:
``dataset_check.encoding_fault`` walks the element headers strictly in the negotiated syntax, then
``read_header(..., pixels=False)`` stops before the pixel data. Prints the median time per film
of each and the ratio after / before, and, as the reference for the scale, the time to copy the
film's bytes once (what the handler does anyway: ``event.encoded_dataset()``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from dicomgen import dataset_bytes, make_cr

from cxr_node.receive.dataset_check import encoding_fault
from cxr_node.receive.ingest import read_header

EXPLICIT = "1.2.840.10008.1.2.1"


def _median(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=10.0)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    side = int((args.size_mb * 1e6 / 2) ** 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_cr(Path(tmp) / "film.dcm", rows=side, cols=side)
        whole = path.read_bytes()
        ds = dataset_bytes(path)

    def before() -> None:
        read_header(whole)

    def after() -> None:
        assert encoding_fault(ds, EXPLICIT) is None
        read_header(whole, pixels=False)

    copy = _median(lambda: bytes(bytearray(whole)), args.repeat)
    b, a = _median(before, args.repeat), _median(after, args.repeat)
    walk = _median(lambda: encoding_fault(ds, EXPLICIT), args.repeat)
    print(f"film {len(whole) / 1e6:.1f} MB, medians of {args.repeat}")
    print(f"  copy of the film's bytes (scale)          {copy * 1e3:8.2f} ms")
    print(f"  before: read_header (whole stream)        {b * 1e3:8.2f} ms")
    print(f"  after:  encoding_fault + header only      {a * 1e3:8.2f} ms   ratio after/before {a / b:.2f}")
    print(f"          of which the strict walk          {walk * 1e3:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
