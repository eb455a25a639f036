"""Sybil traffic family B: one model-extraction attacker splitting its queries across many
API keys, written independently of ``exporter/sim/sybil.py`` and ``exporter/sim/attacks.py``
(without reading them, nor the detectors or group linker), so the group linker can be measured
on Sybil traffic it was never tuned to.

The attacker sees only the API: the inputs it sends and the probability vectors it gets back.
It owns a small private set of natural samples (``Dataset.natural(..., role="attacker")``) and,
for the adaptive strategies, trains its own substitute (:class:`Substitute`, a one-hidden-layer
ReLU MLP fitted on the victim's probability vectors). A group of ``size`` keys gets a budget of
``size * per_member`` queries; every key sends at least one. Parameters below are drawn per
group (``U``: uniform, ``LU``: log-uniform, ``int U``: integers, bounds included).

===============  ====================================================  ===========================================
strategy         attack                                                how the keys share the work
===============  ====================================================  ===========================================
margin_pool      active learning (margin sampling): natural seeds      every round's batch (``int U[4, 32]``
                 (``int U[2, 5]`` per class) are labelled, then each   queries per active key, at most
                 round the substitute is retrained and scores a pool   per_member/4) is cut into one contiguous
                 synthesised around the labelled set (5-20x the        slice per active key; keys answer in
                 batch; mixup between two labelled points with         parallel, the substitute is retrained
                 probability ``U[0, 0.8]``, plus Gaussian noise        between rounds
                 ``U[0.02, 0.12]`` of each feature's range); the 2x
                 batch lowest-margin candidates are thinned to the
                 batch by farthest-point selection (diversity)
bisect           boundary line search (Tramer et al.): two endpoints   ``own`` (50 %): each search runs whole on
                 the victim labels differently (a natural seed and     one key, keys search in parallel, each with
                 another seed with chance ``U[0.3, 1]``; a uniform     its own budget share; ``spread``: one
                 point of the feature box otherwise, or when the two   orchestrator runs ``int U[2, size+2]``
                 seeds agree) are bisected for ``int U[6, 14]`` steps  searches at once and sends each query
                 (or until the midpoint no longer moves after          through the next key of a cycle
                 rounding), then ``int U[0, 3]`` probes at distance    reshuffled every pass
                 ``LU[0.002, 0.02]`` of the range around the boundary
                 point; seed labels are cached (never re-sent)
jacobian_decay   Jacobian-based augmentation, targeted at a random     rounds go to rotating crews of
                 other class, with a *decaying, normalised* step:       ``ceil(U[0.25, 0.6] * size)`` keys, the
                 the substitute's gradient of the target probability   round's points cut into one slice per
                 on a random ``U[0.2, 1]`` share of the features,      crew member; the next round starts where
                 rescaled to unit RMS (in range units), times          the crew rotation stopped
                 ``U[0.03, 0.15] * U[0.6, 0.9] ** round``; seeds
                 ``int U[10, 40]``; at most (budget - seeds) /
                 ``int U[6, 12]`` points augmented per round (a
                 random reservoir of the labelled set)
gauss_shared     non-adaptive random perturbation around one shared    every key perturbs the *same* seed set
                 seed set (``int U[5, 40]`` natural samples): seed     with its own noise scale (group scale
                 plus Gaussian noise on a random ``U[0.3, 1]`` share   times ``lognormal(0, U[0, 0.6])``), in its
                 of the features, ``U[0.01, 0.08]`` of the range       own cyclic seed order, with its own budget
                                                                       share and pace
rotation         Knockoff-Nets-style adaptive transfer set: a pool of  one key at a time: switch after a fixed
                 off-distribution inputs and interpolated natural      count ``int LU[10, per_member]`` (50 %) or
                 samples (half each) is partitioned by the             a clock period (the run's length /
                 substitute's predicted class; a gradient bandit       ``size * U[1.5, 3]``; an even split if that
                 (step ``U[0.05, 0.5]``) picks a class and sends a     leaves a key unused), keys visited in a
                 batch of ``int U[5, 25]`` unused pool rows from it,   cycle reshuffled every pass; ``LU[1 s,
                 rewarded by the victim's uncertainty (1 - margin);    2 min]`` between keys
                 substitute retrained every ``int U[100, 500]``
                 queries
shared_chains    boundary-walking chains (DeepFool-like): every key    each key walks its *own* disjoint seeds;
                 walks from its own seeds along the substitute's       all keys share one substitute, retrained
                 gradient of (runner-up - current class)                on every key's answers after each
                 probability, normalised, steps ``U[0.02, 0.1]`` of    synchronised round of ``int U[3, 15]``
                 the range plus ``U[0, 0.5]`` relative exploration     steps per key
                 noise; a chain ends when the victim's label flips
                 or after ``int U[8, 30]`` steps
jbda_split       textbook Jacobian-based dataset augmentation          each round's new points, split (drawn per
                 (Papernot et al. 2017): balanced natural seeds        group, 1/4 each) round-robin over the
                 (``int U[5, 20]`` per class, at most budget/4) are    points, in contiguous slices, by a random
                 labelled; each round the substitute is retrained on   key per point (over the round's non-idle
                 every labelled point, then EVERY point x of the set   keys), or in slices over a rotating crew
                 S becomes x + step * sign(grad of the substitute's    of ``ceil(U[0.25, 0.6] * size)`` keys; a
                 probability of the victim's label y(x)) * range,      round larger than the crew may take goes
                 clipped, so S doubles; step ``U[0.05, 0.3]``, its     out in chunks (late keys join); the
                 sign flipped every ``int U[2, 4]`` rounds (50 %)      substitute is retrained between rounds
                 or never; the last round is cut short by the budget
===============  ====================================================  ===========================================

Inputs as sent, per group: rounded to the data's natural precision (40 %: integer pixels for
digits), sent at full logged precision (40 %), or with a tiny jitter of ``U[2e-4, 1e-3]`` of each
feature's range (20 %: no two queries alike); then clipped into the feature box and rounded as
logged (``Dataset.round``). Answers are ``World.answer`` on the logged inputs.

Pace. Per key a rate: a group base ``LU[1/6, 1]`` queries/s, capped so the whole group sends at
most ``U[1, 5]`` queries/s, times ``lognormal(0, U[0, 0.8])`` per key. Half the groups stagger
their joins (each key but one joins once ``U[0, 0.5]`` of the budget is spent, or of the longest
key's stream in the parallel strategies; every key that has not sent yet joins once the budget
left is down to twice their number). Half have idle keys: a key sits out a round of margin_pool,
shared_chains or jbda_split (not its rotating crew) with chance ``p = U[0.05, 0.3]`` (a key's first round excepted); in a parallel stream a gap becomes a break of
``LU[2, 30]`` min with chance ``p / 10``. Round-based strategies pause ``LU[U[2, 20], U[30, 300]]`` s between rounds
(retraining). A single-stream strategy (``rotation``, ``bisect`` spread) sends at ``LU[0.3, 3]``
(rotation) or the sum of the key rates up to 4 queries/s (spread). The group starts uniformly in
the first half of the window; a run longer than what is left is squeezed into 85-100 % of it.

Randomness: everything of a group is drawn from one generator keyed by (seed, stream, strategy,
size, index), so groups never share seeds or samples, and a run is reproducible.

    python3 bench/detection/sybil_b.py --dataset digits --seed 0
"""

