"""Cost of each detector alone, in microseconds per event, on the throughput benchmark's traffic.

``bench/throughput.py`` says how fast the whole replay is; this says where the time goes.
The traffic is decoded and cut into blocks and per-client batches exactly as ``replay``
does, the shared views (stacked vectors, probabilities, digests) are computed once up front,
every detector learns its reference from the first ``--reference`` inputs (the traffic is
benign), and then every detector runs alone over all blocks (its cross-client stage, then
its per-client updates), with fresh per-client and shared state. Each figure is the best of
``--repeat`` runs (with the command line's process settings, ``exporter.tuning``, like the replay bench).

    python3 bench/detector_cost.py [--events 60000] [--clients 500] [--only prada,knn] [--config FILE] [--tile K] [--split SHARE] [--profile]

``--config FILE`` turns on detectors that are off by default (``links``). ``--tile K`` makes the
inputs K times wider (64·K features), for costs that grow with the width. ``--split SHARE``
adds ``bench/throughput.py``'s sign-step exploration (``links`` while an attack is under way).

``--profile`` prints the top functions of each detector under cProfile as well.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's exporter first, also where the venv installed another
from exporter.tuning import tune_process  # noqa: E402

tune_process()  # as the CLI does (exporter.tuning), before numpy loads

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import make_log  # noqa: E402

from exporter.config import load_settings  # noqa: E402
from exporter.detectors import Batch  # noqa: E402
from exporter.detectors.base import Block, Reference  # noqa: E402
from exporter.detectors.kit import Scaling  # noqa: E402
from exporter.pipeline import Pipeline  # noqa: E402
from exporter.replay import BLOCK, Progress, read_events  # noqa: E402

WARM_VIEWS = ("ts", "vectors", "probs", "confidence", "top2", "predicted", "digests")


def blocks_of(events: list, model: str) -> list[tuple[Block, list[Batch]]]:
    """Each replay block with its per-client batches, as the pipeline cuts them, shared views already computed."""
    out: list[tuple[Block, list[Batch]]] = []
    for i in range(0, len(events), BLOCK):
        block = Block(model, events[i : i + BLOCK])
        for view in WARM_VIEWS:
            getattr(block, view, None)
        batches = [Batch(c, model, [block.events[j] for j in rows.tolist()], block, rows) for c, rows in block.rows_by_client.items()]
        for b in batches:
            for view in WARM_VIEWS:
                getattr(b, view, None)
        out.append((block, batches))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated detector names (default: every enabled one)")
    ap.add_argument("--reference", type=int, default=4096, help="inputs the detectors learn their references from")
    ap.add_argument("--config", default=None, help="configuration file (e.g. one that turns links on)")
    ap.add_argument("--tile", type=int, default=1, help="inputs this many times wider (64 x TILE features)")
    ap.add_argument("--split", type=float, default=0.0, help="share of events from bench/throughput.py's sign-step exploration (0-0.5)")
    ap.add_argument("--profile", action="store_true", help="print each detector's top functions under cProfile")
    args = ap.parse_args()
    if not 0.0 <= args.split <= 0.5:
        ap.error("--split must be between 0 and 0.5")
    settings = load_settings(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "traffic.jsonl"
        make_log(log, args.events, args.clients, tile=args.tile, split=args.split)
        pipeline = Pipeline(settings)
        events = read_events([log], pipeline, settings.files.max_line_bytes, Progress(io.StringIO(), False), Counter())
    pipeline.process(events[:1])  # builds the model's runtime (its detectors)
    model = events[0].model
    runtime = pipeline.runtimes.get(model)
    assert runtime is not None
    sample = np.stack([e.vector for e in events[: args.reference]])
    scaling = Scaling.fit(sample)
    reference = Reference(sample, None, scaling)
    fitted = {det.name: found for det in runtime.detectors if (found := det.fit(reference))}
    runtime.use_reference(scaling, fitted)
    wanted = [n for n in args.only.split(",") if n]
    total = 0.0
    print(f"{len(events)} events of {events[0].vector.shape[0]} features, {args.clients} clients, per-event cost of each detector alone:")
    for det in runtime.detectors:
        if wanted and det.name not in wanted:
            continue
        best = float("inf")
        for _ in range(args.repeat):
            det = type(det)(det.params, runtime.context)  # fresh shared state (e.g. fingerprint's index) each run
            if det.name in fitted:
                det.load_reference(fitted[det.name])
            blocks = blocks_of(events, model)
            states: dict[str, object] = {}
            prof = cProfile.Profile() if args.profile else None
            start = time.perf_counter()
            if prof is not None:
                prof.enable()
            for block, batches in blocks:
                det.prepare(block)
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
