"""Measure the memory cost of one tracked client with a given detector set.

Fills every client's history to capacity (so ring buffers are full), then reports the
bytes held per client two ways: the numpy state arrays alone, and everything the
process allocated for the client (tracemalloc), which includes dict and object overhead.

    python3 bench/memory_per_client.py [--clients 2000] [--dim 64] [--config FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's exporter first, also where the venv installed another
from exporter.config import load_settings  # noqa: E402
from exporter.detectors import enabled_detectors  # noqa: E402
from exporter.metrics import Metrics  # noqa: E402
from exporter.pipeline import Pipeline  # noqa: E402


def state_bytes(p: Pipeline) -> int:
    return sum(
        a.nbytes
        for c in p.store.values()
        for per in c.detector_state.values()
        for st in per.values()
        for a in _arrays(st)
    )


def _arrays(st: object):
    if isinstance(st, np.ndarray):
        yield st
    elif isinstance(st, dict):
        for v in st.values():
            yield from _arrays(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--events", type=int, default=0, help="events per client (default: the largest detector window)")
    ap.add_argument("--config", default=None)
    args = ap.parse_args()
    settings = load_settings(args.config)
    settings.state.max_clients = max(settings.state.max_clients, args.clients)
    windows = [getattr(params, "window", 0) for _, params in enabled_detectors(settings).values()]
    per_client = args.events or max(windows + [1])
    p = Pipeline(settings, Metrics(enabled_detectors(settings)))
    rng = np.random.default_rng(0)
    probs = np.full(10, 0.1).tolist()

    def feed(clients: range) -> None:
        for c in clients:
            x = rng.integers(0, 17, (per_client, args.dim)).astype(float)
            p.ingest_objects({"client": f"c{c}", "ts": 1e9, "model": "m", "input": row.tolist(), "output": probs} for row in x)

    feed(range(50))  # warm-up: model runtime, metric children
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    feed(range(50, 50 + args.clients))
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    n = len(p.store)
    result = {
        "detectors": list(enabled_detectors(settings)),
        "dim": args.dim,
        "events_per_client": per_client,
        "clients": args.clients,
        "state_array_bytes_per_client": round(state_bytes(p) / n),
        "total_bytes_per_client": round((after - before) / args.clients),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
