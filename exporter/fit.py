"""Does replayed traffic fit its calibration profile? A counted warning when it does not.

A profile describes benign traffic of one model and one data source. Replayed on other
traffic (another model version, another data source, or ``simulate`` with another
``--seed``, which changes the data split and the victim), its references make nearly
every client look like an attacker, and nothing in the report says why. Two signs are
counted, per model of the profile, over the events ``replay`` read:

* **far events**: inputs with a feature more than ``FAR_SPREADS`` spreads from the
  profile's benign centre (its frozen feature scaling). Benign traffic like the
  calibration traffic almost never has one: the scaling is a winsorized mean and spread
  of that traffic (for a normal feature, 6 spreads is a chance of 2e-9).
* **rejected dimensions**: events rejected as ``wrong_dimension``: with a profile, a
  model's input length and class count are fixed by it.

A warning is given when either is at least ``WARN_SHARE`` of the events (and there are at
least ``MIN_EVENTS``). Attack traffic can lie far outside too, so a log made mostly of
attacks also shows the sign: the message says so. Cost: one pass of numpy over the
vectors, ``CHUNK`` events at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from exporter import reasons
from exporter.events import Event
from exporter.profile import Profile

FAR_SPREADS = 6.0
WARN_SHARE = 0.25
MIN_EVENTS = 100
CHUNK = 8192


def far_counts(profile: Profile, events: Sequence[Event]) -> dict[str, tuple[int, int]]:
    """Per model of the profile with a feature scaling: (far events, events with a vector of its length)."""
    scalings = {
        name: (np.asarray(mp.scaling["center"], dtype=np.float64), np.asarray(mp.scaling["spread"], dtype=np.float64))
        for name, mp in profile.models.items()
        if mp.scaling is not None
    }
    rows: dict[str, list[np.ndarray]] = {name: [] for name in scalings}
    counts = {name: [0, 0] for name in scalings}

    def flush(name: str) -> None:
        center, spread = scalings[name]
        x = np.stack(rows[name])
        counts[name][0] += int((np.abs(x - center) > FAR_SPREADS * spread).any(axis=1).sum())
        counts[name][1] += x.shape[0]
        rows[name].clear()

    for e in events:
        if e.vector is not None and e.model in scalings and e.vector.shape[0] == scalings[e.model][0].shape[0]:
            rows[e.model].append(e.vector)
            if len(rows[e.model]) >= CHUNK:
                flush(e.model)
    for name in scalings:
        if rows[name]:
            flush(name)
    return {name: (far, n) for name, (far, n) in counts.items() if n}


def fit_warnings(profile: Profile, events: Sequence[Event], rejected: Mapping[str, int]) -> list[str]:
    """The warnings for traffic that does not fit ``profile`` (empty when it fits)."""
    out: list[str] = []
    for name, (far, n) in far_counts(profile, events).items():
        if n >= MIN_EVENTS and far >= WARN_SHARE * n:
            mp = profile.models[name]
            out.append(
                f"model {name!r}: {far:,} of {n:,} events ({far / n:.0%}) have a feature more than {FAR_SPREADS:g} spreads "
                f"from the profile's benign centre (calibrated on {mp.events:,} events of {mp.clients:,} clients). "
                "The profile does not seem to fit this traffic: calibrated on other data (another model version or data "
                "source, or another `simulate --seed`), it flags clients for that. Calibrate on benign traffic of this "
                "model, or replay without --profile. A log made mostly of attacks shows this too."
            )
    wrong = int(rejected.get(reasons.WRONG_DIMENSION, 0))
    total = len(events) + sum(int(v) for v in rejected.values())
    if total >= MIN_EVENTS and wrong >= WARN_SHARE * total:
        dims = ", ".join(f"{name!r}: {mp.input_dim} features, {mp.num_classes} classes" for name, mp in profile.models.items())
        out.append(
            f"{wrong:,} of {total:,} events ({wrong / total:.0%}) were rejected as {reasons.WRONG_DIMENSION}: the profile fixes "
            f"each model's input length and class count ({dims}). The profile is for another model, or the log's "
            "events name the wrong model."
        )
    return out
