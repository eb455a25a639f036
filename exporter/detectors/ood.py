"""Out-of-distribution queries: how far a client's recent inputs lie from benign traffic."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from pydantic import Field

from exporter.detectors.base import (
    Batch,
    Detector,
    DetectorParams,
    Reference,
    Signals,
    State,
    WindowedParams,
    min_threshold_field,
)
from exporter.detectors.kit import ring_in_order, ring_write, scatter, vector_rows

# Per-query distances are stored as float32; anything beyond this is "very far" anyway
# and must not become inf (an inf would poison the window sums).
_MAX_DISTANCE = 1e30


class OodParams(WindowedParams):
    """Parameters of :class:`OodDetector`."""

    window: int = Field(64, ge=1, le=100_000, description="How many of the client's last per-query distances are kept.")
    min_events: int = Field(20, ge=1, description="Judged queries needed in the window before the client can be flagged (<= window).")
    trim: float = Field(
        0.1,
        ge=0.0,
        lt=0.5,
        description=(
            "Share of the window's largest distances left out of the client statistic (a trimmed "
            "mean): a benign client's few odd inputs cannot flag it, while an attacker that mixes "
            "its queries 1:1 with natural ones still moves the statistic by about half of its "
            "own distance. 0 = plain mean."
        ),
    )
    scale: float = Field(
        1.0,
        gt=0.0,
        description=(
            "Where the score crosses 0.5, in units of the benign level: value = s / (s + scale * "
            "level) for the client statistic s. The benign level is the reference's trimmed mean "
            "distance (learned by fit), so a typical benign client scores about 1 / (1 + scale)."
        ),
    )
    threshold: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description=(
            "Flag when the score reaches this (with min_events judged queries). 0.9 with "
            "scale 1 means a statistic nine times the benign level (a conservative default for "
            "traffic no profile describes; calibration may lower it to min_threshold); iid benign windows stay "
            "well below it. Calibration overwrites it per model."
        ),
    )
    min_threshold: float = min_threshold_field(0.6)
    shrinkage: float = Field(
        0.05,
        ge=0.0,
        le=100.0,
        description=(
            "Covariance regularization used by fit: Sigma + shrinkage * mean(diag Sigma) * I, so "
            "constant features (blank pixels) do not make Sigma singular. Larger values trust the "
            "correlations less."
        ),
    )
    max_full_dim: int = Field(
        512,
        ge=1,
        description=(
            "fit learns a full d x d whitening matrix up to this input dimension and a diagonal "
            "one above it (a full matrix costs d*d*4 bytes per model and O(d^2) per query)."
        ),
    )


def whitening(vectors: np.ndarray, shrinkage: float, full: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mean and regularized whitening of (n, d) ``vectors``: W = (Sigma + lambda I)^-1/2.

    lambda = ``shrinkage`` * mean(diag Sigma) (or 1e-12-safe fallbacks when every feature
    is constant). ``full=False`` returns the diagonal (d,) version, 1 / sqrt(var + lambda).
    Then ``((x - mean) @ W)**2`` (full) or ``((x - mean) * W)**2`` (diagonal), summed,
    is the squared Mahalanobis distance under the regularized covariance.
    """
    x = np.asarray(vectors, dtype=np.float64)
    mean = x.mean(axis=0)
    centered = x - mean
    n = max(x.shape[0] - 1, 1)
    if not full:
        var = np.einsum("ij,ij->j", centered, centered) / n
        lam = shrinkage * float(var.mean())
        if lam <= 0.0:
            lam = 1.0 if float(var.mean()) == 0.0 else 1e-12
        return mean, (1.0 / np.sqrt(var + lam)).astype(np.float32)
    cov = centered.T @ centered / n
    diag_mean = float(np.trace(cov)) / cov.shape[0]
    lam = shrinkage * diag_mean
    if lam <= 0.0:
        lam = 1.0 if diag_mean == 0.0 else 1e-12 * diag_mean
    cov[np.diag_indices_from(cov)] += lam
    evals, evecs = np.linalg.eigh(cov)
    evals = np.maximum(evals, lam)  # the regularized spectrum is >= lam; guard rounding
    w = (evecs / np.sqrt(evals)) @ evecs.T
    return mean, w.astype(np.float32)


