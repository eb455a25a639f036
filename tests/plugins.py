"""Test-only detectors loaded through the ``plugins`` config key."""

from __future__ import annotations

import numpy as np

from exporter.detectors import Detector, DetectorParams, Signal, State
from exporter.events import Event


class FlagClientsNamedBad(Detector):
    """Flags clients whose id starts with 'bad'; counts events in its state."""

    name = "always"

    def init_state(self) -> State:
        return {"n": np.zeros((), dtype=np.int64)}

    def update(self, state: State, event: Event) -> Signal:
        state["n"][...] = int(state["n"]) + 1
        bad = event.client.startswith("bad")
        return Signal(1.0 if bad else 0.1, bad)


class Broken(Detector):
    """Fails on every event of clients named 'crash*', and returns an out-of-range score for 'weird*'."""

    name = "broken"

    def init_state(self) -> State:
        return {}

    def update(self, state: State, event: Event) -> Signal:
        if event.client.startswith("crash"):
            raise RuntimeError("boom")
        if event.client.startswith("weird"):
            return Signal(1.5, True)
        return Signal(0.0, False)


class Params(DetectorParams):
    pass
