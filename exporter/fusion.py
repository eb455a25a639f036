"""The verdict: the stage after the detectors that turns their signals into one per-client flag and risk.

Each detector watches one signal and flags a client when its value reaches its threshold
with enough evidence (``min_events`` judged queries in its window). The verdict flags a
client while any of the fusion's inputs flags it, and its risk is the strongest
detector's value relative to its threshold:

    ratio = max over inputs of value / threshold,    risk = min(1, ratio / 2)

so the risk is 0.5 exactly at a threshold, and the detector with the largest ratio is
the strongest evidence. A detector that did not judge an event (NaN) keeps its last
value and flag for it.

The thresholds are what makes this a calibrated verdict: ``monitaur-exporter
calibrate`` sets every input's threshold *jointly*, from the largest value each benign
calibration client ever reached on each detector, so that the share of benign clients
flagged at any point of their history -- whichever detector, and however many queries
they send -- stays at the target (see :mod:`exporter.calibrate`). Testing after every
query is accounted for there: a client's lifetime maximum is what is calibrated, not a
value at one moment. Without a profile, the detectors' documented defaults apply.

The verdict is judged per event; what the client is *flagged* as, until released, is
the sticky verdict built on it (:mod:`exporter.verdict`). :meth:`Fusion.judge` also
gives, for any event, the inputs over their thresholds and by how far (value /
threshold), which the sticky verdict keeps as the evidence of a flag.

Per event: O(k) for k inputs. Per-client state: 9·k bytes (last value and flag per input).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from exporter.config import FusionConfig
from exporter.detectors.base import Signals, State

FUSION = "fusion"  # the stage's name in observers, snapshots and profiles


@dataclass(frozen=True, slots=True)
class Judgement:
    """The fusion's verdict on a batch, with the evidence behind it.

    ``signals``: the risk and verdict after each event; ``ratios`` (n, k): each input's
    value over its threshold after each event (NaN before the input judged anything);
    ``flags`` (n, k): whether each input flagged there.
    """

    inputs: tuple[str, ...]
    signals: Signals
    ratios: np.ndarray
    flags: np.ndarray

    def over_threshold(self, i: int) -> dict[str, float]:
        """The inputs that flagged at event ``i``, each with its value / threshold, strongest first."""
        on = [(self.inputs[j], float(self.ratios[i, j])) for j in np.flatnonzero(self.flags[i])]
        return dict(sorted(on, key=lambda kv: np.inf if np.isnan(kv[1]) else -kv[1]))


class Fusion:
    """The verdict of one model: any input detector flagged; risk from the strongest one."""

    def __init__(self, params: FusionConfig, inputs: list[str], thresholds: dict[str, float]) -> None:
        """``inputs``: the detectors whose flags make the verdict; ``thresholds``: their
        thresholds on their values (a detector without one is taken as 1)."""
        self.params = params
        self.inputs = list(inputs)
        # 1 / threshold per input: a threshold of 0 makes any positive value infinitely strong
        self._inv = np.array([1.0 / t if (t := thresholds.get(d, 1.0)) > 0 else np.inf for d in self.inputs])

    def state_version(self) -> str:
        """A digest of what shapes the state: one slot per input, in order."""
        return hashlib.sha256(("fusion:2:" + ",".join(self.inputs)).encode()).hexdigest()[:16]

    def init_state(self) -> State:
        k = len(self.inputs)
        return {"last": np.full(k, np.nan), "flags": np.zeros(k, dtype=bool)}

    def update(self, state: State, signals: dict[str, Signals], n: int) -> Signals | None:
        """The client's risk and verdict after each of the batch's ``n`` events."""
        judged = self.judge(state, signals, n)
        return judged.signals if judged is not None else None

    def judge(self, state: State, signals: dict[str, Signals], n: int) -> Judgement | None:
        """:meth:`update`, with each input's ratio to its threshold and flag after each event."""
        values, flags = self.carried(state, signals, n)
        if values is None:
            return None
        have = ~np.isnan(values)
        ratios = values * self._inv
        strongest = np.where(have, ratios, -np.inf).max(axis=1)
        risk = np.where(have.any(axis=1), np.minimum(np.maximum(strongest, 0.0) / 2.0, 1.0), np.nan)
        return Judgement(tuple(self.inputs), Signals(risk, flags.any(axis=1) & ~np.isnan(risk)), ratios, flags)

    def carried(self, state: State, signals: dict[str, Signals], n: int) -> tuple[np.ndarray | None, np.ndarray]:
        """(n, k) each input's value and flag after each event, the last judged ones carried
        forward over events an input did not judge; the state keeps the last row."""
        k = len(self.inputs)
        if k == 0:
            return None, np.zeros((n, 0), dtype=bool)
        values = np.full((n + 1, k), np.nan)
        flags = np.zeros((n + 1, k), dtype=bool)
        values[0], flags[0] = state["last"], state["flags"]
        for j, name in enumerate(self.inputs):
            sig = signals.get(name)
            if sig is not None:
                values[1:, j] = sig.values
                flags[1:, j] = sig.flagged
        seen = ~np.isnan(values)
        seen[0] = True
        idx = np.maximum.accumulate(np.where(seen, np.arange(n + 1)[:, None], 0), axis=0)
        cols = np.arange(k)[None, :]
        values, flags = values[idx, cols], flags[idx, cols]
        state["last"][...] = values[-1]
        state["flags"][...] = flags[-1]
        return values[1:], flags[1:]
