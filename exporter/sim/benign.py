"""Benign client behaviours: what honest traffic looks like, including its awkward parts.

Each behaviour is a function ``(world, rng, n, t0, span) -> Stream``: ``n`` queries of
one client, with timestamps inside ``[t0, t0 + span]`` (the client's active session).
Honest traffic is open-loop (it does not depend on the answers), so each behaviour is
generated in one vectorized step. The awkward behaviours (retries, resubmits, bursts,
drift, popular inputs) are here on purpose: they are what makes naive detectors raise
false alarms, and what calibration must absorb.

============== =============================================================================
iid            natural inputs from the benign pool, classes as in the data
class_skewed   natural inputs whose classes follow a skewed Dirichlet(0.2) mix (one app,
               one kind of document)
retries        iid, and 15 % of queries are re-sent *exactly* 1-3 times a few seconds later
noisy_resubmit iid, and 20 % are re-sent 1-3 times with small noise (3 % of the feature
               range, rounded to the data's precision: a re-scan, a re-measured record)
batch          a batch job: many distinct natural inputs in bursts of 50-200 queries that
               share one timestamp; the client sends 4x the usual volume
drift          the class mix moves from the natural one toward 2-3 classes over the session,
               and a slowly growing offset (up to 10 % of each feature's range, kept in the
               box) is added: a population or sensor drifting
popular        40 % of queries come from a small global pool of popular inputs that many
               clients send identically (Zipf-like popularity); the rest is iid
org_app        one of 2-5 apps of one organisation that share its data: a catalogue of 40-120
               natural records of 1-3 classes; each app has its own preference over the
               catalogue (Dirichlet 1) and sends 70 % of its records as they are and 30 %
               re-measured (every feature scaled by 1 + N(0, 2 %)); apps of one organisation
               work in the same hours (their sessions overlap)
outage_retry   a client active across the population's outage (one per population, 3-10
               minutes at 40-60 % of the window): its queries inside the outage are lost (not
               logged), and at recovery it re-sends them, with its last 1-3 answered queries
               whose answers were lost, exactly, within about a minute; every outage_retry
               client of the population restarts at the same moment
============== =============================================================================

``org_app`` and ``outage_retry`` are not in :data:`DEFAULT_MIX` (the detection benchmark's
populations stay as they were); the group benchmark adds them (bench/detection/groups.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from exporter.sim.world import World


@dataclass
class Stream:
    """One client's queries in time order: timestamps ``ts`` (n,) and inputs ``X`` (n, d)."""

    ts: np.ndarray
    X: np.ndarray

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def sorted(self) -> "Stream":
        order = np.argsort(self.ts, kind="stable")
        return Stream(self.ts[order], self.X[order])


def arrivals(rng: np.random.Generator, n: int, t0: float, span: float) -> np.ndarray:
    """``n`` Poisson-process arrival times in ``[t0, t0 + span]`` (sorted uniforms)."""
    return t0 + np.sort(rng.uniform(0.0, span, n))


def iid(world: World, rng: np.random.Generator, n: int, t0: float, span: float) -> Stream:
    X, _ = world.dataset.natural(rng, n)
    return Stream(arrivals(rng, n, t0, span), X)


def class_skewed(world: World, rng: np.random.Generator, n: int, t0: float, span: float) -> Stream:
    K = world.dataset.num_classes
    weights = rng.dirichlet(np.full(K, 0.2))
    classes = rng.choice(K, size=n, p=weights)
    X, _ = world.dataset.natural(rng, n, classes=classes)
    return Stream(arrivals(rng, n, t0, span), X)


def _resend(world: World, rng: np.random.Generator, n: int, t0: float, span: float, share: float, noise: float) -> Stream:
    """Originals plus re-sent copies (exact when ``noise`` is 0), ``n`` queries in all."""
    base = iid(world, rng, n, t0, span)
    repeats = np.where(rng.random(n) < share, rng.integers(1, 4, n), 0)
    src = np.repeat(np.arange(n), repeats)
    delay = rng.exponential(3.0, src.size)  # seconds between copies; cumulated per original below
    ts_copy = base.ts[src] + _within_group_cumsum(delay, repeats)
    X_copy = base.X[src]
    if noise > 0 and src.size:
        ds = world.dataset
        X_copy = ds.clip(ds.round_natural(X_copy + rng.normal(0.0, 1.0, X_copy.shape) * noise * ds.span))
    s = Stream(np.concatenate([base.ts, ts_copy]), np.concatenate([base.X, X_copy])).sorted()
    return Stream(s.ts[:n], s.X[:n])


