"""Sign steps: queries that move every feature of an earlier query by the same amount (JbDA, T-RND, I-FGSM)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from exporter.detectors.base import (
    Batch,
    Detector,
    DetectorParams,
    ModelContext,
    Reference,
    Signals,
    State,
    WindowedParams,
    min_threshold_field,
)
from exporter.detectors.kit import feature_spans, share_signals, vector_rows

_CHUNK = 256  # queries judged at once (bounds the (chunk, history + chunk) distance matrix)


def _smallest(d2: np.ndarray, k: int) -> np.ndarray:
    """(m, k) the columns of the ``k`` smallest values of each row of ``d2`` (m, n > k), in no
    particular order; ties broken arbitrarily, as ``np.argpartition`` does.

    One ``np.partition`` (values only) finds each row's k-th smallest value, and a row with
    exactly ``k`` values up to it takes those columns. ``np.argpartition``, slower on these
    rows, sorts out only the rows with ties at their k-th value: the first ``k`` queries of
    a client, which see fewer than ``k`` earlier ones, and exact repeats. (With this and the
    plain indexing in :meth:`StepsDetector._judge`, ``steps`` went from 8.7-9.3 to 6.2 µs per
    event: ``bench/detector_cost.py --only steps``, docs/performance.md run 9.)"""
    kth = np.partition(d2, k - 1, axis=1)[:, k - 1 : k]
    within = d2 <= kth  # at least k per row
    single = np.count_nonzero(within, axis=1) == k
    if single.all():
        return np.nonzero(within)[1].reshape(-1, k)
    out = np.empty((d2.shape[0], k), dtype=np.intp)
    out[single] = np.nonzero(within[single])[1].reshape(-1, k)
    tied = ~single
    out[tied] = np.argpartition(d2[tied], k - 1, axis=1)[:, :k]
    return out


class StepsParams(WindowedParams):
    """Parameters of :class:`StepsDetector`."""

    history: int = Field(256, ge=8, le=4096, description="How many of the client's last queries a new query is compared with.")
    candidates: int = Field(4, ge=1, le=32, description="The nearest earlier queries (by distance) tested for a sign step.")
    min_changed: float = Field(
        0.5, gt=0.0, le=1.0, description="A step moves at least this share of the features (features at a bound may not move)."
    )
    spread: float = Field(
        1.2,
        gt=1.0,
        le=2.0,
        description="A step moves the features by the same amount: the 15th and 85th percentiles of the moved features' "
        "changes (in units of each feature's range) lie within this factor of each other.",
    )
    min_step: float = Field(0.02, gt=0.0, lt=1.0, description="Smallest step, as a share of the feature's range (smaller changes are noise).")
    profiles: int = Field(
        64, ge=1, le=4096, description="How many of the client's last steps' change vectors a new step is compared with (see repeat)."
    )
    repeat: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="A change that repeats an earlier one (relative distance below this) is a step in any units: "
        "an attacker's own box, whatever the features' ranges.",
    )
    window: int = Field(100, ge=1, le=100_000, description="How many of the client's last judged queries the share of steps is taken over.")
    min_events: int = Field(20, ge=1, description="Judged queries needed in the window before the client can be flagged (<= window).")
    threshold: float = Field(
        0.4,
        ge=0.0,
        le=1.0,
        description="Flag when at least this share of the window's queries was a sign step from an earlier query. Calibration overwrites it per model.",
    )
    min_threshold: float = min_threshold_field(0.15)


class StepsDetector(Detector):
    """Flags a client whose queries are sign steps away from its own earlier queries.

    What it catches: synthetic-data extraction by Jacobian-based augmentation (Papernot et
    al. 2017's JbDA: ``x + λ·sign(∇)``), PRADA's T-RND and I-FGSM variants, and any
    augmentation that moves every feature of a seed by ±λ of its range. A query set built
    that way is a lattice around a few natural seeds: each new point differs from an
    earlier one by the same amount in every feature it moves (features at the edge of the
    box are clipped, and do not move). Benign inputs hardly ever stand in that relation to
    each other: a re-measured record, a retry with noise or an edit moves some features
    by different amounts. This holds whatever the attacker interleaves with its synthetic
    queries, and whatever API key sent the parent query, which is why it also catches the
    members of a Sybil split, each of which sees steps from its own earlier queries.

    How: each query is compared with the client's last ``history`` queries (those of the
    same batch included); the ``candidates`` nearest distinct ones (Euclidean, in range
    units) are tested: the query is a step from one of them when at least ``min_changed``
    of the features changed and the changes, in units of each feature's range, agree
    within a factor ``spread`` (15th to 85th percentile of the changed features) and are
    at least ``min_step``. Feature ranges come from the benign reference (``fit``: the
    0.1 % and 99.9 % quantiles); when most ranges are alike (images, pixels), one shared
    range is used, as an attacker working in a common pixel box does. The score is the
    share of steps among the last ``window`` judged queries, ``steps / max(n,
    min_events)``; flagged when it reaches ``threshold`` with ``n >= min_events``.

    What it misses: augmentation whose steps are not of one size per query (random
    step sizes per feature), parents older than ``history`` queries (a JbDA set doubles
    every round, so late rounds reach back further: early rounds are what it catches),
    and attacks that do not derive queries from each other (random or natural data: see
    ``ood`` and ``coverage``; search around one input: see ``knn``).

    Not judged: queries without a vector of the model's length, and every query before
    the model has a reference.

    Cost per batch of m queries with d features: one (m, history + m) x d distance
    product per chunk, a partial sort per row, and a sort of the ``candidates`` x d
    changes per query. State per client: ``4 * history * d + window + 16`` bytes (the
    last queries as float32, a bool per window slot, two counters); 65.7 KB with the
    defaults at 64 features.
    """

    name: ClassVar[str] = "steps"
    Params: ClassVar[type[DetectorParams]] = StepsParams
    threshold_param: ClassVar[str | None] = "threshold"
    default_enabled: ClassVar[bool] = True
    params: StepsParams

    def __init__(self, params: DetectorParams, context: ModelContext) -> None:
        super().__init__(params, context)
        self._dim = context.input_dim
        self._inv: np.ndarray | None = None  # 1 / feature range (range units), from the reference
        self._moving: np.ndarray | None = None  # features with a range at all
        self._uniform = False  # one range for all features (the reference says so)

    # -- reference --------------------------------------------------------------
    def fit(self, reference: Reference) -> State | None:
        found = feature_spans(reference, self._dim)
        if found is None:
            return None
        _, span, uniform = found
        return {"span": span, "uniform": np.asarray(uniform)}

    def load_reference(self, reference: State) -> None:
        span = np.asarray(reference["span"], dtype=np.float64)
        if span.ndim != 1 or (self._dim is not None and span.shape[0] != self._dim) or not np.isfinite(span).all() or (span < 0).any():
            raise ValueError("steps reference: span must be one non-negative range per feature")
        moving = span > 0
        self._moving = moving
        self._inv = np.where(moving, 1.0 / np.where(moving, span, 1.0), 0.0)
        self._uniform = bool(np.asarray(reference.get("uniform", False)))

    # -- detection ----------------------------------------------------------------
    def init_state(self) -> State:
        p, d = self.params, self._dim or 0
        return {
            "hist": np.zeros((p.history, d), dtype=np.float32),  # the last queries in range units, a ring
            "count": np.zeros((), dtype=np.int64),  # queries judged so far
            "prof": np.zeros((p.profiles, d), dtype=np.float32),  # each query's change from its nearest earlier one, a ring
            "step_buf": np.zeros(p.window, dtype=np.bool_),
            "step_count": np.zeros((), dtype=np.int64),
        }

    def update(self, state: State, batch: Batch) -> Signals | None:
        if self._inv is None or self._dim is None:
            return None
        idx, x = vector_rows(batch, self._dim)
        if x is None:
            return None
        u = (np.asarray(x, dtype=np.float64) * self._inv).astype(np.float32)
        steps = np.concatenate([self._judge(state, u[s : s + _CHUNK]) for s in range(0, u.shape[0], _CHUNK)])
        p = self.params
        return share_signals(state["step_buf"], state["step_count"], steps, idx, len(batch), p.min_events, p.threshold)

    def _judge(self, state: State, u: np.ndarray) -> np.ndarray:
        """Whether each query of ``u`` (a chunk, range units) is a step from one of the
        ``history`` queries before it; then fold the chunk into the ring."""
        p = self.params
        H, k = p.history, p.candidates
        m = u.shape[0]
        n0 = int(state["count"])
        hist = state["hist"]
        held = min(n0, H)
        if n0 <= H:
            old = hist[:held]
        else:
            s = n0 % H
            old = np.concatenate((hist[s:], hist[:s]))
        seq = np.concatenate((old, u))  # every query a new one may be compared with, oldest first
        n = seq.shape[0]
        sq = np.einsum("ij,ij->i", seq, seq)
        d2 = sq[held:, None] + sq[None, :] - 2.0 * (u @ seq.T)
        # Query i (at held + i in seq) sees seq[held + i - H : held + i]: a band below the diagonal.
        cols = np.arange(n)[None, :]
        pos = held + np.arange(m)[:, None]
        visible = (cols < pos) & (cols >= pos - H)
        d2 = np.where(visible, d2, np.inf)
        # A few more candidates than tested, re-ranked on exact distances (the product's
        # rounding depends on the chunk's shape), ties to the most recent: the same
        # candidates whatever the batching.
        wide = min(k + 2, n)
        near = _smallest(d2, wide) if n > wide else np.broadcast_to(np.arange(n), (m, n))
        rows = np.arange(m)[:, None]  # (plain indexing with it: cheaper than take_along_axis on these small arrays)
        change = np.abs(u[:, None, :] - seq[near])  # (m, wide, d)
        exact = np.einsum("ijk,ijk->ij", change, change, dtype=np.float64)
        visible_near = np.isfinite(d2[rows, near])
        # An exact repeat of an earlier query is no new point: neither a step nor a parent's
        # child (repeats are repetition's business).
        repeat = (visible_near & (exact == 0.0)).any(axis=1)
        seen = visible_near & (exact > 0.0)
        exact = np.where(seen, exact, np.inf)
        order = np.lexsort((pos - near, exact), axis=1)[:, : min(k, wide)]
        change = change[rows, order]
        seen = seen[rows, order]
        enough, sign_step = self._shape(change)
        moved = enough & seen & ~repeat[:, None]
        step = sign_step & moved
        # A change that an earlier query made too: the same step size per feature, in any units.
        primary = np.where(moved[:, :1], change[:, 0, :], 0.0).astype(np.float32)  # (m, d)
        if not self._uniform:  # features of their own ranges: the attacker's box is not ours
            step |= self._repeats(state, change, moved, primary, n0)
        # Fold the chunk in: its last H queries (and P primary changes) take the rings' next slots.
        for ring, items in ((hist, u), (state["prof"], primary)):
            size = ring.shape[0]
            tail = items[max(0, m - size) :]
            ring[(n0 + m - tail.shape[0] + np.arange(tail.shape[0])) % size] = tail
        state["count"][...] = n0 + m
        return step.any(axis=1)

    def _repeats(self, state: State, change: np.ndarray, moved: np.ndarray, primary: np.ndarray, n0: int) -> np.ndarray:
        """(m, kk) whether each candidate change repeats the primary change of one of the
        ``profiles`` queries before it (relative Euclidean distance below ``repeat``)."""
        p = self.params
        P = p.profiles
        m, kk, d = change.shape
        held = min(n0, P)
        ring = state["prof"]
        old = ring[:held] if n0 <= P else np.concatenate((ring[n0 % P :], ring[: n0 % P]))
        prev = np.concatenate((old, primary))  # (held + m, d), oldest first
        a = change.reshape(m * kk, d)
        asq = np.einsum("ij,ij->i", a, a)
        bsq = np.einsum("ij,ij->i", prev, prev)
        dist = asq[:, None] + bsq[None, :] - 2.0 * (a @ prev.T)
        cols = np.arange(prev.shape[0])[None, :]
        pos = np.repeat(held + np.arange(m), kk)[:, None]
        visible = (cols < pos) & (cols >= pos - P) & (bsq[None, :] > 0.0)
        tol = p.repeat * p.repeat * np.minimum(asq[:, None], bsq[None, :])
        hit = (visible & (dist <= tol)).any(axis=1).reshape(m, kk)
        return hit & moved

    def _shape(self, change: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(m, kk) twice, from one sort of each change's moving features (range units): whether
        it moves at least ``min_changed`` of them, and whether it is a sign step besides."""
        p = self.params
        moving = self._moving
        assert moving is not None
        c = change[:, :, moving]
        d = c.shape[-1]
        srt = np.sort(c, axis=-1)
        nz = np.count_nonzero(srt > 1e-6, axis=-1)
        enough = nz >= p.min_changed * d
        first = d - nz  # sorted: the unchanged features come first
        lo = np.minimum(first + (0.15 * nz).astype(np.int64), d - 1)
        hi = np.minimum(first + np.ceil(0.85 * nz).astype(np.int64) - 1, d - 1)
        flat = srt.reshape(-1, d)
        at = np.arange(flat.shape[0])
        a = flat[at, lo.ravel()].reshape(lo.shape)
        b = flat[at, np.maximum(hi, lo).ravel()].reshape(lo.shape)
        return enough, enough & (a >= p.min_step) & (b <= a * p.spread)
