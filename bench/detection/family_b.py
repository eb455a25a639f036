"""Benign traffic family B: honest clients of a prediction API, written independently of
``exporter/sim/benign.py`` so that the detection benchmark can calibrate on one family of
benign behaviours and evaluate on the other (and hold out behaviours or parameter regimes).

Every client is one API key with one behaviour, a query budget ``n`` drawn from a truncated
Pareto law (:class:`LengthDist`, 20 to 5,000 queries by default) and its own pace. Inputs are
natural rows of the dataset's benign pool (``Dataset.natural``), edited by some behaviours and
then rounded to the data's own precision and clipped into the feature box, so every value is
one a real record could hold. Answers are ``World.answer`` on the inputs as logged.

Behaviours (``BEHAVIOURS_B``; default weights in ``DEFAULT_MIX_B``). "human" pace: per client a
median think time, log-uniform in ``FamilyB.think_time`` (2 s to 4 min), log-normal gaps,
visits of ~25 queries separated by breaks of ~30 min. "machine" pace: per client a rate,
log-uniform in ``FamilyB.machine_rate`` (one query per 3 min to 40 per second), exponential gaps.

================  ==========  ======================================================================
behaviour         pace        what it sends (parameters drawn per client unless said otherwise)
================  ==========  ======================================================================
interactive       human       natural inputs, mild class preference (Dirichlet 2); 3 % double
                              submits (the same input again 0.2-1.5 s later); a share
                              ``popular_background`` (2 %) from the popular pool ("try the example")
canary            schedule    a fixed set of 1-8 inputs (30 %: the first is a popular-pool input),
                              re-sent in the same order every period, log-uniform in
                              ``monitor_period`` (15 s to 15 min); cron-exact (jitter 20 ms) or
                              drifting (each period 0-10 % late); a round is one same-timestamp burst (40 %)
                              or 50-300 ms apart; 30 %: one fixture is replaced half-way (a deploy)
reviewer          human x4    borderline cases: natural inputs whose victim margin (top-1 minus
                              top-2) is in the lowest 3-20 % of a candidate pool (of at most
                              30,000: long sessions take a wider share); 5 % re-reviews
                              (an earlier case again)
form_edit         human       one record edited step by step, every state submitted: 1+Geom(1/6)
                              edits per record; tabular: 1 field to another record's value or by a
                              small step (0.1 std), 0-60 % of edits dragged with a slider (3-8
                              intermediate values on one feature); images: strokes of 2-4 pixels
                              (+4..16, or erased), drawn live (every pixel submitted) for half the
                              clients; 10 % undo (a previous state again); 0.15-0.6 s between
                              live states, ~4 s between edits, think time x3 between records
bulk              batches     a scoring job: batches of 25-1,000 rows (same timestamp for half the
                              jobs, else 1-20 ms apart), batch gap = size / rate; rows in drawn
                              order, sorted by class (30 %) or by one feature (35 %); 2 % duplicate
                              rows; 30 % of jobs run twice (the same rows again, 10-40 % of the
                              window later)
proxy             mixed       one key for 2-30 users (Dirichlet 0.8 activity shares), each with
                              its own class preference (Dirichlet 0.6) and human pace; half the
                              proxies also carry one machine sub-stream; spread over 50-100 % of
                              the window
drift             machine     production data that shifts: the class mix follows a seasonal cycle
                              (0.25-2 cycles per session, amplitude 0.5-2 in logit space), and
                              covariates drift linearly: tabular: 1-4 features scaled by up to
                              3-12 % (sign drawn); images: intensity fades by up to 0-25 %
class_subset      either      only 1 to min(3, K-1) classes (a clinic, a sorting line), skewed
                              (Dirichlet 1); human or machine pace (50 %)
popular           human       a share of queries (Beta with mean ``popular_share``, 0.6) from a
                              pool of ``popular_pool`` (60) inputs shared by every client of the
                              family, Zipf(``popular_zipf`` 1.2) popularity; the rest natural
org_app           machine     2-5 apps (``org_size``) of one organisation share a sub-distribution:
                              the organisation's classes (1 to max(1, ceil(K/3))) and 15-60 anchor
                              records of them; each app prefers some anchors (Dirichlet 0.3) and
                              sends an exact anchor (20 %) or an interpolation towards a same-class
                              anchor neighbour (u in [0, 0.5]); apps are active within the
                              organisation's hours (40-100 % of the window); the last
                              organisation of a population may have fewer apps
outage_retry      machine     active across the stream's outage (one per stream, at 30-70 % of the
                              window, 2-15 min long; nothing is logged inside it); after recovery
                              it re-sends its retry queue (queries of the last 1-10 min before the
                              outage, which were answered but lost, and those attempted during it;
                              at most n/6 of each) within ``retry_span`` (15-90 s, per stream), exactly
                              (75 %) or nearly (one field moved by one unit); rate >= 1/min
imputing          machine     records with missing fields filled by defaults: 10-50 % of records;
                              tabular: 1-3 of the client's 3-6 optional fields set to the pool
                              median or to zero (clipped); images: cropped scans (1-3 top or
                              bottom rows blank)
================  ==========  ======================================================================

Timing: a client's events are placed inside ``[start, start + window]``; a session longer than
the window is squeezed into 70-100 % of it (a heavy user is a fast user). The outage is
modelled for ``outage_retry`` clients only: the other behaviours keep sending through it, so
that holding out ``outage_retry`` leaves no trace of the outage in the traffic. Client ids: ``<prefix>-NNNN``
(neutral). Ground truth: ``{"kind": "benign", "type": <behaviour>, "group": <org id or None>}``.

Randomness: client ``i`` draws everything from a generator keyed by (seed, stream, i), its
behaviour from a prefix-stable weighted round-robin over the mix, its organisation from a
per-stream sequence of organisation sizes: growing the population never changes earlier
clients, and another ``stream`` gives other clients, organisations and outage. The popular
pool depends on the seed only (the same service's example inputs, whatever the stream).

    python3 bench/detection/family_b.py --dataset digits --clients 50 --seed 0 --out /tmp/b.jsonl
"""

