"""Feature-space coverage (Kesarwani et al. 2018): how often a client queries regions benign traffic rarely visits."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from pydantic import Field

from exporter.detectors.base import (
    Batch,
    ClientMetric,
    Detector,
    DetectorParams,
    ModelContext,
    Reference,
    Signals,
    State,
    WindowedParams,
)
from exporter.detectors.kit import ring_in_order, ring_write, share_signals


class CoverageParams(WindowedParams):
    """Parameters of :class:`CoverageDetector`."""

    bits: int = Field(10, ge=3, le=16, description="Random hyperplanes per partition; each partition cuts the feature space into 2**bits cells.")
    tables: int = Field(
        4,
        ge=1,
        le=16,
        description=(
            "Independent partitions (each with its own hyperplanes). A query is novel when its "
            "cell is rare in at least half of them: one random draw of hyperplanes can happen "
            "to leave a whole off-distribution region in a benign cell, several rarely all do."
        ),
    )
    spread: float = Field(
        1.5,
        ge=0.0,
        le=10.0,
        description=(
            "Offsets of the hyperplanes from the reference mean, in units of the benign spread "
            "along each hyperplane's normal (drawn as N(0, spread^2)). 0 = SimHash cones through "
            "the mean, which only see a query's direction; offsets also cut by distance, so far "
            "queries land in cells benign traffic rarely reaches."
        ),
    )
    seed: int = Field(0, ge=0, description="Seed of the hyperplanes; the same seed gives the same cells in every process.")
    rare_mass: float = Field(
        1e-3,
        gt=0.0,
        lt=1.0,
        description=(
            "A cell is rare when it holds less than this share of benign queries (of the "
            "reference with one; of the distinct client visits of all traffic without)."
        ),
    )
    window: int = Field(100, ge=1, le=100_000, description="How many of the client's last judged queries the novelty share is taken over.")
    min_events: int = Field(20, ge=1, description="Judged queries needed in the window before the client can be flagged (<= window).")
    threshold: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description=(
            "Flag when at least this share of the window's queries was novel. iid benign traffic "
            "is novel about 1 % of the time, uniform random queries almost always. Calibration "
            "overwrites it per model."
        ),
    )
    min_stats_count: int = Field(
        200,
        ge=2,
        description=(
            "Without a reference: inputs the model's live feature statistics must have seen "
            "before cells are computed at all (earlier cells would be placed by noise)."
        ),
    )
    min_global_visits: int = Field(
        1000,
        ge=1,
        description=(
            "Without a reference: distinct (client, cell) visits per partition (on average) needed "
            "before cells can be called rare from the traffic itself; queries before that are not judged. "
            "Below 1 / rare_mass visits (1000 by default), 'rare' can only mean 'never visited "
            "by another client'."
        ),
    )


def hyperplanes(dim: int, bits: int, spread: float, seed: int, tables: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals (dim, tables * bits) and offsets (tables * bits,) of the partitions, fixed by ``seed``.

    Columns ``t * bits : (t + 1) * bits`` belong to partition ``t``. numpy's PCG64 stream
    for a given seed is the same on every platform and process.
    """
    rng = np.random.default_rng([seed, dim, bits, tables])
    normals = rng.standard_normal((dim, tables * bits))
    normals /= np.linalg.norm(normals, axis=0)
    offsets = rng.standard_normal(tables * bits) * spread
    return normals, offsets


