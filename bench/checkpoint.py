"""Cost of a state checkpoint: snapshot and restore times, and how long the pipeline lock is held.

Tracks ``--clients`` clients of a 64-feature, 10-class model with the default detector set
(``--events`` each), then times a checkpoint's snapshot (``Pipeline.snapshot_copy()`` streamed by
``snapshot.dump``) (best of ``--repeat``), the longest
and the total time its lock holds lasted (pushes and scrapes wait for those), the copy
alone (``Pipeline.snapshot_copy()``: what file ingestion waits for, the rest being
written by a thread), and ``Pipeline.restore()`` of the result.

    python3 bench/checkpoint.py [--clients 1000] [--events 20] [--repeat 3] [--config FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's exporter first, also where the venv installed another
from exporter.tuning import tune_process  # noqa: E402

tune_process()  # as the CLI does (exporter.tuning), before numpy loads

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from exporter.config import load_settings  # noqa: E402
from exporter.pipeline import Pipeline  # noqa: E402
from exporter.snapshot import dump  # noqa: E402


class TimedLock:
    """Wraps the pipeline's lock and records how long each hold lasted."""

    def __init__(self, lock: threading.RLock) -> None:
        self.lock = lock
        self.holds: list[float] = []

    def __enter__(self) -> None:
        self.lock.acquire()
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.holds.append(time.perf_counter() - self._start)
        self.lock.release()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--events", type=int, default=20, help="events per client")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--config", default=None)
    args = ap.parse_args()
    settings = load_settings(args.config)
    settings.state.max_clients = max(settings.state.max_clients, args.clients)
    p = Pipeline(settings)
    rng = np.random.default_rng(0)
    probs = np.full(10, 0.1).tolist()
    for c in range(args.clients):
        x = rng.integers(0, 17, (args.events, 64)).astype(float)
        p.ingest_objects({"client": f"c{c}", "ts": 1e9 + c, "model": "m", "input": row.tolist(), "output": probs} for row in x)
    real = p.lock
    snap, copy, restore, longest, held = float("inf"), float("inf"), float("inf"), 0.0, 0.0
    data = b""
    for _ in range(args.repeat):
        timed = TimedLock(real)
        p.lock = timed  # type: ignore[assignment]
        start = time.perf_counter()
        buf = io.BytesIO()
        dump(p.snapshot_copy(), buf)  # as a checkpoint does, into a file
        elapsed = time.perf_counter() - start
        data = buf.getvalue()
        p.lock = real
        if elapsed < snap:
            snap, longest, held = elapsed, max(timed.holds), sum(timed.holds)
        start = time.perf_counter()
        p.snapshot_copy()  # what file ingestion waits for (the writer thread encodes and writes)
        copy = min(copy, time.perf_counter() - start)
        start = time.perf_counter()
        Pipeline(settings).restore(data)
        restore = min(restore, time.perf_counter() - start)
    print(
        json.dumps(
            {
                "clients": args.clients,
                "snapshot_bytes": len(data),
                "snapshot_seconds": round(snap, 3),
                "copy_seconds": round(copy, 3),
                "longest_lock_hold_seconds": round(longest, 4),
                "total_lock_hold_seconds": round(held, 3),
                "restore_seconds": round(restore, 3),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
