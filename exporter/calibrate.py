"""``monitaur-exporter calibrate``: learn a profile from benign traffic.

The benign clients are split in three groups (by a hash of their ids), one per pass, so
that each pass is measured on clients the previous ones did not learn from. Each pass
runs the same pipeline ``replay`` uses:

1. per model, freeze the feature standardization and let every detector ``fit`` its
   reference statistics on (a sample of) the first group's inputs;
2. replay all the benign traffic with those references and record the second group's
   values of every detector: each threshold becomes the value that at most
   ``target_fpr`` of these clients ever reach (never below the detector's default), and
   the pooled values become the null samples of the ``risk`` fusion;
3. replay all of it again with the fusion calibrated, and set its threshold the same
   way on the third group's values.

Passes 2 and 3 replay every group, not just the one they measure, because some state is
shared across clients: a query matches earlier queries of *any* client in the
``fingerprint`` index, so a benign client's match rate grows with the traffic around
it. Replaying a third of the population would understate it, and the threshold with it.

Thresholds are per client, not per event: a benign client is "falsely alarmed" if
it is flagged at any point of its history, which is what an operator experiences.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from exporter.config import Settings
from exporter.detectors import Batch, ModelContext, Signals
from exporter.detectors.base import Reference
from exporter.detectors.kit import Scaling
from exporter.events import Event
from exporter.fusion import FUSION, NULL_PREFIX
from exporter.pipeline import Pipeline
from exporter.profile import ModelProfile, Profile, params_digest
from exporter.replay import Progress, existing_files, read_events, run_blocks

log = logging.getLogger("monitaur.calibrate")
MIN_CLIENTS_PER_FPR = 5  # fewer than 5/target_fpr clients makes the quantile a guess


@dataclass
class _Recorder:
    """Pipeline observer: per (model, detector), each client's largest value and a pool of values.

    Only the ``clients`` given are recorded: the pipeline runs on all the benign traffic,
    so that state shared across clients (the fingerprint index, coverage counts) is as
    full as the whole calibration population makes it, while the figures come from
    clients that no earlier step learned from.
    """

    clients: set[str]
    maxima: dict[tuple[str, str], dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    pools: dict[tuple[str, str], list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))

    def __call__(self, batch: Batch, name: str, signals: Signals) -> None:
        if batch.client not in self.clients:
            return
        v = signals.values[~np.isnan(signals.values)]
        if v.size == 0:
            return
        key = (batch.model, name)
        per = self.maxima[key]
        per[batch.client] = max(per.get(batch.client, -np.inf), float(v.max()))
        self.pools[key].append(v)


def threshold_for(maxima: list[float], target_fpr: float) -> float:
    """The smallest threshold that at most ``target_fpr`` of these clients reach (flag: value >= threshold)."""
    desc = np.sort(np.asarray(maxima, dtype=np.float64))[::-1]
    k = int(np.floor(target_fpr * desc.size))
    return float(np.nextafter(desc[k], np.inf)) if desc.size else 1.0


def split_by_client(events: list[Event], parts: int = 2) -> list[list[Event]]:
    """Split benign traffic into ``parts`` disjoint groups of clients.

    Each calibration step must be measured on clients the previous steps did not learn
    from: a threshold measured on the very clients a reference (or a null sample) came
    from is optimistic, and fresh clients are then flagged more often than the target.
    A client's group comes from a hash of its id, so the split is stable. With fewer
    clients than groups (training data written as events), events are dealt round-robin.
    """
    clients = sorted({e.client for e in events})
    if len(clients) < parts:
        return [events[i::parts] for i in range(parts)]
    group = {c: hashlib.blake2b(c.encode(), digest_size=8).digest()[0] % parts for c in clients}
    if len(set(group.values())) < parts:  # a degenerate hash split of very few clients
        group = {c: i % parts for i, c in enumerate(clients)}
    out: list[list[Event]] = [[] for _ in range(parts)]
    for e in events:
        out[group[e.client]].append(e)
    return out


def _sample(chunks: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    values = np.concatenate(chunks) if chunks else np.empty(0)
    if values.size > n:
        values = rng.choice(values, size=n, replace=False)
    return np.sort(values).astype(np.float32)


def _fit_model(settings: Settings, model: str, events: list[Event], rng: np.random.Generator) -> ModelProfile:
    """Pass 1 for one model: frozen standardization and each detector's reference statistics."""
    specs = settings.detector_params()
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
    reference = Reference(vectors, probs, scaling)
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