from __future__ import annotations

import argparse
import math
import sys
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing

from exporter.sim.datasets import Dataset  # noqa: E402
from exporter.sim.traffic import DEFAULT_START, Traffic  # noqa: E402
from exporter.sim.world import World, build_world  # noqa: E402

DEFAULT_WINDOW = 6 * 3600.0

DEFAULT_MIX_B: dict[str, float] = {
    "interactive": 0.16, "canary": 0.06, "reviewer": 0.06, "form_edit": 0.08, "bulk": 0.08, "proxy": 0.06,
    "drift": 0.08, "class_subset": 0.08, "popular": 0.08, "org_app": 0.10, "outage_retry": 0.08, "imputing": 0.08,
}


# -- parameters (plain data) ---------------------------------------------------------------
@dataclass(frozen=True)
class LengthDist:
    """Queries per client: a Pareto law of ``shape`` truncated to ``[min, max]`` (heavy tail;
    with the defaults the median is ~60 and the mean ~250)."""

    min: int = 20
    max: int = 5000
    shape: float = 0.6

    def sample(self, rng: np.random.Generator) -> int:
        a, lo, hi = self.shape, float(self.min), float(self.max)
        u = rng.random()
        x = lo / (1.0 - u * (1.0 - (lo / hi) ** a)) ** (1.0 / a)
        return int(min(self.max, max(self.min, math.floor(x))))


@dataclass(frozen=True)
class OutageSpec:
    """One outage per stream; ranges are (low, high), drawn uniformly."""

    at: tuple[float, float] = (0.3, 0.7)  # start, as a fraction of the window
    duration: tuple[float, float] = (120.0, 900.0)  # seconds during which nothing is answered
    retry_span: tuple[float, float] = (15.0, 90.0)  # seconds after recovery holding every re-send
    lookback: tuple[float, float] = (60.0, 600.0)  # per client: answered queries re-sent (responses lost)
    exact_share: float = 0.75  # re-sends identical to the original; the rest one unit off


@dataclass(frozen=True)
class FamilyB:
    """Everything a benchmark may vary or hold out. Ranges (low, high) are log-uniform per client."""

    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX_B))
    length: LengthDist = LengthDist()
    machine_rate: tuple[float, float] = (1 / 180, 40.0)  # queries per second
    think_time: tuple[float, float] = (2.0, 240.0)  # seconds, median human gap
    monitor_period: tuple[float, float] = (15.0, 900.0)  # seconds between canary rounds
    popular_share: float = 0.6  # mean share of a popular client's queries from the pool
    popular_background: float = 0.02  # share of interactive users' queries from the pool
    popular_pool: int = 60
    popular_zipf: float = 1.2
    org_size: tuple[int, int] = (2, 5)  # apps per organisation (uniform)
    outage: OutageSpec = OutageSpec()

    def without(self, *names: str) -> "FamilyB":
        """The same family with behaviours ``names`` held out (weight removed)."""
        return replace(self, mix={k: v for k, v in self.mix.items() if k not in names})

    def only(self, *names: str) -> "FamilyB":
        """The same family restricted to behaviours ``names``."""
        return replace(self, mix={k: v for k, v in self.mix.items() if k in names})

    def validate(self) -> None:
        """Raise ValueError on unknown behaviours or impossible ranges."""
        unknown = sorted(set(self.mix) - set(BEHAVIOURS_B))
        if unknown:
            raise ValueError(f"unknown family-B behaviour(s) {', '.join(unknown)}; known: {', '.join(BEHAVIOURS_B)}")
        if not self.mix or min(self.mix.values()) < 0 or sum(self.mix.values()) <= 0:
            raise ValueError("the behaviour mix needs non-negative weights with a positive sum")
        if not (1 <= self.length.min <= self.length.max) or self.length.shape <= 0:
            raise ValueError("length needs 1 <= min <= max and shape > 0")
        for name in ("machine_rate", "think_time", "monitor_period"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} needs 0 < low <= high")
        if not (0 <= self.popular_share <= 1 and 0 <= self.popular_background <= 1):
            raise ValueError("popular shares must lie in [0, 1]")
        if self.popular_pool < 1 or self.popular_zipf < 0 or not 1 <= self.org_size[0] <= self.org_size[1]:
            raise ValueError("popular_pool >= 1, popular_zipf >= 0 and 1 <= org_size low <= high are required")
        o = self.outage
        if not (0 <= o.at[0] <= o.at[1] <= 1 and 0 < o.duration[0] <= o.duration[1] and 0 < o.retry_span[0] <= o.retry_span[1]
                and 0 <= o.lookback[0] <= o.lookback[1] and 0 <= o.exact_share <= 1):
            raise ValueError("outage ranges must be ordered, positive, and 'at' within [0, 1]")


