"""A small, seeded, dependency-free traffic generator shaped like the digits dataset.

It gives the README's first command a log to chew on, and tests realistic event shapes:
64 features in 0..16 (8x8 images), a 10-class "victim" that answers with probabilities,
benign clients that send natural inputs, and attackers whose traffic the core detectors
should see (boundary probing, exact-repeat floods, tiny-perturbation searches).
The extraction benchmark in ``bench/detection`` uses real datasets instead.

Usage: ``python -m exporter.demo [--seed N] > logs/example.jsonl``

Without ``--seed``, every run draws new traffic (the seed comes from the clock) and
every client id ends with a tag of that seed (``scraper-repeat-3fa9c1``): the exporter
keeps each client's state across restarts, so a second run that re-sent the same
inputs under the same ids would look like every benign app repeating itself. The
world (the prototypes and the victim) is the same in every run, so the exporter's
learned reference stays valid. ``--seed 0`` gives the fixed log the tests and the
golden reports use (ids without a tag).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Iterator, Sequence

import numpy as np

DIM = 64
CLASSES = 10


class DigitsLike:
    """Class prototypes, a sampler of natural inputs and a softmax victim model."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.prototypes = np.clip(rng.gamma(1.2, 4.0, size=(CLASSES, DIM)) * (rng.random((CLASSES, DIM)) < 0.55), 0, 16)
        self.temperature = 6.0

    def sample(self, rng: np.random.Generator, n: int, classes: np.ndarray | None = None) -> np.ndarray:
        """Natural inputs: a prototype plus noise, rounded to integers in 0..16."""
        cls = rng.integers(0, CLASSES, n) if classes is None else classes
        x = self.prototypes[cls] + rng.normal(0, 1.2, size=(n, DIM))
        return np.clip(np.rint(x), 0, 16)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities: a softmax over negative distances to the prototypes."""
        d = np.sqrt(((x[:, None, :] - self.prototypes[None, :, :]) ** 2).sum(-1))
        z = -(d - d.min(axis=1, keepdims=True)) / self.temperature
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)


def _num(v: float) -> int | float:
    r = round(float(v), 3)
    return int(r) if r.is_integer() else r


def _line(ts: float, client: str, x: np.ndarray, p: np.ndarray) -> str:
    return json.dumps({"ts": round(ts, 3), "client": client, "model": "digits", "input": [_num(v) for v in x], "output": [round(float(v), 5) for v in p]})


def benign_rows(
    world: DigitsLike, rng: np.random.Generator, clients: int, per_client: int, start: float, prefix: str = "app-"
) -> list[tuple[float, str, np.ndarray]]:
    """Benign clients sending natural inputs over ten minutes, with an occasional honest retry."""
    rows: list[tuple[float, str, np.ndarray]] = []
    for c in range(clients):
        x = world.sample(rng, per_client)
        x[rng.random(per_client) < 0.05] = x[0]
        ts = start + np.sort(rng.uniform(0, 600, per_client))
        rows += [(t, f"{prefix}{c:02d}", xi) for t, xi in zip(ts, x)]
    return rows


def to_lines(world: DigitsLike, rows: list[tuple[float, str, np.ndarray]]) -> Iterator[str]:
    """Time-ordered JSON lines with the victim's answers."""
    rows = sorted(rows, key=lambda r: r[0])
    probs = world.predict(np.stack([r[2] for r in rows]))
    for (t, client, x), p in zip(rows, probs):
        yield _line(t, client, x, p)


def benign_log(seed: int, clients: int, per_client: int = 60, start: float = 1764097200.0) -> Iterator[str]:
    """Benign traffic only (for calibration)."""
    world = DigitsLike(0)
    return to_lines(world, benign_rows(world, np.random.default_rng(seed), clients, per_client, start, "cal-"))


def example_log(seed: int = 0, benign_clients: int = 20, per_client: int = 60, start: float = 1764097200.0, tag: str = "") -> Iterator[str]:
    """Benign traffic from 20 apps (enough for the live baseline to learn the model), plus three attackers, in time order.

    The world is always ``DigitsLike(0)``; ``seed`` draws the traffic; ``tag`` is appended to every client id.
    """
    world = DigitsLike(0)
    rng = np.random.default_rng(seed + 1)
    rows = benign_rows(world, rng, benign_clients, per_client, start)
    # boundary prober: midpoints between two classes' prototypes
    a, b = rng.integers(0, CLASSES, (2, per_client))
    mid = np.clip(np.rint((world.prototypes[a] + world.prototypes[b]) / 2 + rng.normal(0, 0.3, (per_client, DIM))), 0, 16)
    rows += [(t, "scraper-boundary", xi) for t, xi in zip(start + np.sort(rng.uniform(0, 600, per_client)), mid)]
    # repeat flood: a loop re-sending the same few inputs, a few a second
    few = world.sample(rng, 3)
    rows += [(t, "scraper-repeat", few[i % 3]) for i, t in enumerate(start + 300 + np.sort(rng.uniform(0, 20, per_client)))]
    # perturbation search around one input (what HopSkipJump-like search looks like); a
    # search takes more queries than an app's session
    base = world.sample(rng, 1)[0]
    steps = np.clip(base + rng.normal(0, 0.05, (2 * per_client, DIM)).cumsum(axis=0) * 0.1, 0, 16)
    rows += [(t, "scraper-search", xi) for t, xi in zip(start + np.sort(rng.uniform(0, 600, 2 * per_client)), steps)]
    if tag:
        rows = [(t, f"{client}-{tag}", x) for t, client, x in rows]
    yield from to_lines(world, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporter.demo", description="Write a demo log (20 benign apps, 3 scrapers) to stdout.")
    parser.add_argument("--seed", type=int, default=None,
                        help="fixed traffic and plain client ids (default: new traffic each run, ids tagged with the seed)")
    args = parser.parse_args(argv)
    if args.seed is None:
        seed = time.time_ns() % (1 << 24)
        lines = example_log(seed, tag=f"{seed:06x}")
    else:
        lines = example_log(args.seed)
    try:
        for line in lines:
            sys.stdout.write(line + "\n")
    except BrokenPipeError:  # `| head`
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