def trimmed_window_means(old: np.ndarray, new: np.ndarray, count: int, window: int, trim: float) -> tuple[np.ndarray, np.ndarray]:
    """For each item of ``new``: the trimmed mean of the window that ends with it, and its size.

    ``old`` holds the ring's items oldest first (``count`` ever pushed, at most ``window``
    kept). Window ``t`` holds the last ``n = min(count + t + 1, window)`` items of ``old``
    followed by ``new[: t + 1]``; its largest ``floor(trim * n)`` items are dropped.
    All windows are sorted at once as rows of a (len(new), window) strided view; slots
    of a window that is still filling hold +inf, which sorts last and is never summed.
    Every row is summed over its full width (dropped slots as zeros), so a row's result
    depends only on its items: batching changes nothing.
    """
    m = new.shape[0]
    n_old = old.shape[0]
    seq = np.empty(window + m, dtype=np.float64)
    seq[: window - n_old] = np.inf
    seq[window - n_old : window] = old
    seq[window:] = new
    # Row t is seq[t + 1 : t + 1 + window] (a view: rows overlap, nothing is copied).
    item = seq.itemsize
    rows = np.sort(np.ndarray((m, window), dtype=np.float64, buffer=seq, offset=item, strides=(item, item)), axis=1)
    n = np.minimum(np.arange(count + 1, count + m + 1), window)
    keep = n - (trim * n).astype(np.int64)
    sums = np.where(_slots(window) < keep[:, None], rows, 0.0).sum(axis=1)
    return sums / keep, n


_SLOTS: dict[int, np.ndarray] = {}


def _slots(window: int) -> np.ndarray:
    """0, 1, ..., window - 1 (cached)."""
    out = _SLOTS.get(window)
    if out is None:
        out = _SLOTS[window] = np.arange(window)
    return out