def _fold(mean: np.ndarray, std: np.ndarray, normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The standardize-then-project map ((x - mean) / std) @ normals as x @ a - c.

    A side test z . n > cut is then x @ a > c + cut: one product and one comparison per batch.
    """
    a = normals / std[:, None]
    return a, mean @ a


class CoverageDetector(Detector):
    """Flags a client when many of its recent queries land in cells benign traffic rarely visits.

    What it catches: extraction that spreads queries over the feature space to learn the
    whole decision surface (Kesarwani et al. 2018's extraction monitor): uniform random
    points (Tramèr et al. 2016), off-distribution natural data (Knockoff Nets), generator
    output, Jacobian-augmentation sets once they leave the data. It complements ``ood``
    with another geometry: partitions into cells rather than one distance to one
    Gaussian, so multi-modal benign data (a cluster per class) is described better.

    Cells: the query is standardized (reference statistics, or ``context.stats`` without
    a reference) and, in each of ``tables`` independent partitions, its cell is the bit
    pattern of ``bits`` fixed random hyperplanes ``[z . n_j > o_j * sigma_j]``: unit
    normals n_j, offsets o_j ~ N(0, spread^2) in units of the benign spread sigma_j along
    n_j (1 without a reference). Hyperplanes through the mean (``spread`` 0, plain
    SimHash) make cones that only see a query's direction; in 64 dimensions benign noise
    fills all directions, so far queries are hardly rarer than benign ones. A single
    partition is a lottery: far queries all fall in the few unbounded cells in their
    direction, and whether those hold benign mass depends on the draw. Measured on
    digit-like data over 10 seeds (share of queries called novel): one 10-bit partition,
    benign 1-7 %, uniform random 5-99 %; 4 partitions through the mean, benign about 11 %,
    uniform random 47-100 %; the defaults (4 partitions with offsets, majority), benign
    at most 1.3 %, uniform random at least 97 %, feature-permuted digits at least 72 %.

    Novelty: a cell is *rare* when it holds less than ``rare_mass`` of benign traffic, and
    a query is *novel* when its cells are rare in at least half of the partitions:

    * with a reference (``fit``): the cell's share of the reference queries;
    * without: the cell's share of all distinct (client, cell) visits made so far by the
      *other* clients (the shared state counts, per cell, the clients that visited it).
      Counting distinct clients, not queries, keeps a single heavy attacker from making
      its own cells look popular. Until the partitions have ``min_global_visits`` visits
      on average nothing is judged (NaN), and nothing at all is done before ``context.stats`` has
      seen ``min_stats_count`` inputs. Cruder: the cells move while the statistics still
      learn, and colluders who share cells make them look visited to each other.

    The score is the share of novel queries among the client's last ``window`` judged
    queries, ``novel / max(n, min_events)`` (it ramps up for a new client instead of
    jumping to 1); flagged when it reaches ``threshold`` with ``n >= min_events``. Novelty
    is a property of the cell, not of the client's history, so the score of a client that
    keeps querying rare regions stays high (a "first visit" rate would fall as the
    client's own coverage saturates).

    Collusion: splitting a spread-out attack over several API keys does not dilute it,
    because each member's share of novel queries is the attack's share, whatever its
    volume. The shared per-model state (distinct clients per cell) also gives a global
    view, :meth:`global_view`: the cells covered by the union of all clients and the
    share of visits that went to rare cells, a model-level gauge that jumps when a group
    of clients explores the space together.

    Extra per-client statistics, not folded into the score (a benign client may
    legitimately see one class only, so a skewed class histogram would make the score
    flap): :meth:`coverage` (the share of all cells the client has visited, Kesarwani's
    coverage) and :meth:`class_entropy` (normalized entropy of the predicted classes of
    the window, ÷ ln K).

    What it misses: attacks whose queries stay in benign cells (small steps around
    natural seeds, HopSkipJump, ActiveThief on in-distribution data), inputs that only
    rearrange plausible values (flipped digits: 20-60 % novel), and very high-dimensional
    inputs, where a few hyperplanes cut too coarsely. Inputs without vectors are not
    judged (None).

    Cost per batch of m queries: one (m, d) x (d, tables * bits) product, a unique over
    the m * tables visited cells, a few gathers and scatters on the bitmaps and the
    shared counts, and one cumulative sum over the window (O(m d tables bits + window)).
    State per client: ``tables * 2**bits / 8 + 3 * window + 16`` bytes (a visited-cell
    bitmap per partition, a bool novelty and an int16 predicted-class slot per window
    entry, two int64 counters); 828 bytes with the defaults. Shared per model:
    ``tables * (4 * 2**bits + 8)`` bytes (16 KiB with the defaults).
    """

    name: ClassVar[str] = "coverage"
    Params: ClassVar[type[DetectorParams]] = CoverageParams
    threshold_param: ClassVar[str | None] = "threshold"
    default_enabled: ClassVar[bool] = True
    client_metrics: ClassVar[tuple[ClientMetric, ...]] = (
        ClientMetric("monitaur_client_feature_coverage", "gauge", "Share of feature-space cells the client has ever queried, 0 to 1 (averaged over partitions)."),
        ClientMetric(
            "monitaur_client_class_entropy",
            "gauge",
            "Normalized entropy (0 to 1) of the classes predicted for the client's recent queries; near 1: evenly spread over all classes.",
        ),
    )
    params: CoverageParams

    def __init__(self, params: DetectorParams, context: ModelContext) -> None:
        super().__init__(params, context)
        p = self.params
        cells = 1 << p.bits
        # (tables * bits, tables): column t sums the bits of partition t into a cell index,
        # offset by t * 2**bits so that all partitions share one flat index space.
        # float64 holds these integers exactly and lets the product use BLAS.
        weights = np.zeros((p.tables * p.bits, p.tables), dtype=np.float64)
        for t in range(p.tables):
            weights[t * p.bits : (t + 1) * p.bits, t] = 1 << np.arange(p.bits)
        self._weights = weights
        self._base = np.arange(p.tables, dtype=np.float64) * cells
        self._visits = np.zeros(p.tables * cells, dtype=np.uint32)  # distinct clients per cell
        self._totals = np.zeros(p.tables, dtype=np.int64)  # distinct visits per partition
        # Without a reference: the hyperplanes, and the projection folded with the live
        # statistics (recomputed when they change).
        self._planes: tuple[np.ndarray, np.ndarray] | None = None
        self._folded: tuple[object, int, np.ndarray, np.ndarray] | None = None
        # With a reference: the folded projection and thresholds (see _fold), and the rare cells.
        self._ref: tuple[np.ndarray, np.ndarray] | None = None
        self._rare: np.ndarray | None = None

    # -- reference --------------------------------------------------------------
    def fit(self, reference: Reference) -> State | None:
        x = reference.vectors
        if x is None or x.ndim != 2 or x.shape[0] < 2:
            return None
        x = np.asarray(x, dtype=np.float64)
        if reference.stats is not None and reference.stats.dim == x.shape[1]:
            mean, std = reference.stats.mean.copy(), reference.stats.std.copy()
        else:
            mean = x.mean(axis=0)
            std = x.std(axis=0, ddof=1)
            std = np.where(std > 1e-6, std, 1.0)
        p = self.params
        normals, offsets = hyperplanes(x.shape[1], p.bits, p.spread, p.seed, p.tables)
        a, c = _fold(mean, std, normals)
        proj = x @ a
        sigma = proj.std(axis=0)
        sigma = np.where(sigma > 1e-12, sigma, 1.0)
        cuts = offsets * sigma
        flat = self._flat_cells(proj > c + cuts)
        mass = np.bincount(flat.ravel(), minlength=self._visits.shape[0]) / x.shape[0]
        return {"mean": mean, "std": std, "normals": normals, "cuts": cuts, "mass": mass}

    def load_reference(self, reference: State) -> None:
        mean = np.asarray(reference["mean"], dtype=np.float64)
        std = np.asarray(reference["std"], dtype=np.float64)
        normals = np.asarray(reference["normals"], dtype=np.float64)
        cuts = np.asarray(reference["cuts"], dtype=np.float64)
        mass = np.asarray(reference["mass"], dtype=np.float64)
        d, p = mean.shape[0], self.params
        width = p.tables * p.bits
        if std.shape != (d,) or normals.shape != (d, width) or cuts.shape != (width,) or mass.shape != self._visits.shape:
            raise ValueError(f"coverage reference does not fit {p.tables} partitions of {p.bits} bits over {d} features")
        if self.context.input_dim is not None and d != self.context.input_dim:
            raise ValueError(f"coverage reference has {d} features; model {self.context.name} has {self.context.input_dim}")
        a, c = _fold(mean, std, normals)
        self._ref = (a, c + cuts)
        self._rare = mass < p.rare_mass

    # -- shared state -----------------------------------------------------------
    def shared_state(self) -> State | None:
        return {"visits": self._visits.copy(), "totals": self._totals.copy()}

    def load_shared_state(self, state: State) -> None:
        visits = np.asarray(state["visits"])
        if visits.shape != self._visits.shape:
            raise ValueError(f"coverage shared state has {visits.shape[0]} cells; expected {self._visits.shape[0]}")
        self._visits = visits.astype(np.uint32, copy=True)
        self._totals = self._visits.reshape(self.params.tables, -1).sum(axis=1, dtype=np.int64)

    def global_view(self) -> dict[str, float]:
        """The model-level coverage of all clients together (the union of their cells), averaged over partitions.

        ``cells_visited``: cells any client has visited; ``coverage``: their share of all
        cells; ``visits``: distinct (client, cell) visits; with a reference also
        ``rare_cells_visited`` (visited cells that are rare in the reference) and
        ``rare_visit_share`` (the share of distinct visits that went to rare cells).
        """
        t = self.params.tables
        visited = self._visits > 0
        out: dict[str, float] = {
            "cells_visited": float(visited.sum()) / t,
            "coverage": float(visited.mean()),
            "visits": float(self._totals.sum()) / t,
        }
        if self._rare is not None:
            out["rare_cells_visited"] = float((visited & self._rare).sum()) / t
            total = int(self._totals.sum())
            out["rare_visit_share"] = float(self._visits[self._rare].sum(dtype=np.int64)) / total if total else math.nan
        return out

    # -- detection ----------------------------------------------------------------
    def init_state(self) -> State:
        p = self.params
        return {
            "visited": np.zeros(max(p.tables * (1 << p.bits) // 8, 1), dtype=np.uint8),
            "novel_buf": np.zeros(p.window, dtype=np.bool_),
            "novel_count": np.zeros((), dtype=np.int64),
            "class_buf": np.full(p.window, -1, dtype=np.int16),
            "class_count": np.zeros((), dtype=np.int64),
        }

    def _flat_cells(self, above: np.ndarray) -> np.ndarray:
        """(m, tables) flat cell indices from the (m, tables * bits) hyperplane sides."""
        return (np.matmul(above, self._weights, dtype=np.float64) + self._base).astype(np.int64)

    def cells(self, vectors: np.ndarray) -> np.ndarray | None:
        """(m, tables) the flat cell index (``t * 2**bits + cell``) of each input in each partition t.

        None when no standardization is known yet.
        """
        if self._ref is not None:
            a, limits = self._ref
        else:
            stats = self.context.stats
            if stats is None or stats.dim != vectors.shape[1] or stats.count < self.params.min_stats_count:
                return None
            p = self.params
            if self._planes is None or self._planes[0].shape[0] != stats.dim:
                self._planes = hyperplanes(stats.dim, p.bits, p.spread, p.seed, p.tables)
                self._folded = None
            normals, cuts = self._planes
            folded = self._folded
            if folded is None or folded[0] is not stats or folded[1] != stats.count:
                a, c = _fold(stats.mean, stats.std, normals)
                folded = self._folded = (stats, stats.count, a, c + cuts)
            a, limits = folded[2], folded[3]
        if vectors.shape[1] != a.shape[0]:
            raise ValueError(f"input of {vectors.shape[1]} features; the coverage cells have {a.shape[0]}")
        return self._flat_cells(vectors @ a > limits)

    def update(self, state: State, batch: Batch) -> Signals | None:
        x = batch.vectors
        if x is None:
            return None
        cells = self.cells(x)
        if cells is None:
            return None
        p = self.params
        m = cells.shape[0]
        visited = state["visited"]
        byte = cells >> 3
        bit = (cells & 7).astype(np.uint8)
        seen = ((visited[byte] >> bit) & 1).astype(bool)  # (m, tables): visited before this batch
        flat = cells.ravel()  # event-major: an earlier event's cells come first
        first = np.zeros(flat.shape[0], dtype=bool)
        first[np.unique(flat, return_index=True)[1]] = True
        new_visit = first.reshape(cells.shape) & ~seen  # the client's first visits to a cell
        if self._rare is not None:
            rare = self._rare[cells]
            judged = None
        else:
            # Distinct visits per partition known before each event (the batch's earlier
            # first visits included), so a batch gives the same verdicts as its events one
            # at a time; a cell's own first visit by this client never counts for it.
            totals = self._totals + np.cumsum(new_visit, axis=0, dtype=np.int64) - new_visit
            others = self._visits[cells].astype(np.int64) - seen  # clients other than this one
            rare = others < p.rare_mass * totals
            judged = totals.sum(axis=1) >= p.tables * p.min_global_visits
        novel = 2 * rare.sum(axis=1) >= p.tables  # rare in at least half of the partitions
        # Fold the batch in: the client's bitmaps and the model's distinct-client counts.
        fresh = cells[new_visit]  # distinct cells
        if fresh.shape[0]:
            self._visits[fresh] += np.uint32(1)
            self._totals += new_visit.sum(axis=0)
            np.bitwise_or.at(visited, byte[new_visit], np.left_shift(np.uint8(1), bit[new_visit]))
        cls_count = int(state["class_count"])
        ring_write(state["class_buf"], cls_count, batch.predicted.astype(np.int16))
        state["class_count"][...] = cls_count + m
        rows = None if judged is None else np.flatnonzero(judged)
        hits = novel if rows is None else novel[rows]
        return share_signals(state["novel_buf"], state["novel_count"], hits, rows, m, p.min_events, p.threshold)

    # -- extra per-client statistics ---------------------------------------------
    def client_values(self, state: State) -> dict[str, float]:
        return {"monitaur_client_feature_coverage": self.coverage(state), "monitaur_client_class_entropy": self.class_entropy(state)}

    def coverage(self, state: State) -> float:
        """The share of all cells the client has ever visited (Kesarwani's coverage), averaged over partitions."""
        return float(np.unpackbits(state["visited"]).sum()) / self._visits.shape[0]

    def class_entropy(self, state: State) -> float:
        """Normalized entropy (÷ ln K) of the predicted classes in the client's window; NaN if unknown.

        K is the model's number of classes (or the largest class index seen + 1).
        """
        classes = ring_in_order(state["class_buf"], int(state["class_count"]))
        classes = classes[classes >= 0]
        if classes.size == 0:
            return math.nan
        k = self.context.num_classes or int(classes.max()) + 1
        if k < 2:
            return math.nan
        counts = np.bincount(classes, minlength=k).astype(np.float64)
        p = counts[counts > 0] / classes.size
        return float(-(p * np.log(p)).sum() / math.log(k))
