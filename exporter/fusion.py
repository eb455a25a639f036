"""The verdict: one per-client risk fused from every detector's signal, after the detectors.

Each detector watches one signal, and each attack shows up in only some of them; an
operator wants one verdict to alert on. Fusion is the stage after the detectors: it
reads their signals for a client's batch (it is not a detector, and no detector reads
it) and keeps a small per-client state of its own.

With a calibration profile, each detector's current value becomes a p-value against the
values benign clients produced, and the p-values are combined two ways: Fisher's method
(many detectors mildly unusual) and Tippett's minimum (one detector extremely unusual).
Beyond the top 1% of the benign values, p follows an exponential tail fitted to them, so
a value far beyond anything benign is not capped at p = 1/(n+1). The smaller combined p
wins, and

    risk = min(1, -log10(p) / 10)

so 0.5 means "as unusual as one benign event in 100,000" and 1 means p <= 1e-10. The
threshold is calibrated on benign clients for the target per-client false-alarm rate.

Without a profile (or for an input the profile did not calibrate), fusion falls back to
the documented uncalibrated rule: risk is the largest input value, flagged while any
input detector flags.

Per event: O(k) for k inputs plus a binary search per input in its benign null sample.
Per-client state: 9·k bytes (last value and flag per input).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from exporter.config import FusionConfig
from exporter.detectors.base import Signals, State

FUSION = "fusion"  # the stage's name in observers, snapshots and profiles
NULL_PREFIX = "null."
TAIL = 0.01  # share of the benign null whose excesses fit the extrapolated tail
MIN_EXCESS = 0.01  # floor of the tail's mean excess (a null whose top values are all equal)


class Fusion:
    """Fuses the detectors' values into one per-client risk and verdict (for one model)."""

    def __init__(self, params: FusionConfig, detectors: list[str]) -> None:
        self.params = params
        self.threshold = params.threshold
        self.inputs: list[str] = [d for d in (params.inputs or detectors) if d in detectors]
        self._nulls: list[np.ndarray | None] = [None] * len(self.inputs)
        self._tails: list[tuple[float, float]] = [(1.0, 1.0)] * len(self.inputs)  # (tail start, mean excess)
        self._lgamma = np.array([math.lgamma(i + 1) for i in range(len(self.inputs) + 1)])

    @property
    def calibrated(self) -> bool:
        return any(n is not None for n in self._nulls)

    def state_version(self) -> str:
        """A digest of what shapes the state: one slot per input, in order."""
        return hashlib.sha256(("fusion:1:" + ",".join(self.inputs)).encode()).hexdigest()[:16]

    def init_state(self) -> State:
        k = len(self.inputs)
        return {"last": np.full(k, np.nan), "flags": np.zeros(k, dtype=bool)}

    def load_reference(self, reference: State, threshold: float | None) -> None:
        """Use the benign null samples (and threshold) of a calibration profile."""
        for i, name in enumerate(self.inputs):
            null = reference.get(NULL_PREFIX + name)
            if null is not None and null.size:
                null = np.sort(np.asarray(null, dtype=np.float64))
                self._nulls[i] = null
                start = float(np.quantile(null, 1.0 - TAIL))
                excess = null[null > start] - start
                self._tails[i] = (start, max(float(excess.mean()) if excess.size else 0.0, MIN_EXCESS))
        if threshold is not None:
            self.threshold = threshold

    def update(self, state: State, signals: dict[str, Signals], n: int) -> Signals | None:
        """The client's risk and verdict after each of the batch's ``n`` events."""
        k = len(self.inputs)
        if k == 0:
            return None
        values = np.full((n + 1, k), np.nan)
        flags = np.zeros((n + 1, k), dtype=bool)
        values[0], flags[0] = state["last"], state["flags"]
        for j, name in enumerate(self.inputs):
            sig = signals.get(name)
            if sig is not None:
                values[1:, j] = sig.values
                flags[1:, j] = sig.flagged
        # Carry each input's last judged value (and its flag) forward over unjudged events.
        seen = ~np.isnan(values)
        seen[0] = True
        idx = np.maximum.accumulate(np.where(seen, np.arange(n + 1)[:, None], 0), axis=0)
        cols = np.arange(k)[None, :]
        values, flags = values[idx, cols], flags[idx, cols]
        state["last"][...] = values[-1]
        state["flags"][...] = flags[-1]
        values, flags = values[1:], flags[1:]
        if self.calibrated:
            risk = self._fuse(values)
            flagged = risk >= self.threshold
        else:
            have = ~np.isnan(values)
            risk = np.where(have.any(axis=1), np.nanmax(np.where(have, values, -np.inf), axis=1), np.nan)
            flagged = flags.any(axis=1)
        risk = np.where(np.isnan(risk), np.nan, np.clip(risk, 0.0, 1.0))
        return Signals(risk, flagged & ~np.isnan(risk))

    def _fuse(self, values: np.ndarray) -> np.ndarray:
        """Combined p-value of each row's calibrated inputs, as -log10(p)/10."""
        m = values.shape[0]
        logp = np.full(values.shape, np.nan)
        for j, null in enumerate(self._nulls):
            if null is None:
                continue
            v = values[:, j]
            ok = ~np.isnan(v)
            exceed = null.size - np.searchsorted(null, v[ok], side="left")
            empirical = np.log((1.0 + exceed) / (1.0 + null.size))
            # Beyond the benign null's top TAIL share, an exponential tail fitted to it keeps
            # p falling with the value instead of stopping at 1/(n+1).
            start, excess = self._tails[j]
            tail = np.log(TAIL) - (v[ok] - start) / excess
            logp[ok, j] = np.where(v[ok] > start, np.minimum(empirical, tail), empirical)
        n = (~np.isnan(logp)).sum(axis=1)
        out = np.full(m, np.nan)
        rows = n > 0
        if not rows.any():
            return out
        lp, nn = logp[rows], n[rows]
        # Fisher: X = -2 Σ ln p ~ χ²(2n); for even dof, sf = e^{-x/2} Σ_{i<n} (x/2)^i / i!
        half = -np.nansum(lp, axis=1)
        i = np.arange(self._lgamma.size - 1)[None, :]
        with np.errstate(divide="ignore"):
            terms = i * np.log(np.maximum(half, 1e-300))[:, None] - self._lgamma[:-1][None, :]
        terms = np.where(i < nn[:, None], terms, -np.inf)
        top = terms.max(axis=1)
        log_fisher = -half + top + np.log(np.exp(terms - top[:, None]).sum(axis=1))
        # Tippett: 1 - (1 - p_min)^n, computed stably in log space
        pmin = np.exp(np.nanmin(lp, axis=1))
        log_tippett = np.log(-np.expm1(nn * np.log1p(-np.minimum(pmin, 1 - 1e-16))))
        log_p = np.minimum(log_fisher, log_tippett)
        out[rows] = -log_p / math.log(10) / 10.0
        return out