class OodDetector(Detector):
    """Flags a client whose recent queries lie far from the benign query distribution.

    What it catches: extraction and evasion traffic that does not look like the model's
    users' data. Uniform random points in the feature box (Tramèr et al. 2016's equation
    solving and retraining), natural data from another distribution (Knockoff Nets: another
    dataset, or real data with permuted or flipped features), generator output of
    data-free extraction (DFME, MAZE), and Jacobian-augmentation (JbDA) sets drifting off
    the data manifold round after round. All of these put most queries at a large
    Mahalanobis distance from the benign mean, where benign queries rarely are.

    How: each query x gets ``D(x) = |W (x - mu)|^2 / d``, a squared Mahalanobis distance
    divided by the dimension, so a benign query scores about 1 (less with shrinkage).

    mu is the reference mean and W the regularized whitening matrix
    (Sigma + shrinkage * mean(diag Sigma) * I)^-1/2, full d x d float32 up to
    ``max_full_dim`` features, diagonal above, learned by ``fit`` on benign data (a
    calibration profile, or the model's live baseline); nothing is judged before the
    model has a reference. ``fit`` also learns the benign level: the trimmed mean of the
    reference's own distances (below 1 because of the shrinkage; in-sample, so a little
    optimistic for small references).

    A ring keeps the client's last ``window`` distances; the client statistic s is their
    trimmed mean, leaving out the largest ``trim`` share. The score is
    ``s / (s + scale * level)`` (0.5 at ``scale`` times the benign level, about
    1 / (1 + scale) for a benign client); flagged when it reaches ``threshold`` with at
    least ``min_events`` queries in the window. Mixing attack queries 1:1 with natural
    ones only about halves the attack's contribution to s: with distances 10-30x the
    benign level, such a mix still flags.

    What it misses: attacks that stay on the data manifold: PRADA-style small steps
    around natural seeds (JbDA's early rounds, I-FGSM, HopSkipJump around a real input),
    ActiveThief choosing among in-distribution natural data, and slow attacks diluted far
    below 1:1 with natural queries. Text and encoded images without vectors are not
    judged (None). An MMD-with-random-features statistic is not implemented.

    Cost per batch of m queries: one (m, d) x (d, d) product (O(m d^2); O(m d) without a
    reference or diagonal) plus sorting m windows of ``window`` distances
    (O(m * window * log window)), in a fixed number of numpy operations.
    State per client: ``4 * window + 8`` bytes (a float32 per slot, an int64 counter);
    264 bytes with the defaults. Per model with a reference: ``4 d^2 + 8 d + 8`` bytes in
    the profile (W as float32), ``8 d^2 + 8 d`` in memory (a float64 copy, for exact
    arithmetic); 32 KiB at d = 64.
    """

    name: ClassVar[str] = "ood"
    Params: ClassVar[type[DetectorParams]] = OodParams
    threshold_param: ClassVar[str | None] = "threshold"
    default_enabled: ClassVar[bool] = True
    params: OodParams

    def __init__(self, params: DetectorParams, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, context)
        self._mean: np.ndarray | None = None
        self._w: np.ndarray | None = None  # float64 copy of the whitening, (d, d) or (d,)
        self._level = 1.0

    # -- reference --------------------------------------------------------------
    def fit(self, reference: Reference) -> State | None:
        x = reference.vectors
        if x is None or x.ndim != 2 or x.shape[0] < 2:
            return None
        x = np.asarray(x, dtype=np.float64)
        # A full covariance needs a few samples per feature; fewer get the diagonal.
        full = x.shape[1] <= self.params.max_full_dim and x.shape[0] >= 4 * x.shape[1]
        mean, w = whitening(x, self.params.shrinkage, full)
        dist = _distances(x, mean, w.astype(np.float64))
        level = _trimmed_mean(dist, self.params.trim)
        return {"mean": mean, "whitening": w, "level": np.asarray(max(level, 1e-12), dtype=np.float64)}

    def load_reference(self, reference: State) -> None:
        mean = np.asarray(reference["mean"], dtype=np.float64)
        w = np.asarray(reference["whitening"], dtype=np.float64)
        level = float(reference["level"])
        d = mean.shape[0]
        if mean.ndim != 1 or w.shape not in ((d, d), (d,)):
            raise ValueError(f"ood reference: whitening of shape {w.shape} does not fit a mean of {d} features")
        if self.context.input_dim is not None and d != self.context.input_dim:
            raise ValueError(f"ood reference has {d} features; model {self.context.name} has {self.context.input_dim}")
        if not (math.isfinite(level) and level > 0.0):
            raise ValueError("ood reference: level must be a positive number")
        self._mean, self._w, self._level = mean, w, level

    # -- detection ----------------------------------------------------------------
    def init_state(self) -> State:
        return {"dist_buf": np.zeros(self.params.window, dtype=np.float32), "dist_count": np.zeros((), dtype=np.int64)}

    def distances(self, vectors: np.ndarray) -> np.ndarray | None:
        """(m,) squared Mahalanobis distance / d of each row (float32-rounded, as stored); None if unjudgeable."""
        if self._mean is None or self._w is None or vectors.shape[1] != self._mean.shape[0]:
            return None
        d = _distances(vectors, self._mean, self._w)
        # Inputs so large that the products overflow are as far as a distance can be.
        return np.minimum(np.nan_to_num(d, nan=_MAX_DISTANCE), _MAX_DISTANCE).astype(np.float32).astype(np.float64)

    def update(self, state: State, batch: Batch) -> Signals | None:
        if self._mean is None:
            return None
        idx, x = vector_rows(batch, self._mean.shape[0])
        if x is None:
            return None
        dist = self.distances(x)
        if dist is None:
            return None
        p = self.params
        buf = state["dist_buf"]
        count = int(state["dist_count"])
        s, n = trimmed_window_means(ring_in_order(buf, count), dist, count, p.window, p.trim)
        ring_write(buf, count, dist)
        state["dist_count"][...] = count + dist.shape[0]
        # Ramp in over the first min_events queries, like the window-share detectors: a
        # new client's first odd query is weak evidence, not a full-strength score.
        values = s / (s + p.scale * self._level) * np.minimum(n, p.min_events) / p.min_events
        return scatter(len(batch), idx, values, (n >= p.min_events) & (values >= p.threshold))

    def statistic(self, state: State) -> float:
        """The client's current trimmed mean distance (NaN before any query)."""
        count = int(state["dist_count"])
        if count == 0:
            return math.nan
        return _trimmed_mean(ring_in_order(state["dist_buf"], count).astype(np.float64), self.params.trim)


def _distances(x: np.ndarray, mean: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Row-wise |W (x - mean)|^2 / d for a full (d, d) or diagonal (d,) ``w``."""
    c = np.asarray(x, dtype=np.float64) - mean
    z = c @ w if w.ndim == 2 else c * w
    return np.einsum("ij,ij->i", z, z) / z.shape[1]


def _trimmed_mean(values: np.ndarray, trim: float) -> float:
    v = np.sort(values)
    keep = v.shape[0] - int(math.floor(trim * v.shape[0]))
    return float(v[:keep].mean())
