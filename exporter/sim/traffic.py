"""Compose a client population into one time-ordered stream of prediction events.

A :class:`Population` says who is there: N benign clients with a behaviour mix, and
attackers by type. :func:`simulate` runs every client (attacks closed-loop against the
victim), merges the streams in time order, answers every query with the victim (on the
input *as logged*, i.e. rounded) and returns a :class:`Traffic`: events as arrays, the
JSON-lines writer, and the ground truth (client -> kind, type, group).

Timing: benign clients are active in one session (20-100 % of the window, placed
uniformly) with Poisson arrivals inside it; batch jobs send same-timestamp bursts.
Scripted attackers send a Poisson stream at ~``attack_rate`` queries/s (log-normal
spread across attackers) from a start in the first half of the window; slow attackers
send one query every ~``slow_gap`` seconds (exponential gaps), so 1000 queries span
about 3.5 days whatever the window; a Sybil group's one stream is dealt round-robin to
its members. For held-out regimes, ``Population`` can bound each benign client's query
count (``benign_query_range``), pace sessions at a set rate (``benign_rate``) and pass
keyword parameters to behaviours (``behaviour_params``, e.g. the popular share).

Client ids: benign ``<prefix>-NNNN`` (neutral on purpose), attackers
``atk-<type>-<i>``, Sybil members ``syb-<i>-<j>`` in group ``syb-<i>``.

Randomness: every client draws from its own generator, keyed by (seed, population
stream, role, index), so adding attackers never changes the benign traffic, and a
calibration population (another stream label) never repeats the evaluation one.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from exporter.sim.attacks import ATTACKS, run_attack
from exporter.sim.benign import BEHAVIOURS, DEFAULT_MIX, VOLUME_FACTOR, Organisation, Stream, organisation
from exporter.sim.world import World

DEFAULT_START = 1764097200.0  # 2025-11-25T19:00:00Z: a fixed origin keeps runs byte-identical
SYBIL_SIZE = 10


@dataclass
class Population:
    """Who sends traffic. ``attacks`` maps an attack name to its number of clients
    (of groups, for ``sybil``)."""

    benign: int = 20
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    benign_queries: int = 100  # median queries per benign client (log-normal, sigma 0.7)
    attacks: dict[str, int] = field(default_factory=dict)
    attack_queries: int = 1000  # per attacker client; per group for sybil
    window: float = 3600.0  # seconds over which sessions and scripted attacks spread
    start: float = DEFAULT_START
    attack_rate: float = 1.0  # median queries/s of a scripted attacker
    slow_gap: float = 300.0  # mean seconds between a slow attacker's queries
    benign_prefix: str = "app"
    stream: str = "main"  # names the random stream: calibration and evaluation differ
    # Regime knobs for held-out evaluations (bench/detection --holdout); the defaults keep
    # the traffic described above, byte for byte.
    benign_query_range: tuple[int, int] | None = None  # bounds each benign client's query count (after the batch factor)
    benign_rate: float | None = None  # median queries/s of a benign session; None: it spans 20-100 % of the window
    behaviour_params: dict[str, dict[str, float]] = field(default_factory=dict)  # keyword arguments per behaviour
    org_size: tuple[int, int] = (2, 5)  # apps per organisation (org_app clients), uniform

    def validate(self) -> None:
        """Raise ValueError on an impossible population (unknown names, negative sizes)."""
        if self.benign < 0:
            raise ValueError("the number of benign clients must be >= 0")
        unknown = sorted(set(self.mix) - set(BEHAVIOURS))
        if unknown:
            raise ValueError(f"unknown benign behaviour(s) {', '.join(unknown)}; known: {', '.join(BEHAVIOURS)}")
        if self.benign and (not self.mix or sum(self.mix.values()) <= 0 or min(self.mix.values()) < 0):
            raise ValueError("the behaviour mix needs non-negative weights with a positive sum")
        bad = sorted(set(self.attacks) - set(ATTACKS))
        if bad:
            raise ValueError(f"unknown attack(s) {', '.join(bad)}; known: {', '.join(ATTACKS)}")
        if any(v < 0 for v in self.attacks.values()):
            raise ValueError("attack client counts must be >= 0")
        if self.benign_queries < 1 or self.attack_queries < 1:
            raise ValueError("query counts must be >= 1")
        if self.window <= 0 or self.attack_rate <= 0 or self.slow_gap <= 0:
            raise ValueError("window, attack_rate and slow_gap must be > 0")
        if self.benign_query_range is not None and not 1 <= self.benign_query_range[0] <= self.benign_query_range[1]:
            raise ValueError("benign_query_range must be (low, high) with 1 <= low <= high")
        if self.benign_rate is not None and not self.benign_rate > 0:
            raise ValueError("benign_rate must be > 0")
        odd = sorted(set(self.behaviour_params) - set(BEHAVIOURS))
        if odd:
            raise ValueError(f"behaviour_params for unknown behaviour(s) {', '.join(odd)}")


@dataclass
class Traffic:
    """Events in time order: ``ts`` (n,), ``client`` (n,) indexes into ``clients``,
    ``X`` (n, d) inputs as logged (rounded), ``P`` (n, K) the victim's answers."""

    ts: np.ndarray
    client: np.ndarray
    clients: list[str]
    X: np.ndarray
    P: np.ndarray
    truth: dict[str, dict[str, Any]]
    model: str
    decimals: np.ndarray

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def subset(self, keep: np.ndarray) -> "Traffic":
        """The events selected by a boolean mask or index array (order kept)."""
        return Traffic(self.ts[keep], self.client[keep], self.clients, self.X[keep], self.P[keep], self.truth, self.model, self.decimals)

    def head(self, n: int) -> "Traffic":
        """The first ``n`` events in time order."""
        return self.subset(np.arange(min(n, len(self))))

    def lines(self, ts: np.ndarray | None = None) -> Iterator[str]:
        """JSON lines in the event contract: ``{"ts", "client", "model", "input", "output"}``.

        ``ts`` overrides the timestamps (live pacing stamps events when they are sent).
        """
        dumps = json.dumps
        model = dumps(self.model)
        names = [dumps(c) for c in self.clients]
        xs = (self.X + 0.0).tolist()  # + 0.0: no "-0"; inputs are pre-rounded, so repr is short
        ps = (np.round(self.P, 6) + 0.0).tolist()
        stamps = self.ts if ts is None else ts
        for i in range(len(self)):
            x = [int(v) if v.is_integer() else v for v in xs[i]]  # integral values print as integers
            yield f'{{"ts": {stamps[i]:.3f}, "client": {names[self.client[i]]}, "model": {model}, "input": {dumps(x)}, "output": {dumps(ps[i])}}}'

    def write(self, target: str | os.PathLike[str] | IO[str], append: bool = True) -> int:
        """Write the JSON lines to a path (parents created; appended by default) or an open
        text stream; returns the number of lines written."""
        if hasattr(target, "write"):
            return _write_lines(target, self.lines())  # type: ignore[arg-type]
        path = Path(target)  # type: ignore[arg-type]
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a" if append else "w", encoding="utf-8") as fh:
            return _write_lines(fh, self.lines())

    def ground_truth(self, **meta: Any) -> dict[str, Any]:
        """``{"clients": {id: {"kind", "type", "group", "queries"}}, **meta}``, with the
        query counts of the events actually present."""
        counts = np.bincount(self.client, minlength=len(self.clients))
        clients = {c: {**self.truth[c], "queries": int(counts[i])} for i, c in enumerate(self.clients)}
        return {**meta, "model": self.model, "clients": clients}