# -- randomness ----------------------------------------------------------------------------
def _rng(seed: int, stream: str, role: str, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(stream.encode()), zlib.crc32(b"family-b:" + role.encode()), index])


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def assign_behaviours(mix: dict[str, float], n: int) -> list[str]:
    """Behaviour of clients ``0..n-1``: a smooth weighted round-robin over ``mix``, so every
    prefix follows the mix as closely as integers allow and growing ``n`` keeps the prefix."""
    names = [k for k, v in mix.items() if v > 0]
    w = np.array([mix[k] for k in names], dtype=np.float64)
    credit = np.zeros(len(names))
    out = []
    for _ in range(n):
        credit += w
        j = int(np.argmax(credit))
        credit[j] -= w.sum()
        out.append(names[j])
    return out


def outage_span(seed: int, stream: str, family: FamilyB, start: float, window: float) -> tuple[float, float, float]:
    """The stream's outage: (down, up, retry_end); every retry lands in ``[up, retry_end]``."""
    o, rng = family.outage, _rng(seed, stream, "outage")
    down = start + window * rng.uniform(*o.at)
    up = down + rng.uniform(*o.duration)
    return down, up, up + rng.uniform(*o.retry_span)


def popular_pool(world: World, seed: int, size: int) -> np.ndarray:
    """The family's popular inputs (the service's examples): seed-level, shared by all streams."""
    X, _ = world.dataset.natural(np.random.default_rng([seed, zlib.crc32(b"family-b:popular")]), size)
    return X


# -- per-client context --------------------------------------------------------------------
@dataclass
class Org:
    """One organisation: its classes, anchor records and active hours."""

    id: str
    anchors: np.ndarray  # (A, d) natural records of the organisation's classes
    neighbours: np.ndarray  # (A, k) same-class anchor neighbours
    t0: float
    t1: float


