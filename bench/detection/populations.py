"""Who is in the benchmark's logs: benign traffic families, training data written as events,
held-out behaviours and regimes, and attack variants (the sweep and the held-out ones).

Everything here returns :class:`exporter.sim.Traffic` objects; :func:`merge` joins them
into one time-ordered log, :func:`tag` adds fields to their ground truth (``family``,
``holdout``, ``set``), which the scoring reads back.
"""

from __future__ import annotations

import importlib
import zlib
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, Callable

import numpy as np

from exporter.sim import ATTACKS, BEHAVIOURS, DEFAULT_MIX, Population, Traffic, World, simulate
from exporter.sim.traffic import DEFAULT_START


@dataclass(frozen=True)
class Sizes:
    """Population sizes of one benchmark mode (calibration sizes are given separately)."""

    eval_benign: int  # benign evaluation clients per benign family
    per_attack: int  # attacker clients per ordinary attack type
    sybil_groups: int
    slow: int
    interleaved: int
    benign_queries: int  # median queries per benign client (family A)
    attack_queries: int  # per attacker client, per Sybil group
    window: float  # seconds of benign activity (family A)
    holdout_benign: int  # clients of the extra held-out population (--holdout)
    variant_clients: int  # attacker clients per sweep or held-out attack variant


FULL = Sizes(eval_benign=1000, per_attack=10, sybil_groups=3, slow=5, interleaved=10, benign_queries=100,
             attack_queries=1000, window=6 * 3600.0, holdout_benign=200, variant_clients=3)
QUICK = Sizes(eval_benign=1000, per_attack=2, sybil_groups=1, slow=2, interleaved=2, benign_queries=80,
              attack_queries=300, window=3600.0, holdout_benign=100, variant_clients=1)


