"""PRADA (Juuti et al., EuroS&P 2019): the shape of a client's nearest-neighbour distances."""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from functools import lru_cache
from itertools import compress
from statistics import NormalDist
from typing import ClassVar

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from exporter.detectors.base import (
    Batch,
    Detector,
    DetectorParams,
    ModelContext,
    Signals,
    State,
    min_threshold_field,
)
from exporter.detectors.kit import reservoir_slot, ring_in_order, ring_write, scatter

_SLOT_SALT = 0x70726164612D6773  # "prada-gs"
_REPEAT_TOLERANCE = 1e-10  # squared distances below this share of ||x||^2 are rounding noise: an exact repeat
_FLAT = 1e-6  # a sample whose spread is below this share of its magnitude is a point mass (W = 0)

# Royston's (1992) polynomial corrections of the two outermost Shapiro-Wilk coefficients
# (algorithm AS R94, as in scipy's swilk), in powers of 1/sqrt(n).
_C1 = (0.0, 0.221157, -0.147981, -2.07119, 4.434685, -2.706056)
_C2 = (0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633)


def _poly(c: tuple[float, ...], x: float) -> float:
    return sum(ci * x**i for i, ci in enumerate(c))


@lru_cache(maxsize=8192)
def shapiro_coefficients(n: int) -> np.ndarray:
    """The Shapiro-Wilk weights a_1..a_{n//2} (positive, outermost first) for a sample of n >= 3.

    Royston's approximation, as computed by algorithm AS R94 (scipy's ``swilk``): the
    weights depend on n only, so they are computed once per n and cached.
    """
    if n < 3:
        raise ValueError("Shapiro-Wilk needs at least 3 values")
    if n == 3:
        a3 = np.array([math.sqrt(0.5)])
        a3.setflags(write=False)
        return a3
    half = n // 2
    quantile = NormalDist().inv_cdf  # Wichura's AS 241, to double precision (no scipy needed)
    m = -np.array([quantile((i - 0.375) / (n + 0.25)) for i in range(1, half + 1)])  # expected upper normal order statistics
    summ2 = 2.0 * float(m @ m)
    ssumm2 = math.sqrt(summ2)
    rsn = 1.0 / math.sqrt(n)
    a1 = _poly(_C1, rsn) + m[0] / ssumm2
    if n > 5:
        a2 = m[1] / ssumm2 + _poly(_C2, rsn)
        fac = math.sqrt((summ2 - 2.0 * m[0] ** 2 - 2.0 * m[1] ** 2) / (1.0 - 2.0 * a1**2 - 2.0 * a2**2))
        a = m / fac
        a[1] = a2
    else:
        fac = math.sqrt((summ2 - 2.0 * m[0] ** 2) / (1.0 - 2.0 * a1**2))
        a = m / fac
    a[0] = a1
    a.setflags(write=False)
    return a


def shapiro_w(sorted_x: np.ndarray) -> float:
    """The Shapiro-Wilk W of an ascending sample (n >= 3), equal to scipy's to ~1e-9.

    A sample without spread (all values equal to 1 part in a million, e.g. synthetic
    steps of one fixed length) has no normal shape at all: W = 0.
    """
    n = sorted_x.shape[0]
    a = shapiro_coefficients(n)
    half = a.shape[0]
    centered = sorted_x - float(sorted_x.sum()) / n
    ss = float(centered @ centered)
    scale = float(abs(sorted_x[-1]) + abs(sorted_x[0]))
    if ss <= (_FLAT * scale) ** 2 * n:
        return 0.0
    num = float(a @ (sorted_x[: n - half - 1 : -1] - sorted_x[:half]))
    return min(num * num / ss, 1.0)


@lru_cache(maxsize=8192)
def _signed_weights(n: int) -> np.ndarray:
    """The Shapiro-Wilk weights laid over an ascending sample of n, so that ``W``'s numerator
    is their dot product with the sample: -a_i at position i, +a_i at n - 1 - i, 0 between."""
    a = shapiro_coefficients(n)
    half = a.shape[0]
    out = np.zeros(n)
    out[:half] = -a
    out[n - half :] = a[::-1]
    out.setflags(write=False)
    return out


