#!/usr/bin/env python3
"""Would another grouping rule name Sybil groups with fewer other attackers in them?

Replays a log kept by ``bench/detection/groups.py --workdir DIR`` (its config, profile and
evaluation log), records every link the ``links`` detector makes (the explorer, the
clients it continued or followed, whether it was flagged), and regroups the clients
offline under several rules:

* ``components >= k``: the exporter's rule (:mod:`exporter.groups`) before commit
  ``3774c6b``, at ``group_min_links`` k: eligible clients joined by edges of at least k
  links, connected components;
* ``average linkage >= t``: eligible clients merged greedily, strongest first, while the
  links between two clusters per pair of their members is at least t (edges of at least 3
  links only);
* ``components >= 3, then attach >= 3``: components at 3, then each eligible client
  left out joins the component its links add up to 3 with, summed over the component's
  members (a member whose few links are spread over several members);
* ``components >= 3 of edges both clients link``: the exporter's rule since commit
  ``3774c6b``: only edges that each of their two clients made a link of;
* ``components >= 3 between clients that made a link of such an edge``: components at 3
  among the eligible clients that made at least one link of some edge of 3 links to another
  eligible client (a local rule that the exporter could keep link by link);
* ``components >= 3, members with >= n own links into theirs``: components at 3, then,
  until nothing changes, members with fewer than n links of their own to the rest of their
  component leave and the components are recomputed.

Per log and rule: the true groups named, named and pure, the held-out strategy's groups
named, and the honest clients (``app-`` and ``bapp-`` ids) in any cluster. Logs of either
Sybil generator (``groups.py --sybil a`` or ``b``) can be regrouped; the independent
generator's have no held-out strategy.

To try other ``links`` parameters, change ``DIR/<log>/config.yml`` and recalibrate
(``monitaur-exporter calibrate --config DIR/<log>/config.yml --out DIR/<log>/profile-<clients>.bin
DIR/<log>/calibration.jsonl``): a profile made under other parameters would be ignored, and
the script refuses it.

Eligible, as in the exporter: flagged by ``links``, or at least 3 linked queries. A true
group is *named* when one cluster holds >= 80 % of its members, and *pure* when >= 80 % of
that cluster's members are its own (as ``scoring.score_groups``), counted over the whole
log: no expiry and no timing. Members are told apart by their ids
(``syb-<strategy>-<size>-<index>-<j>``, :mod:`exporter.sim.sybil`).

    python3 bench/detection/groups.py --datasets digits,breast_cancer,wine --seeds 0 --workdir DIR
    python3 bench/detection/group_rules.py DIR/digits-0 DIR/breast_cancer-0 DIR/wine-0
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from exporter.config import load_settings  # noqa: E402
from exporter.detectors import enabled_detectors  # noqa: E402
from exporter.detectors.base import Batch, Signals  # noqa: E402
from exporter.detectors.fingerprint import client_key  # noqa: E402
from exporter.profile import load_profile, params_digest  # noqa: E402
from exporter.replay import replay  # noqa: E402
from exporter.sim.sybil import HELD_OUT  # noqa: E402

MEMBER = re.compile(r"(sybb?-[a-z_]+-\d+-\d+)-\d+$")  # both generators' members: exporter/sim/sybil.py, sybil_b.py
HONEST = re.compile(r"b?app-\d+$")  # the benign clients of groups.py's evaluation log (families A and B)

Edges = Counter[frozenset[str]]
Arcs = Counter[tuple[str, str]]  # (explorer, peer): links made by the explorer's own queries


def replay_kept(workdir: Path, observer: Callable[[Batch, str, Signals], None], at_end: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Replay a kept log (``DIR/<dataset>-<seed>`` of ``groups.py --workdir DIR``) with its config and
    its one calibration profile (``profile-<clients>.bin``), as ``monitaur-exporter replay --profile``
    would; ``observer`` and ``at_end`` as :func:`exporter.replay.replay` takes them. Returns the report."""
    profiles = sorted(workdir.glob("profile-*.bin"))
    if len(profiles) != 1:
        raise SystemExit(f"{workdir}: expected one profile-*.bin, found {len(profiles)}")
    settings = load_settings(str(workdir / "config.yml"))
    profile = load_profile(str(profiles[0]), settings)
    cls, params = enabled_detectors(settings)["links"]
    if any(mp.params.get("links") != params_digest(params, cls.threshold_param) for mp in profile.models.values()):
        # The exporter would ignore the profile's links reference, and links would judge nothing.
        raise SystemExit(f"{workdir}: the profile was calibrated under other links parameters than config.yml's; recalibrate first: "
                         f"monitaur-exporter calibrate --config {workdir}/config.yml --out {profiles[0]} {workdir}/calibration.jsonl")
    return replay(settings, [str(workdir / "evaluation.jsonl")], progress=False, profile=profile, observer=observer, at_end=at_end)