def attack_counts(sizes: Sizes, attacks: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Clients (groups for Sybil) per attack type in the evaluation population."""
    special = {"sybil": sizes.sybil_groups, "slow": sizes.slow, "interleaved": sizes.interleaved}
    return {a: special.get(a, sizes.per_attack) for a in attacks}


# -- joining traffic ---------------------------------------------------------------------------
def merge(*traffics: Traffic) -> Traffic:
    """One time-ordered Traffic from several of the same model (client ids must not collide).

    Equal timestamps keep the order of the arguments, then each part's own order.
    """
    parts = [t for t in traffics if len(t.clients)]
    if not parts:
        raise ValueError("nothing to merge")
    names: list[str] = []
    truth: dict[str, dict[str, Any]] = {}
    client_parts = []
    for t in parts:
        if t.model != parts[0].model:
            raise ValueError(f"cannot merge traffic of models {parts[0].model!r} and {t.model!r}")
        clash = set(t.clients) & set(truth)
        if clash:
            raise ValueError(f"client ids in two populations, e.g. {sorted(clash)[:3]}")
        client_parts.append(t.client + len(names))
        names.extend(t.clients)
        truth.update({c: t.truth[c] for c in t.clients})
    ts = np.concatenate([t.ts for t in parts])
    order = np.argsort(ts, kind="stable")
    return Traffic(ts[order], np.concatenate(client_parts)[order], names, np.concatenate([t.X for t in parts])[order],
                   np.concatenate([t.P for t in parts])[order], truth, parts[0].model, parts[0].decimals)


def tag(traffic: Traffic, **fields: Any) -> Traffic:
    """The same events, with ``fields`` added to every client's ground truth."""
    truth = {c: {**traffic.truth[c], **fields} for c in traffic.clients}
    return replace(traffic, truth=truth)


def rename(traffic: Traffic, new_name: Callable[[str], str], **fields: Any) -> Traffic:
    """The same events under other client ids (and group ids, renamed alike), ``fields`` added to the truth."""
    names = [new_name(c) for c in traffic.clients]
    truth = {}
    for old, new in zip(traffic.clients, names):
        info = dict(traffic.truth[old])
        if info.get("group"):
            info["group"] = new_name(info["group"])
        truth[new] = {**info, **fields}
    return replace(traffic, clients=names, truth=truth)


# -- benign families ---------------------------------------------------------------------------
class FamilyUnavailable(RuntimeError):
    """A benign family whose module is not in this checkout."""


def simulate_family_a(world: World, n: int, seed: int, *, prefix: str, stream: str, sizes: Sizes,
                      overrides: dict[str, Any] | None = None) -> Traffic:
    """Family A: ``exporter.sim``'s benign behaviours, with :class:`Population` knobs as ``overrides``."""
    pop = Population(benign=n, benign_queries=sizes.benign_queries, window=sizes.window, benign_prefix=prefix, stream=stream)
    return simulate(world, replace(pop, **(overrides or {})), seed)


def family_b_module() -> ModuleType | None:
    """``bench/detection/family_b.py`` (written independently of exporter.sim), or None when absent."""
    try:
        return importlib.import_module("family_b")
    except ModuleNotFoundError as exc:
        if exc.name != "family_b":
            raise  # the module exists but is broken: say so rather than skip it
        return None


def simulate_family_b(world: World, n: int, seed: int, *, prefix: str, stream: str, sizes: Sizes,
                      overrides: dict[str, Any] | None = None) -> Traffic:
    """Family B: its own session lengths, rates and mixes; ``sizes`` does not shape it."""
    module = family_b_module()
    if module is None:
        raise FamilyUnavailable("benign family b needs bench/detection/family_b.py, which is not in this checkout")
    if overrides:
        raise ValueError("held-out regimes are knobs of family a; family b takes none")
    return module.simulate_benign_b(world, n, seed, prefix=prefix, stream=stream)


@dataclass(frozen=True)
class Family:
    """A benign traffic family: how to simulate it, and the ids and random streams it uses."""

    name: str
    simulate: Callable[..., Traffic]
    calib_prefix: str
    eval_prefix: str
    eval_stream: str
    describe: str

    def calib_stream(self, label: str) -> str:
        """Each calibration size is its own population: its own random stream."""
        return f"{self.name}-calibration-{label}"

    def available(self) -> bool:
        return self.name != "b" or family_b_module() is not None


FAMILIES: dict[str, Family] = {
    "a": Family("a", simulate_family_a, "cal", "app", "evaluation", "exporter.sim benign behaviours (7-behaviour mix)"),
    "b": Family("b", simulate_family_b, "bcal", "bapp", "b-eval", "bench/detection/family_b.py, written independently"),
}


def training_events(world: World, seed: int, clients: int = 1, gap: float = 1.0) -> Traffic:
    """The victim's training split as events: shuffled, no session structure, ``clients`` ids
    dealt round-robin (``train-0000`` ...), one event every ``gap`` seconds, answered by the victim."""
    ds = world.dataset
    rng = np.random.default_rng([seed, zlib.crc32(b"training-events")])
    X = ds.round(ds.X_victim[rng.permutation(len(ds.X_victim))])
    ts = DEFAULT_START + gap * np.arange(len(X), dtype=np.float64)
    names = [f"train-{i:04d}" for i in range(clients)]
    truth = {c: {"kind": "benign", "type": "training", "group": None} for c in names}
    return Traffic(ts, np.arange(len(X)) % clients, names, X, world.victim.predict_proba(X), truth, world.model, ds.decimals)


# -- held-out behaviours and regimes ----------------------------------------------------------------
@dataclass(frozen=True)
class Holdout:
    """Calibrate without something benign, evaluate with it.

    ``calib``: :class:`Population` overrides of every calibration population (family A);
    ``held``: overrides of an extra evaluation population (ids ``hold-NNNN``) that has it.
    The held-out clients are that population, plus, for a behaviour, every family-A
    evaluation client of that behaviour.
    """

    spec: str
    calib: dict[str, Any]
    held: dict[str, Any]
    describe: str
    behaviour: str | None = None

    def is_held_out(self, truth: dict[str, Any]) -> bool:
        if truth.get("holdout"):
            return True
        return self.behaviour is not None and truth.get("family") == "a" and truth.get("type") == self.behaviour


REGIMES: dict[str, Holdout] = {
    "session_length": Holdout(
        "regime:session_length", {"benign_queries": 40, "benign_query_range": (20, 80)},
        {"benign_queries": 500, "benign_query_range": (300, 5000)},
        "calibrate on short sessions (20-80 queries per client), evaluate on long ones (300-5,000)"),
    "rate": Holdout(
        "regime:rate", {"benign_rate": 0.02}, {"benign_rate": 2.0},
        "calibrate on slow sessions (median 0.02 queries/s), evaluate on fast ones (median 2 queries/s)"),
    "popular_share": Holdout(
        "regime:popular_share", {"behaviour_params": {"popular": {"share": 0.1}}},
        {"mix": {"popular": 1.0}, "behaviour_params": {"popular": {"share": 0.8}}},
        "calibrate with popular-input clients sending 10 % popular inputs, evaluate clients sending 80 %"),
}


def parse_holdout(spec: str) -> Holdout:
    """``behaviour:<name>`` or ``regime:<name>`` -> :class:`Holdout` (ValueError if unknown)."""
    kind, _, name = spec.partition(":")
    if kind == "behaviour":
        if name not in BEHAVIOURS:
            raise ValueError(f"unknown benign behaviour {name!r}; known: {', '.join(BEHAVIOURS)}")
        mix = {k: v for k, v in DEFAULT_MIX.items() if k != name}
        return Holdout(spec, {"mix": mix}, {"mix": {name: 1.0}}, f"calibrate without {name} clients, evaluate with them", behaviour=name)
    if kind == "regime":
        if name not in REGIMES:
            raise ValueError(f"unknown regime {name!r}; known: {', '.join(REGIMES)}")
        return REGIMES[name]
    raise ValueError(f"--holdout takes behaviour:<name> or regime:<name>, got {spec!r}")


# -- attack variants ---------------------------------------------------------------------------------
ABBREV = {"step": "l", "seeds": "s", "targets": "t", "rounds": "r", "interleave": "i", "tau": "tau"}


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


@dataclass(frozen=True)
class Variant:
    """An attack with other parameters (``exporter.sim.attacks``' ``params``) and budget.

    Its name encodes them: ``trnd-l0.01-t8`` is T-RND with λ = 0.01 of the range and 8
    targets; ``interleaved-i5-b300`` is JbDA interleaved 1:5 with 300 queries. Its
    clients are ``atk-<name>-<i>``.
    """

    attack: str
    params: tuple[tuple[str, float], ...] = ()
    budget: int | None = None  # queries per client; None: the run's attack_queries

    @property
    def name(self) -> str:
        parts = [self.attack, *(f"{ABBREV[k]}{_num(v)}" for k, v in self.params)]
        if self.budget is not None:
            parts.append(f"b{self.budget}")
        return "-".join(parts)


def variant(attack: str, budget: int | None = None, **params: float) -> Variant:
    """A :class:`Variant` with its parameters in a fixed order (so equal variants have equal names)."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}")
    bad = sorted(set(params) - set(ABBREV))
    if bad:
        raise ValueError(f"unknown attack parameter(s) {bad}")
    return Variant(attack, tuple((k, float(params[k])) for k in ABBREV if k in params), budget)


# The sweep developers tune on: one parameter at a time around each attack's defaults
# (JbDA/T-RND: λ 0.1, 10 seeds per class, unbounded rounds, 1 target; interleave 1:1;
# budget 1,000).
SWEEP: tuple[Variant, ...] = (
    *(variant("jbda", step=s) for s in (0.03, 0.3)),
    *(variant("jbda", seeds=s) for s in (2, 5)),
    *(variant("jbda", rounds=r) for r in (2, 4)),
    *(variant("jbda", budget=b) for b in (100, 300, 5000)),
    *(variant("trnd", step=s) for s in (0.03, 0.3)),
    *(variant("trnd", targets=t) for t in (2, 4)),
    *(variant("trnd", rounds=r) for r in (2, 4)),
    *(variant("trnd", budget=b) for b in (100, 300, 5000)),
    *(variant("interleaved", interleave=k) for k in (2, 3, 5)),
    *(variant("interleaved", budget=b) for b in (300, 5000)),
)

# HELD OUT: never in the sweep or the default runs, so never used to choose detectors,
# parameters or thresholds; only `--heldout-attacks` adds them, and they are reported apart.
# T-RND with a step below and more targets than the sweep has, and a 1:5 interleave at a
# low budget (a combination the sweep does not contain).
HELDOUT_ATTACKS: tuple[Variant, ...] = (
    variant("trnd", step=0.01, targets=8),
    variant("interleaved", budget=300, interleave=5),
)


def simulate_variant(world: World, v: Variant, clients: int, seed: int, sizes: Sizes, set_name: str) -> Traffic:
    """``clients`` attackers of variant ``v`` (own random stream), ids and truth naming the variant."""
    pop = Population(benign=0, attacks={v.attack: clients}, attack_queries=v.budget or sizes.attack_queries,
                     window=sizes.window, stream=f"variant:{v.name}")
    tr = simulate(world, pop, seed, attack_params=dict(v.params))
    prefixes = {f"atk-{v.attack}-": f"atk-{v.name}-", "syb-": f"syb-{v.name}-"}

    def new_name(old: str) -> str:
        for a, b in prefixes.items():
            if old.startswith(a):
                return b + old[len(a):]
        return old

    return rename(tr, new_name, type=v.name, base=v.attack, params=dict(v.params), set=set_name)


@dataclass
class EvalPlan:
    """What goes into one evaluation log (per dataset and seed)."""

    sizes: Sizes
    attacks: list[str]
    families: list[str]
    holdout: Holdout | None = None
    sweep: bool = False
    heldout_attacks: bool = False
    variants: list[tuple[Variant, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.variants = ([(v, "sweep") for v in SWEEP] if self.sweep else []) + (
            [(v, "heldout") for v in HELDOUT_ATTACKS] if self.heldout_attacks else [])


def evaluation_traffic(world: World, seed: int, plan: EvalPlan) -> Traffic:
    """Benign clients of every family, the held-out population, the attackers and the variants."""
    s = plan.sizes
    parts = []
    for name in plan.families:
        fam = FAMILIES[name]
        parts.append(tag(fam.simulate(world, s.eval_benign, seed, prefix=fam.eval_prefix, stream=fam.eval_stream, sizes=s), family=name))
    if plan.holdout is not None:
        held = simulate_family_a(world, s.holdout_benign, seed, prefix="hold", stream=f"holdout:{plan.holdout.spec}", sizes=s,
                                 overrides=plan.holdout.held)
        parts.append(tag(held, family="a", holdout=True))
    if plan.attacks:
        atk = simulate(world, Population(benign=0, attacks=attack_counts(s, plan.attacks), attack_queries=s.attack_queries,
                                         window=s.window, stream="evaluation"), seed)
        parts.append(tag(atk, set="default"))
    for v, set_name in plan.variants:
        parts.append(simulate_variant(world, v, s.variant_clients, seed, s, set_name))
    return merge(*parts)


def calibration_traffic(world: World, seed: int, label: str, family: str, sizes: Sizes, holdout: Holdout | None) -> Traffic:
    """The calibration population ``label``: N benign clients of ``family`` (own stream), or the training data."""
    if label == "training":
        return training_events(world, seed)
    fam = FAMILIES[family]
    return fam.simulate(world, int(label), seed, prefix=fam.calib_prefix, stream=fam.calib_stream(label), sizes=sizes,
                        overrides=holdout.calib if holdout else None)
