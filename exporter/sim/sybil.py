"""Sybil groups: one extraction attack spread over several API keys, in several ways.

A group is ``size`` client ids run by one attacker, who builds one Jacobian augmentation
set (JbDA, Papernot et al. 2017) from seeds of its own (natural samples of the attacker
pool, so that two groups never share seeds) and sends its queries through the members:

===========  ==================================================================================
even         one JbDA run dealt round-robin over the members (the classic split)
staggered    members join one after another over the first half of the run; each query goes
             to a random member among those that have joined
uneven       each member has its own rate: the queries are dealt with Dirichlet(1) weights
mixed        attack types mixed across members: the members share one substitute and one
             growing set, and each makes its own points by its own rule, JbDA (sign of the
             own-class gradient) or T-RND (toward a random other class); see
             :func:`exporter.sim.attacks.coordinated_augmentation`
===========  ==================================================================================

``mixed`` is the HELD-OUT strategy of the group benchmark (bench/detection/groups.py): it was
not used while choosing how clients are linked, and is reported apart.

Timing: the group sends a Poisson stream at ``member_rate x size`` queries/s (log-normal
spread across groups), from a start in the first half of the window.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from exporter.sim.attacks import coordinated_augmentation, run_attack
from exporter.sim.traffic import DEFAULT_START, Traffic
from exporter.sim.world import World

STRATEGIES = ("even", "staggered", "uneven", "mixed")
HELD_OUT = "mixed"


@dataclass(frozen=True)
class SybilPlan:
    """One Sybil group: its strategy, number of members and queries per member."""

    strategy: str
    size: int
    per_member: int = 300
    member_rate: float = 0.1  # median queries/s of one member

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown Sybil strategy {self.strategy!r}; known: {', '.join(STRATEGIES)}")
        if self.size < 2 or self.per_member < 1 or self.member_rate <= 0:
            raise ValueError("a Sybil group needs at least 2 members, 1 query each and a positive rate")


def member_kinds(strategy: str, size: int) -> list[str]:
    """The attack type of each member of a group: ``mixed`` alternates JbDA and T-RND, the others are JbDA splits."""
    if strategy == "mixed":
        return ["jbda" if j % 2 == 0 else "trnd" for j in range(size)]
    return ["jbda"] * size


def _rng(seed: int, stream: str, role: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(stream.encode()), zlib.crc32(role.encode()), index])


def simulate_sybil(world: World, plan: SybilPlan, seed: int, index: int, *, stream: str = "sybil", prefix: str = "syb",
                   start: float = DEFAULT_START, window: float = 6 * 3600.0) -> Traffic:
    """The events of one Sybil group, answered by the victim; members ``<prefix>-<strategy>-<size>-<index>-<j>``."""
    ds = world.dataset
    rng = _rng(seed, stream, f"sybil:{plan.strategy}:{plan.size}", index)
    budget = plan.size * plan.per_member
    params = {"natural_seeds": 1.0}
    if plan.strategy == "mixed":
        X, member = coordinated_augmentation(ds, world.answer, budget, rng, member_kinds(plan.strategy, plan.size), params)
    else:
        X = run_attack("jbda", ds, world.answer, budget, rng, params)
        n = len(X)
        if plan.strategy == "even":
            member = np.arange(n) % plan.size
        elif plan.strategy == "uneven":
            member = rng.choice(plan.size, n, p=rng.dirichlet(np.ones(plan.size)))
        else:  # staggered: member j joins at a share j / size of the first half of the run
            joined = np.searchsorted(0.5 * np.arange(plan.size) / plan.size, np.arange(n) / n, side="right")
            member = np.floor(rng.random(n) * joined).astype(np.int64)
    rate = plan.member_rate * plan.size * rng.lognormal(0.0, 0.3)
    t0 = start + rng.uniform(0.0, 0.5 * window)
    ts = t0 + np.cumsum(rng.exponential(1.0 / rate, len(X)))
    group = f"{prefix}-{plan.strategy}-{plan.size}-{index}"
    names = [f"{group}-{j}" for j in range(plan.size)]
    truth = {c: {"kind": "attack", "type": f"sybil-{plan.strategy}", "group": group, "strategy": plan.strategy, "size": plan.size}
             for c in names}
    X = ds.round(X)
    return Traffic(ts, member.astype(np.int64), names, X, world.victim.predict_proba(X), truth, world.model, ds.decimals)
