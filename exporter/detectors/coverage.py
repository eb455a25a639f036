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
    min_threshold_field,
)
from exporter.detectors.kit import ring_in_order, ring_write, share_signals, vector_rows


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
            "A cell is rare when it holds less than this share of the reference's benign queries."
        ),
    )
    window: int = Field(100, ge=1, le=100_000, description="How many of the client's last judged queries the novelty share is taken over.")
    min_events: int = Field(20, ge=1, description="Judged queries needed in the window before the client can be flagged (<= window).")
    threshold: float = Field(
        0.75,
        ge=0.0,
        le=1.0,
        description=(
            "Flag when at least this share of the window's queries was novel. iid benign traffic "
            "is novel about 1 % of the time, uniform random queries almost always; honest clients "
            "that send unusual inputs (partly drawn images) reach 0.7, hence the conservative default. Calibration "
            "overwrites it per model."
        ),
    )
    min_threshold: float = min_threshold_field(0.2)


_MIN_FIT = 500  # fewer reference samples than this place the cells by noise


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

    Cells: the query is standardized with the reference's feature scaling and, in each
    of ``tables`` independent partitions, its cell is the bit pattern of ``bits`` fixed
    random hyperplanes ``[z . n_j > o_j * sigma_j]``: unit normals n_j, offsets
    o_j ~ N(0, spread^2) in units of the benign spread sigma_j along n_j. Hyperplanes through the mean (``spread`` 0, plain
    SimHash) make cones that only see a query's direction; in 64 dimensions benign noise
    fills all directions, so far queries are hardly rarer than benign ones. A single
    partition is a lottery: far queries all fall in the few unbounded cells in their
    direction, and whether those hold benign mass depends on the draw. Measured on
    digit-like data over 10 seeds (share of queries called novel): one 10-bit partition,
    benign 1-7 %, uniform random 5-99 %; 4 partitions through the mean, benign about 11 %,
    uniform random 47-100 %; the defaults (4 partitions with offsets, majority), benign
    at most 1.3 %, uniform random at least 97 %, feature-permuted digits at least 72 %.

    Novelty: a cell is *rare* when it holds less than ``rare_mass`` of the reference's
    benign queries (``fit``: from a calibration profile, or from the model's live
    baseline), and a query is *novel* when its cells are rare in at least half of the
    partitions. Nothing is judged before the model has a reference. Rarity is a
    property of the reference, not of live traffic, so no client can make its own
    cells look popular, or another client's look rare.

    The score is the share of novel queries among the client's last ``window`` judged
    queries, ``novel / max(n, min_events)`` (it ramps up for a new client instead of
    jumping to 1); flagged when it reaches ``threshold`` with ``n >= min_events``. Novelty
    is a property of the cell, not of the client's history, so the score of a client that
    keeps querying rare regions stays high (a "first visit" rate would fall as the
    client's own coverage saturates).

    Collusion: splitting a spread-out attack over several API keys does not dilute it,
    because each member's share of novel queries is the attack's share, whatever its
    volume.

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

    Cost per batch of m queries: one (m, d) x (d, tables * bits) product, a gather of the
    rare-cell mask, a scatter into the client's bitmaps and one cumulative sum over the
    window (O(m d tables bits + window)).
    State per client: ``tables * 2**bits / 8 + 3 * window + 16`` bytes (a visited-cell
    bitmap per partition, a bool novelty and an int16 predicted-class slot per window
    entry, two int64 counters); 828 bytes with the defaults. Per model: the reference's
    folded projection and a rare-cell mask (``tables * 2**bits`` bytes).
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
        self._cells = p.tables * cells
        # The folded projection and thresholds (see _fold), and the rare cells, from the reference.
        self._ref: tuple[np.ndarray, np.ndarray] | None = None
        self._rare: np.ndarray | None = None

    # -- reference --------------------------------------------------------------
    def fit(self, reference: Reference) -> State | None:
        x = reference.vectors
        if x is None or x.ndim != 2 or x.shape[0] < _MIN_FIT:
            return None
        x = np.asarray(x, dtype=np.float64)
        if reference.scaling is not None and reference.scaling.dim == x.shape[1]:
            mean, std = reference.scaling.center.copy(), reference.scaling.spread.copy()
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
        mass = np.bincount(flat.ravel(), minlength=self._cells) / x.shape[0]
        # A cell that holds fewer than two of n samples cannot be told from an empty one:
        # with few samples, "rare" means at most one of them (a mass below 2 / n).
        rare_below = max(p.rare_mass, 2.0 / x.shape[0])
        return {"mean": mean, "std": std, "normals": normals, "cuts": cuts, "mass": mass, "rare_below": np.asarray(rare_below)}

    def load_reference(self, reference: State) -> None:
        mean = np.asarray(reference["mean"], dtype=np.float64)
        std = np.asarray(reference["std"], dtype=np.float64)
        normals = np.asarray(reference["normals"], dtype=np.float64)
        cuts = np.asarray(reference["cuts"], dtype=np.float64)
        mass = np.asarray(reference["mass"], dtype=np.float64)
        d, p = mean.shape[0], self.params
        width = p.tables * p.bits
        if std.shape != (d,) or normals.shape != (d, width) or cuts.shape != (width,) or mass.shape != (self._cells,):
            raise ValueError(f"coverage reference does not fit {p.tables} partitions of {p.bits} bits over {d} features")
        if self.context.input_dim is not None and d != self.context.input_dim:
            raise ValueError(f"coverage reference has {d} features; model {self.context.name} has {self.context.input_dim}")
        a, c = _fold(mean, std, normals)
        self._ref = (a, c + cuts)
        self._rare = mass < float(np.asarray(reference.get("rare_below", p.rare_mass)))

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

        None before the model has a reference (cells are placed by the benign spread).
        """
        if self._ref is None:
            return None
        a, limits = self._ref
        if vectors.shape[1] != a.shape[0]:
            raise ValueError(f"input of {vectors.shape[1]} features; the coverage cells have {a.shape[0]}")
        return self._flat_cells(vectors @ a > limits)

    def update(self, state: State, batch: Batch) -> Signals | None:
        m = len(batch)
        cls_count = int(state["class_count"])  # the class histogram needs no reference
        ring_write(state["class_buf"], cls_count, batch.predicted.astype(np.int16))
        state["class_count"][...] = cls_count + m
        if self._ref is None or self._rare is None:
            return None
        idx, x = vector_rows(batch, self._ref[0].shape[0])
        cells = self.cells(x) if x is not None else None
        if cells is None:
            return None
        p = self.params
        visited = state["visited"]
        np.bitwise_or.at(visited, cells >> 3, np.left_shift(np.uint8(1), (cells & 7).astype(np.uint8)))
        novel = 2 * self._rare[cells].sum(axis=1) >= p.tables  # rare in at least half of the partitions
        return share_signals(state["novel_buf"], state["novel_count"], novel, idx, m, p.min_events, p.threshold)

    # -- extra per-client statistics ---------------------------------------------
    def client_values(self, state: State) -> dict[str, float]:
        return {"monitaur_client_feature_coverage": self.coverage(state), "monitaur_client_class_entropy": self.class_entropy(state)}

    def coverage(self, state: State) -> float:
        """The share of all cells the client has ever visited (Kesarwani's coverage), averaged over partitions."""
        return float(np.unpackbits(state["visited"]).sum()) / self._cells

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
