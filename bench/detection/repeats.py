#!/usr/bin/env python3
"""Do Sybil members re-send points that another client sent first, where honest clients do not?

``links`` ignores exact repeats (popular inputs and retries must not link anyone). But a
textbook JbDA re-sends every child whose gradient signs did not change, and a split deals
those re-sends to any of its keys. This script measures, on a log kept by
``bench/detection/groups.py --workdir DIR``, per population (named as in
``bench/detection/nearness.py``), the share of queries whose input exactly repeats one
that *another* client sent first; of those, the share first sent by a member of the same
Sybil group (the ground truth of the ids); and, with ``--reference`` (the run's
``calibration.jsonl``), the share that are also off-manifold: farther from every
reference query than 99 % of honest queries are.

    python3 bench/detection/groups.py --sybil b --datasets wine --seeds 0 --workdir DIR
    python3 bench/detection/repeats.py DIR/wine-0/evaluation.jsonl --reference DIR/wine-0/calibration.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nearness import BENIGN, group_of, kind, load, reference_distance  # noqa: E402


def first_other(clients: np.ndarray, X: np.ndarray) -> np.ndarray:
    """(n,) for each query (in log order), the index of the first query with the same input if
    another client sent it, else -1 (a new input, or a repeat of the client's own)."""
    first: dict[bytes, int] = {}
    out = np.full(len(X), -1, dtype=np.int64)
    for i, row in enumerate(np.ascontiguousarray(X)):
        j = first.setdefault(row.tobytes(), i)
        if j != i and clients[j] != clients[i]:
            out[i] = j
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path, help="evaluation.jsonl of a groups.py --workdir run")
    ap.add_argument("--reference", type=Path, help="calibration.jsonl of the run: also count the off-manifold repeats")
    args = ap.parse_args(argv)
    ts, clients, X = load(args.log)
    order = np.argsort(ts, kind="stable")
    clients, X = clients[order], X[order]
    kinds = np.array([kind(str(c)) for c in clients])
    other = first_other(clients, X)
    off = None
    if args.reference:
        span = X.max(axis=0) - X.min(axis=0)
        scale = np.where(span > 0, span, 1.0)
        far = reference_distance(X / scale, np.unique(load(args.reference)[2] / scale, axis=0))
        off = far > np.quantile(far[np.isin(kinds, list(BENIGN.values()))], 0.99)
    print(f"`{args.log}`: queries that exactly repeat an input another client sent first\n")
    print("| population | queries | repeats of another client's | of those, first sent by its own group | off-manifold repeats |")
    print("|---|---:|---:|---:|---:|")
    for k in sorted(set(kinds.tolist())):
        rows = np.flatnonzero(kinds == k)
        rep = rows[other[rows] >= 0]
        own = np.mean([group_of(str(clients[i])) == group_of(str(clients[other[i]])) for i in rep]) if k.startswith("syb") and rep.size else None
        shares = [f"{rep.size / rows.size:.3f}", "-" if own is None else f"{own:.2f}", "-" if off is None else f"{off[rep].sum() / rows.size:.3f}"]
        print(f"| {k} | {rows.size} | " + " | ".join(shares) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
