#!/usr/bin/env python3
"""What each kind of Sybil member gives ``links`` to work with: distinct inputs, linked queries, score, group.

A group is named when the reported group holds 80 % of its members, and a member joins a
group only when its own queries were linked (``links`` flagged it, or ``group_min_links`` of
its queries were linked) and it has ``group_min_links`` links with a member (docs/groups.md,
How groups form). This script replays a log kept by ``bench/detection/groups.py --workdir
DIR`` in-process, with the run's own config and profile (``group_rules.replay_kept``: the
same code path as ``monitaur-exporter replay``), and prints, per dataset, strategy, group
size and member attack type (``jbda`` or ``trnd`` for the ``mixed`` strategy's members,
``jbda`` for the others), the medians over
the members of the given runs of: queries sent, distinct inputs among them, queries that
``links`` linked to another client, and its score at the end; and how many members ``links``
flagged, how many the verdict flagged (any detector) and how many are in their group's
reported group (the group that holds most of its members)::

    python3 bench/detection/groups.py --datasets breast_cancer --seeds 2 --strategies mixed --workdir DIR
    python3 bench/detection/members.py DIR/breast_cancer-2

Only our generator's groups (``exporter/sim/sybil.py``, ids ``syb-<strategy>-<size>-<index>-<j>``)
are read. A replay takes as long as ``groups.py``'s (about a minute per log of 440,000 events).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from group_rules import replay_kept  # noqa: E402

from exporter.sim.sybil import member_kinds  # noqa: E402

MEMBER = re.compile(r"^syb-([a-z]+)-(\d+)-(\d+)-(\d+)$")


@dataclass
class Member:
    """What one Sybil member sent and what ``links`` made of it."""

    queries: int = 0
    inputs: set[int] = field(default_factory=set)  # digests of its distinct inputs
    linked: int = 0  # queries linked to another client's, ever (the detector's state)
    score: float = 0.0
    links_flagged: bool = False
    flagged: bool = False
    group: str | None = None


def replay_run(run_dir: Path) -> dict[str, Member]:
    """The Sybil members of one ``groups.py`` run directory, replayed with its config and profile."""
    members: dict[str, Member] = defaultdict(Member)

    def observe(batch: Any, name: str, _signals: Any) -> None:
        if name == "links" and MEMBER.match(batch.client):
            m = members[batch.client]
            m.queries += len(batch)
            m.inputs.update(int(d) for d in batch.digests)

    def at_end(pipeline: Any) -> None:
        for client in pipeline.store.values():
            if client.client_id in members:
                for states in client.detector_state.values():
                    if "links" in states:
                        members[client.client_id].linked = int(states["links"]["linked"])

    report = replay_kept(run_dir, observe, at_end)
    for cid, m in members.items():
        entry = report["clients"].get(cid, {})
        links = entry.get("detectors", {}).get("links", {})
        m.score, m.links_flagged = float(links.get("value", 0.0)), bool(links.get("flagged", False))
        m.flagged, m.group = bool(entry.get("flagged", False)), entry.get("group")
    return members


def rows(runs: dict[str, dict[str, Member]]) -> dict[tuple[str, str, int, str], list[tuple[Member, bool]]]:
    """Members by (dataset, strategy, size, attack type), each with whether it is in its group's reported group."""
    out: dict[tuple[str, str, int, str], list[tuple[Member, bool]]] = defaultdict(list)
    for dataset, members in runs.items():
        by_group: dict[str, list[tuple[str, Member]]] = defaultdict(list)
        for cid, m in members.items():
            by_group[cid.rsplit("-", 1)[0]].append((cid, m))
        for group, found in by_group.items():
            strategy, size = MEMBER.match(found[0][0]).group(1, 2)  # type: ignore[union-attr]
            kinds = member_kinds(strategy, int(size))
            counts = Counter(m.group for _, m in found if m.group is not None)
            reported = counts.most_common(1)[0][0] if counts else None
            for cid, m in found:
                kind = kinds[int(cid.rsplit("-", 1)[1])]
                out[(dataset.rsplit("-", 1)[0], strategy, int(size), kind)].append((m, reported is not None and m.group == reported))
    return out


def med(values: list[float] | list[int]) -> str:
    """The median, as the table prints it."""
    return f"{np.median(values):g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories of groups.py --workdir (DIR/<dataset>-<seed>)")
    args = ap.parse_args(argv)
    runs = {}
    for run_dir in args.runs:
        runs[run_dir.name] = replay_run(run_dir)
        print(f"{run_dir}: {len(runs[run_dir.name])} Sybil members", file=sys.stderr)
    print("| dataset | strategy | size | type | members | queries | distinct inputs | linked queries | links score | flagged by links | flagged | in the reported group |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (dataset, strategy, size, kind), found in sorted(rows(runs).items()):
        ms = [m for m, _ in found]
        print(f"| {dataset} | {strategy} | {size} | {kind} | {len(ms)} | {med([m.queries for m in ms])} | {med([len(m.inputs) for m in ms])} "
              f"| {med([m.linked for m in ms])} | {med([round(m.score, 3) for m in ms])} | {sum(m.links_flagged for m in ms)} "
              f"| {sum(m.flagged for m in ms)} | {sum(inside for _, inside in found)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
