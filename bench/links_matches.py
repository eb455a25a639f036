"""What a client that designs its queries to match many verified steps costs ``links``, per block.

The table of steps is read for every change that continues a step, and each change can
match up to ``step_depth`` stored steps per candidate it continues. A client chooses how
many: this script sends, block after block, lattices of 8 keys whose every level is 8
near copies of one point (distinct inputs that differ below the precision floor), one
sign step (of 0.03 of the range, turning each level) from the level before, so that each
query continues 8 candidates and each such change matches the steps in its bucket. The
same run times honest blocks, and a plain sign-step split as ``bench/throughput.py
--split`` makes it, in between. Each row is the median over the blocks of one kind,
times of ``prepare`` and ``update`` (the detector driven block by block, as the tests
drive it), on a model of ``--features`` continuous features::

    python3 bench/links_matches.py [--features 30] [--rounds 30] [--repeat 2]

Compare the ratios to honest blocks, not the times: the machine's load moves both.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's exporter first, also where the venv installed another
from exporter.tuning import tune_process  # noqa: E402

tune_process()  # as the CLI does (exporter.tuning), before numpy loads

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from exporter.detectors.base import Batch, Block, ModelContext, Reference  # noqa: E402
from exporter.detectors.kit import Scaling  # noqa: E402
from exporter.detectors.links import LinksDetector, LinksParams  # noqa: E402
from exporter.events import Event  # noqa: E402

BLOCK = 256
COPIES = 8  # near copies per level of the designed lattice, and its keys


def detector(features: int, rng: np.random.Generator) -> LinksDetector:
    """``links`` with its defaults, fitted on standard normal honest traffic."""
    benign = rng.normal(0.0, 1.0, (3000, features))
    scaling = Scaling.fit(benign)
    det = LinksDetector(LinksParams(), ModelContext("m", "tabular", features, 10, scaling, ("links",)))
    det.load_reference(det.fit(Reference(benign, None, scaling)))
    return det


def judge(det: LinksDetector, states: dict[str, Any], x: np.ndarray, clients: list[str], t: float) -> tuple[float, int]:
    """Seconds to prepare and update one block, and how many of its queries were linked."""
    events = [Event(c, "m", t + i * 1e-3, "tabular", vector=v) for i, (c, v) in enumerate(zip(clients, x))]
    block = Block("m", events)
    start = time.perf_counter()
    det.prepare(block)
    for c in set(clients):
        rows = np.array([i for i, e in enumerate(events) if e.client == c])
        det.update(states.setdefault(c, det.init_state()), Batch(c, "m", [events[i] for i in rows], block, rows))
    return time.perf_counter() - start, int(block.prepared["links"][1].sum())


def run(kind: str, features: int, rounds: int) -> dict[str, float]:
    """Honest blocks alternating with blocks of ``kind`` ("split" or "lattice")."""
    rng = np.random.default_rng(0)
    det = detector(features, rng)
    lam = 0.03 * det._ref["span"]
    states: dict[str, Any] = {}
    t = 1000.0

    def honest() -> tuple[np.ndarray, list[str]]:
        return rng.normal(0.0, 1.0, (BLOCK, features)), [f"h{i}" for i in rng.integers(0, 50, BLOCK)]

    for _ in range(4):
        judge(det, states, *honest(), t)
        t += 1.0
    points = list(rng.normal(0.0, 1.0, (20, features)))
    levels = BLOCK // COPIES
    level = rng.normal(0.0, 1.0, (levels, features))
    turn_a = rng.choice([-1.0, 1.0], features)
    turn_b = turn_a.copy()
    turn_b[rng.permutation(features)[: features // 2]] *= -1
    honest_s, hostile_s, linked = [], [], []
    for k in range(rounds):
        dt, _ = judge(det, states, *honest(), t)
        t += 1.0
        if kind == "split":
            for _ in range(BLOCK):
                recent = points[-200:]
                points.append(recent[rng.integers(len(recent))] + lam * rng.choice([-1.0, 1.0], features))
            x, clients = np.array(points[-BLOCK:]), [f"s{i}" for i in rng.integers(0, 10, BLOCK)]
        else:
            below = np.zeros((levels, COPIES, features))
            below[:, :, 0] = rng.uniform(-1.0, 1.0, (levels, COPIES)) * 1e-5 * det._ref["span"][0]  # below the precision floor
            x = (level[:, None, :] + below).reshape(-1, features)
            clients = [f"a{(i + k) % COPIES}" for i in range(BLOCK)]
            level = level + lam * (turn_a if k % 2 == 0 else turn_b)
        hostile, n = judge(det, states, x, clients, t)
        t += 1.0
        if k >= 6:  # once the lattice's steps are verified and filed
            honest_s.append(dt)
            hostile_s.append(hostile)
            linked.append(n)
    h, a = float(np.median(honest_s)), float(np.median(hostile_s))
    return {"honest_ms": round(1e3 * h, 2), "hostile_ms": round(1e3 * a, 2), "ratio": round(a / h, 2), "linked_per_block": int(np.median(linked))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    for _ in range(args.repeat):
        for kind in ("split", "lattice"):
            print(kind, run(kind, args.features, args.rounds), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
