"""``monitaur-exporter calibrate``: learn a profile from benign traffic, and say what it promises.

The verdict flags a client while any detector is over its threshold
(:mod:`exporter.fusion`), so a benign client is falsely alarmed if *any* detector, at
*any* point of its history, crosses its threshold. Calibration therefore works on each
benign client's lifetime maximum of every detector, and sets all thresholds jointly:

1. **Clients.** The benign events of a model are grouped by client. A client with more
   than ``MAX_SESSION`` events is cut into sessions of 100 to 1,000 events; events with
   no client structure at all (a model's training data written as events, under fewer
   than ``MIN_CLIENTS`` ids) are cut into pseudo-clients of 50 to 500 events. The
   detectors that need real sessions (``rate``, ``repetition``: timing and resubmits)
   then keep their documented defaults, and the summary says so.
2. **Out-of-fold values.** The clients are split in two folds. Each fold's reference
   statistics (feature scaling, ood covariance, coverage cells, knn distances, step
   ranges) are fitted on its events, all the benign traffic is replayed with them, and
   the *other* fold's clients' lifetime maxima are recorded; so every client is measured
   against references that did not learn from it (in-sample values are optimistic), while
   state shared across clients (the fingerprint index) is as full as the whole
   population makes it. The profile's references are then fitted on all the events.
3. **Thresholds.** The verdict flags while any of its ``J`` detectors flags, so each gets
   ``alpha / J`` of the target (a union bound). A detector's threshold is the value that a
   share ``alpha / J`` of clients like the calibration clients would reach, from their
   lifetime maxima (:func:`tail_threshold`), never below its ``min_threshold`` (what the
   detector can tell apart at best: a benign sample that never moved it must not make its
   first movement an alarm). A threshold above 1 means the detector cannot tell these
   clients from attackers: it never flags for the model, and the summary lists it.
4. **The threshold of one detector** (:func:`tail_threshold`), from the ``n`` clients'
   lifetime maxima and its share ``a``:

   * ``n >= 2 / a``: read from the order statistics (the value that ``floor(a n)``
     clients exceed), which needs no model of the tail;
   * otherwise there are too few large values to read the quantile from, so an
     exponential tail is fitted to the largest ``sqrt(n)`` (at least ``TAIL_MIN``) of
     the maxima (a share that shrinks as ``n`` grows, so the fit follows the tail and
     not the bulk: with 200 clients, the top 20 % missed a heavier tail of a few
     behaviours), its scale taken at a ``TAIL_CONFIDENCE`` upper confidence bound
     (chi-square, :func:`sigma_bound`), and extrapolated to ``a``.

   If no calibration client reached the detector's conservative default, the threshold
   is never raised above it. Detectors outside the verdict (exported and alerted on by
   themselves) get their own ``alpha`` quantile, never below their default. Clients that
   linked more than ``links``' ``calibration_ceiling`` of a full window of their queries
   (:class:`_LinkedWindows`) are an attack inside the log: left out
   of the references fitted after the folds and of every threshold (:func:`_attacks_inside`).
5. **The promise** (:func:`conformal_scale`). A client's statistic is its largest ratio
   of a lifetime maximum to its detector's threshold: the verdict flags it when that
   reaches 1. With ``n`` clients, split conformal prediction promises ``alpha`` when
   ``n + 1 >= 1 / alpha`` (and ``1 / (n + 1)`` below that, the smallest rate ``n``
   exchangeable clients can promise without a model of the tail): every verdict
   threshold is raised by the factor that puts the right order statistic of the
   clients' statistics below 1. The promise is distribution-free: it needs no model of
   how the detectors' values are spread, only clients like the calibration clients.
   The tail model's figure, usually lower, is reported beside it as ``expected``.
   A benign behaviour the calibration data does not contain is not covered, which is
   why the benchmark also measures held-out behaviours and another traffic family
   (docs/detection.md).
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any, Callable, TextIO

import numpy as np

from exporter.binomial import upper_bound
from exporter.config import Settings
from exporter.detectors import Batch, ModelContext, Signals, enabled_detectors
from exporter.detectors.base import Reference
from exporter.detectors.kit import Scaling, winsorize
from exporter.events import Event
from exporter.groups import group_threshold
from exporter.pipeline import Pipeline
from exporter.profile import ModelProfile, Profile, params_digest
from exporter.replay import Progress, existing_files, read_events, run_blocks

log = logging.getLogger("monitaur.calibrate")
MAX_NAMED = 10  # clients named in a warning line (the summary lists them all)

MAX_SESSION = 2_000  # a client with more events is cut into sessions
MIN_CLIENTS = 10  # fewer client ids than this: the events have no client structure (training data)
TAIL_MIN = 3  # the tail is fitted to the sqrt(n) largest maxima, and to at least this many
TAIL_CONFIDENCE = 0.7  # the tail's scale is taken at this upper confidence bound
EXTRAPOLATION = 2.5  # the tail model never expects more than this factor below 1 / (n + 1), what n clients show without one
UPPER_CONFIDENCE = 0.9  # the confidence of the promise's per-sample bound
SESSION_FREE = ("rate", "repetition")  # detectors that need real sessions to be calibrated


@dataclass
class _Maxima:
    """Pipeline observer: each recorded client's largest value of every detector, per model."""

    clients: set[str]
    values: dict[str, dict[str, dict[str, float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(dict)))

    def __call__(self, batch: Batch, name: str, signals: Signals) -> None:
        if batch.client not in self.clients:
            return
        v = signals.values[~np.isnan(signals.values)]
        if v.size:
            per = self.values[batch.model][name]
            per[batch.client] = max(per.get(batch.client, -np.inf), float(v.max()))


@dataclass
class _LinkedWindows:
    """Pipeline observer: each recorded client's most linked queries within one ``links`` window,
    as a share of the whole window, per model (what ``calibration_ceiling`` is compared with).

    ``links``' own value divides by the queries in the window, at least ``min_events``: three
    chance links among an honest client's first 50 queries make it 0.06. A split's members
    make far more. So the ceiling counts linked queries against a full window: more than
    ``calibration_ceiling x window`` (10 of 200 at the defaults) among consecutive queries.
    The value after each judged query gives that count: the value times the queries then in
    the window (at least ``min_events``).
    """

    clients: set[str]
    window: int
    min_events: int
    shares: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    _judged: dict[tuple[str, str], int] = field(default_factory=dict, init=False)  # judged queries so far, per (model, client)

    def __call__(self, batch: Batch, name: str, signals: Signals) -> None:
        if name != "links" or batch.client not in self.clients:
            return
        v = signals.values[~np.isnan(signals.values)]
        if v.size == 0:
            return
        key = (batch.model, batch.client)
        before = self._judged.get(key, 0)
        self._judged[key] = before + v.size
        in_window = np.minimum(before + np.arange(1, v.size + 1), self.window)
        linked = np.rint(v * np.maximum(in_window, self.min_events))
        per = self.shares[batch.model]
        per[batch.client] = max(per.get(batch.client, 0.0), float(linked.max()) / self.window)


def _fan_out(observers: list[Callable[[Batch, str, Signals], None]]) -> Callable[[Batch, str, Signals], None]:
    """One pipeline observer that calls each of ``observers`` in turn."""

    def observe(batch: Batch, name: str, signals: Signals) -> None:
        for o in observers:
            o(batch, name, signals)

    return observe


@dataclass
class Promise:
    """What a profile promises for a model: the false-alarm rate, and how it was derived."""

    clients: int  # calibration clients (or pseudo-clients) the thresholds rest on
    fpr: float  # the promised per-client false-alarm rate: distribution-free (conformal), for clients like these
    upper: float  # the rate this one calibration sample keeps with probability UPPER_CONFIDENCE (fpr is an average over samples)
    expected: float  # what the tail model expects: usually lower, and true only if the tails are exponential
    scale: float  # the factor every verdict threshold was raised by to keep ``fpr`` (1: none needed)
    how: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "clients": self.clients, "fpr": round(self.fpr, 6), "upper": round(self.upper, 6), "upper_confidence": UPPER_CONFIDENCE,
            "expected": round(self.expected, 6), "scale": round(self.scale, 6), "how": self.how,
        }


