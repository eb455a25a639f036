#!/usr/bin/env python3
"""Are Sybil members' queries nearer to other clients' queries than honest ones are?

The simplest cross-client evidence would be nearness: a query close to a recent query of
another client (closer than equal, which the fingerprint index already sees). This script
measures, on a log kept by ``bench/detection/groups.py --workdir DIR``, how near each
sampled query lies to the nearest earlier query of *another* client: RMS distance over the
features in units of each feature's range in the log, among that client's predecessors of
the last ``--window`` seconds (at most ``--recent`` queries back), exact repeats left out.

Clients are told apart by their ids, as the group benchmark names them: ``app-`` and
``bapp-`` benign families A and B, ``syb-<strategy>-`` and ``sybb-<strategy>-`` Sybil
members of ``exporter/sim/sybil.py`` and ``bench/detection/sybil_b.py``, anything else
by its first word (``atk``: solo attackers).

    python3 bench/detection/groups.py --sybil b --datasets digits --seeds 0 --workdir DIR
    python3 bench/detection/nearness.py DIR/digits-0/evaluation.jsonl
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson

BENIGN = {"app": "benign A", "bapp": "benign B"}


def kind(client: str) -> str:
    """The population of a client id of the group benchmark (module docstring)."""
    head, _, rest = client.partition("-")
    if head in BENIGN:
        return BENIGN[head]
    if head in ("syb", "sybb"):
        return f"{head}:{rest.split('-')[0]}"
    return head


def load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Event times, client ids and inputs (in units of each feature's range in the log)."""
    ts, clients, rows = [], [], []
    with open(path, "rb") as fh:
        for line in fh:
            event = orjson.loads(line)
            ts.append(event["ts"])
            clients.append(event["client"])
            rows.append(event["input"])
    X = np.asarray(rows, dtype=np.float64)
    span = X.max(axis=0) - X.min(axis=0)
    return np.asarray(ts), np.asarray(clients), X / np.where(span > 0, span, 1.0)


def nearest_other(ts: np.ndarray, clients: np.ndarray, U: np.ndarray, i: int, window: float, recent: int) -> float | None:
    """RMS distance from query ``i`` to the nearest earlier query of another client (None: no such query)."""
    lo = max(0, i - recent, int(np.searchsorted(ts, ts[i] - window)))
    j = np.arange(lo, i)
    j = j[clients[j] != clients[i]]
    if j.size == 0:
        return None
    d = np.sqrt(((U[j] - U[i]) ** 2).mean(axis=1))
    d = d[d > 0]
    return float(d.min()) if d.size else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path, help="evaluation.jsonl of a groups.py --workdir run")
    ap.add_argument("--sample", type=int, default=600, help="queries sampled per population (default 600)")
    ap.add_argument("--window", type=float, default=1800.0, help="seconds back (default 1800)")
    ap.add_argument("--recent", type=int, default=20_000, help="queries back at most (default 20,000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    ts, clients, U = load(args.log)
    kinds = np.array([kind(c) for c in clients])
    rng = np.random.default_rng(args.seed)
    found: dict[str, list[float]] = defaultdict(list)
    for k in sorted(set(kinds.tolist())):
        rows = np.flatnonzero(kinds == k)
        for i in rng.choice(rows, min(args.sample, rows.size), replace=False):
            d = nearest_other(ts, clients, U, int(i), args.window, args.recent)
            if d is not None:
                found[k].append(d)
    benign = np.concatenate([found[k] for k in BENIGN.values() if k in found])
    q01, q1, q50 = np.quantile(benign, [0.001, 0.01, 0.5])
    print(f"`{args.log}`: honest queries' nearest other-client query, 0.1 / 1 / 50 % quantiles: {q01:.4f} / {q1:.4f} / {q50:.4f}\n")
    print("| population | queries | median distance | share nearer than the honest 1 % quantile |")
    print("|---|---:|---:|---:|")
    for k, d in found.items():
        v = np.asarray(d)
        print(f"| {k} | {v.size} | {np.median(v):.4f} | {np.mean(v < q1):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
