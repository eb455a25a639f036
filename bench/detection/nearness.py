#!/usr/bin/env python3
"""Are Sybil members' queries nearer to other clients' queries than honest ones are?

The simplest cross-client evidence would be nearness: a query close to a recent query of
another client (closer than equal, which the fingerprint index already sees). This script
measures, on a log kept by ``bench/detection/groups.py --workdir DIR``, how near each
sampled query lies to the nearest earlier query of *another* client: RMS distance over the
features in units of each feature's range in the log, among that client's predecessors of
the last ``--window`` seconds (at most ``--recent`` queries back), exact repeats left out.

With ``--reference`` (the run's ``calibration.jsonl``), only *off-manifold* queries count,
as samples and as neighbours: those farther from every reference query than 99 % of
honest queries are. Honest clients seldom send such queries, attacks often do; the
question is then whether a Sybil member's off-manifold neighbour belongs to its own group.

Clients are told apart by their ids, as the group benchmark names them: ``app-`` and
``bapp-`` benign families A and B, ``syb-<strategy>-`` and ``sybb-<strategy>-`` Sybil
members of ``exporter/sim/sybil.py`` and ``bench/detection/sybil_b.py`` (group: the id
without its last part), anything else by its first word (``atk``: solo attackers).

    python3 bench/detection/groups.py --sybil b --datasets digits --seeds 0 --workdir DIR
    python3 bench/detection/nearness.py DIR/digits-0/evaluation.jsonl [--reference DIR/digits-0/calibration.jsonl]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from exporter.detectors.links import nearest_rms  # noqa: E402
from exporter.profile import Profile  # noqa: E402

BENIGN = {"app": "benign A", "bapp": "benign B"}


def kind(client: str) -> str:
    """The population of a client id of the group benchmark (module docstring)."""
    head, _, rest = client.partition("-")
    if head in BENIGN:
        return BENIGN[head]
    if head in ("syb", "sybb"):
        return f"{head}:{rest.split('-')[0]}"
    return head


def group_of(client: str) -> str | None:
    """The Sybil group of a member's id, None for other clients."""
    return client.rsplit("-", 1)[0] if client.partition("-")[0] in ("syb", "sybb") else None


def load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Event times, client ids and inputs of a JSON-lines log."""
    ts, clients, rows = [], [], []
    with open(path, "rb") as fh:
        for line in fh:
            event = orjson.loads(line)
            ts.append(event["ts"])
            clients.append(event["client"])
            rows.append(event["input"])
    return np.asarray(ts), np.asarray(clients), np.asarray(rows, dtype=np.float64)


def run_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments of the scripts that read a run directory as ``links`` would: the directory,
    its profile, and the near links' guards."""
    ap.add_argument("run", type=Path, help="a run directory of groups.py --workdir (evaluation.jsonl, profile-200.bin)")
    ap.add_argument("--profile", default="profile-200.bin", help="the calibration profile in it (default profile-200.bin)")
    ap.add_argument("--distinct", type=int, default=8, help="links' distinct_repeats (default 8)")
    ap.add_argument("--recent", type=int, default=65_536, help="log positions back that count (links' max_queries, default 65,536)")


@dataclass
class Run:
    """A run directory of ``groups.py --workdir`` as ``links`` sees it: the evaluation log's
    client ids, inputs and populations in time order, and from the calibration profile's
    ``links`` reference the anchors, spacing and ``far`` distance; inputs and anchors in units
    of the features' ranges, over the features that move (``units``)."""

    log: Path
    clients: np.ndarray
    X: np.ndarray
    kinds: np.ndarray
    span: np.ndarray
    anchors: np.ndarray
    spacing: float
    far: float

    def units(self, x: np.ndarray) -> np.ndarray:
        moving = self.span > 0
        return x[:, moving] / self.span[moving]