def _trimmed_ws(seq: np.ndarray, starts: list[int], lengths: list[int]) -> list[float]:
    """W of each window ``seq[s : s + n]`` (n >= 3, values >= 0: distances) after dropping
    its values more than 3 standard deviations from its mean (PRADA).

    The windows are sorted and summed together, as the rows of one matrix: windows
    shorter than the longest (a client's first tests, before its window fills) are
    padded with zeros, which sort first and add nothing (:func:`_padded_sums`). A row
    without outliers (the usual case) gets W from those sums; the others from their
    kept values, a run of their sorted values. Every window gives the same W alone or
    stacked with others, up to rounding of the sums (the raw-moment sum of squared
    deviations, as for rows without outliers; :func:`shapiro_w` centres first).
    """
    width = max(lengths)
    if min(lengths) == width:
        xs = seq[np.add.outer(np.asarray(starts), np.arange(width))]
    else:
        xs = np.zeros((len(lengths), width))
        for i, (s, n) in enumerate(zip(starts, lengths)):
            xs[i, :n] = seq[s : s + n]
    xs.sort(axis=1)
    nums, s1, s2, lows, highs = _padded_sums(xs, lengths)
    out: list[float] = []
    for i, n in enumerate(lengths):
        mu = s1[i] / n
        ss = max(s2[i] - s1[i] * mu, 0.0)
        spread = 3.0 * math.sqrt(ss / n)
        if lows[i] >= mu - spread and highs[i] <= mu + spread:  # no outliers
            out.append(_w_from_sums(nums[i], ss, lows[i], highs[i], n))
            continue
        row = xs[i, width - n :]
        lo = int(np.searchsorted(row, mu - spread, side="left"))
        hi = int(np.searchsorted(row, mu + spread, side="right"))
        k = hi - lo
        if k < 3:
            out.append(1.0)
            continue
        kept = row[lo:hi]
        t1 = float(kept.sum())
        out.append(_w_from_sums(float(kept @ _signed_weights(k)), max(float(kept @ kept) - t1 * t1 / k, 0.0), float(kept[0]), float(kept[-1]), k))
    return out


def _padded_sums(xs: np.ndarray, lengths: list[int]) -> tuple[list[float], ...]:
    """For ascending rows ``xs`` whose last ``lengths[i]`` values are row i's sample (values
    >= 0; what comes before them is zero padding): the Shapiro-Wilk numerators, sums,
    sums of squares, smallest and largest values of the samples."""
    r, width = xs.shape
    if min(lengths) == width:
        nums = xs @ _signed_weights(width)
    else:
        weights = np.zeros((r, width))
        for i, n in enumerate(lengths):
            weights[i, width - n :] = _signed_weights(n)
        nums = np.einsum("ij,ij->i", xs, weights)
    lows = xs[np.arange(r), width - np.asarray(lengths)]
    return nums.tolist(), xs.sum(axis=1).tolist(), np.einsum("ij,ij->i", xs, xs).tolist(), lows.tolist(), xs[:, -1].tolist()


def _w_from_sums(num: float, ss: float, low: float, high: float, n: int) -> float:
    """Shapiro-Wilk W of a sample of n from its numerator (the weighted sum), its sum of
    squared deviations and its extremes (0 for a sample without spread, like :func:`shapiro_w`)."""
    if ss <= (_FLAT * (abs(low) + abs(high))) ** 2 * n:
        return 0.0
    return min(num * num / ss, 1.0)


_CHUNK = 256  # the growing-set rule takes a batch in chunks of up to this many events,
_CHUNK_MEMBERS = 1 << 22  # and of at most this many gathered member values (events x max_per_class x features)
_PAIR_BLOCK = 48  # events multiplied together for their same-class pairs (see _same_class_pairs)


@lru_cache(maxsize=_CHUNK + 1)
def _below_diagonal(m: int) -> np.ndarray:
    """An (m x m) mask, True strictly below the diagonal (column j < row i)."""
    below = np.tri(m, m, -1, dtype=bool)
    below.setflags(write=False)
    return below


