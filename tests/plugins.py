"""Test-only detectors loaded through the ``plugins`` config key."""

from __future__ import annotations

import numpy as np

from exporter.detectors import Batch, Detector, Signals, State


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
