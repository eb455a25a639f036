#!/usr/bin/env python3
"""Would an off-manifold test with a local scale see what the global one misses (digits)?

``links`` calls an input off-manifold when it lies farther from every anchor than
``far_factor`` times one global spacing (the 99 % quantile of the anchors' distances to
their nearest other anchor). Where the data's density varies a lot, as in digits' raw
pixels, that spacing is set by the sparsest anchors, and the attacks' inputs are nearer
to an anchor than it: the test sees almost none of them. This script measures, on a run
directory kept by ``bench/detection/groups.py --workdir DIR``, a local alternative: an
input's distance to its nearest anchor divided by that anchor's distance to its ``--k``-th
nearest other anchor (RMS over the moving features, in units of their ranges, with the
anchors and ranges of the calibration profile's ``links`` reference).

The first table gives, per population (named as in ``bench/detection/nearness.py``), the
share of queries off the manifold by the global test and by the local one at each of
``--ratios``. The second gives, per ratio, what near links would make of those inputs, as
``bench/detection/near.py`` counts them: the clients of each population with more than
``--distinct`` distinct off-manifold inputs that lie within ``--factor`` global spacings
of another client's earlier off-manifold input, nearer than any of their own. Honest
clients counted there are the ones such a test would risk linking. First, it prints the
honest side's own ratios: quantiles over the run's calibration inputs (``calibration.jsonl``,
the anchors themselves left out), from which a ratio could be set per model, as ``far`` is.

    python3 bench/detection/groups.py --sybil b --datasets digits --seeds 0 --workdir DIR
    python3 bench/detection/local_scale.py DIR/digits-0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from near import nearest_earlier_other  # noqa: E402
from nearness import load, load_run, run_arguments  # noqa: E402


def rms_distances(q: np.ndarray, a: np.ndarray) -> np.ndarray:
    """(len(q), len(a)) RMS distances over the columns."""
    d2 = np.einsum("ij,ij->i", q, q)[:, None] - 2.0 * (q @ a.T) + np.einsum("ij,ij->i", a, a)[None, :]
    return np.sqrt(np.maximum(d2, 0.0) / q.shape[1])


def local_ratio(U: np.ndarray, anchors: np.ndarray, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``U``: the distance to the nearest anchor, and that distance divided by the
    anchor's distance to its ``k``-th nearest other anchor."""
    between = rms_distances(anchors, anchors)
    np.fill_diagonal(between, np.inf)
    scale = np.sort(between, axis=1)[:, k - 1]
    nearest = np.empty(U.shape[0])
    ratio = np.empty(U.shape[0])
    for s in range(0, U.shape[0], block):
        d = rms_distances(U[s : s + block], anchors)
        j = d.argmin(axis=1)
        nearest[s : s + block] = d[np.arange(j.size), j]
        ratio[s : s + block] = nearest[s : s + block] / np.maximum(scale[j], 1e-12)
    return nearest, ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    run_arguments(ap)
    ap.add_argument("--k", type=int, default=5, help="the anchor's k-th nearest other anchor sets its scale (default 5)")
    ap.add_argument("--ratios", default="2,2.5,3", help="local ratios above which an input is off-manifold (default 2,2.5,3)")
    ap.add_argument("--factor", type=float, default=0.5, help="links' near_factor, in global spacings (default 0.5)")
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    run = load_run(args.run, args.profile)
    log, clients, X, kinds, spacing, far = run.log, run.clients, run.X, run.kinds, run.spacing, run.far
    U = run.units(X)
    nearest, ratio = local_ratio(U, run.anchors, args.k)
    pops = sorted(set(kinds.tolist()))
    print(f"`{log}`: global spacing {spacing:.4f}, far {far:.4f}; local scale: each anchor's distance to its {args.k}th nearest other anchor\n")
    calibration = args.run / "calibration.jsonl"
    if calibration.exists():
        cx = load(calibration)[2]
        c_near, c_ratio = local_ratio(run.units(cx), run.anchors, args.k)
        c_ratio = c_ratio[c_near > 0]  # the anchors themselves are at distance 0
        q = ", ".join(f"{p:g}: {np.quantile(c_ratio, p):.2f}" for p in (0.99, 0.999, 0.9999))
        print(f"Local ratios of the {c_ratio.size} calibration inputs that are not anchors, quantiles {q}\n")
    print("| population | queries | off by the global test | " + " | ".join(f"local ratio > {r:g}" for r in ratios) + " |")
    print("|---|---:|---:|" + "---:|" * len(ratios))
    for p in pops:
        r = kinds == p
        print(f"| {p} | {int(r.sum())} | {np.mean(nearest[r] > far):.4f} | " + " | ".join(f"{np.mean(ratio[r] > t):.4f}" for t in ratios) + " |")
    print(f"\nClients past {args.distinct} distinct off-manifold inputs near another client's (near_factor {args.factor:g}), per local ratio\n")
    print("| population | clients | " + " | ".join(f"ratio > {r:g}" for r in ratios) + " |")
    print("|---|---:|" + "---:|" * len(ratios))
    counts: dict[str, list[int]] = {p: [] for p in pops}
    for t in ratios:
        off = np.flatnonzero(ratio > t)
        _, owner = np.unique(clients[off], return_inverse=True)
        best, _, own = nearest_earlier_other(U[off], off, owner, args.recent)
        hit = (best < own) & (best <= args.factor * spacing)  # the sender's own input as near or nearer: no link
        for p in pops:
            rows = np.flatnonzero((kinds[off] == p) & hit)
            seen = {(str(clients[off[i]]), X[off[i]].tobytes()) for i in rows.tolist()}
            per_client = np.unique([c for c, _ in seen], return_counts=True)[1] if seen else np.zeros(0, dtype=int)
            counts[p].append(int((per_client > args.distinct).sum()))
    for p in pops:
        print(f"| {p} | {len(np.unique(clients[kinds == p]))} | " + " | ".join(str(c) for c in counts[p]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
