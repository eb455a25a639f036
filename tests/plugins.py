"""Test-only detectors loaded through the ``plugins`` config key."""

from __future__ import annotations

import json

import numpy as np

from exporter.config import Settings
from exporter.detectors import Batch, ClientMetric, Detector, DetectorParams, Signals, State


class FlagClientsNamedBad(Detector):
    """Flags clients whose id starts with 'bad'; counts events in its state."""

    name = "always"

    def init_state(self) -> State:
        return {"n": np.zeros((), dtype=np.int64)}

    def update(self, state: State, batch: Batch) -> Signals:
        state["n"][...] = int(state["n"]) + len(batch)
        bad = batch.client.startswith("bad")
        return Signals.constant(len(batch), 1.0 if bad else 0.1, bad)


class Broken(Detector):
    """Fails on every batch of clients named 'crash*', and returns an out-of-range score for 'weird*'."""

    name = "broken"

    def init_state(self) -> State:
        return {}

    def update(self, state: State, batch: Batch) -> Signals:
        if batch.client.startswith("crash"):
            raise RuntimeError("boom")
        if batch.client.startswith("weird"):
            return Signals.constant(len(batch), 1.5, True)
        return Signals.constant(len(batch), 0.0, False)


class Stats(Detector):
    """Exports per-client statistics: its event count, a ratio (NaN for clients 'quiet*'); fails for 'statfail*'."""

    name = "stats"
    client_metrics = (
        ClientMetric("monitaur_client_test_events", "counter", "Events the test detector saw."),
        ClientMetric("monitaur_client_test_ratio", "gauge", "A test ratio."),
    )

    def init_state(self) -> State:
        return {"n": np.zeros((), dtype=np.int64), "quiet": np.zeros((), dtype=np.bool_), "fail": np.zeros((), dtype=np.bool_)}

    def update(self, state: State, batch: Batch) -> Signals:
        state["n"][...] = int(state["n"]) + len(batch)
        state["quiet"][...] = batch.client.startswith("quiet")
        state["fail"][...] = batch.client.startswith("statfail")
        return Signals.constant(len(batch), 0.0, False)

    def client_values(self, state: State) -> dict[str, float]:
        if bool(state["fail"]):
            raise RuntimeError("boom")
        return {"monitaur_client_test_events": float(state["n"]), "monitaur_client_test_ratio": float("nan") if bool(state["quiet"]) else 0.25}


class HalfApplied(Detector):
    """Changes its state, then fails: for clients with 'half' in their id from their second
    batch on, for 'halffirst' on every batch, and with an out-of-range score for 'halfweird'.

    Its state changes every way a detector can: in place, by replacing an array, by adding a key.
    """

    name = "half"

    def init_state(self) -> State:
        return {"n": np.zeros((), dtype=np.int64), "seen": np.zeros(4, dtype=np.int64)}

    def update(self, state: State, batch: Batch) -> Signals:
        first = int(state["n"]) == 0
        state["n"][...] = int(state["n"]) + len(batch)
        state["seen"] += 1
        state["replaced"] = np.ones(3)
        state["seen"] = state["seen"] * 2
        if "halffirst" in batch.client or ("half" in batch.client and not first and "halfweird" not in batch.client):
            raise RuntimeError("failed halfway")
        if "halfweird" in batch.client:
            return Signals.constant(len(batch), 1.5, True)
        return Signals.constant(len(batch), 0.2, False)


class MarkedParams(DetectorParams):
    threshold: float = 0.4
    latch: bool = False


class Marked(Detector):
    """Scores 0.8 an event whose first feature is 16 (a marker), else 0.1; flags at ``threshold``.

    With ``latch``, a client stays flagged by it after its first marked event, as a latching
    detector (prada's alarm) does: only a restart of its state clears it.
    """

    name = "marked"
    Params = MarkedParams
    threshold_param = "threshold"

    def init_state(self) -> State:
        return {"seen": np.zeros((), dtype=np.bool_)}

    def update(self, state: State, batch: Batch) -> Signals:
        marked = np.array([e.vector is not None and e.vector[0] >= 16 for e in batch.events])
        seen = np.logical_or.accumulate(marked) | bool(state["seen"]) if self.params.latch else marked
        state["seen"][...] = bool(seen[-1]) if self.params.latch else False
        values = np.where(seen, 0.8, 0.1)
        return Signals(values, values >= self.params.threshold)


def marked_event(client: str, marked: bool) -> str:
    """One JSON line of model digits that :class:`Marked` flags (``marked``) or not."""
    x = [16.0 if marked else 0.0] + [1.0] * 63
    return json.dumps({"client": client, "model": "digits", "input": x, "output": [0.5, 0.5]})


def marked_settings(latch: bool = False, **kw: object) -> Settings:
    """Settings whose verdict has one input, :class:`Marked`: each test decides exactly when a client is flagged."""
    return Settings(plugins={"marked": "tests.plugins:Marked"}, detectors={"marked": {"latch": latch}}, fusion={"inputs": ["marked"]}, **kw)
