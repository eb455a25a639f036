#!/usr/bin/env python3
"""Do Sybil members send off-manifold inputs near another client's, where honest clients do not?

Split line searches, active learning and noise around shared seeds explore one region off
the data from several keys, with neither fixed steps nor exact repeats. This script
measures, on a run directory kept by ``bench/detection/groups.py --workdir DIR`` (its
``evaluation.jsonl`` and the calibration profile ``profile-200.bin``), what ``links``' near
links would see: each query that is off-manifold by the detector's own test, with the
anchors, spacing, ``far`` distance and feature ranges of the profile's ``links`` reference,
and whether an off-manifold input of *another* client among the last ``--recent`` queries
of the log (the index holds 65,536) lies within ``near_factor`` spacings of it (RMS over the
moving features, in units of their ranges) and nearer than every earlier input of the
query's own client, as the detector asks. It ignores what the detector's index can miss
(queries pushed out of their buckets), so it is close to an upper bound of what the
detector links: only where the index misses the sender's own nearer input can the detector
link a query that this script does not count.

The first table gives, per population (named as in ``bench/detection/nearness.py``), the
share of queries that are off-manifold, and of them, the share near another client's (at
the first of ``--factors``, by default 0.5) and, for Sybil members, the share whose nearest
such input came from their own group. The second gives, per ``near_factor``, the honest
clients with any such input, those with more than ``--distinct`` (``distinct_repeats``, 8)
distinct ones, which the detector would link, the most of one honest client, and the
Sybil members past ``--distinct``.

    python3 bench/detection/groups.py --sybil b --datasets wine --seeds 0 --workdir DIR
    python3 bench/detection/near.py DIR/wine-0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from nearness import BENIGN, group_of, load_run, run_arguments  # noqa: E402

from exporter.detectors.links import nearest_rms  # noqa: E402


def nearest_earlier_other(U: np.ndarray, at: np.ndarray, owner: np.ndarray, recent: int, block: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of ``U`` (the off-manifold queries, in log order; ``at`` their positions in the
    log, ``owner`` their clients as integers): the RMS distance to the nearest earlier row of
    another client at most ``recent`` log positions back, that row (inf and -1: none), and the
    distance to the nearest such row of its own client (inf: none). Exact repeats (distance 0)
    are left out, as the index files an input once."""
    n = U.shape[0]
    best = np.full(n, np.inf)
    who = np.full(n, -1, dtype=np.int64)
    own = np.full(n, np.inf)
    sq = np.einsum("ij,ij->i", U, U)
    for s in range(0, n, block):
        e = min(n, s + block)
        j0 = int(np.searchsorted(at, at[s] - recent))
        d2 = sq[s:e, None] - 2.0 * (U[s:e] @ U[j0:e].T) + sq[None, j0:e]
        d = np.sqrt(np.maximum(d2, 0.0) / U.shape[1])
        j = np.arange(j0, e)[None, :]
        i = np.arange(s, e)[:, None]
        d[(j >= i) | (at[j0:e][None, :] < at[s:e, None] - recent) | (d == 0.0)] = np.inf
        same = owner[j0:e][None, :] == owner[s:e, None]
        own[s:e] = np.where(same, d, np.inf).min(axis=1)
        d[same] = np.inf
        k = d.argmin(axis=1)
        best[s:e] = d[np.arange(e - s), k]
        who[s:e] = np.where(np.isfinite(best[s:e]), j0 + k, -1)
    return best, who, own


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    run_arguments(ap)
    ap.add_argument("--factors", default="0.5,0.25,1,2", help="near_factor values; the first is the first table's (default 0.5,0.25,1,2)")
    args = ap.parse_args(argv)
    factors = [float(f) for f in args.factors.split(",")]
    run = load_run(args.run, args.profile)
    log, clients, X, kinds, spacing, far = run.log, run.clients, run.X, run.kinds, run.spacing, run.far
    U = run.units(X)
    at = np.flatnonzero(nearest_rms(U, run.anchors) > far)
    _, owner = np.unique(clients[at], return_inverse=True)
    best, who, own_d = nearest_earlier_other(U[at], at, owner, args.recent)
    rel = np.where(best < own_d, best / spacing, np.inf)  # the sender's own input as near or nearer: no link
    print(f"`{log}`: anchors' spacing {spacing:.4f}, far {far:.4f}; off-manifold queries near another client's\n")
    print(f"| population | queries | off-manifold | of those, near another client's (near_factor {factors[0]:g}) | nearest from its own group |")
    print("|---|---:|---:|---:|---:|")
    off_kind = kinds[at]
    for k in sorted(set(kinds.tolist())):
        rows = np.flatnonzero(off_kind == k)
        near = rows[rel[rows] <= factors[0]]
        own = "-"
        if k.startswith("syb") and near.size:
            own = f"{np.mean([group_of(str(clients[at[i]])) == group_of(str(clients[at[who[i]]])) for i in near]):.2f}"
        share = f"{near.size / rows.size:.3f}" if rows.size else "-"
        print(f"| {k} | {int((kinds == k).sum())} | {rows.size / max(int((kinds == k).sum()), 1):.3f} | {share} | {own} |")
    honest = np.isin(off_kind, list(BENIGN.values()))
    attack = np.char.startswith(off_kind.astype(str), "syb")
    members = len({str(c) for c, k in zip(clients, kinds) if k.startswith("syb")})
    print(f"\nBy near_factor: honest clients with off-manifold inputs near another client's, and Sybil members, past {args.distinct} distinct ones\n")
    print(f"| near_factor | honest clients with any | honest clients past {args.distinct} | most of one honest client | Sybil members past {args.distinct} (of {members}) |")
    print("|---:|---:|---:|---:|---:|")
    def distinct_per_client(rows: np.ndarray) -> np.ndarray:
        """Distinct inputs per client among the off-manifold queries ``rows`` (a client's own repeats count once)."""
        seen = {(str(clients[at[i]]), X[at[i]].tobytes()) for i in rows.tolist()}
        return np.unique([c for c, _ in seen], return_counts=True)[1]

    for f in factors:
        hit = rel <= f
        h = distinct_per_client(np.flatnonzero(hit & honest))
        a = distinct_per_client(np.flatnonzero(hit & attack))
        print(f"| {f:g} | {h.size} | {int((h > args.distinct).sum())} | {int(h.max()) if h.size else 0} | {int((a > args.distinct).sum())} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
