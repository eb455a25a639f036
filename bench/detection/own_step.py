"""Which earlier point does ``links`` take a query's own step from? Measured on one Sybil group of a benchmark log.

A JbDA point is its parent moved by the same size on every feature it does not clip. This
script finds each query's parent within the group (the earlier member query whose change to
it has most features at one size, in units of the features' ranges, within ``--tolerance``:
the attacker's ranges need not be the calibration's), and for a sample of queries whose
parent is among its candidates (sent at most ``--window`` seconds before and in one of its
buckets: the index's depth and capacity are left out), counts how often each rule picks the
parent from those candidates:

- ``nearest (probe)``: the nearest on the probe features (the rule before sign steps);
- ``nearest (all)``: the nearest on all features;
- ``links``: the detector's rule (``LinksDetector._parent``: the most probe features moved by one size, at least 6 of 8, then the nearest).
  Its later rule, the sizes of the model's recent verified steps (``_known_parent``), needs the
  steps a replay verifies, so it is not counted here: ``groups.py`` measures its effect.

``--units data`` finds the parents in units of the dataset's own feature ranges, as this
repository's simulator (``exporter.sim``) steps, instead of the calibration's: where those
differ (breast cancer), the parents are there, but not one size in the detector's units.

    python3 bench/detection/groups.py --sybil b --strategies jbda_split --datasets digits --seeds 3 --workdir DIR
    python3 bench/detection/own_step.py DIR/digits-3 sybb-jbda_split-30-20-
    python3 bench/detection/groups.py --datasets breast_cancer --seeds 0 --workdir DIR
    python3 bench/detection/own_step.py DIR/breast_cancer-0 syb-even-3-0- --units data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's exporter first
from exporter.detectors.base import ModelContext, Reference  # noqa: E402
from exporter.detectors.kit import Scaling  # noqa: E402
from exporter.detectors.links import LinksDetector, LinksParams  # noqa: E402


def _inputs(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rows = [orjson.loads(line) for line in path.open("rb")]
    return np.array([r["input"] for r in rows], np.float64), np.array([r["ts"] for r in rows]), [r["client"] for r in rows]


def parents(u: np.ndarray, tolerance: float) -> np.ndarray:
    """Per query (rows of ``u``, range units), the earlier query it is a sign step from (-1: none): at
    least 30 % of the features moved, 60 % of those by the largest change (within ``tolerance``,
    relative), the nearest such if several."""
    out = np.full(len(u), -1)
    for k in range(1, len(u)):
        d = np.abs(u[k] - u[:k])
        top = d.max(axis=1, keepdims=True)
        moved = (d > 1e-6).sum(axis=1)
        even = ((d >= top * (1.0 - tolerance)) & (d > 1e-6)).sum(axis=1)
        ok = (even >= 0.6 * np.maximum(moved, 1)) & (moved >= 0.3 * u.shape[1]) & (top[:, 0] > 0)
        if ok.any():
            j = np.flatnonzero(ok)
            out[k] = j[np.argmin(d[j].sum(axis=1))]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a dataset-seed directory of groups.py --workdir")
    ap.add_argument("prefix", help="client id prefix of the group's members")
    ap.add_argument("--window", type=float, default=3000.0, help="candidates sent at most this many seconds before (default 3000)")
    ap.add_argument("--sample", type=int, default=400)
    ap.add_argument("--tolerance", type=float, default=0.02, help="relative tolerance of one size when finding parents (default 0.02)")
    ap.add_argument("--units", choices=("calibration", "data"), default="calibration",
                    help="find parents in the detector's units (the calibration's ranges, default) or in the dataset's own ranges "
                         "(exporter.sim's; the run directory's name gives the dataset and seed)")
    args = ap.parse_args()
    cal, _, _ = _inputs(args.run / "calibration.jsonl")
    scaling = Scaling.fit(cal)
    det = LinksDetector(LinksParams(), ModelContext("m", "tabular", cal.shape[1], 2, scaling, ("links",)))
    ref = det.fit(Reference(cal, None, scaling))
    assert ref is not None
    det.load_reference(ref)
    x, ts, clients = _inputs(args.run / "evaluation.jsonl")
    u = det._units(x)
    buckets = det._buckets(u)
    members = np.flatnonzero([c.startswith(args.prefix) for c in clients])
    if members.size == 0:
        ap.error(f"no client id starts with {args.prefix!r}")
    if args.units == "data":
        from exporter.sim import build_world

        dataset, seed = args.run.name.rsplit("-", 1)
        span = build_world(dataset, int(seed)).dataset.span
        par = parents(x[members] / np.where(span > 0, span, 1.0), args.tolerance)
    else:
        par = parents(u[members].astype(np.float64), args.tolerance)
    rng = np.random.default_rng(0)
    with_parent = np.flatnonzero(par >= 0)
    picked = {"nearest (probe)": 0, "nearest (all)": 0, "links": 0}
    among = 0
    r = det._probe
    for k in rng.choice(with_parent, min(args.sample, with_parent.size), replace=False):
        q, p = members[k], members[par[k]]
        cand = np.flatnonzero((ts < ts[q]) & (ts >= ts[q] - args.window) & (buckets == buckets[q]).any(axis=1))
        if p not in cand:
            continue
        among += 1
        du = u[q] - u[cand]
        probe = (du[:, :r] ** 2).sum(axis=1)
        picked["nearest (probe)"] += cand[np.argmin(probe)] == p
        picked["nearest (all)"] += cand[np.argmin((du**2).sum(axis=1))] == p
        alive = np.ones((1, cand.size), dtype=bool)
        picked["links"] += cand[int(det._parent(np.abs(du[None, :, :r]), alive, probe[None, :])[0])] == p
    print(f"{args.prefix}: {members.size} queries, {with_parent.size} a sign step from an earlier one ({args.units} units); "
          f"sampled {min(args.sample, with_parent.size)}, parent among the candidates for {among}")
    for rule, n in picked.items():
        print(f"  {rule:>16}: parent picked for {n} of {among}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