def load_run(run: Path, profile: str) -> Run:
    """Read ``run`` (its ``evaluation.jsonl`` and the profile ``profile``, which must have the anchors' spacing)."""
    log = run / "evaluation.jsonl"
    ts, clients, X = load(log)
    order = np.argsort(ts, kind="stable")
    clients, X = clients[order], X[order]
    ref = next(iter(Profile.load(run / profile).models.values())).references.get("links", {})
    if "spacing" not in ref:
        raise SystemExit("the profile's links reference has no anchors' spacing: calibrate with links enabled, on this version")
    span = np.asarray(ref["span"], dtype=np.float64)
    anchors = np.asarray(ref["anchors"], dtype=np.float64)[:, span > 0] / span[span > 0]
    kinds = np.array([kind(str(c)) for c in clients])
    return Run(log, clients, X, kinds, span, anchors, float(ref["spacing"]), float(ref["far"]))


def nearest_other(ts: np.ndarray, clients: np.ndarray, U: np.ndarray, i: int, window: float, recent: int,
                  among: np.ndarray | None = None) -> tuple[float, int] | None:
    """RMS distance from query ``i`` to the nearest earlier query of another client (among
    the rows ``among`` marks, if given), and that query's row; None when there is none."""
    lo = max(0, i - recent, int(np.searchsorted(ts, ts[i] - window)))
    j = np.arange(lo, i)
    j = j[(clients[j] != clients[i]) & (True if among is None else among[j])]
    d = np.sqrt(((U[j] - U[i]) ** 2).mean(axis=1))
    j, d = j[d > 0], d[d > 0]
    return (float(d.min()), int(j[np.argmin(d)])) if d.size else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path, help="evaluation.jsonl of a groups.py --workdir run")
    ap.add_argument("--reference", type=Path, help="calibration.jsonl of the run: compare off-manifold queries only")
    ap.add_argument("--sample", type=int, default=600, help="queries sampled per population (default 600)")
    ap.add_argument("--window", type=float, default=1800.0, help="seconds back (default 1800)")
    ap.add_argument("--recent", type=int, default=20_000, help="queries back at most (default 20,000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    ts, clients, X = load(args.log)
    span = X.max(axis=0) - X.min(axis=0)
    U = X / np.where(span > 0, span, 1.0)
    kinds = np.array([kind(c) for c in clients])
    rng = np.random.default_rng(args.seed)
    honest = np.isin(kinds, list(BENIGN.values()))
    among = None
    if args.reference:
        R = np.unique(load(args.reference)[2] / np.where(span > 0, span, 1.0), axis=0)
        far = nearest_rms(U, R)
        among = far > np.quantile(far[rng.choice(np.flatnonzero(honest), min(20_000, int(honest.sum())), replace=False)], 0.99)
        print("Off-manifold share of the queries: " + ", ".join(f"{k} {among[kinds == k].mean():.3f}" for k in sorted(set(kinds.tolist()))) + "\n")
    found: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for k in sorted(set(kinds.tolist())):
        rows = np.flatnonzero((kinds == k) & (True if among is None else among))
        for i in rng.choice(rows, min(args.sample, rows.size), replace=False):
            near = nearest_other(ts, clients, U, int(i), args.window, args.recent, among)
            if near is not None:
                own = group_of(str(clients[i]))
                found[k].append((near[0], own is not None and group_of(str(clients[near[1]])) == own))
    benign = np.array([d for k in BENIGN.values() for d, _ in found.get(k, [])])
    q01, q1, q50 = np.quantile(benign, [0.001, 0.01, 0.5])
    print(f"`{args.log}`: honest queries' nearest other-client query, 0.1 / 1 / 50 % quantiles: {q01:.4f} / {q1:.4f} / {q50:.4f}\n")
    print("| population | queries | median distance | share nearer than the honest 1 % quantile | nearest from its own group |")
    print("|---|---:|---:|---:|---:|")
    for k, rows in found.items():
        v = np.array([d for d, _ in rows])
        own = f"{np.mean([o for _, o in rows]):.2f}" if k.startswith("syb") else "-"
        print(f"| {k} | {v.size} | {np.median(v):.4f} | {np.mean(v < q1):.3f} | {own} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