def sessions(events: list[Event], rng: np.random.Generator) -> tuple[list[Event], bool]:
    """The events relabelled by calibration client (see the module docstring, step 1), and
    whether they had a client structure (False: pseudo-clients cut from structure-free events)."""
    by_client: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(events):
        by_client[e.client].append(i)
    structured = len(by_client) >= MIN_CLIENTS
    low, high = (100, 1000) if structured else (50, 500)
    label = [e.client for e in events]
    for client, idx in by_client.items():
        if structured and len(idx) <= MAX_SESSION:
            continue
        start, part = 0, 0
        while start < len(idx):
            size = int(np.exp(rng.uniform(math.log(low), math.log(high))))
            for i in idx[start : start + size]:
                label[i] = f"{client}#{part}"
            start += size
            part += 1
    out = [e if label[i] == e.client else replace(e, client=label[i], cache={}) for i, e in enumerate(events)]
    return out, structured


def fold_of(client: str) -> int:
    """A client's fold (0 or 1), from a hash of its id: stable, and independent of the order of events."""
    return hashlib.blake2b(client.encode(), digest_size=8).digest()[0] & 1


def _fit_model(settings: Settings, model: str, events: list[Event], rng: np.random.Generator) -> ModelProfile:
    """A model's reference statistics from ``events`` (and the feature scaling learned with them)."""
    specs = enabled_detectors(settings)
    first = events[0]
    limit = settings.calibration.max_reference_samples
    pick = events if len(events) <= limit else [events[i] for i in np.sort(rng.choice(len(events), limit, replace=False))]
    vectors = np.stack([e.vector for e in pick]) if first.vector is not None else None
    probs = Batch("", model, pick).probs
    scaling = Scaling.fit(vectors) if vectors is not None else None
    mcfg = settings.models.get(model)
    dim = vectors.shape[1] if vectors is not None else None
    k = probs.shape[1] if probs is not None else (mcfg.num_classes if mcfg else None)
    context = ModelContext(model, first.modality, dim, k, scaling, tuple(specs))
    reference = Reference(winsorize(vectors, Scaling.TRIM) if vectors is not None else None, probs, scaling, unclipped=vectors)
    references: dict[str, dict[str, np.ndarray]] = {}
    for name, (cls, params) in specs.items():
        fitted = cls(params, context).fit(reference)
        if fitted:
            references[name] = fitted
    return ModelProfile(
        modality=first.modality,
        input_dim=dim,
        num_classes=k,
        scaling=scaling.state() if scaling is not None else None,
        references=references,
        params={name: params_digest(params, cls.threshold_param) for name, (cls, params) in specs.items()},
        clients=len({e.client for e in events}),
        events=len(events),
    )