@dataclass
class Client:
    """What a behaviour sees: the world, its parameters, its generator and query budget."""

    world: World
    family: FamilyB
    rng: np.random.Generator
    n: int
    start: float
    window: float
    pool: np.ndarray
    pool_p: np.ndarray
    outage: tuple[float, float, float]
    org: Org | None = None

    @property
    def ds(self) -> Dataset:
        return self.world.dataset

    @property
    def K(self) -> int:
        return self.ds.num_classes

    def natural(self, n: int, classes: np.ndarray | None = None) -> np.ndarray:
        if n == 0:
            return np.zeros((0, self.ds.dim))
        return self.ds.natural(self.rng, n, "benign", classes)[0]

    def natural_pref(self, n: int, alpha: float) -> np.ndarray:
        """Natural inputs with a Dirichlet(alpha) class preference of this client."""
        pref = self.rng.dirichlet(np.full(self.K, alpha))
        return self.natural(n, self.rng.choice(self.K, n, p=pref))

    def popular(self, n: int) -> np.ndarray:
        return self.pool[self.rng.choice(len(self.pool), n, p=self.pool_p)]

    def tidy(self, X: np.ndarray) -> np.ndarray:
        """Edited inputs back to natural precision, inside the feature box."""
        return self.ds.clip(self.ds.round_natural(X))

    def unit(self) -> np.ndarray:
        """(d,) one unit of each feature's natural precision."""
        return 10.0 ** -self.ds.data_decimals.astype(np.float64)

    def think(self) -> float:
        return _loguniform(self.rng, *self.family.think_time)

    def rate(self) -> float:
        return _loguniform(self.rng, *self.family.machine_rate)

    # -- timing --------------------------------------------------------------------------
    def human_gaps(self, n: int, median: float) -> np.ndarray:
        """Log-normal think times; visits of ~25 queries separated by ~30 min breaks."""
        gaps = self.rng.lognormal(np.log(median), 0.8, n)
        brk = self.rng.random(n) < 1 / 25
        gaps[brk] = self.rng.lognormal(np.log(1800.0), 1.0, int(brk.sum()))
        gaps[0] = 0.0
        return gaps

    def machine_gaps(self, n: int, rate: float) -> np.ndarray:
        gaps = self.rng.exponential(1 / rate, n)
        gaps[0] = 0.0
        return gaps

    def place(self, rel: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
        """Relative times (from 0, non-decreasing) to absolute ones inside ``[lo, hi]`` (default:
        the window), squeezed into 70-100 % of it when longer, at a uniform offset."""
        lo = self.start if lo is None else lo
        hi = self.start + self.window if hi is None else hi
        rel = rel - rel[0]
        span = float(rel[-1])
        if span > hi - lo:  # too long: squeezed into 70-100 % of the room
            target = (hi - lo) * self.rng.uniform(0.7, 1.0)
            rel = rel * (target / span)
            span = target
        return lo + self.rng.uniform(0.0, max(0.0, hi - lo - span)) + rel


Behaviour = Callable[[Client], tuple[np.ndarray, np.ndarray]]


# -- behaviours ----------------------------------------------------------------------------
def interactive(c: Client) -> tuple[np.ndarray, np.ndarray]:
    n, rng = c.n, c.rng
    X = c.natural_pref(n, 2.0)
    pop = rng.random(n) < c.family.popular_background
    X[pop] = c.popular(int(pop.sum()))
    gaps = c.human_gaps(n, c.think())
    for i in np.flatnonzero(rng.random(n) < 0.03):
        if i > 0:  # double submit: the previous input again, a moment later
            X[i] = X[i - 1]
            gaps[i] = rng.uniform(0.2, 1.5)
    return c.place(np.cumsum(gaps)), X


def canary(c: Client) -> tuple[np.ndarray, np.ndarray]:
    n, rng = c.n, c.rng
    k = min(int(rng.integers(1, 9)), n)
    fixtures = c.natural(k)
    if rng.random() < 0.3:
        fixtures[0] = c.popular(1)[0]
    rounds = -(-n // k)
    X = np.tile(fixtures, (rounds, 1))[:n]
    if rng.random() < 0.3 and rounds >= 2:  # a deploy replaces one fixture half-way
        j = int(rng.integers(k))
        X[(rounds // 2) * k + j::k] = c.natural(1)[0]
    period = _loguniform(rng, *c.family.monitor_period)
    if rng.random() < 0.5:  # cron-exact
        t_round = np.arange(rounds) * period + rng.normal(0, 0.02, rounds)
    else:  # a sleep loop that drifts
        t_round = np.concatenate([[0.0], np.cumsum(period * (1 + np.abs(rng.normal(0, 0.05, rounds - 1))))])
    within = np.zeros(k) if rng.random() < 0.4 else np.concatenate([[0.0], np.cumsum(rng.uniform(0.05, 0.3, k - 1))])
    rel = (t_round[:, None] + within[None, :]).ravel()[:n]
    return c.place(np.maximum.accumulate(rel)), X


def reviewer(c: Client) -> tuple[np.ndarray, np.ndarray]:
    n, rng = c.n, c.rng
    q = rng.uniform(0.03, 0.2)
    m = int(min(30000, max(200, math.ceil(1.5 * n / q))))
    cand = c.natural(m)
    P = np.sort(c.world.answer(cand), axis=1)
    margin = P[:, -1] - P[:, -2]
    hard = np.flatnonzero(margin <= np.quantile(margin, max(q, min(1.0, 1.5 * n / m))))
    pick = rng.choice(hard, n, replace=hard.size < n)
    X = cand[rng.permutation(pick)]
    for i in np.flatnonzero(rng.random(n) < 0.05):
        if i > 0:  # re-review an earlier case
            X[i] = X[int(rng.integers(i))]
    return c.place(np.cumsum(c.human_gaps(n, 4 * c.think()))), X


def form_edit(c: Client) -> tuple[np.ndarray, np.ndarray]:
    rng, ds = c.rng, c.ds
    think, live, slider = c.think(), rng.random() < 0.5, rng.uniform(0.0, 0.6)
    std = ds.X_benign.std(axis=0)
    free = np.flatnonzero(ds.span > 0)
    side = int(round(math.sqrt(ds.dim)))
    xs: list[np.ndarray] = []
    gaps: list[float] = []

    def emit(x: np.ndarray, gap: float) -> None:
        xs.append(x.copy())
        gaps.append(gap)

    while len(xs) < c.n:
        x = c.natural(1)[0]
        history = [x.copy()]
        emit(x, rng.lognormal(np.log(3 * think), 0.8) if xs else 0.0)
        for _ in range(1 + int(rng.geometric(1 / 6))):
            if len(xs) >= c.n:
                break
            edit_gap = rng.lognormal(np.log(4.0), 0.7)
            if len(history) >= 2 and rng.random() < 0.1:  # undo
                x = history[-2].copy()
                history.append(x.copy())
                emit(x, edit_gap)
                continue
            states: list[np.ndarray] = []
            if ds.is_image:  # a stroke of 2-4 pixels, drawn or erased
                r, col = int(rng.integers(side)), int(rng.integers(side))
                dr, dc = [(0, 1), (1, 0), (1, 1), (1, -1)][int(rng.integers(4))]
                erase = rng.random() < 0.3
                y = x.copy()
                for s in range(int(rng.integers(2, 5))):
                    rr, cc = r + s * dr, col + s * dc
                    if 0 <= rr < side and 0 <= cc < side:
                        p = rr * side + cc
                        y[p] = 0.0 if erase else y[p] + rng.integers(4, 17)
                        states.append(c.tidy(y[None])[0])
                if not live:
                    states = states[-1:]
            else:  # one field: another record's value, or a small step; maybe with a slider
                f = int(rng.choice(free))
                target = c.natural(1)[0][f] if rng.random() < 0.5 else x[f] + rng.normal(0, 0.1 * std[f])
                steps = int(rng.integers(3, 9)) if rng.random() < slider else 1
                for j in range(1, steps + 1):
                    y = x.copy()
                    y[f] = x[f] + (target - x[f]) * j / steps
                    states.append(c.tidy(y[None])[0])
                if np.array_equal(states[-1], x):  # the step rounded away: one unit instead
                    y = x.copy()
                    y[f] += c.unit()[f] * (1 if rng.random() < 0.5 else -1)
                    states = [c.tidy(y[None])[0]]
            for j, s in enumerate(states):
                if len(xs) >= c.n:
                    break
                emit(s, edit_gap if j == 0 else rng.uniform(0.15, 0.6))
            if states:
                x = states[-1].copy()
                history.append(x.copy())
    return c.place(np.cumsum(gaps)), np.array(xs[: c.n])


def bulk(c: Client) -> tuple[np.ndarray, np.ndarray]:
    n, rng, ds = c.n, c.rng, c.ds
    runs = 2 if n >= 40 and rng.random() < 0.3 else 1
    n1 = -(-n // runs)
    cls = rng.integers(0, c.K, n1)
    rows = c.natural(n1, cls)
    mode = rng.random()
    if mode < 0.3:
        rows = rows[np.argsort(cls, kind="stable")]
    elif mode < 0.65:
        f = int(rng.choice(np.flatnonzero(ds.span > 0)))
        order = np.argsort(rows[:, f], kind="stable")
        rows = rows[order if rng.random() < 0.5 else order[::-1]]
    for i in np.flatnonzero(rng.random(n1) < 0.02):
        if i > 0:  # a duplicated row in the source table
            rows[i] = rows[int(rng.integers(i))]
    X = np.concatenate([rows, rows[: n - n1]])
    rate = c.rate()
    size = max(1, min(n1, int(_loguniform(rng, 25, 1000))))
    same_ts = rng.random() < 0.5
    gaps = np.zeros(n) if same_ts else rng.uniform(0.001, 0.02, n)
    starts = np.arange(n) % n1 % size == 0  # each run restarts its batching
    gaps[starts] = size / rate * rng.lognormal(0.0, 0.3, int(starts.sum()))
    if runs == 2:
        gaps[n1] = c.window * rng.uniform(0.1, 0.4)
    gaps[0] = 0.0
    return c.place(np.cumsum(gaps)), X


def proxy(c: Client) -> tuple[np.ndarray, np.ndarray]:
    n, rng = c.n, c.rng
    users = max(2, int(_loguniform(rng, 2, 31)))
    counts = rng.multinomial(n, rng.dirichlet(np.full(users, 0.8)))
    span = c.window * rng.uniform(0.5, 1.0)
    machine = rng.random() < 0.5
    ts, xs = [], []
    for u, m in enumerate(counts):
        if m == 0:
            continue
        gaps = c.machine_gaps(m, c.rate()) if machine and u == 0 else c.human_gaps(m, c.think())
        rel = np.cumsum(gaps)
        if rel[-1] > span:
            rel = rel * (span / rel[-1])
        ts.append(rel + rng.uniform(0, max(0.0, span - rel[-1])))
        xs.append(c.natural_pref(int(m), 0.6))
    t, X = np.concatenate(ts), np.concatenate(xs)
    order = np.argsort(t, kind="stable")
    return c.place(t[order]), X[order]


def drift(c: Client) -> tuple[np.ndarray, np.ndarray]:
    n, rng, ds = c.n, c.rng, c.ds
    rel = np.cumsum(c.machine_gaps(n, c.rate()))
    u = rel / rel[-1] if rel[-1] > 0 else np.linspace(0, 1, n)
    base, phase = rng.normal(0, 1, c.K), rng.uniform(0, 2 * np.pi, c.K)
    logits = base + rng.uniform(0.5, 2.0) * np.sin(2 * np.pi * rng.uniform(0.25, 2.0) * u[:, None] + phase)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    cum = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
    classes = np.minimum((cum < rng.random((n, 1))).sum(axis=1), c.K - 1)
    X = c.natural(n, classes)
    if ds.is_image:
        X = X * (1 - rng.uniform(0, 0.25) * u[:, None])
    else:
        feats = rng.choice(np.flatnonzero(ds.span > 0), int(rng.integers(1, 5)), replace=False)
        delta = rng.uniform(0.03, 0.12, feats.size) * rng.choice([-1, 1], feats.size)
        X[:, feats] *= 1 + u[:, None] * delta[None, :]
    return c.place(rel), c.tidy(X)


def class_subset(c: Client) -> tuple[np.ndarray, np.ndarray]:
    n, rng = c.n, c.rng
    k = int(rng.integers(1, min(3, max(1, c.K - 1)) + 1))
    classes = rng.choice(c.K, k, replace=False)
    X = c.natural(n, rng.choice(classes, n, p=rng.dirichlet(np.ones(k))))
    gaps = c.human_gaps(n, c.think()) if rng.random() < 0.5 else c.machine_gaps(n, c.rate())
    return c.place(np.cumsum(gaps)), X


def popular(c: Client) -> tuple[np.ndarray, np.ndarray]:
    n, rng, s = c.n, c.rng, c.family.popular_share
    share = s if s in (0.0, 1.0) else rng.beta(4 * s, 4 * (1 - s))
    X = c.natural(n)
    pop = rng.random(n) < share
    X[pop] = c.popular(int(pop.sum()))
    return c.place(np.cumsum(c.human_gaps(n, c.think()))), X


def org_app(c: Client) -> tuple[np.ndarray, np.ndarray]:
    n, rng, org = c.n, c.rng, c.org
    assert org is not None, "org_app clients are given their organisation"
    A = len(org.anchors)
    pick = rng.choice(A, n, p=rng.dirichlet(np.full(A, 0.3)))
    nb = org.neighbours[pick, rng.integers(0, org.neighbours.shape[1], n)]
    u = rng.uniform(0, 0.5, (n, 1)) * (rng.random((n, 1)) >= 0.2)  # 20 %: the anchor itself
    X = c.tidy(org.anchors[pick] + u * (org.anchors[nb] - org.anchors[pick]))
    return c.place(np.cumsum(c.machine_gaps(n, c.rate())), org.t0, org.t1), X


def outage_retry(c: Client) -> tuple[np.ndarray, np.ndarray]:
    n, rng = c.n, c.rng
    down, up, retry_end = c.outage
    rate = max(c.rate(), 1 / 60)
    k = int(rng.integers(n // 5, n // 2 + 1))  # answered queries before the outage
    pre = down - np.cumsum(rng.exponential(1 / rate, k))[::-1]
    if pre[0] < c.start:
        pre = down - (down - pre) * ((down - c.start) / (down - pre[0]))
    lost = np.sort(rng.uniform(down, up, min(rng.poisson(rate * (up - down)), n)))  # attempted, unanswered
    X_pre, X_lost = c.natural_pref(k, 1.5), c.natural_pref(lost.size, 1.5)
    queue_t = np.concatenate([pre, lost])
    queue_X = np.concatenate([X_pre, X_lost])
    # The retry queue: the last answered queries whose responses were lost (within the
    # lookback), and the latest unanswered attempts; at most n/6 of each, at least one.
    cap = max(1, n // 6)
    look = down - rng.uniform(*c.family.outage.lookback)
    answered = np.flatnonzero(pre >= look)[-cap:]
    if answered.size == 0:
        answered = np.array([k - 1])  # the request in flight when the service went down
    queue = np.concatenate([answered, k + np.arange(lost.size)[-cap:]])
    R = queue.size
    span = retry_end - up
    d0 = rng.uniform(0, 0.3 * span)
    t_retry = up + d0 + np.sort(rng.uniform(0, span - d0, R))
    X_retry = queue_X[queue].copy()
    near = rng.random(R) >= c.family.outage.exact_share
    for i in np.flatnonzero(near):  # re-entered or re-serialised: one field one unit off
        f = int(rng.choice(np.flatnonzero(c.ds.span > 0)))
        X_retry[i, f] += c.unit()[f] * (1 if rng.random() < 0.5 else -1)
    X_retry = c.tidy(X_retry)
    m = n - k - R  # normal traffic after recovery
    post = up + np.cumsum(rng.exponential(1 / rate, m))
    end = c.start + c.window
    if m and post[-1] > end:
        post = up + (post - up) * ((end - up) / (post[-1] - up))
    t = np.concatenate([pre, t_retry, post])
    X = np.concatenate([X_pre, X_retry, c.natural_pref(m, 1.5)])
    order = np.argsort(t, kind="stable")
    return t[order], X[order]


def imputing(c: Client) -> tuple[np.ndarray, np.ndarray]:
    n, rng, ds = c.n, c.rng, c.ds
    X = c.natural_pref(n, 1.5)
    hit = np.flatnonzero(rng.random(n) < rng.uniform(0.1, 0.5))
    if ds.is_image:
        side = int(round(math.sqrt(ds.dim)))
        img = X.reshape(n, side, side)
        top = rng.random() < 0.5
        for i in hit:
            rows = int(rng.integers(1, 4))
            if top:
                img[i, :rows] = 0.0
            else:
                img[i, side - rows:] = 0.0
        X = img.reshape(n, ds.dim)
    else:
        optional = rng.choice(np.flatnonzero(ds.span > 0), int(rng.integers(3, 7)), replace=False)
        default = ds.round_natural(np.median(ds.X_benign, axis=0)[None])[0] if rng.random() < 0.6 else np.zeros(ds.dim)
        for i in hit:
            f = rng.choice(optional, int(rng.integers(1, 4)), replace=False)
            X[i, f] = default[f]
    gaps = c.machine_gaps(n, c.rate())
    return c.place(np.cumsum(gaps)), c.tidy(X)


BEHAVIOURS_B: dict[str, Behaviour] = {
    "interactive": interactive, "canary": canary, "reviewer": reviewer, "form_edit": form_edit, "bulk": bulk,
    "proxy": proxy, "drift": drift, "class_subset": class_subset, "popular": popular, "org_app": org_app,
    "outage_retry": outage_retry, "imputing": imputing,
}


# -- organisations -------------------------------------------------------------------------
def _org_of(seed: int, stream: str, family: FamilyB, rank: int) -> int:
    """Organisation index of the ``rank``-th org_app client: a per-stream sequence of sizes."""
    rng = _rng(seed, stream, "org-sizes")
    total, org = 0, 0
    while True:
        total += int(rng.integers(family.org_size[0], family.org_size[1] + 1))
        if rank < total:
            return org
        org += 1


def _build_org(world: World, seed: int, stream: str, prefix: str, index: int, start: float, window: float) -> Org:
    ds, rng = world.dataset, _rng(seed, stream, "org", index)
    K = ds.num_classes
    classes = rng.choice(K, int(rng.integers(1, max(1, math.ceil(K / 3)) + 1)), replace=False)
    A = int(rng.integers(15, 61))
    anchors, y = ds.natural(rng, A, "benign", rng.choice(classes, A))
    scale = np.where(ds.span > 0, ds.span, 1.0)
    Z = anchors / scale
    d = ((Z[:, None, :] - Z[None, :, :]) ** 2).sum(-1)
    d[y[:, None] != y[None, :]] = np.inf
    np.fill_diagonal(d, np.inf)
    k = 3
    neighbours = np.argsort(d, axis=1)[:, :k]
    alone = ~np.isfinite(np.take_along_axis(d, neighbours, axis=1))
    neighbours[alone] = np.repeat(np.arange(A)[:, None], k, axis=1)[alone]  # no same-class neighbour: itself
    length = window * rng.uniform(0.4, 1.0)
    t0 = start + rng.uniform(0, window - length)
    return Org(f"{prefix}-org{index:03d}", anchors, neighbours, t0, t0 + length)


# -- population ----------------------------------------------------------------------------
def simulate_benign_b(
    world: World, n_clients: int, seed: int, *, family: FamilyB | None = None, prefix: str = "bapp",
    stream: str = "b-eval", start: float = DEFAULT_START, window: float = DEFAULT_WINDOW,
) -> Traffic:
    """``n_clients`` family-B benign clients as one time-ordered :class:`Traffic`."""
    family = FamilyB() if family is None else family
    family.validate()
    if n_clients < 0 or window <= 0:
        raise ValueError("n_clients must be >= 0 and window > 0")
    ds = world.dataset
    pool = popular_pool(world, seed, family.popular_pool)
    ranks = np.arange(1, family.popular_pool + 1, dtype=np.float64) ** -family.popular_zipf
    outage = outage_span(seed, stream, family, start, window)
    orgs: dict[int, Org] = {}
    names, truth = [], {}
    ts_parts, X_parts, client_parts = [], [], []
    org_rank = 0
    for i, kind in enumerate(assign_behaviours(family.mix, n_clients)):
        rng = _rng(seed, stream, "client", i)
        org = None
        if kind == "org_app":
            j = _org_of(seed, stream, family, org_rank)
            org_rank += 1
            if j not in orgs:
                orgs[j] = _build_org(world, seed, stream, prefix, j, start, window)
            org = orgs[j]
        n = family.length.sample(rng)
        c = Client(world, family, rng, n, start, window, pool, ranks / ranks.sum(), outage, org)
        t, X = BEHAVIOURS_B[kind](c)
        if len(t) != n or X.shape != (n, ds.dim):
            raise AssertionError(f"behaviour {kind} produced {len(t)} events for a budget of {n}")
        name = f"{prefix}-{i:04d}"
        names.append(name)
        truth[name] = {"kind": "benign", "type": kind, "group": org.id if org else None}
        ts_parts.append(t)
        X_parts.append(X)
        client_parts.append(np.full(n, i, dtype=np.int64))
    K = ds.num_classes
    if not names:
        return Traffic(np.zeros(0), np.zeros(0, dtype=np.int64), [], np.zeros((0, ds.dim)), np.zeros((0, K)), {}, world.model, ds.decimals)
    ts = np.round(np.concatenate(ts_parts), 3)
    X = ds.round(ds.clip(np.concatenate(X_parts)))
    client = np.concatenate(client_parts)
    order = np.argsort(ts, kind="stable")
    X = X[order]
    return Traffic(ts[order], client[order], names, X, world.answer(X), truth, world.model, ds.decimals)


def merge(*traffics: Traffic) -> Traffic:
    """One time-ordered Traffic from several of the same model: equal timestamps keep the
    argument order, then each input's own order; clients renumbered; client names must not clash."""
    if not traffics:
        raise ValueError("merge() needs at least one Traffic")
    first = traffics[0]
    names: list[str] = []
    truth: dict[str, dict] = {}
    for t in traffics:
        if t.model != first.model or t.X.shape[1] != first.X.shape[1] or t.P.shape[1] != first.P.shape[1]:
            raise ValueError(f"cannot merge traffic of model {t.model!r} (shape {t.X.shape[1]}x{t.P.shape[1]}) into {first.model!r}")
        if not np.array_equal(t.decimals, first.decimals):
            raise ValueError("cannot merge traffic written with other decimals")
        clash = set(names) & set(t.clients)
        if clash:
            raise ValueError(f"client name clash in merge(), e.g. {sorted(clash)[0]!r}")
        names.extend(t.clients)
        truth.update({c: t.truth[c] for c in t.clients})
    offsets = np.cumsum([0] + [len(t.clients) for t in traffics[:-1]])
    ts = np.concatenate([t.ts for t in traffics])
    client = np.concatenate([t.client.astype(np.int64) + off for t, off in zip(traffics, offsets)])
    order = np.argsort(ts, kind="stable")
    X = np.concatenate([t.X for t in traffics])
    P = np.concatenate([t.P for t in traffics])
    return Traffic(ts[order], client[order], names, X[order], P[order], truth, first.model, first.decimals)


# -- CLI -----------------------------------------------------------------------------------
def summary(traffic: Traffic) -> dict[str, dict[str, float]]:
    """Per behaviour: clients, events, and the median and maximum queries per client."""
    counts = np.bincount(traffic.client, minlength=len(traffic.clients))
    out: dict[str, list[int]] = {}
    for i, name in enumerate(traffic.clients):
        out.setdefault(traffic.truth[name]["type"], []).append(int(counts[i]))
    return {k: {"clients": len(v), "events": sum(v), "median": float(np.median(v)), "max": max(v)} for k, v in sorted(out.items())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Simulate family-B benign traffic and write it as JSON lines.")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stream", default="b-eval")
    ap.add_argument("--prefix", default="bapp")
    ap.add_argument("--window", type=float, default=DEFAULT_WINDOW, help="seconds")
    ap.add_argument("--out", required=True, help="JSON-lines file (overwritten)")
    args = ap.parse_args(argv)
    world = build_world(args.dataset, args.seed)
    traffic = simulate_benign_b(world, args.clients, args.seed, prefix=args.prefix, stream=args.stream, window=args.window)
    lines = traffic.write(args.out, append=False)
    print(f"{lines} events from {len(traffic.clients)} clients -> {args.out}")
    print(f"{'behaviour':<14}{'clients':>8}{'events':>9}{'median':>8}{'max':>7}")
    for kind, s in summary(traffic).items():
        print(f"{kind:<14}{s['clients']:>8}{s['events']:>9}{s['median']:>8.0f}{s['max']:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