def _write_lines(fh: IO[str], lines: Iterator[str]) -> int:
    n = 0
    buf: list[str] = []
    for line in lines:
        buf.append(line)
        if len(buf) >= 1000:
            fh.write("\n".join(buf) + "\n")
            n += len(buf)
            buf.clear()
    if buf:
        fh.write("\n".join(buf) + "\n")
        n += len(buf)
    return n


def _rng(seed: int, stream: str, role: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(stream.encode()), zlib.crc32(role.encode()), index])


def allocate(mix: dict[str, float], n: int) -> list[str]:
    """Behaviour of each of ``n`` clients: counts proportional to ``mix`` (largest
    remainder), in a fixed interleaved order so a prefix of clients is also a mix."""
    names = [k for k, v in mix.items() if v > 0]
    w = np.array([mix[k] for k in names], dtype=np.float64)
    exact = w / w.sum() * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    out: list[str] = []
    left = counts.copy()
    while len(out) < n:  # round-robin over behaviours, weighted by what is left
        for i, name in enumerate(names):
            if left[i] > 0:
                out.append(name)
                left[i] -= 1
    return out


def _outage(pop: Population, seed: int) -> tuple[float, float]:
    """The population's outage (down, up): 3-10 minutes, starting at 40-60 % of the window."""
    rng = _rng(seed, pop.stream, "outage", 0)
    down = pop.start + pop.window * rng.uniform(0.4, 0.6)
    return down, down + rng.uniform(180.0, 600.0)


def _org_of(pop: Population, seed: int, rank: int) -> int:
    """Organisation of the ``rank``-th org_app client: consecutive runs of 2-5 apps."""
    rng = _rng(seed, pop.stream, "org-sizes", 0)
    total = org = 0
    while True:
        total += int(rng.integers(pop.org_size[0], pop.org_size[1] + 1))
        if rank < total:
            return org
        org += 1