def _profile(settings: Settings, events: list[Event], rng: np.random.Generator, target_fpr: float) -> Profile:
    by_model: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        by_model[e.model].append(e)
    return Profile(target_fpr=target_fpr, models={m: _fit_model(settings, m, evs, rng) for m, evs in by_model.items()})


def calibrate(settings: Settings, paths: list[str], progress_stream: TextIO = sys.stderr, progress: bool | None = None) -> tuple[Profile, dict[str, Any]]:
    """Learn a profile from benign logs; return it with a summary for the operator."""
    cal = settings.calibration
    rng = np.random.default_rng(cal.seed)
    files = existing_files(paths)
    bar = Progress(progress_stream, progress)
    rejected: Counter[str] = Counter()
    raw = read_events(files, Pipeline(settings, event_time=True), settings.files.max_line_bytes, bar, rejected)
    if not raw:
        raise ValueError("the calibration logs hold no valid events")
    events, structured = sessions(raw, rng)
    specs = enabled_detectors(settings)

    # Step 2: out-of-fold lifetime maxima.
    maxima: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    group_maxima: dict[str, list[tuple[float, tuple[str, ...]]]] = defaultdict(list)  # groups' maximum scores, standing ones' members
    linked_shares: dict[str, dict[str, float]] = defaultdict(dict)  # links' calibration_ceiling is compared with these
    for fold in (0, 1):
        fitted_on = [e for e in events if fold_of(e.client) != fold]
        measured = {e.client for e in events if fold_of(e.client) == fold}
        if not fitted_on or not measured:
            continue
        rec = _Maxima(measured)
        observers: list[Callable[[Batch, str, Signals], None]] = [rec]
        if "links" in specs:
            observers.append(_LinkedWindows(measured, specs["links"][1].window, specs["links"][1].min_events, linked_shares))
        pipe = Pipeline(settings, event_time=True, profile=_profile(settings, fitted_on, rng, cal.target_fpr), observer=_fan_out(observers))
        run_blocks(pipe, events, bar, f"calibrating (fold {fold + 1} of 2)")
        if fold == 0:  # groups that formed by chance among benign clients: each fold replays every event, so count one
            for model, mg in pipe.groups.by_model.items():
                group_maxima[model] += mg.all_maxima()
        for model, per in rec.values.items():
            for name, clients in per.items():
                maxima[model][name].update(clients)
    bar.close()

    # Attacks inside the calibration log (links' calibration_ceiling) are left out of everything learned from here on.
    left_out = {model: found for model, per in maxima.items() if (found := _attacks_inside(specs, per, linked_shares.get(model, {})))}
    attackers = {(model, c) for model, found in left_out.items() if found["left_out"] for c in found["clients"]}
    if attackers:
        events = [e for e in events if (e.model, e.client) not in attackers]
    profile = _profile(settings, events, rng, cal.target_fpr)
    defaults_kept: dict[str, list[str]] = {}
    for model, mp in profile.models.items():
        per = maxima.get(model, {})
        clients = sorted({c for name in per for c in per[name] if (model, c) not in attackers})
        mp.clients = len(clients)
        mp.events = sum(1 for e in events if e.model == model)
        kept = [n for n in SESSION_FREE if n in specs] if not structured else []
        defaults_kept[model] = kept
        thresholds, promise = _thresholds(specs, per, clients, kept, cal.target_fpr)
        mp.thresholds.update(thresholds)
        mp.promise = promise.as_dict()
        inside = left_out.get(model, {})
        mp.groups = _group_calibration(specs, group_maxima.get(model, []), cal.target_fpr, inside.get("left_out", True), set(inside.get("clients", [])))
    return profile, _summary(profile, raw, rejected, cal.target_fpr, structured, defaults_kept, left_out)


