"""Synthetic digits-shaped traffic shared by the detector tests.

64 features in 0..16 from 10 sparse class prototypes plus noise, and the query
patterns of the attacks the detectors target: HopSkipJump-like probing (rounds of tiny
probes around a slowly moving point), SimBA (one coordinate changed per query) and
JbDA-like augmentation steps.
"""

from __future__ import annotations

import io

import numpy as np

from exporter.detectors.base import Batch, Detector, Signals, State
from exporter.detectors.kit import Scaling
from exporter.events import Event

D, K = 64, 10


class Digits:
    def __init__(self, seed: int = 0, noise: float = 3.0) -> None:
        rng = np.random.default_rng(seed)
        self.prototypes = np.clip(rng.gamma(1.2, 4.0, size=(K, D)) * (rng.random((K, D)) < 0.55), 0, 16)
        self.noise = noise

    def sample(self, rng: np.random.Generator, n: int, classes: np.ndarray | None = None) -> np.ndarray:
        c = rng.integers(0, K, n) if classes is None else np.asarray(classes)
        return np.clip(np.rint(self.prototypes[c] + rng.normal(0.0, self.noise, (n, D))), 0, 16)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """A victim's probabilities: softmax over negative distances to the prototypes."""
        d = np.sqrt(((x[:, None, :] - self.prototypes[None]) ** 2).sum(-1))
        z = np.exp(-(d - d.min(axis=1, keepdims=True)) / 6.0)
        return z / z.sum(axis=1, keepdims=True)


WORLD = Digits()


def hopskipjump(rng: np.random.Generator, n: int, sigma: float = 0.1) -> np.ndarray:
    """Gradient-estimation rounds of 10 tiny probes around a point that then takes a small step."""
    cur = (WORLD.sample(rng, 1)[0] + WORLD.sample(rng, 1)[0]) / 2
    out = []
    while len(out) < n:
        out += [cur + rng.normal(0.0, sigma, D) for _ in range(10)]
        cur = cur + rng.normal(0.0, sigma, D)
    return np.clip(np.array(out[:n]), 0, 16)


def simba(rng: np.random.Generator, n: int, eps: float = 3.2) -> np.ndarray:
    """SimBA: try +eps then -eps on one coordinate at a time; keep the change when it 'helps'."""
    x = WORLD.sample(rng, 1)[0]
    order = rng.permutation(D)
    out: list[np.ndarray] = []
    i = 0
    while len(out) < n:
        j = order[i % D]
        i += 1
        for step in (eps, -eps):
            q = x.copy()
            q[j] = np.clip(q[j] + step, 0, 16)
            out.append(q)
            if rng.random() < 0.3:
                x = q
                break
    return np.array(out[:n])


def jbda(rng: np.random.Generator, n: int, lam: float = 0.1) -> np.ndarray:
    s = np.concatenate([WORLD.sample(rng, 10, np.full(10, c)) for c in range(K)])
    s = s[rng.permutation(len(s))]
    out = [s]
    while sum(len(o) for o in out) < n:
        new = np.clip(s + lam * 16.0 * np.sign(rng.standard_normal(s.shape)), 0, 16)
        out.append(new)
        s = np.concatenate([s, new])
    return np.concatenate(out)[:n]


def judge(det: Detector, state: State, batch: Batch) -> Signals | None:
    """What the pipeline does with one batch: the cross-client stage, then the client's update."""
    det.prepare(batch)
    return det.update(state, batch)


def scaling_of(x: np.ndarray) -> Scaling:
    """The feature scaling a calibration would learn from benign vectors ``x``."""
    return Scaling.fit(x)


def run(det: Detector, events: list[Event], sizes: list[int] | int = 32, state: dict | None = None):
    """Feed ``events`` in batches (a fixed size or a list of sizes, cycled); return values, flags, state."""
    state = det.init_state() if state is None else state
    sizes = [sizes] if isinstance(sizes, int) else sizes
    values, flags = [], []
    i = b = 0
    while i < len(events):
        chunk = events[i : i + sizes[b % len(sizes)]]
        out = judge(det, state, Batch(chunk[0].client, "m", chunk))
        if out is None:
            values.append(np.full(len(chunk), np.nan))
            flags.append(np.zeros(len(chunk), dtype=bool))
        else:
            values.append(out.values)
            flags.append(out.flagged)
        i += len(chunk)
        b += 1
    return np.concatenate(values), np.concatenate(flags), state


def savez_roundtrip(state: State) -> State:
    """``state`` written with np.savez and read back without pickle, as calibration profiles and snapshots do."""
    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        return {k: npz[k].copy() for k in npz.files}