def calibrate(settings: Settings, paths: list[str], progress_stream: TextIO = sys.stderr, progress: bool | None = None) -> tuple[Profile, dict[str, Any]]:
    """Learn a profile from benign logs; return it with a summary for the operator."""
    cal = settings.calibration
    rng = np.random.default_rng(cal.seed)
    files = existing_files(paths)
    bar = Progress(progress_stream, progress)
    rejected: Counter[str] = Counter()
    events = read_events(files, Pipeline(settings, event_time=True), settings.files.max_line_bytes, bar, rejected)
    if not events:
        raise ValueError("the calibration logs hold no valid events")
    fit_events, detector_events, risk_events = split_by_client(events, 3)
    by_model: dict[str, list[Event]] = defaultdict(list)
    for e in fit_events:
        by_model[e.model].append(e)
    profile = Profile(target_fpr=cal.target_fpr, models={m: _fit_model(settings, m, evs, rng) for m, evs in by_model.items()})
    for name, mp in profile.models.items():  # the final threshold rests on the last third
        mp.clients = len({e.client for e in risk_events if e.model == name})
        mp.events = sum(1 for e in risk_events if e.model == name)
    specs = settings.detector_params()

    # Pass 2: thresholds and the fusion's null samples.
    rec = _Recorder({e.client for e in detector_events})
    run_blocks(Pipeline(settings, event_time=True, profile=profile, observer=rec), events, bar, "calibrating detectors")
    for model, mp in profile.models.items():
        for name, (cls, params) in specs.items():
            maxima = list(rec.maxima.get((model, name), {}).values())
            if cls.threshold_param and maxima:
                # Calibration only raises a threshold: where benign traffic never moves a
                # detector, its documented default still decides what counts as evidence.
                default = float(getattr(params, cls.threshold_param))
                mp.thresholds[name] = max(threshold_for(maxima, cal.target_fpr), default)
        mp.fusion = {NULL_PREFIX + n: _sample(rec.pools[(model, n)], cal.null_samples, rng) for n in specs if rec.pools.get((model, n))}

    # Pass 3: the fused verdict's threshold, then what the final profile flags.
    rec = _Recorder({e.client for e in risk_events})
    run_blocks(Pipeline(settings, event_time=True, profile=profile, observer=rec), events, bar, "calibrating the verdict")
    floor = settings.fusion.min_threshold
    for model, mp in profile.models.items():
        maxima = list(rec.maxima.get((model, FUSION), {}).values())
        mp.thresholds[FUSION] = max(threshold_for(maxima, cal.target_fpr), floor) if maxima else floor
    bar.close()
    summary = _summary(profile, events, rejected, cal.target_fpr)
    return profile, summary


def _summary(profile: Profile, events: list[Event], rejected: Counter[str], target_fpr: float) -> dict[str, Any]:
    out: dict[str, Any] = {"events": {"accepted": len(events), "rejected": dict(rejected)}, "target_fpr": target_fpr, "models": {}}
    for model, mp in profile.models.items():
        note = None
        if mp.clients < MIN_CLIENTS_PER_FPR / target_fpr:
            note = (
                f"only {mp.clients} benign clients: a {target_fpr:.1%} false-alarm threshold is estimated from very few of them; "
                f"{int(MIN_CLIENTS_PER_FPR / target_fpr)} or more give a stable one"
            )
            log.warning("model %s: %s", model, note)
        out["models"][model] = {
            "clients": mp.clients,
            "events": mp.events,
            "input_dim": mp.input_dim,
            "num_classes": mp.num_classes,
            "thresholds": {k: round(v, 6) for k, v in mp.thresholds.items()},
            "references": sorted(mp.references),
            **({"warning": note} if note else {}),
        }
    return out