def _thresholds(specs: dict[str, Any], per: dict[str, dict[str, float]], clients: list[str], kept: list[str], alpha: float) -> tuple[dict[str, float], Promise]:
    """Every detector's threshold (module docstring, steps 3 to 5), and the promise."""
    verdict = [name for name, (cls, _) in specs.items() if cls.threshold_param and cls.verdict and name not in kept]
    n = len(clients)
    expected = max(alpha, 1.0 / (EXTRAPOLATION * (n + 1)))  # what n clients support under the tail model
    share = expected / max(len(verdict), 1)  # each verdict detector's part of it (a union bound)
    out: dict[str, float] = {}
    hows: set[str] = set()
    for name, (cls, params) in specs.items():
        if not cls.threshold_param or name in kept:
            continue
        default = float(getattr(params, cls.threshold_param))
        floor = min(float(getattr(params, "min_threshold", default)), default)
        judged = np.array([v for c in clients if (v := per.get(name, {}).get(c)) is not None], dtype=np.float64)
        if judged.size == 0:  # no client was judged (too little data to fit its reference): the default stands
            continue
        if name in verdict:
            tau, how = tail_threshold(judged, share)
            if judged.max() <= default:  # no benign client reached the conservative default: no reason to go past it
                tau = min(tau, default)
            out[name] = max(floor, tau)
            hows.add(how)
        else:  # exported and alerted on, not part of the verdict: its own rate, never below its default
            out[name] = max(default, _own_threshold(judged, alpha))
    inputs = {name: out.get(name, float(getattr(specs[name][1], specs[name][0].threshold_param))) for name in verdict}
    scale, promised, upper = conformal_scale(per, clients, inputs, alpha)
    for name in verdict:
        if name in out:
            out[name] *= scale
    how = (
        f"distribution-free for clients like the {n} calibration clients: no more than {promised:.2%} of them would be "
        f"flagged at any point of their history (conformal: the verdict's thresholds were raised {scale:.3g}-fold so "
        f"that at most a {promised:.2%} quantile of the clients' largest threshold ratio passes them); that is an average over "
        f"calibration samples, and this sample keeps {upper:.2%} with {UPPER_CONFIDENCE:.0%} confidence. The tail model "
        f"expects {expected:.2%}: each of the {len(verdict)} detectors of the verdict gets {share:.3%} of it "
        f"(a union bound); " + "; ".join(sorted(hows))
    )
    return out, Promise(n, promised, upper, expected, scale, how)


