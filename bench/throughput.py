"""Replay throughput of the default detector set, against a parse-only baseline in the same run.

Generates digits-shaped traffic (64 features, 10 classes) for many clients, then times
  1. parse-only: reading and decoding every line (JSON, validation) — the floor;
  2. replay: the same plus every enabled detector, as ``monitaur-exporter replay`` runs.
Both run in one process with the command line's process settings (``exporter.tuning``: one
BLAS thread, no huge pages for numpy's arrays), so their ratio is meaningful on a noisy
machine even when the absolute numbers are not. The kernel time and page faults of the
fastest replay are reported too: new memory is where a VM's kernel costs most.

    python3 bench/throughput.py [--events 100000] [--clients 500] [--repeat 5] [--config FILE] [--resent SHARE] [--split SHARE]

``--resent SHARE`` makes that share of the events (at most 0.5) re-send the input of the
event just before, from another client: the worst case of the ``links`` detector's test
of repeated inputs, which runs once per input repeated by another client.

``--split SHARE`` makes that share of the events (at most 0.5, all after the first tenth of
the log) one sign-step exploration split over ``SPLIT_KEYS`` clients of their own: each
point is a recent point of the split moved by ``SPLIT_STEP`` on every pixel, signs at random
(JbDA's lattice without its substitute). Its points continue each other's steps, so
``links`` verifies steps all along and reads its table of steps for every query: the cost
while an attack is under way, which honest traffic alone never shows.
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
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402

from exporter.config import load_settings  # noqa: E402
from exporter.detectors import enabled_detectors  # noqa: E402
from exporter.demo import DIM, DigitsLike, _line  # noqa: E402
from exporter.pipeline import Pipeline  # noqa: E402
from exporter.replay import Progress, read_events, replay  # noqa: E402


SPLIT_KEYS = 10  # clients of the --split exploration
SPLIT_STEP = 2.0  # its step on every pixel (an eighth of the 0..16 range)
SPLIT_RECENT = 200  # each point is a step from one of the split's last this many points


def split_points(world: DigitsLike, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` points of a sign-step exploration: natural seeds, then each point one of the last
    ``SPLIT_RECENT`` points moved by ``SPLIT_STEP`` on every pixel (signs at random, clipped to
    the pixels' 0..16)."""
    seeds = min(n, 20)
    out = np.empty((n, DIM))
    out[:seeds] = world.sample(rng, seeds)
    for i in range(seeds, n):
        parent = out[rng.integers(max(0, i - SPLIT_RECENT), i)]
        out[i] = np.clip(parent + SPLIT_STEP * np.where(rng.random(DIM) < 0.5, -1.0, 1.0), 0, 16)
    return out


def make_log(path: Path, events: int, clients: int, seed: int = 0, resent: float = 0.0, tile: int = 1, split: float = 0.0) -> None:
    """The benchmark's traffic; ``tile`` > 1 makes inputs that many times wider (the 64 features
    repeated, each copy with its own noise, sd 0.5, rounded to 2 decimals): costs that grow with
    the width show."""
    world = DigitsLike(seed)
    rng = np.random.default_rng(seed)
    x = world.sample(rng, events)
    if tile > 1:  # (the default traffic stays as it was: no draws)
        x = np.concatenate([x] + [np.round(x + rng.normal(0.0, 0.5, x.shape), 2) for _ in range(tile - 1)], axis=1)
    who = rng.integers(0, clients, events)
    if resent > 0.0:  # (the default traffic stays as it was: no draws)
        odd = np.arange(1, events, 2)
        again = rng.choice(odd, min(odd.size, round(resent * events)), replace=False)  # each re-sends the event before it
        x[again] = x[again - 1]
        who[again] = (who[again - 1] + 1 + rng.integers(0, max(clients - 1, 1), again.size)) % clients
    names = [f"client-{c}" for c in who]
    if split > 0.0:  # (the default traffic stays as it was: no draws)
        start = events // 10  # after the first tenth: detector_cost.py learns its references from the first inputs
        at = start + np.sort(rng.choice(events - start, min(events - start, round(split * events)), replace=False))
        x[at, :DIM] = split_points(world, rng, at.size)
        for k, i in enumerate(at.tolist()):
            names[i] = f"split-{k % SPLIT_KEYS}"
    p = world.predict(x[:, :DIM])
    ts = 1.7e9 + np.cumsum(rng.exponential(0.01, events))
    with open(path, "w") as fh:
        for t, c, xi, pi in zip(ts, names, x, p):
            fh.write(_line(float(t), c, xi, pi) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=5, help="best of N runs for each measurement")
    ap.add_argument("--config", default=None)
    ap.add_argument("--profile", default=None, help="calibration profile for the replay runs")
    ap.add_argument("--resent", type=float, default=0.0, help="share of events that re-send the previous event's input from another client (0-0.5)")
    ap.add_argument("--split", type=float, default=0.0, help="share of events from one sign-step exploration split over SPLIT_KEYS clients (0-0.5)")
    args = ap.parse_args()
    if not 0.0 <= args.resent <= 0.5:
        ap.error("--resent must be between 0 and 0.5")
    if not 0.0 <= args.split <= 0.5:
        ap.error("--split must be between 0 and 0.5")
    settings = load_settings(args.config)
    profile = None
    if args.profile:
        from exporter.profile import load_profile

        profile = load_profile(args.profile, settings)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "traffic.jsonl"
        make_log(log, args.events, args.clients, resent=args.resent, split=args.split)
        parse, full = [], []
        kernel: list[tuple[float, int]] = []  # per replay: seconds in the kernel, page faults
        report: dict = {}
        for _ in range(args.repeat):
            start = time.perf_counter()
            read_events([log], Pipeline(settings), settings.files.max_line_bytes, Progress(io.StringIO(), False), Counter())
            parse.append(time.perf_counter() - start)
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            report = replay(settings, [str(log)], progress=False, profile=profile)
            full.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            kernel.append((after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt))
    groups = (report.get("groups") or {}).values()
    fastest = full.index(min(full))
    result = {
        "events": args.events,
        "clients": args.clients,
        "detectors": list(enabled_detectors(settings)),
        "calibrated": profile is not None,
        "resent": args.resent,
        "split": args.split,
        "parse_only_events_per_s": round(args.events / min(parse)),
        "replay_events_per_s": round(args.events / min(full)),
        "replay_to_parse_ratio": round(min(parse) / min(full), 3),
        # of the fastest replay: time the kernel spent for it (page faults, mostly) and its page faults
        "replay_kernel_seconds": round(kernel[fastest][0], 2),
        "replay_page_faults": kernel[fastest][1],
        # with links on: the groups the replay named (honest traffic should form none; --split one of SPLIT_KEYS keys)
        "groups": len(groups),
        "clients_in_groups": sum(len(g["members"]) for g in groups),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