def _benign_stream(world: World, pop: Population, seed: int, index: int, behaviour: str, extra: dict[str, Any] | None = None) -> Stream:
    rng = _rng(seed, pop.stream, "benign", index)
    n = int(np.clip(np.rint(pop.benign_queries * rng.lognormal(0.0, 0.7)), 5, 20 * pop.benign_queries))
    n = max(1, int(n * VOLUME_FACTOR.get(behaviour, 1.0)))
    if pop.benign_query_range is not None:
        n = int(np.clip(n, *pop.benign_query_range))
    if pop.benign_rate is None:
        span = pop.window * rng.uniform(0.2, 1.0)
    else:  # the session lasts as long as its queries take at this client's rate, within the window
        span = min(n / (pop.benign_rate * rng.lognormal(0.0, 0.5)), pop.window)
    t0 = pop.start + rng.uniform(0.0, pop.window - span)
    if behaviour == "outage_retry":  # a session that covers the outage
        down, up = extra["outage"] if extra else _outage(pop, seed)
        t0 = rng.uniform(pop.start, max(pop.start, down - 300.0))
        span = max(span, up + 300.0 - t0)
    return BEHAVIOURS[behaviour](world, rng, n, t0, span, **{**pop.behaviour_params.get(behaviour, {}), **(extra or {})})


def _attack_times(rng: np.random.Generator, pop: Population, timing: str, n: int) -> np.ndarray:
    if timing == "slow":
        t0 = pop.start + rng.uniform(0.0, 0.1 * pop.window)
        return t0 + np.cumsum(rng.exponential(pop.slow_gap, n))
    rate = pop.attack_rate * rng.lognormal(0.0, 0.5)
    t0 = pop.start + rng.uniform(0.0, 0.5 * pop.window)
    return t0 + np.cumsum(rng.exponential(1.0 / rate, n))


def simulate(world: World, pop: Population, seed: int = 0, attack_params: dict[str, float] | None = None) -> Traffic:
    """Run the population against the world's victim and merge all events in time order."""
    pop.validate()
    ds = world.dataset
    names: list[str] = []
    truth: dict[str, dict[str, Any]] = {}
    ts_parts: list[np.ndarray] = []
    cl_parts: list[np.ndarray] = []
    x_parts: list[np.ndarray] = []

    def add(client: str, info: dict[str, Any], ts: np.ndarray, X: np.ndarray) -> None:
        idx = len(names)
        names.append(client)
        truth[client] = info
        ts_parts.append(ts)
        cl_parts.append(np.full(len(ts), idx, dtype=np.int64))
        x_parts.append(X)

    width = max(4, len(str(max(pop.benign - 1, 0))))
    orgs: dict[int, Organisation] = {}
    apps = 0
    for i, behaviour in enumerate(allocate(pop.mix, pop.benign) if pop.benign else []):
        extra: dict[str, Any] | None = None
        group = None
        if behaviour == "org_app":
            j = _org_of(pop, seed, apps)
            apps += 1
            if j not in orgs:
                orgs[j] = organisation(world, _rng(seed, pop.stream, "org", j), pop.start, pop.window)
            extra, group = {"org": orgs[j]}, f"{pop.benign_prefix}-org{j:03d}"
        elif behaviour == "outage_retry":
            extra = {"outage": _outage(pop, seed)}
        s = _benign_stream(world, pop, seed, i, behaviour, extra)
        add(f"{pop.benign_prefix}-{i:0{width}d}", {"kind": "benign", "type": behaviour, "group": group}, s.ts, s.X)

    for name, count in pop.attacks.items():
        spec = ATTACKS[name]
        for i in range(count):
            rng = _rng(seed, pop.stream, f"attack:{name}", i)
            X = run_attack(name, ds, world.answer, pop.attack_queries, rng, attack_params)
            ts = _attack_times(rng, pop, spec.timing, len(X))
            if spec.sybil:
                group = f"syb-{i}"
                member = np.arange(len(X)) % spec.sybil
                for j in range(spec.sybil):
                    sel = member == j
                    add(f"{group}-{j}", {"kind": "attack", "type": name, "group": group}, ts[sel], X[sel])
            else:
                add(f"atk-{name}-{i}", {"kind": "attack", "type": name, "group": None}, ts, X)

    if not names:
        raise ValueError("the population is empty: add benign clients or attacks")
    ts = np.concatenate(ts_parts)
    client = np.concatenate(cl_parts)
    X = ds.round(np.concatenate(x_parts))
    order = np.argsort(ts, kind="stable")
    ts, client, X = ts[order], client[order], X[order]
    P = world.victim.predict_proba(X)
    return Traffic(ts, client, names, X, P, truth, world.model, ds.decimals)
