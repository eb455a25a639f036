"""Cost of each detector alone, in microseconds per event, on the throughput benchmark's traffic.

``bench/throughput.py`` says how fast the whole replay is; this says where the time goes.
The traffic is decoded and cut into per-client batches exactly as ``replay`` does, the
batches' shared views (stacked vectors, probabilities, digests) are computed once up front,
and then every detector runs alone over all batches, with fresh per-client and shared state. Each
figure is the best of ``--repeat`` runs (BLAS threads pinned to 1, like the replay bench).

    python3 bench/detector_cost.py [--events 60000] [--clients 500] [--only prada,knn] [--profile]

``--profile`` prints the top functions of each detector under cProfile as well.
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import make_log  # noqa: E402

from exporter.config import load_settings  # noqa: E402
from exporter.detectors import Batch  # noqa: E402
from exporter.pipeline import Pipeline  # noqa: E402
from exporter.replay import BLOCK, Progress, read_events  # noqa: E402

WARM_VIEWS = ("ts", "vectors", "probs", "confidence", "top2", "predicted", "digests")


def batches_of(events: list, model: str) -> list[Batch]:
    """Per-client batches of each replay block, with their shared views already computed."""
    out: list[Batch] = []
    for i in range(0, len(events), BLOCK):
        groups: dict[str, list] = {}
        for e in events[i : i + BLOCK]:
            groups.setdefault(e.client, []).append(e)
        out += [Batch(c, model, evs) for c, evs in groups.items()]
    for b in out:
        for view in WARM_VIEWS:
            getattr(b, view, None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated detector names (default: every enabled one)")
    ap.add_argument("--profile", action="store_true", help="print each detector's top functions under cProfile")
    args = ap.parse_args()
    settings = load_settings(None)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "traffic.jsonl"
        make_log(log, args.events, args.clients)
        pipeline = Pipeline(settings)
        events = read_events([log], pipeline, settings.files.max_line_bytes, Progress(io.StringIO(), False), Counter())
    pipeline.process(events[:1])  # builds the model's runtime (detectors, statistics)
    model = events[0].model
    runtime = pipeline.runtimes[model]
    if runtime.context.stats is not None:  # a long-running exporter's settled feature statistics
        runtime.context.stats.update_many(np.stack([e.vector for e in events[1:]]))
    wanted = [n for n in args.only.split(",") if n]
    total = 0.0
    print(f"{len(events)} events, {args.clients} clients, per-event cost of each detector alone:")
    for det in runtime.detectors:
        if wanted and det.name not in wanted:
            continue
        best = float("inf")
        for _ in range(args.repeat):
            det = type(det)(det.params, runtime.context)  # fresh shared state (e.g. fingerprint's index) each run
            batches = batches_of(events, model)
            if det.name == "risk":  # fusion reads the other detectors' signals of the batch
                others: dict[tuple[str, str], object] = {}
                for b in batches:
                    for other in runtime.detectors:
                        if other is not det:
                            key = (other.name, b.client)
                            if key not in others:
                                others[key] = other.init_state()
                            sig = other.update(others[key], b)  # type: ignore[arg-type]
                            if sig is not None:
                                b.signals[other.name] = sig
            states: dict[str, object] = {}
            prof = cProfile.Profile() if args.profile else None
            start = time.perf_counter()
            if prof is not None:
                prof.enable()
            for b in batches:
                st = states.get(b.client)
                if st is None:
                    st = states[b.client] = det.init_state()
                det.update(st, b)  # type: ignore[arg-type]
            if prof is not None:
                prof.disable()
            best = min(best, time.perf_counter() - start)
        total += best
        print(f"  {det.name:16s} {best / len(events) * 1e6:7.2f} us/event")
        if prof is not None:
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(12)
    print(f"  {'sum':16s} {total / len(events) * 1e6:7.2f} us/event")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
