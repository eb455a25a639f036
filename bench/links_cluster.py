"""What one hostile client can make the ``links`` detector spend: a tight cluster of inputs.

A query's candidates come from ``tables`` hash tables, and near one another one entry comes
back from most of them. A client that sends many distinct inputs close together far off the
data makes every query's candidates its own cluster's earlier points; every (query,
candidate) pair then goes to near links' full comparison, a row of the input's width each.
Each case runs in a child process (its peak RSS is the child's own): ``links`` alone,
reference fitted on 600 benign integer inputs in 0..16 (as ``tests/test_links_memory.py``
does), then 1,024 queries of one client in blocks of 256, timed per block (``prepare`` and
``update``: what the pipeline runs under its lock).

- ``cluster``: every feature at 100 (far off the data), 12 features moved by -1, 0 or +1 and
  one by a counter (distinct inputs);
- ``honest``: inputs drawn like the reference's (no cluster, no near links).

    python3 bench/links_cluster.py [--dims 784,4096]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's exporter first
from exporter.tuning import tune_process  # noqa: E402

tune_process()  # as the CLI does (exporter.tuning), before numpy loads

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def case(dim: int, kind: str) -> dict[str, object]:
    """One case in this process: seconds per block and peak RSS (MiB, Linux ``VmHWM``)."""
    from exporter.detectors.base import Batch, Block, ModelContext, Reference
    from exporter.detectors.kit import Scaling
    from exporter.detectors.links import LinksDetector, LinksParams
    from exporter.events import Event

    rng = np.random.default_rng(dim)
    benign = rng.integers(0, 17, (600, dim)).astype(float)
    scaling = Scaling.fit(benign)
    det = LinksDetector(LinksParams(), ModelContext("m", "tabular", dim, 10, scaling, ("links",)))
    ref = det.fit(Reference(benign, None, scaling))
    buf = io.BytesIO()
    np.savez(buf, **ref)  # as a profile stores it
    buf.seek(0)
    det.load_reference(dict(np.load(buf)))
    n = 1024
    if kind == "cluster":
        x = np.full((n, dim), 100.0)
        x[:, :12] += rng.integers(-1, 2, (n, 12))
        x[:, 12] += np.arange(n) * 1e-3
    else:
        x = rng.integers(0, 17, (n, dim)).astype(float)
    state = det.init_state()
    seconds = []
    for b in range(0, n, 256):
        events = [Event("mallory", "m", 1000.0 + i, "tabular", vector=v) for i, v in enumerate(x[b : b + 256], start=b)]
        block = Block("m", events)
        started = time.perf_counter()
        det.prepare(block)
        det.update(state, Batch("mallory", "m", events, block, np.arange(len(events))))
        seconds.append(time.perf_counter() - started)
    status = Path("/proc/self/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    return {"dim": dim, "case": kind, "block_seconds_max": round(max(seconds), 3), "block_seconds": [round(s, 3) for s in seconds],
            "peak_rss_mib": round(peak, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="784,4096", help="input widths, comma-separated")
    ap.add_argument("--child", nargs=2, metavar=("DIM", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(case(int(args.child[0]), args.child[1])))
        return 0
    print("| features | case | slowest block, s | blocks, s | peak RSS, MiB |\n|---:|---|---:|---|---:|")
    for dim in [int(d) for d in args.dims.split(",")]:
        for kind in ("honest", "cluster"):
            out = subprocess.run([sys.executable, __file__, "--child", str(dim), kind], check=True, capture_output=True, text=True).stdout
            r = json.loads(out)
            print(f"| {dim} | {kind} | {r['block_seconds_max']} | {', '.join(map(str, r['block_seconds']))} | {r['peak_rss_mib']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
