#!/usr/bin/env python3
"""Do Sybil members re-send points that another client sent first, where honest clients do not?

``links`` ignores exact repeats (popular inputs and retries must not link anyone). But a
textbook JbDA re-sends every child whose gradient signs did not change, and a split deals
those re-sends to any of its keys. This script measures, on a log kept by
``bench/detection/groups.py --workdir DIR``, per population (named as in
``bench/detection/nearness.py``), the share of queries whose input exactly repeats one
that *another* client sent first; of those, the share first sent by a member of the same
Sybil group (the ground truth of the ids); and, with ``--reference`` (the run's
``calibration.jsonl``), the share that are also off-manifold by the ``links`` detector's
own test, learned from the calibration data alone: farther from every one of
``--anchors`` distinct calibration inputs than ``--factors`` times the 99 % quantile of
the anchors' distances to their nearest other anchor (RMS in units of each feature's
0.1-99.9 % range). A second table then gives, per factor, the honest clients that repeat
such an input at all, and the most any one of them does: what ``far_factor`` must keep
below ``distinct_repeats``.

    python3 bench/detection/groups.py --sybil b --datasets wine --seeds 0 --workdir DIR
    python3 bench/detection/repeats.py DIR/wine-0/evaluation.jsonl --reference DIR/wine-0/calibration.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from nearness import BENIGN, group_of, kind, load  # noqa: E402

from exporter.detectors.links import anchor_sample, anchor_spacing, nearest_rms  # noqa: E402


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


def off_manifold_distance(X: np.ndarray, reference: np.ndarray, anchors: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """(n,) each input's RMS distance to the nearest anchor, and the anchors' spacing (the
    99 % quantile of their nearest-other distances), as ``links`` learns them from ``reference``
    (its ranges from the raw log, not the winsorized reference, and without the shared box of
    pixel features; ``bench/detection/near.py`` reads the profile's own)."""
    lo, hi = np.quantile(reference, [0.001, 0.999], axis=0)
    span = hi - lo
    moving = span > 0
    A = anchor_sample(reference, anchors, seed)
    if A is None:
        raise SystemExit("the reference has fewer than two distinct inputs")
    return nearest_rms(X[:, moving] / span[moving], A[:, moving] / span[moving]), anchor_spacing(A, span)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path, help="evaluation.jsonl of a groups.py --workdir run")
    ap.add_argument("--reference", type=Path, help="calibration.jsonl of the run: also count the off-manifold repeats")
    ap.add_argument("--calibration-clients", type=int, default=None, help="learn the anchors from only the first N clients of the calibration log (a small operator's calibration)")
    ap.add_argument("--anchors", type=int, default=1024, help="distinct calibration inputs kept as anchors (links' anchors, default 1024)")
    ap.add_argument("--clients", default=None, help="also list, per client whose id starts with this, its queries, repeats and off-manifold repeats")
    ap.add_argument("--factors", default="1,1.5,2,3", help="far_factor values to compare (the first table uses the last; default 1,1.5,2,3)")
    args = ap.parse_args(argv)
    factors = [float(f) for f in args.factors.split(",")]
    ts, clients, X = load(args.log)
    order = np.argsort(ts, kind="stable")
    clients, X = clients[order], X[order]
    kinds = np.array([kind(str(c)) for c in clients])
    other = first_other(clients, X)
    off = far = None
    spacing = 0.0
    if args.reference:
        _, cal_clients, reference = load(args.reference)
        if args.calibration_clients is not None:
            first = list(dict.fromkeys(cal_clients.tolist()))[: args.calibration_clients]
            reference = reference[np.isin(cal_clients, first)]
        far, spacing = off_manifold_distance(X, reference, args.anchors)
        off = far > factors[-1] * spacing
    print(f"`{args.log}`: queries that exactly repeat an input another client sent first\n")
    print("| population | queries | repeats of another client's | of those, first sent by its own group | off-manifold repeats |")
    print("|---|---:|---:|---:|---:|")
    for k in sorted(set(kinds.tolist())):
        rows = np.flatnonzero(kinds == k)
        rep = rows[other[rows] >= 0]
        own = np.mean([group_of(str(clients[i])) == group_of(str(clients[other[i]])) for i in rep]) if k.startswith("syb") and rep.size else None
        shares = [f"{rep.size / rows.size:.3f}", "-" if own is None else f"{own:.2f}", "-" if off is None else f"{off[rep].sum() / rows.size:.3f}"]
        print(f"| {k} | {rows.size} | " + " | ".join(shares) + " |")
    if args.clients:
        print(f"\nClients `{args.clients}*`\n")
        print("| client | queries | repeats of another client's | off-manifold repeats |")
        print("|---|---:|---:|---:|")
        for c in sorted({str(c) for c in clients if str(c).startswith(args.clients)}):
            rows = np.flatnonzero(clients == c)
            rep = rows[other[rows] >= 0]
            print(f"| {c} | {rows.size} | {rep.size} | {'-' if off is None else int(off[rep].sum())} |")
    if far is not None:
        honest = np.isin(kinds, list(BENIGN.values())) & (other >= 0)
        attack = np.char.startswith(kinds.astype(str), "syb")
        print(f"\nAnchors' spacing {spacing:.4f}: honest clients repeating another client's off-manifold input, by far_factor\n")
        print("| far_factor | honest clients with any | most distinct such inputs of one honest client | Sybil members' queries that are such repeats |")
        print("|---:|---:|---:|---:|")
        for f in factors:
            hits = far > f * spacing
            rows = np.flatnonzero(honest & hits)
            per = np.unique([clients[i] for i in {(str(clients[i]), X[i].tobytes()): i for i in rows.tolist()}.values()], return_counts=True)[1]
            share = (attack & (other >= 0) & hits).sum() / max(int(attack.sum()), 1)
            print(f"| {f:g} | {per.size} | {int(per.max()) if per.size else 0} | {share:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