def record(workdir: Path) -> tuple[Edges, set[str], set[str], Arcs]:
    """Replay the kept log; the links between clients (either way), the eligible clients, every
    client, and the links by direction (explorer, peer)."""
    names: dict[int, str] = {}
    linked: list[tuple[str, list[int]]] = []
    own: Counter[str] = Counter()
    flagged: set[str] = set()

    def observe(batch: Batch, name: str, signals: Signals) -> None:
        names.setdefault(client_key(batch.client), batch.client)
        found = batch.block.prepared.get("links") if batch.block is not None and name == "links" else None
        if found is None:
            return
        for i, row in enumerate(batch.rows.tolist()):
            if found[1][row]:
                own[batch.client] += 1
                flagged.update([batch.client] if signals.flagged[i] else [])
                linked.append((batch.client, [int(k) for k in found[2][row] if k]))

    replay_kept(workdir, observe)
    edges: Edges = Counter()
    arcs: Arcs = Counter()
    for child, parents in linked:
        for key in parents:
            parent = names.get(key)
            if parent is not None and parent != child:
                edges[frozenset((child, parent))] += 1
                arcs[(child, parent)] += 1
    return edges, {c for c in own if c in flagged or own[c] >= 3}, set(names.values()), arcs


def mutual(edges: Edges, eligible: set[str], arcs: Arcs, k: int) -> list[set[str]]:
    """``components >= k`` over the edges that each of their two clients made at least one link of (its own queries)."""
    both: Edges = Counter()
    for pair, n in edges.items():
        a, b = tuple(pair)
        if arcs[(a, b)] and arcs[(b, a)]:
            both[pair] = n
    return components(both, eligible, k)


def own_into(edges: Edges, eligible: set[str], arcs: Arcs, k: int, own: int) -> list[set[str]]:
    """``components >= k``, then, until nothing changes, every member whose own links to the other
    members of its component add up to fewer than ``own`` leaves, and the components are recomputed."""
    members = set(eligible)
    while True:
        parts = components(edges, members, k)
        out = set()
        for part in parts:
            for c in part:
                if sum(arcs[(c, q)] for q in part if q != c) < own:
                    out.add(c)
        if not out:
            return parts
        members -= out


def active(edges: Edges, eligible: set[str], arcs: Arcs, k: int) -> list[set[str]]:
    """``components >= k`` between *active* clients: eligible clients that made at least one link
    of some edge of at least ``k`` links to another eligible client. An edge itself may be one
    way; a client that never made a link of a heavy edge joins no group, however many links to
    it others make."""
    on: set[str] = set()
    for pair, n in edges.items():
        a, b = tuple(pair)
        if n >= k and a in eligible and b in eligible:
            on.update(c for c, peer in ((a, b), (b, a)) if arcs[(c, peer)])
    return components(edges, on, k)


def components(edges: Edges, eligible: set[str], k: int) -> list[set[str]]:
    adj: dict[str, set[str]] = defaultdict(set)
    for pair, n in edges.items():
        a, b = tuple(pair)
        if n >= k and a in eligible and b in eligible:
            adj[a].add(b)
            adj[b].add(a)
    seen: set[str] = set()
    out = []
    for start in adj:
        if start in seen:
            continue
        part, todo = set(), [start]
        while todo:
            c = todo.pop()
            if c not in part:
                part.add(c)
                todo += adj[c] - part
        seen |= part
        out.append(part)
    return out