def conformal_scale(per: dict[str, dict[str, float]], clients: list[str], thresholds: dict[str, float], alpha: float) -> tuple[float, float, float]:
    """The factor the verdict's thresholds must be raised by, the rate then promised, and its per-sample bound.

    A client's statistic is its largest ratio ``value / threshold`` over the verdict's
    detectors (the verdict flags it exactly when that reaches 1). Among ``n`` exchangeable
    clients, a new one exceeds the ``k``-th smallest statistic with probability at most
    ``1 - k / (n + 1)`` (split conformal), so ``k = ceil((n + 1)(1 - alpha))`` keeps
    ``alpha`` when ``k <= n``; with fewer clients, the largest statistic keeps
    ``1 / (n + 1)``, and no smaller rate can be promised without a model of the tail.
    Scaling every threshold up to that statistic never lowers one.

    The promise is an average over calibration samples. For this one sample, the share
    of new clients above the ``k``-th statistic is Beta(n - k + 1, k) distributed, whose
    ``UPPER_CONFIDENCE`` quantile is the one-sided Clopper-Pearson bound for ``n - k``
    of ``n``: the third figure returned.
    """
    n = len(clients)
    if n == 0 or not thresholds:
        return 1.0, 1.0, 1.0
    def ratio(value: float, threshold: float) -> float:
        return value / threshold if threshold > 0 else (math.inf if value > 0 else 0.0)

    z = np.array([max((ratio(per.get(name, {}).get(c, 0.0), t) for name, t in thresholds.items()), default=0.0) for c in clients])
    k = math.ceil((n + 1) * (1.0 - alpha))
    promised = alpha if k <= n else 1.0 / (n + 1)
    k = min(k, n)
    level = float(np.sort(z)[k - 1])
    upper = upper_bound(n - k, n, UPPER_CONFIDENCE)
    return (float(np.nextafter(level, np.inf)) if level >= 1.0 else 1.0), promised, upper


def _attacks_inside(specs: dict[str, Any], per: dict[str, dict[str, float]], shares: dict[str, float]) -> dict[str, Any]:
    """The calibration clients of a model that linked more than ``calibration_ceiling`` of one
    ``links`` window's queries (``shares``, from :class:`_LinkedWindows`; empty: none, or
    ``links`` off).

    Honest clients continue other clients' explorations only by chance, far below the
    ceiling; a client over it is part of an attack split over several keys inside the
    calibration log. Learned as benign, it would set ``links``' threshold and the group
    threshold just above the split's own values, and the next split like it would form a
    group that is never flagged. So such clients are left out of every reference and
    threshold, unless they are more than half of the clients (then the log is not benign
    traffic at all, or the ceiling is too low for it: they are kept, and named all the same).
    """
    if "links" not in specs:
        return {}
    ceiling = float(specs["links"][1].calibration_ceiling)
    over = {c: v for c, v in shares.items() if v > ceiling}
    if not over:
        return {}
    everyone = {c for name in per for c in per[name]}
    return {
        "clients": sorted(over),
        "count": len(over),
        "largest": round(max(over.values()), 6),
        "ceiling": ceiling,
        "left_out": 2 * len(over) <= len(everyone),
    }


def _group_calibration(
    specs: dict[str, Any], groups: list[tuple[float, tuple[str, ...]]], alpha: float, leave_out: bool = True, attackers: set[str] | None = None
) -> dict[str, Any]:
    """The group threshold of a model (exporter.groups) from the groups that formed among benign clients, and what it rests on.

    Groups (maximum score, standing members) scored over ``links``' ``calibration_ceiling``,
    or standing with a client over it (``attackers``: a split's weaker members link less than
    its strongest, and its group's score can stay under the ceiling), are attacks inside the
    calibration log, not chance: they are left out, unless ``leave_out`` is false (those
    clients were kept, being most of them: :func:`_attacks_inside`)."""
    if "links" not in specs:
        return {}
    params = specs["links"][1]
    attackers = attackers or set()
    maxima = [m for m, _ in groups]
    chance = [m for m, members in groups if not leave_out or (m <= params.calibration_ceiling and attackers.isdisjoint(members))]
    tau, how = group_threshold(chance, float(params.group_threshold), alpha)
    out: dict[str, Any] = {"threshold": tau, "benign_groups": len(chance), "max_benign_score": max(chance, default=0.0)}
    if len(chance) < len(maxima):
        how += (f"; {len(maxima) - len(chance)} group(s) scored over links' calibration_ceiling, or standing with a client over it, "
                f"were left out as attacks (largest score {max(maxima):.4f})")
        out["left_out_groups"] = len(maxima) - len(chance)
    out["how"] = how + " (groups of both folds' replays)"
    return out


