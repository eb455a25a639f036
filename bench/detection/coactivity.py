#!/usr/bin/env python3
"""Would "flagged clients that start and stop together" name the Sybil groups that links miss?

The splits that ``links`` does not name (docs/groups.md, What is not caught) are those
whose members share no points: each grows its own lattice, or steps toward the other class
and back. What they still share is their schedule: one campaign, dealt over several keys,
starts and stops at once. Honest clients start together too (after an outage, at the top
of the hour), so a schedule alone links nobody here; this script measures it only between
clients the client verdict flagged, each on its own evidence, at some time of the replay.

Replays a log kept by ``bench/detection/groups.py --workdir DIR`` (its config, profile and
evaluation log, as ``group_rules.py`` does), and groups the flagged clients offline under:

* ``groups``: the exporter's groups at the end of the replay (its ``links`` groups);
* ``schedule <= S``: flagged clients joined when their first queries are at most ``S``
  seconds apart and so are their last queries (connected components);
* ``groups + schedule <= S``: the exporter's groups, merged where a schedule edge joins
  two of their members or a member and a flagged client outside every group.

Per log and rule: the true groups named, named and pure (as ``group_rules.score``), the
held-out strategy's groups named, the honest clients (``app-``, ``bapp-``) and solo
attackers (``atk-``) in a cluster, and the clusters. Counted over the whole log: no expiry,
and "flagged" at any time, so the schedule rules are an upper bound on what an online rule
would name with them.

    python3 bench/detection/groups.py --datasets digits --seeds 0 --workdir DIR
    python3 bench/detection/coactivity.py DIR/digits-0 [--seconds 10,60,300] [--list]

``--list`` prints, after the table, every schedule cluster that holds an honest client: its
members, each with the start of its queries (seconds from the log's first query) and how
long it queried.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from group_rules import HONEST, MEMBER, components, replay_kept, score  # noqa: E402

from exporter.detectors.base import Batch, Signals  # noqa: E402
from exporter.fusion import FUSION  # noqa: E402
from exporter.sim.sybil import HELD_OUT  # noqa: E402

SOLO = "atk-"  # solo attackers of groups.py's evaluation log


def observe_run(workdir: Path) -> tuple[dict[str, tuple[float, float]], set[str], dict[str, str | None]]:
    """Replay the kept log: each client's first and last query time, the clients the verdict
    flagged at some time, and each client's group at the end (None: none)."""
    span: dict[str, list[float]] = {}
    flagged: set[str] = set()

    def observe(batch: Batch, name: str, signals: Signals) -> None:
        if name != FUSION:
            return
        ts = batch.ts
        lo, hi = float(ts.min()), float(ts.max())
        seen = span.setdefault(batch.client, [lo, hi])
        seen[0], seen[1] = min(seen[0], lo), max(seen[1], hi)
        if signals.flagged.any():
            flagged.add(batch.client)

    report = replay_kept(workdir, observe)
    groups = {c: entry.get("group") for c, entry in (report.get("clients") or {}).items()}
    return {c: (a, b) for c, (a, b) in span.items()}, flagged, groups


def schedule_edges(span: dict[str, tuple[float, float]], flagged: set[str], seconds: float) -> Counter[frozenset[str]]:
    """Pairs of flagged clients whose first queries, and whose last queries, are at most ``seconds`` apart."""
    order = sorted(flagged, key=lambda c: span[c][0])
    edges: Counter[frozenset[str]] = Counter()
    for i, a in enumerate(order):
        for b in order[i + 1 :]:
            if span[b][0] - span[a][0] > seconds:
                break
            if abs(span[b][1] - span[a][1]) <= seconds:
                edges[frozenset((a, b))] = 1
    return edges


def merged(clusters: list[set[str]], edges: Counter[frozenset[str]]) -> list[set[str]]:
    """``clusters`` joined where an edge links two of them, or one and a client outside every cluster."""
    joined: Counter[frozenset[str]] = Counter(edges)
    for part in clusters:  # a cluster holds together: a chain through its members
        members = sorted(part)
        joined.update(frozenset(pair) for pair in zip(members, members[1:]))
    parts = components(joined, set().union(*clusters, *edges), 1)
    covered = set().union(*parts)
    return parts + [part for part in clusters if not part <= covered]  # (a cluster of one has no edge)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdirs", nargs="+", type=Path, help="DIR/<dataset>-<seed> of bench/detection/groups.py --workdir DIR")
    ap.add_argument("--seconds", default="10,60,300", help="schedule tolerances to try, comma-separated (default 10,60,300)")
    ap.add_argument("--list", action="store_true", help="print the schedule clusters that hold an honest client")
    args = ap.parse_args(argv)
    tolerances = [float(s) for s in args.seconds.split(",")]
    listed: list[str] = []
    print("| log | rule | named | named and pure | named, held-out `mixed` | honest clients in a cluster | solo attackers in a cluster | clusters |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    for workdir in args.workdirs:
        span, flagged, group_of = observe_run(workdir)
        truth: dict[str, set[str]] = defaultdict(set)
        for c in span:
            if (m := MEMBER.match(c)) is not None:
                truth[m.group(1)].add(c)
        held = {g: m for g, m in truth.items() if g.startswith(f"syb-{HELD_OUT}-")}
        by_group: dict[str, set[str]] = defaultdict(set)
        for c, g in group_of.items():
            if g is not None:
                by_group[g].add(c)
        rules: dict[str, list[set[str]]] = {"groups": list(by_group.values())}
        for s in tolerances:
            edges = schedule_edges(span, flagged, s)
            rules[f"schedule <= {s:g} s"] = components(edges, flagged, 1)
            t0 = min(start for start, _ in span.values())
            for part in rules[f"schedule <= {s:g} s"]:
                if any(HONEST.match(c) for c in part):
                    listed.append(f"{workdir.name}, schedule <= {s:g} s: " + ", ".join(
                        f"{c} (from {span[c][0] - t0:.0f} s, for {span[c][1] - span[c][0]:.0f} s)" for c in sorted(part)))
            rules[f"groups + schedule <= {s:g} s"] = merged(list(by_group.values()), edges)
        for rule, clusters in rules.items():
            named, pure = score(clusters, truth)
            honest = sum(1 for part in clusters for c in part if HONEST.match(c))
            solo = sum(1 for part in clusters for c in part if c.startswith(SOLO))
            print(f"| {workdir.name} | {rule} | {named}/{len(truth)} | {pure} | {score(clusters, held)[0]}/{len(held)} | {honest} | {solo} | {len(clusters)} |", flush=True)
    if args.list:
        print("", *listed, sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
