"""Which Sybil groups of our generator make points from each other's: the share of members' points whose parent another member sent.

A split of one augmentation run (JbDA, T-RND) links its members when a member's point
continues a point another member sent (``links``, docs/groups.md). Whether that happens
depends on how the run's points are dealt to the members, not only on the strategy's name:
each round makes one point per point of the set, in the set's order, so with round-robin
dealing the point made from query ``k`` goes to member ``(k + s) mod size``, where ``s``
is the set's size at that round. The set starts at 10 seeds per class and doubles, so
whenever the group's size divides ``s``, every point goes to the member that sent its
parent: the members grow separate lattices with one shared substitute, and only the
table of steps (a step repeated, not a point continued) can link them.

For each dataset, strategy of ``exporter/sim/sybil.py`` and group size of the group
benchmark, this prints the share of the members' non-seed queries whose parent (from
:func:`exporter.sim.attacks.augmentation_parents`) another member sent, and into how many
separate lattices the members fall (members joined when one made a point from another's),
over the groups of the given seeds (the same groups as ``bench/detection/groups.py``'s
logs)::

    python3 bench/detection/parents.py [--datasets digits,breast_cancer,wine] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from group_rules import components  # noqa: E402
from groups import SIZES, sybil_group  # noqa: E402

from exporter.sim import build_world  # noqa: E402
from exporter.sim.attacks import augmentation_parents  # noqa: E402
from exporter.sim.sybil import HELD_OUT, STRATEGIES  # noqa: E402

SEEDS_PER_CLASS = 10  # exporter.sim.attacks._seeds' default, which the Sybil groups use


def dealing(member: np.ndarray, seeds: int) -> tuple[float, int]:
    """For one group (``member`` sent each query, in the run's order): the share of non-seed
    queries whose parent another member sent, and into how many separate parts the parents
    split the members (members joined when one made a point from the other's; 1: one lattice)."""
    parent = augmentation_parents(member.size, seeds)
    made = parent >= 0
    edges = Counter(frozenset((str(a), str(b))) for a, b in zip(member[parent[made]], member[made]) if a != b)
    everyone = {str(m) for m in range(int(member.max()) + 1)}
    joined = components(edges, everyone, 1)  # members linked to no other are parts of their own
    parts = len(joined) + len(everyone - set().union(*joined))
    return (float(np.mean(member[parent[made]] != member[made])) if made.any() else float("nan")), parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="digits,breast_cancer,wine")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| dataset | strategy | " + " | ".join(f"size {n}" for n in SIZES) + " |")
    print("|---|---|" + "---|" * len(SIZES))
    for name in args.datasets.split(","):
        worlds = {seed: build_world(name, seed) for seed in seeds}
        first = SEEDS_PER_CLASS * worlds[seeds[0]].dataset.num_classes
        for index, strategy in enumerate(STRATEGIES):
            cells = []
            for j, size in enumerate(SIZES):
                found = [dealing(np.asarray(sybil_group(worlds[seed], "a", strategy, size, seed, index * len(SIZES) + j).client), first)
                         for seed in seeds]
                low, high = min(p for _, p in found), max(p for _, p in found)
                parts = f"{low}" if low == high else f"{low}-{high}"
                cells.append(f"{np.mean([f for f, _ in found]):.2f}, {parts} part{'s' if high > 1 else ''}")
            label = f"{strategy} (held out)" if strategy == HELD_OUT else strategy
            print(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