from __future__ import annotations

import argparse
import math
import sys
import zlib
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing

from exporter.sim.datasets import Dataset  # noqa: E402
from exporter.sim.traffic import DEFAULT_START, Traffic  # noqa: E402
from exporter.sim.world import World, build_world  # noqa: E402

STRATEGIES_B: tuple[str, ...] = ("margin_pool", "bisect", "jacobian_decay", "gauss_shared", "rotation", "shared_chains",
                                  "jbda_split")
DEFAULT_WINDOW = 6 * 3600.0


# -- randomness ----------------------------------------------------------------------------
def _rng(seed: int, stream: str, strategy: str, size: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(stream.encode()), zlib.crc32(b"sybil-b:" + strategy.encode()), size, index])


def _lu(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Log-uniform draw in ``[lo, hi]``."""
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# -- the attacker's substitute -------------------------------------------------------------
class Substitute:
    """One-hidden-layer ReLU MLP on range-scaled features, fitted with Adam on mini-batches to
    the victim's probability vectors (soft cross-entropy). Warm-started across rounds, as an
    attacker retraining on a growing transfer set would; gives probabilities and input gradients."""

    def __init__(self, rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, num_classes: int, hidden: int) -> None:
        d = lo.shape[0]
        self.rng = rng
        self.lo = lo
        self.scale = np.where(hi > lo, hi - lo, 1.0)
        self.params = [rng.normal(0, math.sqrt(2 / d), (d, hidden)), np.zeros(hidden),
                       rng.normal(0, math.sqrt(1 / hidden), (hidden, num_classes)), np.zeros(num_classes)]
        self._m = [np.zeros_like(p) for p in self.params]
        self._v = [np.zeros_like(p) for p in self.params]
        self._t = 0

    def _forward(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        W1, b1, W2, b2 = self.params
        Z = (X - self.lo) / self.scale
        A = Z @ W1 + b1
        H = np.maximum(A, 0.0)
        return Z, A, H, _softmax(H @ W2 + b2)

    def fit(self, X: np.ndarray, T: np.ndarray, steps: int = 80, batch: int = 128, lr: float = 0.01, l2: float = 1e-4) -> None:
        """``steps`` Adam steps on random mini-batches of ``(X, T)``, ``T`` the victim's probabilities."""
        W1, _, W2, _ = self.params
        for _ in range(steps):
            idx = self.rng.integers(0, len(X), min(batch, len(X)))
            Z, A, H, P = self._forward(X[idx])
            G = (P - T[idx]) / len(idx)
            dH = (G @ W2.T) * (A > 0)
            grads = [Z.T @ dH + l2 * W1, dH.sum(0), H.T @ G + l2 * W2, G.sum(0)]
            self._t += 1
            for p, g, m, v in zip(self.params, grads, self._m, self._v):
                m += 0.1 * (g - m)
                v += 0.001 * (g * g - v)
                p -= lr * (m / (1 - 0.9**self._t)) / (np.sqrt(v / (1 - 0.999**self._t)) + 1e-8)

    def proba(self, X: np.ndarray) -> np.ndarray:
        return self._forward(X)[3]

    def input_grad(self, X: np.ndarray, V: np.ndarray) -> np.ndarray:
        """(n, d) gradient of ``V[i] . p(x_i)`` with respect to each input ``x_i``."""
        W1, _, W2, _ = self.params
        _, A, _, P = self._forward(X)
        dz = P * V - P * (P * V).sum(1, keepdims=True)
        return ((dz @ W2.T) * (A > 0)) @ W1.T / self.scale


# -- the group: budget, key state, what it has sent ----------------------------------------
@dataclass
class _Pace:
    """How the keys of one group send (see the module docstring)."""

    rate: np.ndarray  # (size,) queries per second of each key
    join: np.ndarray  # (size,) share of the budget spent before each key joins
    idle: float  # chance a key sits out a round; in a parallel stream, sets the rate of long breaks
    pause: tuple[float, float]  # seconds between rounds (retraining), log-uniform


def _draw_pace(rng: np.random.Generator, size: int) -> _Pace:
    base = min(_lu(rng, 1 / 6, 1.0), rng.uniform(1.0, 5.0) / size)
    rate = base * rng.lognormal(0.0, rng.uniform(0.0, 0.8), size)
    join = np.zeros(size)
    if rng.random() < 0.5:
        join = rng.uniform(0.0, 0.5, size)
        join[rng.integers(size)] = 0.0
    idle = 0.0 if rng.random() < 0.5 else rng.uniform(0.05, 0.3)
    return _Pace(rate, join, idle, (rng.uniform(2.0, 20.0), rng.uniform(30.0, 300.0)))


@dataclass
class _Group:
    """One attacker and its keys: sends queries through the API and logs who sent what."""

    world: World
    rng: np.random.Generator
    size: int
    per_member: int
    pace: _Pace
    rounding: str  # "natural" | "full" | "jitter"
    jitter: float
    drawn: dict[str, Any] = field(default_factory=dict)  # parameters a strategy drew, for the ground truth
    X: list[np.ndarray] = field(default_factory=list)
    member: list[np.ndarray] = field(default_factory=list)
    rnd: list[np.ndarray] = field(default_factory=list)
    count: np.ndarray = field(init=False)
    turn: int = 0  # where the crew rotation continues

    def __post_init__(self) -> None:
        self.count = np.zeros(self.size, dtype=np.int64)

    @property
    def ds(self) -> Dataset:
        return self.world.dataset

    @property
    def total(self) -> int:
        return self.size * self.per_member

    @property
    def left(self) -> int:
        return self.total - int(self.count.sum())

    def natural(self, n: int) -> np.ndarray:
        return self.ds.natural(self.rng, n, role="attacker")[0]

    def grid(self, X: np.ndarray) -> np.ndarray:
        """``X`` at the precision the attacker sends (no jitter), clipped and rounded as logged."""
        ds = self.ds
        if self.rounding == "natural":
            X = ds.round_natural(X)
        X = ds.round(ds.clip(X))
        # a bound finer than the logged precision (breast_cancer) rounds outside the box: one unit in
        unit = 10.0 ** -ds.decimals.astype(np.float64)
        X = np.where(X < ds.lo, X + unit, np.where(X > ds.hi, X - unit, X))
        return ds.round(X)

    def send(self, X: np.ndarray, members: int | np.ndarray, rnd: int) -> tuple[np.ndarray, np.ndarray]:
        """Send ``X`` (truncated to the budget left) through ``members`` in round ``rnd``;
        returns the inputs as logged and the victim's answers."""
        X = np.atleast_2d(X)[: self.left]
        if self.rounding == "jitter":
            X = X + self.rng.uniform(-1.0, 1.0, X.shape) * self.jitter * self.ds.span
        X = self.grid(X)
        m = np.broadcast_to(np.asarray(members, dtype=np.int64), (len(X),))
        self.X.append(X)
        self.member.append(m.copy())
        self.rnd.append(np.full(len(X), rnd, dtype=np.int64))
        np.add.at(self.count, m, 1)
        return X, self.world.answer(X)

    def crew(self, k: int | None = None, eligible: np.ndarray | None = None) -> np.ndarray:
        """Keys working this round: joined (by budget spent) and eligible; keys that have never
        sent come first and are never idle; of the others either every non-idle key (``k`` None)
        or the next ``k`` in the rotation. Once the budget left is down to twice the number of
        keys that have never sent, they all join."""
        ok = np.ones(self.size, dtype=bool) if eligible is None else eligible
        unsent = self.count == 0
        due = self.pace.join <= 1.0 - self.left / self.total
        joined = np.flatnonzero(ok & (due | (unsent & (self.left <= 2 * int(unsent.sum())))))
        if joined.size == 0:  # the joined keys are done: the next key to join starts early
            cand = np.flatnonzero(ok)
            joined = cand[[int(np.argmin(self.pace.join[cand]))]]
        new = joined[self.count[joined] == 0]
        old = joined[self.count[joined] > 0]
        if k is None:
            old = old[self.rng.random(old.size) >= self.pace.idle]
        else:
            old = old[np.argsort((old - self.turn) % self.size, kind="stable")][:k]
            if old.size:
                self.turn = int(old[-1] + 1) % self.size
        out = np.concatenate([self.rng.permutation(new), self.rng.permutation(old)])
        return out if out.size else joined[[int(self.rng.integers(joined.size))]]

    def room(self, crew: np.ndarray) -> int:
        """Queries this round may take: the budget left, less one for every key outside ``crew``
        that has never sent (so that every key sends at least once)."""
        outside = self.count == 0
        outside[crew] = False
        return max(1, self.left - int(outside.sum()))

    def slices(self, crew: np.ndarray, n: int) -> np.ndarray:
        """(n,) key of each of ``n`` points: one contiguous slice per crew key, first keys first."""
        parts = np.array_split(np.arange(n), crew.size)
        return np.repeat(crew, [p.size for p in parts])


def _shares(rng: np.random.Generator, total: int, size: int, sigma: float) -> np.ndarray:
    """``total`` queries split over ``size`` keys, each >= 1, by log-normal weights (largest remainder)."""
    w = rng.lognormal(0.0, sigma, size)
    exact = w / w.sum() * (total - size)
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[: total - size - int(counts.sum())]] += 1
    return counts + 1