def average_linkage(edges: Edges, eligible: set[str], t: float) -> list[set[str]]:
    clusters = {c: {c} for c in eligible}
    between: Counter[frozenset[str]] = Counter({p: n for p, n in edges.items() if n >= 3 and p <= eligible})
    while between:
        pair, n = max(between.items(), key=lambda item: item[1] / math.prod(len(clusters[c]) for c in item[0]))
        a, b = tuple(pair)
        if n / (len(clusters[a]) * len(clusters[b])) < t:
            break
        clusters[a] |= clusters.pop(b)
        merged: Counter[frozenset[str]] = Counter()
        for p, m in between.items():
            x, y = (a if c == b else c for c in p)
            if x != y:
                merged[frozenset((x, y))] += m
        between = merged
    return [c for c in clusters.values() if len(c) >= 2]


def attach(edges: Edges, eligible: set[str], k: int) -> list[set[str]]:
    """``components >= k``, then each eligible client outside them joins the component it has
    the most links with, summed over that component's members, when they are at least ``k``:
    a member whose few links are spread over several members of one group."""
    parts = components(edges, eligible, k)
    where = {c: i for i, part in enumerate(parts) for c in part}
    to_part: dict[str, Counter[int]] = defaultdict(Counter)
    for pair, n in edges.items():
        a, b = tuple(pair)
        for x, y in ((a, b), (b, a)):
            if x in eligible and x not in where and y in where:
                to_part[x][where[y]] += n
    for c, counts in to_part.items():
        i, n = counts.most_common(1)[0]
        if n >= k:
            parts[i] = parts[i] | {c}
    return parts


def score(clusters: list[set[str]], truth: dict[str, set[str]]) -> tuple[int, int]:
    """(named, named and pure) true groups."""
    where = {c: i for i, part in enumerate(clusters) for c in part}
    named = pure = 0
    for members in truth.values():
        counts = Counter(where[c] for c in members if c in where)
        if counts:
            i, n = counts.most_common(1)[0]
            if n >= math.ceil(0.8 * len(members)):
                named += 1
                pure += len(members & clusters[i]) >= 0.8 * len(clusters[i])
    return named, pure


RULES: dict[str, Callable[[Edges, set[str], Arcs], list[set[str]]]] = {
    **{f"components >= {k}": (lambda e, g, a, k=k: components(e, g, k)) for k in (2, 3, 5, 10)},
    **{f"average linkage >= {t}": (lambda e, g, a, t=t: average_linkage(e, g, t)) for t in (1.0, 2.0)},
    "components >= 3, then attach >= 3": lambda e, g, a: attach(e, g, 3),
    "components >= 3 of edges both clients link": lambda e, g, a: mutual(e, g, a, 3),
    "components >= 3 between clients that made a link of such an edge": lambda e, g, a: active(e, g, a, 3),
    **{f"components >= 3, members with >= {n} own links into theirs": (lambda e, g, a, n=n: own_into(e, g, a, 3, n)) for n in (1, 3)},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdirs", nargs="+", type=Path, help="DIR/<dataset>-<seed> of bench/detection/groups.py --workdir DIR")
    args = ap.parse_args()
    print("| log | rule | named | named and pure | named, held-out `mixed` | honest clients in a cluster | clusters |\n|---|---|---:|---:|---:|---:|---:|")
    for workdir in args.workdirs:
        edges, eligible, clients, arcs = record(workdir)
        truth: dict[str, set[str]] = defaultdict(set)
        for c in clients:
            if (m := MEMBER.match(c)) is not None:
                truth[m.group(1)].add(c)
        held = {g: m for g, m in truth.items() if g.startswith(f"syb-{HELD_OUT}-")}
        for rule, group in RULES.items():
            clusters = group(edges, eligible, arcs)
            named, pure = score(clusters, truth)
            honest = sum(1 for part in clusters for c in part if HONEST.match(c))
            print(f"| {workdir.name} | {rule} | {named}/{len(truth)} | {pure} | {score(clusters, held)[0]}/{len(held)} | {honest} | {len(clusters)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