def tail_threshold(maxima: np.ndarray, alpha: float) -> tuple[float, str]:
    """The value a share ``alpha`` of clients like these would reach, from their lifetime maxima; and how it was found.

    With enough clients (``n >= 2 / alpha``) it is read from the order statistics; below
    that, an exponential tail is fitted to the largest maxima (module docstring, step 4)
    and extrapolated. A value above 1 means the detector cannot tell these clients from
    attackers: it never flags for this model.
    """
    n = maxima.size
    if n == 0:
        return 1.0, "no client was judged: the default stands"
    x = np.sort(maxima)
    if n >= 2.0 / alpha:
        k = int(np.floor(alpha * n))
        return float(np.nextafter(x[n - k - 1], np.inf)), "order statistics"
    m = min(max(TAIL_MIN, math.ceil(math.sqrt(n))), n)
    u = float(x[n - m - 1]) if n > m else 0.0
    sigma = float((x[n - m :] - u).mean()) * sigma_bound(m, TAIL_CONFIDENCE)
    how = (
        f"an exponential tail fitted to the largest {m} of the {n} clients' maxima, "
        f"its scale at a {TAIL_CONFIDENCE:.0%} upper confidence bound"
    )
    return u + sigma * math.log((m / n) / alpha), how


def sigma_bound(m: int, confidence: float) -> float:
    """The factor that turns the mean of ``m`` exponential excesses into an upper confidence
    bound on their scale: ``2m / chi2_{2m}(1 - confidence)`` (Wilson-Hilferty for the quantile)."""
    dof = 2 * m
    z = NormalDist().inv_cdf(1.0 - confidence)
    low = dof * (1.0 - 2.0 / (9.0 * dof) + z * math.sqrt(2.0 / (9.0 * dof))) ** 3
    return dof / max(low, 1e-9)


def _own_threshold(maxima: np.ndarray, alpha: float) -> float:
    """The smallest threshold that at most ``alpha`` of these clients reach (flag: value >= threshold)."""
    desc = np.sort(maxima)[::-1]
    k = int(np.floor(alpha * desc.size))
    return float(np.nextafter(desc[k], np.inf)) if desc.size else 1.0


def _summary(
    profile: Profile, events: list[Event], rejected: Counter[str], target_fpr: float, structured: bool, kept: dict[str, list[str]],
    left_out: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    out: dict[str, Any] = {"events": {"accepted": len(events), "rejected": dict(rejected)}, "target_fpr": target_fpr, "models": {}}
    for model, mp in profile.models.items():
        entry: dict[str, Any] = {
            "clients": mp.clients,
            "events": mp.events,
            "input_dim": mp.input_dim,
            "num_classes": mp.num_classes,
            "thresholds": {k: round(v, 6) for k, v in mp.thresholds.items()},
            "references": sorted(mp.references),
            "promise": mp.promise,
        }
        if mp.groups:
            entry["groups"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in mp.groups.items()}
        found = left_out.get(model)
        if found:
            entry["attacks_inside"] = found
            shown = ", ".join(found["clients"][:MAX_NAMED]) + (", ..." if found["count"] > MAX_NAMED else "")
            log.warning(
                "model %s: %d calibration client(s) continued other clients' explorations (up to %.3g of a links window's "
                "queries linked, above its calibration_ceiling %.3g), which honest clients do not do by chance: the calibration log seems "
                "to hold an attack split over several keys. %s Check them and calibrate again on logs without them: %s", model,
                found["count"], found["largest"], found["ceiling"],
                "They were left out of every reference and threshold." if found["left_out"]
                else "They are more than half of the clients, so they were kept.", shown,
            )
        if not structured:
            entry["sessions"] = "no client structure (fewer than %d client ids): the events were cut into pseudo-clients of 50 to 500 events" % MIN_CLIENTS
        if kept.get(model):
            entry["defaults_kept"] = {name: "needs real client sessions (timing, resubmits): its documented default is kept" for name in kept[model]}
        promise = mp.promise or {}
        if promise.get("fpr", 1.0) > target_fpr:
            log.warning("model %s: the profile cannot promise %.1f%% false alarms: %s", model, 100 * target_fpr, promise.get("how"))
        out["models"][model] = entry
    return out