# -- timing (relative seconds; placed in the window at the end) ----------------------------
def _round_times(g: _Group, member: np.ndarray, rnd: np.ndarray) -> np.ndarray:
    """Rounds one after another, a retraining pause between them; inside a round every key sends
    its own points in order at its own rate, all keys in parallel."""
    rng, rate = g.rng, g.pace.rate
    out = np.empty(len(member))
    t = 0.0
    for r in np.unique(rnd):
        sel = np.flatnonzero(rnd == r)
        end = t
        for m in np.unique(member[sel]):
            idx = sel[member[sel] == m]
            times = t + np.cumsum(rng.exponential(1.0 / rate[m], idx.size))
            out[idx] = times
            end = max(end, float(times[-1]))
        t = end + _lu(rng, *g.pace.pause)
    return out


def _parallel_times(g: _Group, member: np.ndarray) -> np.ndarray:
    """Every key its own stream at its own rate, joining late by its join share of the longest
    stream, with long idle breaks (2-30 min) at a rate set by the group's idleness."""
    rng, rate = g.rng, g.pace.rate
    counts = np.bincount(member, minlength=g.size)
    longest = float((counts / rate).max())
    out = np.empty(len(member))
    for m in range(g.size):
        idx = np.flatnonzero(member == m)
        gaps = rng.exponential(1.0 / rate[m], idx.size)
        brk = rng.random(idx.size) < g.pace.idle / 10
        gaps[brk] = np.exp(rng.uniform(np.log(120.0), np.log(1800.0), int(brk.sum())))
        out[idx] = g.pace.join[m] * longest + np.cumsum(gaps)
    return out


