"""Measure the memory one model costs, from its first event to a full shared index, by input length.

For each input length, feeds ``--models`` new models through a pipeline (default config,
no profile: each model learns its reference live) and reports, per model, what the
process allocated (tracemalloc: numpy arrays included):

1. after the model's first event (runtime, detectors, metric children, a small index);
2. after ``--events`` events from ``--clients`` clients (the live reference fitted at
   64 and 512 samples: scaling, ood covariance, coverage cells; the index grown), with
   the clients' own state excluded (measured by ``bench/memory_per_client.py``);

and, computed from the arrays themselves, what traffic can add at most per model: the
``fingerprint`` index at ``max_queries`` (grown to capacity here), and the live
baseline's reservoir at its capacity (freed after its last refit step). The worst case
at ``model_admission.max_models`` is ``max_models`` times the last column. Apart, the
opt-in ``links`` detector's index at its capacity (rows, bucket tables and table of steps,
grown to capacity here; the map of filed digests comes on top), which the worst case
does not include.

    python3 bench/memory_per_model.py [--dims 64,784,3072] [--models 4] [--events 600] [--clients 40]
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
from exporter.baseline import BaselinePlan  # noqa: E402
from exporter.config import Settings  # noqa: E402
from exporter.detectors import enabled_detectors  # noqa: E402
from exporter.detectors.base import Reference  # noqa: E402
from exporter.detectors.fingerprint import FingerprintDetector, FingerprintParams  # noqa: E402
from exporter.detectors.links import LinksDetector, LinksParams  # noqa: E402
from exporter.metrics import Metrics  # noqa: E402
from exporter.pipeline import Pipeline  # noqa: E402

MiB = 1024 * 1024


def _client_bytes(p: Pipeline) -> int:
    """Bytes of the clients' own detector and fusion state arrays (not the model's)."""

    def arrays(x: object) -> int:
        if isinstance(x, np.ndarray):
            return x.nbytes
        if isinstance(x, dict):
            return sum(arrays(v) for v in x.values())
        return 0

    return sum(arrays(c.detector_state) + arrays(c.fusion_state) for c in p.store.values())


def _traced(fn) -> int:  # type: ignore[no-untyped-def]
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    fn()
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before


def measure(dim: int, models: int, events: int, clients: int, k: int = 10) -> dict[str, float]:
    settings = Settings(state={"dir": None, "max_clients": 100_000}, model_admission={"max_models": models + 2})
    p = Pipeline(settings, Metrics(enabled_detectors(settings)))
    rng = np.random.default_rng(dim)
    probs = (np.full(k, 1.0 / k)).tolist()

    def feed(model: str, n: int, offset: int = 0) -> None:
        x = rng.integers(0, 17, (n, dim)).astype(float)
        p.ingest_objects(
            {"client": f"c{(offset + i) % clients}", "ts": 1e9 + offset + i, "model": model, "input": row.tolist(), "output": probs}
            for i, row in enumerate(x)
        )

    feed("warm-up", 2)  # module-level caches, the first metric children
    first = _traced(lambda: [feed(f"m{j}", 1) for j in range(models)])
    before = _client_bytes(p)
    grown = _traced(lambda: [feed(f"m{j}", events - 1, offset=1) for j in range(models)])
    grown -= _client_bytes(p) - before  # the clients' state is per client, not per model

    full = FingerprintDetector(FingerprintParams(), next(rt for name, rt in p.runtimes if name == "m0").context)
    while full._alloc < full._cap:
        full._grow()
    index = sum(a.nbytes for a in (full._hashes, full._prev, full._ts, full._digest, full._client, full._head))
    context = next(rt for name, rt in p.runtimes if name == "m0").context
    links = LinksDetector(LinksParams(), context)
    sample = rng.integers(0, 17, (600, dim)).astype(float)
    fitted = links.fit(Reference(sample, None, context.scaling))
    assert fitted is not None
    links.load_reference(fitted)
    while links._alloc < links._cap:
        links._grow()
    rows = (links._U, links._S, links._Up, links._lo, links._hi, links._ts, links._digest, links._client, links._far_seen, links._reach)
    links_index = sum(a.nbytes for a in (*rows, links._slots, links._fill, links._step_slots, links._step_fill))
    plan = BaselinePlan()
    reservoir = plan.capacity * dim * 8
    after_first = first / models
    after_events = after_first + grown / models
    return {
        "dim": dim,
        "first_event_MiB": round(after_first / MiB, 2),
        f"after_{events}_events_MiB": round(after_events / MiB, 2),
        "fingerprint_index_at_max_queries_MiB": round(index / MiB, 1),
        "baseline_reservoir_at_capacity_MiB": round(reservoir / MiB, 1),
        "worst_case_per_model_MiB": round((after_events + index + reservoir) / MiB, 1),
        "links_queries_at_capacity": links._cap,
        "links_index_at_capacity_MiB": round(links_index / MiB, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="64,784,3072")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--events", type=int, default=600, help="events per model (default: past the 512-sample refit)")
    ap.add_argument("--clients", type=int, default=40)
    args = ap.parse_args()
    tracemalloc.start()
    rows = [measure(int(d), args.models, args.events, args.clients) for d in args.dims.split(",")]
    tracemalloc.stop()
    print(json.dumps({"models": args.models, "events": args.events, "clients": args.clients, "per_model": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