def _within_group_cumsum(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Restart a cumulative sum at the start of each group of ``sizes``."""
    if values.size == 0:
        return values
    total = np.cumsum(values)
    starts = np.cumsum(sizes[sizes > 0]) - sizes[sizes > 0]
    offsets = np.repeat(np.concatenate([[0.0], total])[starts], sizes[sizes > 0])
    return total - offsets


def retries(world: World, rng: np.random.Generator, n: int, t0: float, span: float) -> Stream:
    return _resend(world, rng, n, t0, span, share=0.15, noise=0.0)


def noisy_resubmit(world: World, rng: np.random.Generator, n: int, t0: float, span: float) -> Stream:
    return _resend(world, rng, n, t0, span, share=0.20, noise=0.03)


def batch(world: World, rng: np.random.Generator, n: int, t0: float, span: float) -> Stream:
    X, _ = world.dataset.natural(rng, n)
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(50, 201)))
    sizes[-1] -= sum(sizes) - n
    burst_ts = arrivals(rng, len(sizes), t0, span)
    return Stream(np.repeat(burst_ts, sizes), X)


def drift(world: World, rng: np.random.Generator, n: int, t0: float, span: float) -> Stream:
    ds = world.dataset
    K = ds.num_classes
    ts = arrivals(rng, n, t0, span)
    s = (ts - t0) / max(span, 1e-9)  # progress through the session, 0..1
    target = rng.choice(K, size=int(rng.integers(2, 4)) if K > 3 else 1, replace=False)
    shifted = rng.random(n) < s
    classes = np.where(shifted, target[rng.integers(0, target.size, n)], rng.integers(0, K, n))
    X, _ = ds.natural(rng, n, classes=classes)
    direction = rng.choice([-1.0, 1.0], ds.dim) * rng.random(ds.dim)
    X = ds.clip(ds.round_natural(X + s[:, None] * 0.10 * direction * ds.span))
    return Stream(ts, X)


def popular(world: World, rng: np.random.Generator, n: int, t0: float, span: float, share: float = 0.4) -> Stream:
    """``share`` of the queries (40 % by default) come from the global popular pool."""
    base = iid(world, rng, n, t0, span)
    pool = world.popular
    ranks = np.arange(1, len(pool) + 1, dtype=np.float64)
    zipf = (1.0 / ranks) / (1.0 / ranks).sum()
    use = rng.random(n) < share
    X = base.X.copy()
    X[use] = pool[rng.choice(len(pool), size=int(use.sum()), p=zipf)]
    return Stream(base.ts, X)


@dataclass
class Organisation:
    """The data that several apps of one organisation share."""

    catalogue: np.ndarray  # (M, d) natural records of the organisation's classes
    t0: float  # the organisation's working hours
    t1: float


def organisation(world: World, rng: np.random.Generator, start: float, window: float) -> Organisation:
    """A catalogue of 40-120 natural records of 1-3 classes, and hours covering 40-100 % of the window."""
    ds = world.dataset
    K = ds.num_classes
    classes = rng.choice(K, int(rng.integers(1, min(3, K) + 1)), replace=False)
    m = int(rng.integers(40, 121))
    X, _ = ds.natural(rng, m, classes=rng.choice(classes, m))
    length = window * rng.uniform(0.4, 1.0)
    t0 = start + rng.uniform(0.0, window - length)
    return Organisation(X, t0, t0 + length)


def org_app(world: World, rng: np.random.Generator, n: int, t0: float, span: float, org: Organisation | None = None) -> Stream:
    """An app of an organisation (``org``): catalogue records, as they are or re-measured, in the organisation's hours."""
    if org is None:
        raise ValueError("org_app needs its organisation")
    ds = world.dataset
    pick = rng.choice(len(org.catalogue), n, p=rng.dirichlet(np.ones(len(org.catalogue))))
    X = org.catalogue[pick].copy()
    again = rng.random(n) < 0.3
    if again.any():
        X[again] = ds.clip(ds.round_natural(X[again] * (1.0 + rng.normal(0.0, 0.02, (int(again.sum()), ds.dim)))))
    # The session, as long as the organisation's hours allow, moved the least into them (a
    # session outside them would otherwise send every query at one instant).
    length = min(span, org.t1 - org.t0)
    lo = min(max(t0, org.t0), org.t1 - length)
    return Stream(arrivals(rng, n, lo, length), X)


def outage_retry(world: World, rng: np.random.Generator, n: int, t0: float, span: float, outage: tuple[float, float] | None = None) -> Stream:
    """Natural queries across the ``outage`` (down, up): those inside it are lost, then re-sent with the last answered ones."""
    if outage is None:
        raise ValueError("outage_retry needs the population's outage")
    down, up = outage
    ds = world.dataset
    pref = rng.dirichlet(np.full(ds.num_classes, 1.5))
    X, _ = ds.natural(rng, n, classes=rng.choice(ds.num_classes, n, p=pref))
    ts = arrivals(rng, n, t0, span)
    lost = (ts >= down) & (ts < up)
    answered = np.flatnonzero(ts < down)
    tail = answered[-int(rng.integers(1, 4)):] if answered.size else answered  # answered, but the answers were lost
    queue = np.concatenate([tail, np.flatnonzero(lost)])
    retry_ts = up + np.cumsum(rng.exponential(2.0, queue.size)) + rng.uniform(0.0, 30.0)
    keep = ~lost
    return Stream(np.concatenate([ts[keep], retry_ts]), np.concatenate([X[keep], X[queue]])).sorted()


# (world, rng, n, t0, span) -> Stream; some take keyword parameters (popular: share),
# set per population with ``Population.behaviour_params``.
Behaviour = Callable[..., Stream]

BEHAVIOURS: dict[str, Behaviour] = {
    "iid": iid,
    "class_skewed": class_skewed,
    "retries": retries,
    "noisy_resubmit": noisy_resubmit,
    "batch": batch,
    "drift": drift,
    "popular": popular,
    "org_app": org_app,
    "outage_retry": outage_retry,
}

# Share of each behaviour in a default benign population.
DEFAULT_MIX: dict[str, float] = {
    "iid": 0.30,
    "class_skewed": 0.15,
    "retries": 0.10,
    "noisy_resubmit": 0.10,
    "batch": 0.10,
    "drift": 0.10,
    "popular": 0.15,
}

VOLUME_FACTOR: dict[str, float] = {"batch": 4.0}  # batch jobs send more than interactive clients