def _stream_times(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """One sequential stream: exponential gaps at ``rate`` queries per second."""
    return np.cumsum(rng.exponential(1.0 / rate, n))


# -- strategies: each sends through the group and returns relative times -------------------
def _margin_pool(g: _Group) -> np.ndarray:
    rng, ds = g.rng, g.ds
    K, scale = ds.num_classes, np.where(ds.span > 0, ds.span, 1.0)
    per = max(1, min(int(rng.integers(4, 33)), g.per_member // 4))
    mix, noise, factor = rng.uniform(0.0, 0.8), rng.uniform(0.02, 0.12), int(rng.integers(5, 21))
    sub = Substitute(rng, ds.lo, ds.hi, K, int(rng.integers(16, 65)))
    crew = g.crew()
    seeds = g.natural(max(1, min(int(rng.integers(2, 6)) * K, g.total // 5, g.room(crew))))
    Xl, Pl = g.send(seeds, g.slices(crew, len(seeds)), 0)
    rnd = 0
    while g.left > 0:
        rnd += 1
        sub.fit(Xl, Pl)
        crew = g.crew()
        B = min(per * crew.size, g.room(crew))
        m = factor * B
        a, b = Xl[rng.integers(0, len(Xl), m)], Xl[rng.integers(0, len(Xl), m)]
        lam = np.where(rng.random((m, 1)) < mix, rng.random((m, 1)), 0.0)
        cand = ds.clip(a + lam * (b - a) + rng.normal(0.0, noise, (m, ds.dim)) * ds.span)
        Q = np.sort(sub.proba(cand), axis=1)
        short = cand[np.argsort(Q[:, -1] - Q[:, -2], kind="stable")[: 2 * B]]
        pick = _farthest(rng, short / scale, B)
        X, P = g.send(short[pick], g.slices(crew, pick.size), rnd)
        Xl, Pl = np.vstack([Xl, X]), np.vstack([Pl, P])
    return _round_times(g, np.concatenate(g.member), np.concatenate(g.rnd))


def _farthest(rng: np.random.Generator, Z: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` rows of ``Z`` chosen greedily farthest from those already chosen."""
    pick = [int(rng.integers(len(Z)))]
    dist = ((Z - Z[pick[0]]) ** 2).sum(1)
    for _ in range(min(k, len(Z)) - 1):
        j = int(np.argmax(dist))
        pick.append(j)
        dist = np.minimum(dist, ((Z - Z[j]) ** 2).sum(1))
    return np.array(pick)


Search = Generator[np.ndarray, tuple[int, np.ndarray], None]


def _bisect(g: _Group) -> np.ndarray:
    rng, ds = g.rng, g.ds
    steps, probes = int(rng.integers(6, 15)), int(rng.integers(0, 4))
    eps, natural_end = _lu(rng, 0.002, 0.02), rng.uniform(0.3, 1.0)
    seeds = g.natural(int(rng.integers(30, 121)))

    def search(cache: dict[int, tuple[int, np.ndarray]]) -> Search:
        """One line search; yields each point to send and receives (victim label, point as sent)."""
        i = int(rng.integers(len(seeds)))
        if i not in cache:
            cache[i] = yield seeds[i]
        la, lo = cache[i]
        lb, hi = la, lo
        if rng.random() < natural_end:
            j = int(rng.integers(len(seeds)))
            if j not in cache:
                cache[j] = yield seeds[j]
            lb, hi = cache[j]
        if lb == la:  # no natural far end, or one of the same class: a uniform point of the box
            lb, hi = yield rng.uniform(ds.lo, ds.hi)
        if lb == la:
            return
        for _ in range(steps):
            mid = g.grid((lo + hi) / 2)
            if np.array_equal(mid, lo) or np.array_equal(mid, hi):
                break
            lm, sent = yield mid
            lo, hi = (sent, hi) if lm == la else (lo, sent)
        for _ in range(probes):
            u = rng.normal(size=ds.dim)
            yield (lo + hi) / 2 + eps * ds.span * u / max(float(np.sqrt((u * u).mean())), 1e-12)

    def step(gen: Search, reply: tuple[int, np.ndarray] | None, key: Callable[[], int]) -> tuple[int, np.ndarray] | None:
        """Advance ``gen`` by one query, sent through ``key()``; None when the search is over."""
        try:
            x = next(gen) if reply is None else gen.send(reply)
        except StopIteration:
            return None
        X, P = g.send(x, key(), 0)
        return int(P[0].argmax()), X[0]

    if rng.random() < 0.5:  # own: every search whole on one key, keys in parallel
        budget = _shares(rng, g.total, g.size, 0.4)
        for key in range(g.size):
            cache: dict[int, tuple[int, np.ndarray]] = {}
            while g.count[key] < budget[key]:
                gen, reply = search(cache), None
                while g.count[key] < budget[key] and (reply := step(gen, reply, lambda k=key: k)) is not None:
                    pass
        return _parallel_times(g, np.concatenate(g.member))
    # spread: concurrent searches, each query through the next key of a reshuffled cycle
    shared: dict[int, tuple[int, np.ndarray]] = {}
    running: list[tuple[Search, tuple[int, np.ndarray] | None]] = [
        (search(shared), None) for _ in range(int(rng.integers(2, g.size + 3)))]
    cycle: list[int] = []

    def next_key() -> int:
        if not cycle:
            cycle.extend(int(k) for k in rng.permutation(g.size))
        return cycle.pop()

    while g.left > 0:
        for s, (gen, reply) in enumerate(running):
            if g.left == 0:
                break
            reply = step(gen, reply, next_key)
            running[s] = (search(shared), None) if reply is None else (gen, reply)
    return _stream_times(rng, int(g.count.sum()), min(float(g.pace.rate.sum()), 4.0))


def _jacobian_decay(g: _Group) -> np.ndarray:
    rng, ds = g.rng, g.ds
    K, scale = ds.num_classes, np.where(ds.span > 0, ds.span, 1.0)
    lam0, gamma, feat = rng.uniform(0.03, 0.15), rng.uniform(0.6, 0.9), rng.uniform(0.2, 1.0)
    k = max(1, math.ceil(rng.uniform(0.25, 0.6) * g.size))
    sub = Substitute(rng, ds.lo, ds.hi, K, int(rng.integers(16, 65)))
    crew = g.crew(k)
    n0 = max(1, min(int(rng.integers(10, 41)), g.total // 4, g.room(crew)))
    Xl, Pl = g.send(g.natural(n0), g.slices(crew, n0), 0)
    cap = max(1, math.ceil((g.total - n0) / int(rng.integers(6, 13))))
    rnd = 0
    while g.left > 0:
        rnd += 1
        sub.fit(Xl, Pl)
        crew = g.crew(k)
        src = Xl[rng.permutation(len(Xl))[: min(cap, g.room(crew))]]
        target = (sub.proba(src).argmax(1) + rng.integers(1, K, len(src))) % K
        grad = sub.input_grad(src, np.eye(K)[target]) * scale * (rng.random(src.shape) < feat)
        rms = np.sqrt((grad**2).sum(1, keepdims=True) / np.maximum((grad != 0).sum(1, keepdims=True), 1))
        new = src + lam0 * gamma ** (rnd - 1) * grad / np.maximum(rms, 1e-12) * ds.span
        X, P = g.send(new, g.slices(crew, len(new)), rnd)
        Xl, Pl = np.vstack([Xl, X]), np.vstack([Pl, P])
    return _round_times(g, np.concatenate(g.member), np.concatenate(g.rnd))


def _gauss_shared(g: _Group) -> np.ndarray:
    rng, ds = g.rng, g.ds
    seeds = g.natural(int(rng.integers(5, 41)))
    sigma, spread, feat = rng.uniform(0.01, 0.08), rng.uniform(0.0, 0.6), rng.uniform(0.3, 1.0)
    for key, n in enumerate(_shares(rng, g.total, g.size, 0.5)):
        order = np.resize(rng.permutation(len(seeds)), n)
        noise = rng.normal(0.0, sigma * rng.lognormal(0.0, spread), (n, ds.dim)) * (rng.random((n, ds.dim)) < feat)
        g.send(seeds[order] + noise * ds.span, key, 0)
    return _parallel_times(g, np.concatenate(g.member))


def _rotation(g: _Group) -> np.ndarray:
    rng, ds = g.rng, g.ds
    K = ds.num_classes
    batch, alpha, every = int(rng.integers(5, 26)), rng.uniform(0.05, 0.5), int(rng.integers(100, 501))
    half = (3 * g.total) // 4 + batch  # 1.5x the budget: never runs dry
    pool = np.vstack([ds.off_distribution(rng, half), g.natural(half)])
    unused = np.ones(len(pool), dtype=bool)
    arm = rng.integers(0, K, len(pool))  # before the first retraining: arbitrary classes
    sub = Substitute(rng, ds.lo, ds.hi, K, int(rng.integers(16, 65)))
    pref, baseline, since = np.zeros(K), 0.0, 0
    Xs: list[np.ndarray] = []
    Ps: list[np.ndarray] = []
    while g.left > 0:
        live = np.bincount(arm[unused], minlength=K) > 0
        pi = np.where(live, np.exp(pref - pref.max()), 0.0)
        pi /= pi.sum()
        a = int(rng.choice(K, p=pi))
        rows = rng.permutation(np.flatnonzero(unused & (arm == a)))[: min(batch, g.left)]
        unused[rows] = False
        X, P = g.send(pool[rows], 0, 0)  # keys are assigned by time below
        Q = np.sort(P, axis=1)
        reward = float(np.mean(1.0 - (Q[:, -1] - Q[:, -2])))
        pref -= alpha * (reward - baseline) * pi
        pref[a] += alpha * (reward - baseline)
        baseline += 0.2 * (reward - baseline)
        Xs.append(X)
        Ps.append(P)
        since += len(X)
        if since >= every:
            sub.fit(np.concatenate(Xs), np.concatenate(Ps))
            arm[unused], since = sub.proba(pool[unused]).argmax(1), 0
    n = int(g.count.sum())
    rel = _stream_times(rng, n, _lu(rng, 0.3, 3.0))
    if rng.random() < 0.5:  # switch keys every N queries
        seg = np.arange(n) // max(1, min(g.per_member, int(_lu(rng, 10, max(10, g.per_member)))))
    else:  # switch keys every M seconds of the run
        period = float(rel[-1]) / (g.size * rng.uniform(1.5, 3.0))
        seg = np.unique(np.floor((rel - rel[0]) / max(period, 1e-9)), return_inverse=True)[1].ravel()
        if seg[-1] + 1 < g.size:  # too few queries per period to reach every key: an even split
            seg = np.arange(n) * g.size // n
    passes = -(-(int(seg[-1]) + 1) // g.size)
    order = np.concatenate([rng.permutation(g.size) for _ in range(passes)])
    g.member = [order[seg]]
    switch = np.concatenate([[0.0], np.exp(rng.uniform(np.log(1.0), np.log(120.0), int(seg[-1])))])
    return rel + np.cumsum(switch)[seg]


def _shared_chains(g: _Group) -> np.ndarray:
    rng, ds = g.rng, g.ds
    K, scale = ds.num_classes, np.where(ds.span > 0, ds.span, 1.0)
    T, eta, explore, max_len = int(rng.integers(3, 16)), rng.uniform(0.02, 0.1), rng.uniform(0.0, 0.5), int(rng.integers(8, 31))
    sub = Substitute(rng, ds.lo, ds.hi, K, int(rng.integers(16, 65)))
    seeds = g.natural(g.total).reshape(g.size, g.per_member, ds.dim)  # disjoint: row j of key j
    nxt = np.zeros(g.size, dtype=np.int64)  # next own seed of each key
    x = np.zeros((g.size, ds.dim))
    label = np.full(g.size, -1)  # victim label of the chain start; -1: no chain running
    length = np.zeros(g.size, dtype=np.int64)
    Xs: list[np.ndarray] = []
    Ps: list[np.ndarray] = []
    rnd = 0
    while g.left > 0:
        crew = g.crew(eligible=g.count < g.per_member)
        for _ in range(T):
            crew = crew[g.count[crew] < g.per_member]
            if crew.size == 0:
                break
            fresh, walk = crew[label[crew] < 0], crew[label[crew] >= 0]
            pts = [seeds[fresh, nxt[fresh] % g.per_member]]
            nxt[fresh] += 1
            if walk.size:
                Q = sub.proba(x[walk])
                Q[np.arange(walk.size), label[walk]] = -1.0
                V = np.eye(K)[Q.argmax(1)] - np.eye(K)[label[walk]]
                d = sub.input_grad(x[walk], V) * scale
                d /= np.maximum(np.sqrt((d**2).mean(1, keepdims=True)), 1e-12)
                pts.append(x[walk] + eta * (d + explore * rng.normal(size=d.shape)) * ds.span)
            keys = np.concatenate([fresh, walk])
            X, P = g.send(np.vstack(pts), keys, rnd)
            got = P.argmax(1)
            x[keys], length[keys] = X, length[keys] + 1
            label[fresh], length[fresh] = got[: fresh.size], 1
            done = walk[(got[fresh.size:] != label[walk]) | (length[walk] >= max_len)]
            label[done] = -1
            Xs.append(X)
            Ps.append(P)
        sub.fit(np.concatenate(Xs), np.concatenate(Ps))  # the shared substitute, retrained on every key's answers
        rnd += 1
    return _round_times(g, np.concatenate(g.member), np.concatenate(g.rnd))


def _jbda_split(g: _Group) -> np.ndarray:
    rng, ds = g.rng, g.ds
    K = ds.num_classes
    lam, tau = rng.uniform(0.05, 0.3), (int(rng.integers(2, 5)) if rng.random() < 0.5 else 0)  # tau 0: no flip
    split = ("robin", "slices", "random", "crew")[int(rng.integers(4))]
    g.drawn.update(step=round(float(lam), 4), tau=tau, split=split)
    k = max(1, math.ceil(rng.uniform(0.25, 0.6) * g.size)) if split == "crew" else None
    sub = Substitute(rng, ds.lo, ds.hi, K, int(rng.integers(16, 65)))

    def deal(crew: np.ndarray, n: int) -> np.ndarray:
        """(n,) key of each of the round's next ``n`` points."""
        if split == "robin":
            return crew[np.arange(n) % crew.size]
        if split == "random":  # keys that have never sent (first in the crew) get one point each
            keys = crew[rng.integers(0, crew.size, n)]
            new = crew[g.count[crew] == 0][:n]
            keys[rng.permutation(n)[: new.size]] = new
            return keys
        return g.slices(crew, n)  # slices, or a rotating crew of k keys cut into slices

    def query(X: np.ndarray, rnd: int) -> tuple[np.ndarray, np.ndarray]:
        """Label ``X`` in round ``rnd`` (cut short when the budget runs out), in chunks the crew can take."""
        Xs, Ps, i = [], [], 0
        while i < len(X) and g.left > 0:
            crew = g.crew(k)
            n = min(len(X) - i, g.room(crew))
            Xq, Pq = g.send(X[i : i + n], deal(crew, n), rnd)
            Xs.append(Xq)
            Ps.append(Pq)
            i += n
        return np.vstack(Xs), np.vstack(Ps)

    n0 = max(1, min(int(rng.integers(5, 21)) * K, g.total // 4))
    seeds = ds.natural(rng, n0, role="attacker", classes=rng.permutation(np.arange(n0) % K))[0]
    S, P = query(seeds, 0)
    rnd = 0
    while g.left > 0:
        rnd += 1
        sub.fit(S, P)  # retrained on every labelled point
        y = P.argmax(1)  # the victim's label of each point of S
        step = lam * (-1.0) ** ((rnd - 1) // tau if tau else 0)
        new = ds.clip(S + step * np.sign(sub.input_grad(S, np.eye(K)[y])) * ds.span)
        X, Q = query(new, rnd)  # S doubles
        S, P = np.vstack([S, X]), np.vstack([P, Q])
    return _round_times(g, np.concatenate(g.member), np.concatenate(g.rnd))


STRATEGY_FUNCS: dict[str, Callable[[_Group], np.ndarray]] = {
    "margin_pool": _margin_pool, "bisect": _bisect, "jacobian_decay": _jacobian_decay,
    "gauss_shared": _gauss_shared, "rotation": _rotation, "shared_chains": _shared_chains,
    "jbda_split": _jbda_split,
}


# -- public API -----------------------------------------------------------------------------
def simulate_sybil_b(
    world: World, strategy: str, size: int, seed: int, index: int, *, per_member: int = 300,
    prefix: str = "sybb", stream: str = "sybil-b", start: float = DEFAULT_START, window: float = DEFAULT_WINDOW,
) -> Traffic:
    """One Sybil group of ``size`` keys running ``strategy`` with a budget of ``size * per_member``
    queries, as a time-ordered :class:`Traffic` inside ``[start, start + window]``."""
    if strategy not in STRATEGY_FUNCS:
        raise ValueError(f"unknown Sybil-B strategy {strategy!r}; known: {', '.join(STRATEGIES_B)}")
    if size < 1 or per_member < 1 or window <= 0:
        raise ValueError("size and per_member must be >= 1 and window > 0")
    rng = _rng(seed, stream, strategy, size, index)
    pace = _draw_pace(rng, size)
    u = rng.random()
    rounding = "natural" if u < 0.4 else "full" if u < 0.8 else "jitter"
    g = _Group(world, rng, size, per_member, pace, rounding, rng.uniform(2e-4, 1e-3))
    rel = STRATEGY_FUNCS[strategy](g)
    member, X = np.concatenate(g.member), np.concatenate(g.X)
    t0 = start + rng.uniform(0.0, 0.5 * window)
    rel = rel - rel.min()
    room = start + window - t0
    if rel.max() > room:  # too long for what is left of the window: a faster run
        rel = rel * (room * rng.uniform(0.85, 1.0) / rel.max())
    ts = np.minimum(t0 + rel, start + window)
    order = np.argsort(ts, kind="stable")
    ts, member, X = ts[order], member[order], X[order]
    group = f"{prefix}-{strategy}-{size}-{index}"
    clients = [f"{group}-{j}" for j in range(size)]
    info: dict[str, Any] = {"kind": "attack", "type": f"sybil-b-{strategy}", "group": group, "strategy": strategy, "size": size,
                            "params": {"rounding": rounding, **g.drawn}}
    truth = {c: dict(info) for c in clients}
    return Traffic(ts, member, clients, X, world.answer(X), truth, world.model, world.dataset.decimals)


def summary(traffic: Traffic) -> dict[str, float]:
    """Members, queries, mean queries per member, span in minutes, share of exactly repeated inputs."""
    n = len(traffic)
    unique = np.unique(traffic.X, axis=0).shape[0] if n else 0
    return {"members": len(traffic.clients), "queries": n, "per_member": n / max(len(traffic.clients), 1),
            "span_min": float(traffic.ts[-1] - traffic.ts[0]) / 60 if n else 0.0, "repeated": (n - unique) / max(n, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Simulate one family-B Sybil group per strategy and summarise it.")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=10, help="keys per group")
    ap.add_argument("--per-member", type=int, default=300)
    args = ap.parse_args(argv)
    world = build_world(args.dataset, args.seed)
    print(f"{'strategy':<16}{'members':>8}{'queries':>9}{'q/member':>10}{'span min':>10}{'repeated':>10}")
    for strategy in STRATEGIES_B:
        s = summary(simulate_sybil_b(world, strategy, args.size, args.seed, 0, per_member=args.per_member))
        print(f"{strategy:<16}{s['members']:>8}{s['queries']:>9}{s['per_member']:>10.1f}{s['span_min']:>10.1f}{s['repeated']:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