def _same_class_pairs(zq: np.ndarray, zsq: np.ndarray, cls: np.ndarray, bounds: list[int]) -> list[float]:
    """Squared distances ``|x_a|^2 + |x_j|^2 - 2 x_a.x_j`` (float64) between events of a class,
    for events sorted by class (each class's events in time order, a run; run g spans
    ``bounds[g]:bounds[g + 1]``): each event's distances to the earlier events of its run,
    row after row, so that a run whose pairs start at offset b has its event a's row at
    b + a * (a - 1) / 2. Consecutive runs are multiplied together, in blocks of up to
    ``_PAIR_BLOCK`` events (a longer run alone), of which only the same-class pairs below
    the diagonal are kept (as Python floats)."""
    pairs: list[float] = []
    s = 0
    for g in range(1, len(bounds)):
        e = bounds[g]
        if g + 1 < len(bounds) and bounds[g + 1] - s <= _PAIR_BLOCK:
            continue  # the next run fits in this block too
        if e - s > 1:
            z = zq[s:e]
            gram = z @ z.T
            gram *= 2.0
            sq = zsq[s:e]
            block = sq[:, None] + sq[None, :]
            block -= gram
            keep = np.equal.outer(cls[s:e], cls[s:e])
            keep &= _below_diagonal(e - s)
            pairs += block[keep].tolist()
        s = e
    return pairs


def _exact_sq(zq: np.ndarray, picked: np.ndarray, approx_at: np.ndarray) -> np.ndarray:
    """Squared float64 distance of each row of ``zq`` to its ``picked`` member row (inf where
    ``approx_at``, the picked member's approximate value, says the slot is empty)."""
    diff = zq - picked
    return np.where(np.isfinite(approx_at), np.einsum("ij,ij->i", diff, diff), np.inf)


def _forget_stored(members: np.ndarray, slot: int, zq: np.ndarray, approx: np.ndarray, near: np.ndarray, stored: list[float], lo: int, hi: int) -> None:
    """Stored member ``slot`` (of ``members``, one class's) was replaced by a batch event: the
    class's later events ``lo:hi`` no longer see it, and those that had it as their
    nearest stored member search the others again (exact distance again)."""
    approx[lo:hi, slot] = np.inf
    redo = lo + np.flatnonzero(near[lo:hi] == slot)
    if redo.size:
        near[redo] = approx[redo].argmin(axis=1)
        for r, v in zip(redo.tolist(), _exact_sq(zq[redo], members[near[redo]], approx[redo, near[redo]]).tolist()):
            stored[r] = v


def growing_set_slot(cls: int, n: int, capacity: int) -> int:
    """Where the n-th (0-based) addition to class ``cls``'s growing set is stored, or -1 (not stored).

    Reservoir sampling (Algorithm R) with a counter-based hash of (class, n) in place of
    a random generator: slot n while filling, then slot ``h mod (n + 1)`` if below
    ``capacity``. Every addition is kept with probability ``capacity / additions``, the
    same in every process and however events are batched.
    """
    return reservoir_slot(n, capacity, _SLOT_SALT ^ (cls << 40))


class PradaParams(DetectorParams):
    """Parameters of :class:`PradaDetector`."""

    max_per_class: int = Field(16, ge=1, le=4096, description="Growing-set members kept per predicted class; beyond it a deterministic reservoir sample is kept.")
    max_classes: int = Field(
        16,
        ge=1,
        le=1024,
        description="Class buckets kept per client (memory is buckets x max_per_class x features x 4 bytes); classes beyond it share buckets (class mod max_classes).",
    )
    window: int = Field(256, ge=20, le=5000, description="The client's last recorded minimum distances that the normality test pools (Shapiro-Wilk is accurate up to 5000).")
    min_distances: int = Field(50, ge=20, description="Distances needed (more than this) before the first test; the paper uses 100. Must not exceed window.")
    test_every: int = Field(8, ge=1, le=10_000, description="Run the test after every this many judged events of the client (at fixed event counts, whatever the batching).")
    threshold: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description=(
            "Flag when 1 - W reaches this, i.e. W < 1 - threshold. 0.1 is the reference demo's "
            "delta = 0.9, the conservative end of the paper's 0.9-0.96: noisy benign resubmissions "
            "lower W, and iid natural traffic gives W of about 0.95-0.99. Calibration overwrites it per model."
        ),
    )
    min_threshold: float = min_threshold_field(0.1)
    skip_exact_repeats: bool = Field(
        True,
        description=(
            "Do not record a zero distance (an exact repeat of a growing-set member): retries say "
            "nothing about how queries are synthesized, and a spike at 0 would make benign retry "
            "traffic look non-normal. Repeats are the repetition detector's business."
        ),
    )

    @field_validator("min_distances")
    @classmethod
    def _fits_window(cls, value: int, info: ValidationInfo) -> int:
        window = info.data.get("window")
        if window is not None and value >= window:
            raise ValueError(f"must be below window ({window}), or the test could never run")
        return value


class PradaDetector(Detector):
    """Flags a client whose queries' nearest-neighbour distances are far from normally distributed.

    What it catches: synthetic-query model extraction — Papernot's Jacobian-based
    augmentation (JbDA) and PRADA's T-RND/I-FGSM variants — where every new query is a
    small step from an earlier one. Natural queries of a client have minimum distances
    to its earlier queries that look roughly normal; a synthesizing attacker produces a
    mix of tiny steps and large jumps between seeds, and the Shapiro-Wilk W of the pooled
    distances drops. The paper reports alarms within the first few hundred queries.

    How (Juuti et al., Algorithm 1): per client and predicted class c, a growing set
    G_c of standardized input vectors (the model's feature scaling; nothing is judged
    before the model has one). For a query x of class c, d = min ||x - y|| over
    y in G_c (the first query of a class only joins G_c); d is recorded, and if
    d > T_c, x joins G_c and T_c <- max(T_c, mean - std of the distances that made
    members join). Distances are Euclidean over standardized features divided by
    sqrt(number of features) (W does not depend on the scale). Every ``test_every``
    judged events (at fixed counts of the client's events), once more than
    ``min_distances`` distances are recorded, the last ``window`` distances are pooled,
    values more than 3 standard deviations from their mean are dropped, and
    W = Shapiro-Wilk (Royston's approximation, :func:`shapiro_w`, equal to scipy's to
    1e-9 at a fraction of the cost). The score is 1 - W; the client is flagged when it
    reaches ``threshold`` (W < delta = 1 - threshold), and the alarm latches: once
    flagged, the client stays flagged (the score keeps following the tests). Between
    tests the score is the last test's; before the first test it is NaN (not judged yet).

    Deviations from the paper, for bounded state: G_c keeps ``max_per_class`` members,
    beyond that a reservoir sample chosen by a hash of (class, addition number)
    (:func:`growing_set_slot`); only the last ``window`` distances are pooled; classes
    beyond ``max_classes`` share buckets; exact repeats (d = 0) are not recorded
    (``skip_exact_repeats``); a pool without spread (equal to 1 part in a million, e.g.
    steps of one fixed length) counts as W = 0. Label-only answers are assigned a bucket
    from their label (its integer value, else a stable hash of it); events without any
    answer are not judged.

    What it misses (known): uniform random queries (their distances look normal, W near
    0.99), natural-data attacks (Knockoff Nets, ActiveThief) and attacks interleaved
    1:1 with natural queries. Noisy benign resubmissions lower W (false-positive risk
    near delta = 0.95, hence the default 0.9).

    Batching: results do not depend on how a client's events are batched (tests run at
    fixed event counts; events of a batch see the members that earlier events of the
    batch added or replaced), up to floating-point rounding of the distance products
    (matrix products of other shapes: it can only flip a comparison that is an exact
    tie, or pick another of two equidistant members, and moves W by ~1e-12).

    Cost per batch of m events, sorted by class (taken in chunks of up to 256, fewer
    when M * d is large, to bound the temporary arrays): each event is multiplied only
    with its own class's stored members, an (m x M x d) float32 batched product to pick
    the nearest (its distance is then recomputed exactly in float64), and, for the
    distances inside the batch, the classes' runs of events are multiplied in blocks
    of up to 48 events (a longer run alone), of which only the same-class pairs, about
    sum(m_c^2) / 2 for m_c events of class c, become Python floats. Then a Python loop
    over the events with scalar work only (the sequential growing-set rule; each event
    takes the minimum over its run's stored events of one slice of those pairs), and
    the batch's tests together: one row sort and weighted sums of (tests x window)
    values, tests = m / test_every, and a few array operations more per test whose
    window has outliers. Most of it is a fixed number of array operations per batch
    (a few dozen), so a batch of one event costs about as before and a batch of 100
    about half as much per event (``bench/detector_cost.py``).
    State per client: ``K * M * (4 d + 8) + 32 K + 8 * window + 25`` bytes for K class
    buckets (min(classes, max_classes)), M = max_per_class, d features; 171,353 bytes
    for 10 classes, 64 features and the defaults (the float32 growing sets are 96 % of
    it: lower max_per_class for many clients).
    """

    name: ClassVar[str] = "prada"
    Params: ClassVar[type[DetectorParams]] = PradaParams
    threshold_param: ClassVar[str | None] = "threshold"
    # The reference detector from the literature, kept to compare with: ``steps`` catches the
    # JbDA family it was built for (see the detection benchmark), at a fifth of its cost.
    default_enabled: ClassVar[bool] = False
    params: PradaParams

    def __init__(self, params: DetectorParams, context: ModelContext) -> None:
        super().__init__(params, context)
        p = self.params
        self._dim = context.input_dim
        self._classes = min(context.num_classes or p.max_classes, p.max_classes)
        self._scale = 1.0 / math.sqrt(self._dim) if self._dim else 1.0
        self._chunk = max(1, min(_CHUNK, _CHUNK_MEMBERS // (p.max_per_class * max(self._dim or 1, 1))))
        self._label_buckets: dict[str, int] = {}

    # -- state -------------------------------------------------------------------
    def init_state(self) -> State:
        p, k, d = self.params, self._classes, self._dim or 0
        return {
            "members": np.zeros((k, p.max_per_class, d), dtype=np.float32),  # growing sets, standardized
            "members_sq": np.full((k, p.max_per_class), np.inf),  # squared norms; inf marks an empty slot
            "added": np.zeros(k, dtype=np.int64),  # additions ever per class (stored: min(added, M))
            "thresholds": np.zeros(k, dtype=np.float64),  # T_c
            "join_mean": np.zeros(k, dtype=np.float64),  # running mean of the distances that made members join
            "join_m2": np.zeros(k, dtype=np.float64),  # and their sum of squared deviations
            "dist_buf": np.zeros(p.window, dtype=np.float64),
            "dist_count": np.zeros((), dtype=np.int64),
            "events": np.zeros((), dtype=np.int64),  # judged events so far (the test schedule)
            "value": np.full((), np.nan),  # 1 - W of the last test
            "latched": np.zeros((), dtype=np.bool_),
        }

    # -- detection ---------------------------------------------------------------
    def update(self, state: State, batch: Batch) -> Signals | None:
        if not self._dim:
            return None
        idx, x, cls = self._judged(batch)
        if x is None:
            return None
        scaling = self.context.scaling
        if scaling is None or scaling.dim != x.shape[1]:
            return None
        z32 = scaling.apply(x).astype(np.float32)
        m, step = z32.shape[0], self._chunk
        if m <= step:
            dists = self._grow(state, z32, cls)
        else:  # the rule's results do not depend on batching; this bounds its temporary arrays
            dists = []
            for s in range(0, m, step):
                dists += self._grow(state, z32[s : s + step], cls[s : s + step])
        values, flagged = self._test(state, dists)
        return scatter(len(batch), idx, values, flagged)

    def _judged(self, batch: Batch) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Positions of events with a vector and a class, their vectors, and their class buckets."""
        events = batch.events
        d = self._dim
        k = self._classes
        x = batch.vectors  # None unless every event has a vector of one length
        if x is not None or all(e.vector is not None for e in events):
            if x is None or x.ndim != 2 or x.shape[1] != d:
                return np.zeros(0, dtype=np.int64), None, np.zeros(0, dtype=np.int64)
            pred = batch.predicted
            if (pred >= 0).all():
                return np.arange(len(events)), x, pred % k
            rows = list(range(len(events)))
        else:
            rows = [i for i, e in enumerate(events) if e.vector is not None and e.vector.shape == (d,)]
            x = None
            pred = batch.predicted
        keep: list[int] = []
        cls: list[int] = []
        for i in rows:
            c = int(pred[i])
            if c < 0:
                label = events[i].label
                if label is None:
                    continue
                c = self._label_bucket(label)
            keep.append(i)
            cls.append(c % k)
        if not keep:
            return np.zeros(0, dtype=np.int64), None, np.zeros(0, dtype=np.int64)
        idx = np.asarray(keep, dtype=np.int64)
        xs = x[idx] if x is not None else np.stack([events[i].vector for i in keep])
        return idx, xs, np.asarray(cls, dtype=np.int64)

    def _label_bucket(self, label: str) -> int:
        """A stable class number for a label-only answer: its integer value, else a hash of it."""
        c = self._label_buckets.get(label)
        if c is None:
            s = label.strip()
            if s.isascii() and s.isdecimal() and len(s) <= 18:  # "²".isdigit() is True, and int() of 5,000 digits raises
                c = int(s)
            else:
                c = int.from_bytes(hashlib.blake2b(label.encode("utf-8"), digest_size=8).digest(), "little")
            if len(self._label_buckets) < 4096:
                self._label_buckets[label] = c
        return c

    def _grow(self, state: State, z32: np.ndarray, cls: np.ndarray) -> list[float | None]:
        """The sequential growing-set rule over (a chunk of) the batch; returns each event's
        recorded distance (None: none).

        Classes never interact (each has its own growing set, threshold and join
        statistics), so the events are sorted by class, stably, and the rule runs over
        each class's run of events (in time order) in turn. The squared distances it
        reads are computed first, from products of each event with its own class only:
        to the members stored before the batch (float32 ``|g|^2 - 2 z.g`` to pick the
        nearest, whose distance is then computed exactly in float64), and to the earlier
        events of its run (float64, :func:`_same_class_pairs`).
        """
        p = self.params
        cap = p.max_per_class
        scale = self._scale
        skip_repeats = p.skip_exact_repeats
        sqrt = math.sqrt
        m = z32.shape[0]
        pos, bounds = [0], [0, 1]  # batch position of each sorted event; the runs, in sorted positions
        if m > 1:
            order = np.argsort(cls, kind="stable")
            cls = cls[order]
            z32 = z32[order]
            pos = order.tolist()
            bounds = [0, *(np.flatnonzero(cls[1:] != cls[:-1]) + 1).tolist(), m]
        zq = z32.astype(np.float64)
        zsq = np.einsum("ij,ij->i", zq, zq)
        cls_list = cls.tolist()
        classes = [cls_list[k] for k in bounds[:-1]]
        pairs = _same_class_pairs(zq, zsq, cls, bounds)
        added, thresholds, means, m2s = state["added"], state["thresholds"], state["join_mean"], state["join_m2"]
        members, members_sq = state["members"], state["members_sq"]
        approx = near = None
        stored = [math.inf] * m  # squared distance to the nearest member stored before the batch
        if any(added[c] for c in classes):
            approx = members_sq[cls] - 2.0 * np.matmul(members[cls], z32[:, :, None])[:, :, 0]  # (m, M), inf: empty slot
            near = approx.argmin(axis=1)
            stored = _exact_sq(zq, members[cls, near], approx.min(axis=1)).tolist()
        zsq_list = zsq.tolist()
        repeat_below = [_REPEAT_TOLERANCE * max(v, 1.0) for v in zsq_list]
        out: list[float | None] = [None] * m
        joined: list[tuple[int, int, int]] = []  # (class, slot, sorted position) of the batch's stored events
        row = 0  # where the next event's row of pairs starts
        for c, s, e in zip(classes, bounds, bounds[1:]):
            n, threshold, mean, m2 = int(added[c]), float(thresholds[c]), float(means[c]), float(m2s[c])
            slots: dict[int, int] = {}  # slot -> the batch event (its index a in the run) now stored there
            live = [False] * (e - s)  # whether the run's event a is stored (one of the slots' values)
            first = s
            if n == 0:  # the first query of a class only joins
                slots[0] = 0
                live[0] = True
                n, first = 1, s + 1
            for k in range(first, e):
                a = k - s
                best = stored[k]
                if slots:
                    to_earlier = pairs[row : row + a]  # to the run's events 0..a-1
                    v = min(to_earlier) if len(slots) == a else min(compress(to_earlier, live))
                    if v < best:
                        best = v
                row += a
                d = 0.0 if best <= repeat_below[k] else sqrt(best) * scale
                if d == 0.0 and skip_repeats:
                    continue
                out[pos[k]] = d
                if not d > threshold:
                    continue
                # x joins G_c
                if n < cap:
                    slots[n] = a
                    live[a] = True
                else:
                    slot = growing_set_slot(c, n, cap)
                    if slot >= 0:
                        old = slots.get(slot)
                        if old is not None:
                            live[old] = False
                        elif k + 1 < e:  # a member stored before the batch is replaced
                            _forget_stored(members[c], slot, zq, approx, near, stored, k + 1, e)  # type: ignore[arg-type]
                        slots[slot] = a
                        live[a] = True
                # d joins the distances that made members join (every addition but the first: n of them)
                delta = d - mean
                mean += delta / n
                m2 += delta * (d - mean)
                cut = mean - sqrt(max(m2, 0.0) / n)
                if cut > threshold:
                    threshold = cut
                n += 1
            added[c], thresholds[c], means[c], m2s[c] = n, threshold, mean, m2
            joined += [(c, slot, s + a) for slot, a in slots.items()]
        if len(joined) > 2:
            cs, slot_list, ks = (np.array(column, dtype=np.intp) for column in zip(*joined))
            members[cs, slot_list] = z32[ks]
            members_sq[cs, slot_list] = zsq[ks]
        else:  # one or two: cheaper one by one
            for c, slot, k in joined:
                members[c, slot] = z32[k]
                members_sq[c, slot] = zsq_list[k]
        return out

    def _test(self, state: State, dists: list[float | None]) -> tuple[np.ndarray, np.ndarray]:
        """Record the distances, run the tests that fall in this batch; return values and flags per event."""
        p = self.params
        m = len(dists)
        every = p.test_every
        e0 = int(state["events"])
        buf = state["dist_buf"]
        w = buf.shape[0]
        c0 = int(state["dist_count"])
        new = [d for d in dists if d is not None]
        new_values = np.array(new, dtype=np.float64)
        value = float(state["value"])
        latched = bool(state["latched"])
        flag_from = 0 if latched else m  # the batch position from which the client is flagged
        at: list[int] = []  # batch positions of the tests that run
        levels = [value]  # the value before the first of them, then after each
        first_test = every - 1 - (e0 % every)  # batch position of the first scheduled test
        if first_test < m:
            held = min(c0, w)
            skipped = [i for i, d in enumerate(dists) if d is None]  # events that recorded no distance
            ends = []
            for i in range(first_test, m, every):
                recorded = i + 1 - bisect_right(skipped, i)  # distances recorded up to event i
                if c0 + recorded > p.min_distances:
                    at.append(i)
                    ends.append(held + recorded)
            if at:
                seq = np.concatenate((ring_in_order(buf, c0), new_values))
                starts = [max(0, e - w) for e in ends]
                for i, w_value in zip(at, _trimmed_ws(seq, starts, [e - s for s, e in zip(starts, ends)])):
                    value = min(max(1.0 - w_value, 0.0), 1.0)
                    levels.append(value)
                    if value >= p.threshold and not latched:
                        latched = True
                        flag_from = i
                state["value"][...] = value
                state["latched"][...] = latched
        values = np.repeat(levels, [b - a for a, b in zip([0, *at], [*at, m])]) if at else np.full(m, value)
        flagged = np.full(m, flag_from == 0)
        if 0 < flag_from < m:
            flagged[flag_from:] = True
        if new:
            ring_write(buf, c0, new_values)
            state["dist_count"][...] = c0 + len(new)
        state["events"][...] = e0 + m
        return values, flagged
