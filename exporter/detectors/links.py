"""Cross-client links: queries that continue the exploration another client started (Sybil splits)."""

from __future__ import annotations

from collections import deque
from typing import ClassVar

import numpy as np
from pydantic import Field

from exporter.detectors.base import (
    Batch,
    Block,
    Detector,
    DetectorParams,
    ModelContext,
    Reference,
    Signals,
    State,
    WindowedParams,
    min_threshold_field,
)
from exporter.detectors.fingerprint import client_key
from exporter.detectors.kit import count_true, feature_spans, ring_in_order, ring_write, share_signals, vector_rows
from exporter.hashing import splitmix64

_U64 = np.uint64
_OWN_BITS = 12  # buckets of the table of the clients' own recent queries: 2**_OWN_BITS, clients hashed into them
_PROBE_MIN = 3  # probe features on which both steps must agree before the full test
# Feature values per block of (query, candidate) pairs compared feature by feature (1 MiB of
# float32 per array): the pairs of a piece can be many and the inputs wide, and one client can
# make every pair pass the cheap test, so the full comparisons run in blocks of this size.
_PAIR_VALUES = 1 << 18
_FEW_PEERS = 64  # add_peers names up to this many (row, peer) entries one by one, more by sorting
_MAX_DECIMALS = 6
_MAX_ID = 1 << 62  # a restored index's next id must be below this: ids grow by one per query, and must not pass int64
FAR_QUANTILE = 0.99  # the anchors' spacing that far_factor multiplies: this quantile of their nearest-other distances


class LinksParams(WindowedParams):
    """Parameters of :class:`LinksDetector` and of the groups built from its links (:mod:`exporter.groups`)."""

    # -- the index of recent queries ---------------------------------------------------
    tables: int = Field(16, ge=1, le=16, description="Independent hash tables of the index (p-stable LSH); more find more parents, at a cost per query (docs/groups.md, Cost).")
    projections: int = Field(6, ge=1, le=16, description="Random projections per table; a table's bucket is the cell of all of them.")
    width: float = Field(0.5, gt=0.0, le=100.0, description="Cell width of each projection, in units of the features' ranges.")
    depth: int = Field(16, ge=1, le=64, description="Most recent queries kept per bucket: candidates per query are at most tables x depth.")
    bucket_bits: int = Field(14, ge=6, le=22, description="Buckets per table: 2**bucket_bits (cells are hashed into them).")
    seed: int = Field(0, ge=0, description="Seed of the projections; the same seed gives the same buckets in every process.")
    own_candidates: int = Field(
        64,
        ge=0,
        le=1024,
        description=(
            "The client's own last new queries added to each of its queries' candidates (a table of the clients' recent "
            "queries, 4,096 buckets of this many). A key that grows its own part of a split's set steps from its own earlier "
            "points, which busier traffic in the same region pushes out of the shared buckets before the step that continues "
            "them comes; with them, its steps are verified and compared with the other keys' (docs/groups.md). A client's "
            "own points never link it to anybody. 0: none."
        ),
    )
    max_queries: int = Field(65_536, ge=4096, le=4_000_000, description="Queries kept in the shared index (all clients of the model); the oldest are overwritten first.")
    max_index_mib: float = Field(
        64.0,
        gt=0.0,
        le=65_536.0,
        description="Memory of the index's rows per model, in MiB: for wide inputs fewer than max_queries queries are kept (at least 2 x chunk), so that an input length a client chooses cannot make the index large. The bucket tables and the map of digests come on top.",
    )
    ttl_seconds: float = Field(86_400.0, gt=0.0, description="Indexed queries older than this (event time) are no longer compared.")
    chunk: int = Field(256, ge=16, le=4096, description="A query's own step is usable as a parent's only for queries of a later chunk of this many indexed queries (keeps the work vectorized and independent of batching).")
    # -- what a link is --------------------------------------------------------------------
    min_step: float = Field(0.02, gt=0.0, lt=1.0, description="A feature moved when it changed by at least this share of its range ...")
    precision_units: float = Field(1.5, ge=0.0, le=100.0, description="... and by at least this many units of the benign data's precision (rounding is no step).")
    tolerance: float = Field(0.005, gt=0.0, lt=0.5, description="A step repeats another when each moved feature changed by the same amount within this relative tolerance (an attacker's steps repeat exactly, up to the rounding of logged inputs).")
    agreement: float = Field(0.8, gt=0.0, le=1.0, description="Share of the features moved by both steps that must agree (features clipped at the box differ).")
    min_moved: float = Field(0.3, gt=0.0, le=1.0, description="Both steps move at least this share of the features.")
    overlap: float = Field(
        0.8, ge=0.0, le=1.0,
        description="A change continues another client's step only if, of the features either moves, at least this share is moved by both: a step that moves only features whose natural values are predictable (pixels that are nearly always 0) would otherwise be continued by natural records, and frame their senders (0: no such check).",
    )
    min_moved_features: int = Field(
        8,
        ge=1,
        le=4096,
        description=(
            "... and at least this many features (every moving feature of a model with fewer): on a few features, equal "
            "sizes agree by chance between honest records, which then look as if they moved alike (docs/groups.md)."
        ),
    )
    returns: float = Field(0.9, gt=0.5, le=1.0, description="A change that goes back along the parent's step on more than this share of the features is a return near an earlier point (an edited record sent again), not a step.")
    probe: int = Field(8, ge=1, le=4096, description="Cheap first test on this many features (those benign inputs spread most): the two steps' sizes agree on at least 3 of them; the full test runs on the few candidates that pass.")
    step_bits: int = Field(14, ge=6, le=22, description="Buckets of the table of steps: 2**step_bits (steps are filed by their signs and sizes, to the factor of two, on the probe features).")
    step_depth: int = Field(4, ge=1, le=64, description="Most recent steps kept per bucket of the table of steps.")
    known_steps: int = Field(
        16,
        ge=0,
        le=64,
        description=(
            "Distinct sizes of the model's recent verified steps remembered (steps filed in the table of steps, within "
            "steps_window): a query that continued no candidate and is no sign step from one takes its own step from the "
            "candidate its change from has one of these sizes on three quarters of the probe features. An attack's steps "
            "have its own sizes, whatever its units (0: never)."
        ),
    )
    steps_window: float = Field(3600.0, gt=0.0, description="Two clients move alike when a query's step repeats, size for size and sign for sign (or every sign flipped), the step of another client's query made at most this many seconds before.")
    own_repeats: int = Field(64, ge=1, le=4096, description="Digests of the client's last queries remembered: a query the client already sent is no new point, whatever the index still holds.")
    anchors: int = Field(1024, ge=0, le=16_384, description="Benign reference queries kept for the off-manifold test of exact repeats and near inputs (0: neither is ever evidence).")
    far_factor: float = Field(3.0, ge=1.0, le=100.0, description="An input is off-manifold when it lies farther from every anchor than this many times the 99 % quantile of the anchors' distances to their nearest other anchor (RMS over the moving features, in range units). A client that sends an off-manifold input another client sent first is linked to that client ...")
    near_factor: float = Field(0.5, ge=0.0, le=100.0, description="An off-manifold input that lies within this many times the anchors' spacing (the same quantile, RMS, range units) of another client's earlier off-manifold input, with none of the sender's own as near, links its sender to that client, as a repeat does (0: never). Splits whose keys explore one region off the data (line searches, active learning, noise around shared seeds) send such inputs; honest clients seldom send off-manifold inputs at all.")
    distinct_repeats: int = Field(8, ge=0, le=1024, description="... once it has repeated (or come near) more than this many distinct such inputs: clients that share a few synthetic fixtures (health checks, test inputs) are not linked for it.")
    repeats_remembered: int = Field(32, ge=1, le=4096, description="Digests of the distinct off-manifold inputs a client repeated, remembered: a fixture sent again and again counts once.")
    # -- the per-client score ---------------------------------------------------------------
    window: int = Field(200, ge=1, le=100_000, description="How many of the client's last judged queries the share of linked queries is taken over.")
    min_events: int = Field(50, ge=1, description="Judged queries needed in the window before the client can be flagged (<= window): one chance coincidence among a few queries is no share.")
    threshold: float = Field(
        0.03,
        ge=0.0,
        le=1.0,
        description="Flag when at least this share of the window's queries continued another client's exploration. A flagged client can join a group. Calibration overwrites it per model.",
    )
    min_threshold: float = min_threshold_field(0.02)
    # -- groups (exporter.groups) ---------------------------------------------------------------
    group_min_links: int = Field(3, ge=1, le=1000, description="Two flagged clients are linked into one group after this many links between them (either way), each having made at least one.")
    group_threshold: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        exclude=True,
        description="A group is flagged while the share of its members' queries that continued another member's exploration is at least this. Calibration overwrites it per model.",
    )
    calibration_ceiling: float = Field(
        0.05,
        gt=0.0,
        le=1.0,
        exclude=True,
        description=(
            "A calibration client that linked more than this share of a full window of queries (more than calibration_ceiling x "
            "window of any window consecutive queries: 10 of 200) continued other keys' explorations, which honest clients do not "
            "do by chance: it is part of an attack inside the calibration log, and is left out of every reference and threshold "
            "that calibration learns (and named, with a warning); calibration groups scored over it, or standing with such a client, "
            "are left out of group_threshold. "
            "Learned as benign, such a split would set both thresholds just above its own values."
        ),
    )
    max_tracked_clients: int = Field(10_000, ge=2, le=10_000_000, description="Clients with link evidence remembered per model (least recently linked forgotten first).")
    max_peers: int = Field(
        16,
        ge=1,
        le=100,
        description="Peers remembered per client (the heaviest, by a space-saving count). A member of a large group links with "
        "many keys; an edge pushed out of both clients' peers no longer holds their group together.",
    )
    max_group_series: int = Field(50, ge=0, le=10_000, exclude=True, description="Groups exported with their own series (flagged first, then by score).")
    max_member_series: int = Field(100, ge=1, le=10_000, exclude=True, description="Members listed per exported group (monitaur_group_member_info).")


class LinksDetector(Detector):
    """Flags a client whose queries continue explorations that *other* clients started.

    What it catches: a synthetic-data extraction (JbDA, T-RND, I-FGSM-like augmentation)
    split over several API keys. Such an attack builds one lattice of queries: every new
    point is an earlier point moved by the same step in every feature (``x + λ·sign(∇)``),
    and after a split the earlier point was usually sent by another key. Each query is
    compared with recent queries of every client (a shared index); it *continues* one of
    them, p, when the change from p repeats p's own step: every moved feature changed by
    the same amount (within ``tolerance``, on ``agreement`` of the features both moved),
    without going back along it (a change along p's step, three points on one line, links
    too, but is not filed in the table of steps below: honest data holds such lines). That
    test needs no units: the attacker's feature box and λ are whatever they are, and the
    step sizes only have to repeat, which is what the lattice guarantees and what
    independent inputs almost never do (features move by unrelated amounts; rounding noise
    is below the precision floor).

    It also links a query that continues a candidate's own step (the test above; the
    candidate may be its own client's) when its change from that candidate repeats, size
    for size and sign for sign (or every sign flipped), a *verified* step of another client
    made within ``steps_window`` (the table of steps: steps of queries that continued an
    earlier one with a turn, or matched the table): the keys of a split that each grow their
    own part of the set, following one substitute model, step alike without deriving from
    each other's points. Only a change that continues a step is compared: a change between
    two natural records continues nothing, whichever step it happens to repeat. An attacker
    who knows the records an honest client sends (a public dataset) could otherwise file
    their differences as verified steps of its own, far off the data, and have the honest
    client's records linked to it (docs/groups.md).

    It also links a query that exactly repeats another client's indexed input when that
    input is *off-manifold* (farther from every one of ``anchors`` benign reference queries
    than ``far_factor`` times their own 99 % nearest-other spacing): a split's keys re-send
    each other's synthetic points (a JbDA re-queries the children whose signs did not
    change), where honest clients repeat natural inputs. Such a link counts for a client
    only for a distinct input it has not repeated before, and only past its first
    ``distinct_repeats``, so that a few synthetic fixtures shared by many clients (health
    checks, test inputs) link nobody, even when an attacker sent them first.

    It links, in the same way and with the same guards, a query that is itself off-manifold
    and lies within ``near_factor`` anchor spacings of another client's indexed off-manifold
    input, nearer than any of its own client's: split line searches, active learning and
    noise around shared seeds explore one region off the data from several keys, without
    fixed steps or exact repeats.

    Sharing popular inputs, sending similar data, retrying, or starting at the same time
    does none of this, so honest clients are not linked for it. The evidence is directed:
    the client whose query continued p's step is the one exploring; p's client is only
    named as its peer. An attacker who copies an honest client's queries, or steps away
    from them, makes *itself* look linked, never the honest client (groups join only
    clients that are flagged themselves, :mod:`exporter.groups`).

    How: the index keeps the last ``max_queries`` queries of the model (fewer for wide
    inputs, so that their rows fit in ``max_index_mib``: :func:`index_rows`), in units of the
    features' ranges (from the benign reference), with each query's own step (its change
    from the first earlier query it continued, else from the candidate it is a sign step
    away from, else from the one its change from has the sizes of one of the model's recent
    verified steps, else from its nearest candidate). It has
    ``tables`` hash tables; a query's bucket in each is the cell of ``projections`` random
    projections of ``width``, and each bucket keeps its ``depth`` most recent queries. A
    new query's candidates are those (at most ``tables x depth``) and its own client's last
    ``own_candidates`` new queries (a table by client): a key that grows its own part of a
    split's set steps from its own earlier points, and busier traffic in the same region
    pushes those out of the buckets long before the step that continues them comes. A
    client's own points give its queries their own steps, never a link. A cheap test on the
    sizes of the two steps on the ``probe`` features (those benign inputs spread most)
    picks the few worth the full test. A query that repeats a point the index holds is no
    new point: it continues nothing and is not filed again, since popular inputs and
    retries would fill the buckets and push out the points an exploration continues from;
    the off-manifold test of a repeated input runs once per indexed entry (with
    ``near_factor`` > 0, once per indexed query, as it is filed). Score: the share
    of linked queries among the client's last ``window`` judged queries,
    ``linked / max(n, min_events)``; flagged at ``threshold``.

    Batching: matching and indexing happen in :meth:`prepare`, in time order over all the
    clients' queries. A query's own step becomes usable as a parent's once its chunk of
    ``chunk`` indexed queries is complete, so a block is matched piece by piece, each
    vectorized, with the same result as one query at a time whatever the cut (chunks are
    counted in indexed queries, not in blocks). Entries past ``ttl_seconds`` or
    overwritten are not compared.

    What it misses: steps of random sizes per feature, parents older than the index holds,
    another client's parents pushed out of their buckets by busier traffic (the index
    remembers buckets, not time: recall falls as benign traffic in the same region grows;
    a client's own last ``own_candidates`` are kept apart), the first step from
    each natural seed (a seed has no step to continue), and splits whose members neither
    derive from each other's points nor step alike (each its own lattice, with its own
    substitute; the steps detector still flags each member).

    Not judged: queries without a vector of the model's length, and every query before the
    model has a reference. Without anchors (a reference fitted before them, or ``anchors``
    0) neither a repeat nor nearness links anybody; without a spacing in the reference (one
    fitted before near links), nearness does not.

    Cost per query: one (d x tables·projections) projection, a gather of at most
    ``tables x depth + own_candidates`` candidate rows and one multiply-add over them, and the full test on
    the few that pass the cheap one; with ``near_factor`` > 0, a bound on its distance to the
    anchors from one candidate's (``d'`` multiply-adds), its distance to every anchor
    (``anchors x d'``) only where the bound does not settle the test, and for an off-manifold
    query one distance per candidate that is off-manifold too; without, the anchors' distance per repeated input, once; while
    verified steps are recent (an attack under way), for the queries that are no sign step from a candidate,
    a test of the candidates' probe changes against the union of the known sizes' ranges, and a count per
    size for the few in it. State per
    client: ``window + 8·own_repeats + 8·repeats_remembered + 32`` bytes (1,000 B with the
    defaults). Shared index per model: ``8·d' + 12·min(probe, d') + 29`` bytes per query (d'
    features that move in the reference, :func:`row_bytes`), grown with the traffic up to
    its capacity (``max_queries``, or as many as fit in ``max_index_mib``), plus
    ``8 x depth + 8`` bytes per bucket (``tables x 2**bucket_bits`` buckets: 34 MiB with the
    defaults), plus ``8 x own_candidates + 8`` bytes per bucket of the table by client (4,096
    buckets: 2 MiB with the defaults), plus the map of filed digests: at most ``1.25 x capacity + chunk`` entries of about 100 B in CPython
    (two int objects and a dict slot: about 8 MiB with the defaults), plus ``4·d'·anchors``
    bytes of anchors, plus ``(4·min(probe, d') + 8)·known_steps`` bytes of known step sizes.
    """

    name: ClassVar[str] = "links"
    Params: ClassVar[type[DetectorParams]] = LinksParams
    threshold_param: ClassVar[str | None] = "threshold"
    # Cross-client evidence: it makes groups and their own alert, not the client's verdict
    # (a member may be flagged on its own evidence by steps, ood or coverage).
    verdict: ClassVar[bool] = False
    state_format: ClassVar[str] = "3"  # 2: the per-client ring of distinct repeats; 3: units from the benign mean
    default_enabled: ClassVar[bool] = False  # opt-in: it costs about half of replay throughput (docs/groups.md, Cost)
    params: LinksParams

    _INITIAL_ROWS = 4096

    def __init__(self, params: DetectorParams, context: ModelContext) -> None:
        super().__init__(params, context)
        self._dim = context.input_dim
        self._ref: State | None = None
        self._reset_geometry()
        self._reset()

    # -- reference -----------------------------------------------------------------------
    def fit(self, reference: Reference) -> State | None:
        found = feature_spans(reference, self._dim)
        if found is None:
            return None
        x, span, _ = found
        spread = np.where(span > 0, x.std(axis=0) / np.where(span > 0, span, 1.0), 0.0)
        # Queries are kept in float32 units of the ranges, centred on the benign mean: uncentred, a
        # feature whose values sit far from zero against their spread (coordinates, pressures)
        # loses its small differences to rounding, and so the steps and the distances to the anchors.
        state: State = {"span": span, "unit": precision_units(x), "spread": spread, "center": x.mean(axis=0)}
        # Anchors are where benign inputs lie: the calibration inputs as sent where there are such.
        # Winsorized, a natural record with one extreme feature would lie off the data, and
        # honest clients that send it would look as if they explored there together.
        raw = reference.unclipped
        anchors = anchor_sample(raw if raw is not None and raw.shape == x.shape else x, self.params.anchors, self.params.seed)
        if anchors is not None:
            spacing = anchor_spacing(anchors, span)
            state["anchors"] = anchors.astype(np.float32)
            state["far"] = np.array(self.params.far_factor * spacing)
            state["spacing"] = np.array(spacing)
        return state

    def load_reference(self, reference: State) -> None:
        span = np.asarray(reference["span"], dtype=np.float64)
        unit = np.asarray(reference["unit"], dtype=np.float64)
        d = self._dim
        if span.ndim != 1 or (d is not None and span.shape[0] != d) or unit.shape != span.shape:
            raise ValueError("links reference: span and unit must hold one value per feature")
        if not (np.isfinite(span).all() and np.isfinite(unit).all()) or (span < 0).any() or (unit < 0).any():
            raise ValueError("links reference: span and unit must be finite and non-negative")
        self._ref = {"span": span, "unit": unit}
        if "center" in reference:  # optional: references fitted before it have none (the units start at 0)
            center = np.asarray(reference["center"], dtype=np.float64)
            if center.shape != span.shape or not np.isfinite(center).all():
                raise ValueError("links reference: center must hold one finite value per feature")
            self._ref["center"] = center
        if "spread" in reference:
            spread = np.asarray(reference["spread"], dtype=np.float64)
            if spread.shape != span.shape or not np.isfinite(spread).all():
                raise ValueError("links reference: spread must hold one finite value per feature")
            self._ref["spread"] = spread
        if "anchors" in reference:  # optional: references fitted before the off-manifold test have none
            anchors = np.asarray(reference["anchors"], dtype=np.float32)
            far = float(np.asarray(reference.get("far", np.nan)))
            if anchors.ndim != 2 or anchors.shape[1] != span.shape[0] or anchors.shape[0] < 2 or not np.isfinite(anchors).all():
                raise ValueError("links reference: anchors must be two or more finite rows of one value per feature")
            if not (np.isfinite(far) and far > 0.0):
                raise ValueError("links reference: far must be a finite positive distance")
            self._ref["anchors"], self._ref["far"] = anchors, np.array(far)
            if "spacing" in reference:  # optional: references fitted before near links have none (no near links)
                spacing = float(np.asarray(reference["spacing"]))
                if not (np.isfinite(spacing) and spacing > 0.0):
                    raise ValueError("links reference: spacing must be a finite positive distance")
                self._ref["spacing"] = np.array(spacing)
        self._reset_geometry()
        self._reset()  # entries in other units cannot be compared with new ones

    def _reset_geometry(self) -> None:
        """Feature layout (moving features, most spread first: the probe), projections and floors, from the reference."""
        self._inv: np.ndarray | None = None
        self._anchors: np.ndarray | None = None  # benign queries in range units (the off-manifold test), None: no test
        self._near = 0.0  # an off-manifold input this near another client's links (RMS, range units); 0: never
        self._cap = self.params.max_queries  # rows of the index (fewer for wide inputs: _reset_geometry)
        if self._ref is None or self._dim is None:
            return
        p = self.params
        span, unit = self._ref["span"], self._ref["unit"]
        spread = np.asarray(self._ref.get("spread", np.ones_like(span)), dtype=np.float64)
        moving = np.flatnonzero(span > 0)
        if moving.size == 0:
            return
        cols = moving[np.argsort(-spread[moving], kind="stable")]
        self._cols = cols
        self._probe = min(p.probe, cols.size)
        self._min_moved = max(p.min_moved * cols.size, min(p.min_moved_features, cols.size))  # features both steps move, at least
        self._cap = index_rows(p, cols.size)
        inv = 1.0 / span[cols]
        self._inv = inv.astype(np.float32)
        self._center = np.asarray(self._ref.get("center", np.zeros_like(span)), dtype=np.float64)[cols]
        self._floor = np.maximum(p.min_step, p.precision_units * unit[cols] * inv).astype(np.float32)
        rng = np.random.default_rng([p.seed, self._dim, p.tables, p.projections])
        a = rng.standard_normal((cols.size, p.tables * p.projections))
        a /= np.maximum(np.linalg.norm(a, axis=0), 1e-12)
        self._proj = a.astype(np.float32)
        self._offset = (rng.uniform(0.0, p.width, p.tables * p.projections)).astype(np.float32)
        self._mix = (splitmix64(np.arange(1, p.projections + 1, dtype=np.uint64) + _U64(p.seed)) | _U64(1)).astype(np.uint64)
        self._step_mix = (splitmix64(np.arange(1, cols.size + 1, dtype=np.uint64) ^ _U64(0x5EED)) | _U64(1)).astype(np.uint64)
        if "anchors" in self._ref:
            self._anchors = self._units(self._ref["anchors"])
            self._anchor_sq = np.einsum("ij,ij->i", self._anchors, self._anchors)
            self._far = float(self._ref["far"])
            self._near = self.params.near_factor * float(self._ref.get("spacing", 0.0))  # 0: no near links

    def _reset(self) -> None:
        p = self.params
        width = self._cols.size if self._inv is not None else 0
        self._alloc = 0
        self._U = np.zeros((0, width), dtype=np.float32)  # queries in range units (the layout's columns)
        self._S = np.zeros((0, width), dtype=np.float32)  # each query's own step
        r = min(self.params.probe, width)
        self._Up = np.zeros((0, r), dtype=np.float32)  # U on the probe features (contiguous, for the cheap test)
        self._lo = np.zeros((0, r), dtype=np.float32)  # the range of sizes that repeat S there (_bounds)
        self._hi = np.zeros((0, r), dtype=np.float32)
        self._ts = np.zeros(0, dtype=np.float64)
        self._digest = np.zeros(0, dtype=np.uint64)
        self._client = np.zeros(0, dtype=np.uint64)
        self._far_seen = np.zeros(0, dtype=np.int8)  # per entry: 0 not yet tested, 1 on the manifold, 2 off it (a cache of _repeats' test)
        self._reach = np.zeros(0, dtype=np.float32)  # per entry: an upper bound on its RMS distance to the nearest anchor (exact when off the manifold; inf: not known)
        # The tables only once a reference gives the units (34 MiB at the defaults): a model that
        # never gets one (no calibration, a baseline not yet learned) costs none.
        live = self._inv is not None
        buckets, step_buckets = ((p.tables << p.bucket_bits), 1 << p.step_bits) if live else (0, 0)
        self._slots = np.full(buckets * p.depth, -1, dtype=np.int64)  # bucket -> its recent entry ids (depth per bucket)
        self._fill = np.zeros(buckets, dtype=np.int64)  # entries ever put in each bucket
        own = (1 << _OWN_BITS) if live and p.own_candidates else 0
        self._own_slots = np.full(own * p.own_candidates, -1, dtype=np.int64)  # client's bucket -> its recent entry ids
        self._own_fill = np.zeros(own, dtype=np.int64)
        self._next = 0  # id of the next indexed query
        self._oldest = 0  # ids below this are past the TTL
        self._step_slots = np.full(step_buckets * p.step_depth, -1, dtype=np.int64)  # step bucket -> recent query ids
        self._step_fill = np.zeros(step_buckets, dtype=np.int64)
        self._step_last = -np.inf  # event time of the latest filed step
        self._pending: list[tuple[int, int]] = []  # (bucket, query id) of the steps of the current chunk, filed once it is complete
        self._known_size = np.zeros((p.known_steps, r), dtype=np.float32)  # distinct sizes of recent verified steps (probe features)
        self._known_time = np.full(p.known_steps, -np.inf)  # event time of the latest step of each size (-inf: none)
        self._filed: dict[int, int] = {}  # digest -> id of the entry filed in the buckets for that point (repeats are not filed)

    # -- per-client state -------------------------------------------------------------------
    def init_state(self) -> State:
        return {
            "link_buf": np.zeros(self.params.window, dtype=np.bool_),
            "link_count": np.zeros((), dtype=np.int64),
            "linked": np.zeros((), dtype=np.int64),  # queries linked to another client's, ever
            "sent": np.zeros(self.params.own_repeats, dtype=np.uint64),  # digests of the client's last queries, a ring
            "sent_count": np.zeros((), dtype=np.int64),
            "repeated": np.zeros(self.params.repeats_remembered, dtype=np.uint64),  # digests of distinct off-manifold repeats, a ring
            "repeated_count": np.zeros((), dtype=np.int64),
        }

    def update(self, state: State, batch: Batch) -> Signals | None:
        found = batch.prepared_for(self.name)
        if found is None:
            return None
        judged, linked = found[0], found[1].copy()
        rows = np.flatnonzero(judged)
        if rows.size:
            # A query the client itself sent before is no new point, even where the shared index
            # has forgotten it (a canary's fixture, a retry): its links are dropped here, and in the
            # block, so that groups do not count them either.
            dig = batch.digests[rows]
            ring, count = state["sent"], int(state["sent_count"])
            if linked[rows].any():  # (most batches have no link: nothing to drop)
                self._unlink(batch, linked, rows[sent_within(ring_in_order(ring, count), dig, ring.shape[0]) & linked[rows]])
            ring_write(ring, count, dig)
            state["sent_count"][...] = count + rows.size
            off_data = rows[linked[rows] & found[3][rows]]
            if off_data.size:
                self._distinct(state, batch, linked, off_data)
        hits = linked[rows]
        state["linked"][...] = int(state["linked"]) + int(np.count_nonzero(hits))
        p = self.params
        return share_signals(state["link_buf"], state["link_count"], hits, rows, len(batch), p.min_events, p.threshold)

    def _distinct(self, state: State, batch: Batch, linked: np.ndarray, rows: np.ndarray) -> None:
        """Keep a link made by an off-manifold input (``rows``: an exact repeat of another client's,
        or one near another client's) only for a new distinct input of the client's, and only
        past its first ``distinct_repeats``: a client that shares a few
        synthetic fixtures with others (health checks, test inputs) links nobody. The dropped
        links are dropped in the block too, so that groups do not count them."""
        ring, count = state["repeated"], int(state["repeated_count"])
        known = deque(ring_in_order(ring, count).tolist(), maxlen=ring.shape[0])  # as the ring is, one query at a time
        drop, new = [], []
        for row, digest in zip(rows.tolist(), batch.digests[rows].tolist()):
            if digest not in known:
                known.append(digest)
                new.append(digest)
                if count + len(new) > self.params.distinct_repeats:
                    continue
            drop.append(row)
        if new:
            ring_write(ring, count, np.array(new, dtype=np.uint64))
            state["repeated_count"][...] = count + len(new)
        self._unlink(batch, linked, np.array(drop, dtype=np.int64))

    def _unlink(self, batch: Batch, linked: np.ndarray, rows: np.ndarray) -> None:
        """Drop the links of the batch's ``rows``, in the block too (groups read it)."""
        if rows.size:
            linked[rows] = False
            if batch.block is not None:
                batch.block.prepared[self.name][1][batch.rows[rows]] = False

    # -- the cross-client stage -----------------------------------------------------------------
    def prepare(self, block: Block) -> None:
        """Find, for every query of the block in time order, the other clients it is linked to; then index it.

        Leaves per event (``block.prepared``): whether it was judged, whether it is linked
        (it continued or repeated another client's step, or repeated or came near another
        client's off-manifold input), the 64-bit keys of up to two such clients (0: none),
        and whether the link is one of the off-manifold kind (:meth:`update` counts those
        past the client's first ``distinct_repeats`` only).
        All or nothing: the rows and buckets a failed block wrote are put back.
        """
        n = len(block)
        judged = np.zeros(n, dtype=bool)
        linked = np.zeros(n, dtype=bool)
        parents = np.zeros((n, 2), dtype=np.uint64)
        off_data = np.zeros(n, dtype=bool)
        block.prepared[self.name] = (judged, linked, parents, off_data)
        if self._inv is None or self._dim is None:
            return
        idx, x = vector_rows(block, self._dim)  # type: ignore[arg-type]
        if x is None:
            return
        m = idx.shape[0]
        ts = block.ts[idx]
        dig = block.digests[idx]
        names = [block.events[i].client for i in idx.tolist()]
        known = {c: client_key(c) for c in set(names)}
        keys = np.fromiter((known[c] for c in names), dtype=np.uint64, count=m)
        saved = (list(self._pending), self._step_last, self._alloc, self._next, self._oldest, self._U, self._S, self._Up, self._lo, self._hi, self._ts, self._digest, self._client, self._far_seen, self._reach)
        undo: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        filed_undo: list[tuple[int, int | None]] = []
        out_linked = np.zeros(m, dtype=bool)
        out_parents = np.zeros((m, 2), dtype=np.uint64)
        out_off_data = np.zeros(m, dtype=bool)
        try:
            self._expire(float(ts[0]))
            start = 0
            chunk = self.params.chunk
            own = self.params.own_candidates
            while start < m:
                if self._alloc < self._cap and self._next >= self._alloc:
                    self._grow()
                stop = min(m, start + chunk - self._next % chunk)
                if self._alloc < self._cap:  # rows keep their places until the index is full
                    stop = min(stop, start + self._alloc - self._next)
                sl = slice(start, stop)
                u = self._units(x[sl])
                buckets = self._buckets(u)
                # Candidates and filing piece by piece: the same as for the whole block (the
                # buckets then hold the earlier pieces), with arrays that stay in the CPU cache.
                # A repeat of a point the index holds is no new point: it gets no candidates and
                # is not filed, so that popular inputs and retries do not push parents out of
                # their buckets (it still takes its row, which keeps ids and chunks as they were).
                rows, repeated = self._new_points(dig[sl], ts[sl], filed_undo)
                ids = self._next + rows
                found, order, starts, rank_sorted = recent(buckets[rows], self._fill, self._slots, self.params.depth, ids)
                if own:  # the clients' own recent queries too (a table by client)
                    mine = self._own_buckets(keys[sl][rows])
                    own_found, own_order, own_starts, own_rank = recent(mine, self._own_fill, self._own_slots, own, ids)
                    found = np.concatenate([found, own_found], axis=1)
                cand = np.full((stop - start, found.shape[1]), -1, dtype=np.int64)
                cand[rows] = found
                out_linked[sl], out_parents[sl], out_off_data[sl] = self._piece(u, ts[sl], dig[sl], keys[sl], cand, repeated >= 0, undo)
                self._repeats(u, keys[sl], repeated, out_linked[sl], out_parents[sl], out_off_data[sl], undo)
                file(buckets[rows], order, starts, rank_sorted, self._fill, self._slots, self.params.depth, undo, ids)
                if own:
                    file(mine, own_order, own_starts, own_rank, self._own_fill, self._own_slots, own, undo, ids)
                start = stop
                if len(self._filed) > self._cap + self._cap // 4:
                    self._prune_filed(filed_undo)  # at most _cap of them are live: memory stays bounded
        except BaseException:
            for array, at, old in reversed(undo):
                array[at] = old
            for digest, was in reversed(filed_undo):
                if was is None:
                    self._filed.pop(digest, None)
                else:
                    self._filed[digest] = was
            (self._pending, self._step_last, self._alloc, self._next, self._oldest, self._U, self._S, self._Up, self._lo, self._hi, self._ts, self._digest, self._client, self._far_seen, self._reach) = saved
            raise
        judged[idx] = True
        linked[idx] = out_linked
        parents[idx] = out_parents
        off_data[idx] = out_off_data

    def _units(self, x: np.ndarray) -> np.ndarray:
        """(m, width) float32: the queries' moving features (the layout's columns) in units of their
        ranges, from the benign mean (see :meth:`fit`)."""
        return ((np.take(np.asarray(x, dtype=np.float64), self._cols, axis=1) - self._center) * self._inv).astype(np.float32)

    def _buckets(self, u: np.ndarray) -> np.ndarray:
        """(m, tables) flat bucket index of each query in each table."""
        p = self.params
        with np.errstate(invalid="ignore"):  # cells beyond int64 (inputs far outside tiny ranges) share one value, without a warning per input
            cells = np.floor((u @ self._proj + self._offset) * (1.0 / p.width)).astype(np.int64)
        cells = cells.reshape(u.shape[0], p.tables, p.projections).view(np.uint64)
        h = (cells * self._mix).sum(axis=2, dtype=np.uint64)  # wraps modulo 2**64
        h = splitmix64(h ^ (np.arange(p.tables, dtype=np.uint64) * _U64(0x9E3779B97F4A7C15)))
        b = (h >> _U64(64 - p.bucket_bits)).astype(np.int64)
        return b + (np.arange(p.tables, dtype=np.int64) << p.bucket_bits)

    @staticmethod
    def _own_buckets(keys: np.ndarray) -> np.ndarray:
        """(n, 1) each client's bucket in the table of the clients' own recent queries."""
        return (splitmix64(keys ^ _U64(0x0D15EA5E)) >> _U64(64 - _OWN_BITS)).astype(np.int64)[:, None]

    def _new_points(self, dig: np.ndarray, ts: np.ndarray, filed_undo: list[tuple[int, int | None]]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of a piece (about to take ids ``self._next + row``) that are new points: no entry
        filed for the same digest is still live (the same horizon as candidates': not overwritten
        by the end of the chunk, within the TTL); those rows are recorded as filed. Also, per
        row, the id of the live entry it repeats (-1: a new point)."""
        p = self.params
        base = self._next
        horizon = max(self._oldest, base - base % p.chunk + p.chunk - self._cap)
        alloc = max(self._alloc, 1)
        filed, stamps = self._filed, self._ts
        rows = []
        repeated = np.full(dig.shape[0], -1, dtype=np.int64)
        for row, (digest, t) in enumerate(zip(dig.tolist(), ts.tolist())):
            at = filed.get(digest)
            if at is not None and (at >= base or (at >= horizon and stamps[at % alloc] >= t - p.ttl_seconds)):
                repeated[row] = at
                continue
            filed_undo.append((digest, at))
            filed[digest] = base + row
            rows.append(row)
        return np.array(rows, dtype=np.int64), repeated

    def _repeats(
        self, u: np.ndarray, keys: np.ndarray, repeated: np.ndarray, linked: np.ndarray, parents: np.ndarray, by_repeat: np.ndarray,
        undo: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ) -> None:
        """Link each query that exactly repeats an *off-manifold* input another client sent first
        (the live entry ``repeated`` holds, -1: none) to that client, in ``linked`` and ``parents``
        (and ``by_repeat``: :meth:`update` keeps only a client's distinct ones).

        A split's keys re-send each other's synthetic points (a JbDA re-queries the children
        whose signs did not change, and any key may draw them); honest clients repeat natural
        inputs, which lie near the benign anchors. The test runs once per entry (cached in
        ``_far_seen``), on the query's own vector: the same input as the entry's.
        """
        rows = np.flatnonzero(repeated >= 0)
        if self._anchors is None or rows.size == 0:
            return
        pos = repeated[rows] % self._alloc
        owner = self._client[pos]
        other = owner != keys[rows]
        rows, pos, owner = rows[other], pos[other], owner[other]
        if rows.size == 0:
            return
        seen = self._far_seen[pos]
        if (seen == 0).any():
            todo, first = np.unique(pos[seen == 0], return_index=True)
            far = nearest_rms(u[rows[seen == 0][first]], self._anchors, a_sq=self._anchor_sq) > self._far
            self._write(todo, undo, ((self._far_seen, np.where(far, 2, 1).astype(np.int8)),))
            seen = self._far_seen[pos]
        hit = seen == 2
        linked[rows[hit]] = True
        by_repeat[rows[hit]] = True
        parents[rows[hit], 0] = owner[hit]  # a repeat has no candidates: no other parent

    def _prune_filed(self, filed_undo: list[tuple[int, int | None]]) -> None:
        """Forget the filed digests whose entries were overwritten (they can never be live again)."""
        lo = self._next - self._alloc
        for digest in [d for d, i in self._filed.items() if i < lo]:
            filed_undo.append((digest, self._filed.pop(digest)))

    def _piece(
        self, u: np.ndarray, ts: np.ndarray, dig: np.ndarray, keys: np.ndarray, cand: np.ndarray, repeats: np.ndarray,
        undo: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Match and index consecutive queries of one chunk (see the class docstring): per query,
        whether it is linked, the keys of up to two peers, and whether the link is a near one.
        ``repeats``: the rows that repeat a live entry (no candidates, never a candidate)."""
        p = self.params
        m = u.shape[0]
        alloc, base = self._alloc, self._next
        chunk_start = base - base % p.chunk
        take = np.take
        r = self._probe
        # The steps of completed chunks go into the table of steps and the known sizes first: a
        # chunk's queries all read them as they were at its start, whatever the cut into pieces.
        self._flush(chunk_start, undo)
        # 1. Index the piece's rows first (their steps last), so that every candidate is a row of the index.
        first = base % alloc
        at: slice | np.ndarray = slice(first, first + m) if first + m <= alloc else (base + np.arange(m)) % alloc
        self._write(at, undo, ((self._U, u), (self._Up, u[:, :r]), (self._ts, ts), (self._digest, dig), (self._client, keys)))
        # Alive: not overwritten by the end of this chunk, not expired, not past the TTL for this query.
        alive = (cand >= max(self._oldest, chunk_start + p.chunk - self._cap)) & (cand >= 0)
        # Their rows (id % alloc): live ids lie within the last alloc ids, so one wrap at most (no division).
        low = max(0, base + m - alloc)
        cpos = cand - (low - low % alloc)
        cpos -= alloc * (cpos >= alloc)
        cpos[~alive] = 0
        alive &= take(self._ts, cpos) >= (ts - p.ttl_seconds)[:, None]
        # (No candidate has the query's digest: a repeat got no candidates, _new_points.)
        # 2. The cheap test on the probe features (the two steps' sizes agree on at least
        # _PROBE_MIN of them); it also finds the nearest candidate.
        du = take(self._Up, cpos, axis=0)  # (m, K, r); in place from here on (these arrays are the stage's largest)
        np.subtract(u[:, None, :r], du, out=du)
        ad = np.abs(du)
        bound = take(self._lo, cpos, axis=0)
        close = ad >= bound
        close &= ad <= take(self._hi, cpos, axis=0, out=bound, mode="clip")  # cpos are valid rows; "raise" would buffer the output
        close = count_true(close)
        usable = alive & (cand < chunk_start) & (close >= min(_PROBE_MIN, r))  # the candidate's own step is final
        # 3. The full test on the few left.
        passed = np.zeros(usable.shape, dtype=bool)
        straight = np.zeros(usable.shape, dtype=bool)
        qi, ki = first_pairs(usable, cpos)
        block = pairs_per_block(u.shape[1])
        for b in range(0, qi.size, block):
            bq, bk = qi[b : b + block], ki[b : b + block]
            sel = cpos[bq, bk]
            cross = take(self._client, sel) != keys[bq]  # another client's step: the overlap rule applies (_continues)
            passed[bq, bk], straight[bq, bk] = self._continues(u[bq] - take(self._U, sel, axis=0), take(self._S, sel, axis=0), cross)
        pi, pk = np.nonzero(passed)  # row by row, in candidate order
        owner = take(self._client, cpos[pi, pk])
        other = owner != keys[pi]
        linked = np.zeros(m, dtype=bool)
        linked[pi[other]] = True
        parents = np.zeros((m, 2), dtype=np.uint64)
        add_peers(parents, pi[other], owner[other])
        # 4. Each query's own step: from the first candidate it continued, else from the one it differs
        # from by a sign step (most probe features moved by the same size), else from the nearest (probe distance).
        dist = np.where(alive, np.einsum("mkr,mkr->mk", du, du), np.inf)
        far_seen, reach = self._off_manifold(u, cand < base, cpos, dist, repeats)
        self._write(at, undo, ((self._far_seen, far_seen), (self._reach, reach)))
        hit = passed.any(axis=1)
        pick = np.where(hit, np.argmax(passed, axis=1), self._parent(ad, alive, dist, ts))
        has = hit | np.isfinite(dist.min(axis=1))
        steps = np.where(has[:, None], u - take(self._U, cpos[np.arange(m), pick], axis=0), 0.0).astype(np.float32)
        # 5. Each change that continues a candidate's step compared with other clients' recent steps
        # (the table of steps; only those: see the class docstring); a change that repeats one is
        # a verified step, and becomes the query's own.
        # Only steps that turn (not three points on one line) are filed: a line is also what honest
        # data can hold (records interpolated between two others), a turn of equal size is not.
        filing = hit & ~straight[np.arange(m), pick]
        self._alike(u, du, ad, passed, cpos, steps, filing, ts, keys, base, chunk_start, linked, parents, undo)
        lo, hi = self._bounds(steps[:, :r])
        self._write(at, undo, ((self._S, steps), (self._lo, lo), (self._hi, hi)))
        self._next = base + m
        return linked, parents, self._near_links(u, cpos, alive, keys, at, linked, parents)

    def _parent(self, ad: np.ndarray, alive: np.ndarray, dist: np.ndarray, ts: np.ndarray | None = None) -> np.ndarray:
        """(m,) the candidate each query most likely stepped from, when it continued none: the one its
        change from moves the most probe features by the same size (within ``tolerance`` of the
        largest; at least three quarters of the probe features), the nearest of those; without
        such a candidate, the one whose change has the size of a recent verified step (sent at
        ``ts``: :meth:`_known_parent`); without either, the nearest.

        A sign step moves every feature it does not clip by the same size, in units of the
        features' ranges when the attacker's units are those (pixels; features it scales by the
        same ranges as the calibration's). A natural input is seldom such a step away from
        another, and at large steps the nearest candidate is another natural input, not the
        point the query was stepped from: then no query continues the step and the chain never
        starts. ``bench/detection/own_step.py`` counts how often each rule picks the parent.
        Three quarters, not fewer: between integer inputs (pixels) honest changes can move a few
        probe features by one size, and such steps, once continued by chance, wake the table of
        steps for every query of the next hour (``steps_window``); with 3 of 8, honest queries of
        ``bench/throughput.py``'s traffic were linked so (docs/groups.md).
        """
        r = ad.shape[2]
        need = _sized_need(r)
        largest = ad[:, :, 0].copy()
        for f in range(1, r):  # (a max over the short last axis is several times slower)
            np.maximum(largest, ad[:, :, f], out=largest)
        even = count_true((ad >= self._floor[:r]) & (ad >= (largest * (1.0 - self.params.tolerance))[:, :, None]))
        even = np.where(alive, even, 0)
        top = even.max(axis=1)
        stepped = np.argmin(np.where(even == top[:, None], dist, np.inf), axis=1)
        out = np.where(top >= need, stepped, np.argmin(dist, axis=1))
        if ts is not None:
            self._known_parent(ad, alive, dist, ts, np.flatnonzero(top < need), out)
        return out

    def _known_parent(self, ad: np.ndarray, alive: np.ndarray, dist: np.ndarray, ts: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """Set ``out`` for the ``rows`` whose change from a candidate has the sizes of a known step
        (one of the model's recent verified steps, within ``steps_window`` of the query) on three
        quarters of the probe features: that candidate (the nearest of the best such).

        Where the attacker's units are not the features' ranges (each feature scaled its own
        way, as the data's own ranges are on breast cancer), its sign steps move the features by
        different sizes, and the sign-step rule finds nothing; but every step of the attack has
        the same sizes, and those of its verified steps (which continued another step, or
        repeated one of the table) are known. Honest clients seldom make verified steps, so on
        honest traffic this costs nothing; during an attack, for the queries the sign-step rule
        leaves, one test of their candidates against the union of the known sizes' ranges, and a
        count per size for the few candidates in it.
        """
        if rows.size == 0 or self._known_time.size == 0:
            return
        until = self._known_time + self.params.steps_window  # the latest query time each size is usable for
        sizes = np.flatnonzero(until >= ts[rows].min())
        if sizes.size == 0:
            return
        r = ad.shape[2]
        need = _sized_need(r)
        lo, hi = self._bounds(self._known_size[sizes])  # (S, r)
        sub = ad[rows]
        # A candidate with one size on ``need`` probe features has some size on each of them: per
        # feature, the union of the sizes' ranges (few disjoint ranges: sizes share most values)
        # finds the few worth counting.
        some = np.zeros(sub.shape[:2], dtype=np.uint8)
        for f in range(r):
            a = sub[:, :, f]
            for start, end in disjoint(lo[:, f], hi[:, f]):
                some += (a >= start) & (a <= end)
        some = (some >= need) & alive[rows]
        li, ki = np.nonzero(some)
        best = np.zeros(sub.shape[:2], dtype=np.int64)
        if li.size:
            count = self._same_sizes(sub[li, ki][:, None, :], self._known_size[sizes])  # (n, S)
            count *= ts[rows][li][:, None] <= until[sizes]  # each size within steps_window of the query
            best[li, ki] = count.max(axis=1)
        top = best.max(axis=1)
        pick = np.argmin(np.where(best == top[:, None], dist[rows], np.inf), axis=1)
        found = top >= need
        out[rows[found]] = pick[found]

    def _same_sizes(self, ad: np.ndarray, size: np.ndarray) -> np.ndarray:
        """Per row of ``ad`` (..., r): how many of the probe features ``size`` (broadcast with ``ad``)
        moved the row changed by the same amount (:meth:`_bounds`)."""
        lo, hi = self._bounds(size)
        return count_true((ad >= lo) & (ad <= hi))

    def _off_manifold(
        self, u: np.ndarray, earlier: np.ndarray | None = None, cpos: np.ndarray | None = None, dist: np.ndarray | None = None,
        skip: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(m,) int8 per query, as ``_far_seen`` keeps it: 2 off the manifold, 1 on it; 0 (not
        tested) when there are no near links to find, in which case :meth:`_repeats` tests
        repeated entries only, when they are repeated; and (m,) float32, as ``_reach`` keeps it.

        The same answer as the distance to every anchor, at a fraction of the cost: most queries
        lie near an indexed query whose distance to its nearest anchor is known, and by the
        triangle inequality they are on the manifold when that distance plus their own to the
        query is within ``far``. ``earlier`` (m, K) marks the candidates filed before this piece
        (``cpos``: their rows; ``dist``: the squared probe distances, inf where not alive); the
        bound comes from the one whose own bound plus its probe distance (a lower bound of the
        distance) is smallest. Only the queries that this does not settle are measured against
        the anchors, and keep their exact distance. ``skip`` rows (repeats, which are never
        candidates and are tested as the entry they repeat) are not tested."""
        m = u.shape[0]
        reach = np.full(m, np.inf, dtype=np.float32)
        if self._anchors is None or self._near <= 0.0:
            return np.zeros(m, dtype=np.int8), reach
        if earlier is not None and cpos is not None and dist is not None:
            # The candidate with the smallest lower bound of the bound (probe distance plus its reach).
            probe = np.where(earlier, np.sqrt(dist / u.shape[1]) + np.take(self._reach, cpos), np.inf)
            src = np.argmin(probe, axis=1)
            rows = np.flatnonzero(np.isfinite(probe[np.arange(m), src]))
            if rows.size:
                at = cpos[rows, src[rows]]
                diff = u[rows] - np.take(self._U, at, axis=0)
                reach[rows] = np.sqrt(np.einsum("ij,ij->i", diff, diff) / u.shape[1]) + np.take(self._reach, at)
        todo = ~(reach <= self._far)
        if skip is not None:
            todo &= ~skip
        rows = np.flatnonzero(todo)
        if rows.size:
            reach[rows] = nearest_rms(u[rows], self._anchors, a_sq=self._anchor_sq)
        flags = np.where(reach > self._far, 2, 1).astype(np.int8)
        if skip is not None:
            flags[skip] = 0
        return flags, reach

    def _near_links(
        self, u: np.ndarray, cpos: np.ndarray, alive: np.ndarray, keys: np.ndarray, at: slice | np.ndarray, linked: np.ndarray, parents: np.ndarray
    ) -> np.ndarray:
        """Link each query that is off the manifold, and not linked otherwise, to the client of its
        nearest candidate that is off the manifold too, when that candidate was sent by another
        client and lies within ``near_factor`` anchor spacings (RMS over the features, range
        units): a split whose keys explore one region off the data. A query nearer to (or as near
        as) one of its own client's earlier off-manifold inputs among its candidates continues
        that client's own exploration and links nobody, so an attacker who sends inputs near an honest client's cannot get the
        honest client's next inputs linked to its own. Returns which queries it linked
        (:meth:`update` counts them as it counts off-manifold repeats, past the client's first
        ``distinct_repeats``)."""
        near = np.zeros(u.shape[0], dtype=bool)
        if self._near <= 0.0:
            return near
        rows = np.flatnonzero((self._far_seen[at] == 2) & ~linked)
        if rows.size == 0:
            return near
        c = cpos[rows]
        qi, ki = first_pairs(alive[rows] & (np.take(self._far_seen, c) == 2), c)
        if qi.size == 0:
            return near
        d = np.empty(qi.size, dtype=np.float32)
        block = pairs_per_block(u.shape[1])
        for b in range(0, qi.size, block):
            d[b : b + block] = self._rms(u[rows[qi[b : b + block]]], c[qi[b : b + block], ki[b : b + block]])
        hit = d <= self._near
        qi, ki, d = qi[hit], ki[hit], d[hit]
        owner = np.take(self._client, c[qi, ki])
        own = owner == keys[rows[qi]]
        order = np.lexsort((~own, d, qi))  # per query, its nearest such candidate first (its own client's first on a tie)
        qi, owner, own = qi[order], owner[order], own[order]
        first = np.ones(qi.size, dtype=bool)
        first[1:] = qi[1:] != qi[:-1]
        first &= ~own
        found = rows[qi[first]]
        near[found] = linked[found] = True
        parents[found, 0] = owner[first]
        return near

    def _rms(self, q: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """(n,) the RMS distance (range units) of each query ``q`` (n, width) to the entry at row ``pos`` (n,)."""
        diff = q - np.take(self._U, pos, axis=0)
        return np.sqrt(np.einsum("ij,ij->i", diff, diff) / q.shape[1])

    def _alike(
        self, u: np.ndarray, du: np.ndarray, ad: np.ndarray, pairs: np.ndarray, cpos: np.ndarray, steps: np.ndarray, filing: np.ndarray,
        ts: np.ndarray, keys: np.ndarray, base: int, chunk_start: int, linked: np.ndarray, parents: np.ndarray,
        undo: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ) -> None:
        """Link each query whose change from a candidate it continues (``pairs``: the change repeats
        the candidate's own step in size) repeats, size for size and sign for sign (or every sign
        flipped), a recent step of another client: the same attack configuration, following the
        same substitute model, even where the clients never derive from each other's points (a
        split whose members each grow their own part of the set). A change from a candidate it
        does not continue (between two natural records) is never compared: otherwise an attacker
        could file the differences between records an honest client will send as verified steps
        of its own, and frame it.

        The table of steps holds only verified steps: queries that continued an earlier one
        (``filing``) or matched a step of the table. Honest clients make neither, so their changes
        are compared, never compared with. The table is read as it was at the start of the
        query's chunk (the steps of a chunk are filed when it is complete), which keeps the
        result independent of batching. Matching steps replace the query's own step in ``steps``.
        """
        p = self.params
        readable = self._step_last >= float(ts.min()) - p.steps_window  # for some query of the piece (each row is checked below)
        if filing.any() or readable:
            r = self._probe
            floor = self._floor[:r]
            moved = ad >= floor
            step_like = pairs & (count_true(moved) >= min(_PROBE_MIN, r))
            if step_like.any() and readable:
                qi, ki = np.nonzero(step_like)
                bucket = self._step_bucket(du[qi, ki], moved[qi, ki])
                fill = np.take(self._step_fill, bucket)
                held = np.flatnonzero(fill)  # only changes whose bucket holds steps are looked at further
                qi, ki, bucket, fill = qi[held], ki[held], bucket[held], fill[held]
                j = np.arange(p.step_depth)
                ok = j < np.minimum(fill, p.step_depth)[:, None]
                ids = np.where(ok, np.take(self._step_slots, bucket[:, None] * p.step_depth + (fill[:, None] - 1 - j) % p.step_depth), -1)
                live = (ids >= max(self._oldest, chunk_start + p.chunk - self._cap)) & (ids < chunk_start)
                ipos = np.where(live, ids % self._alloc, 0)
                live &= (np.take(self._ts, ipos) >= (ts[qi] - p.steps_window)[:, None]) & (np.take(self._client, ipos) != keys[qi][:, None])
                ln, ld = np.nonzero(live)
                # Every change against its bucket's steps, many at once (most are chance collisions of the
                # hash), in blocks: the pairs can be many and the inputs wide, and a block's arrays stay small.
                block = pairs_per_block(u.shape[1])
                keep = np.zeros(ln.size, dtype=bool)
                for b in range(0, ln.size, block):
                    bn, bd = ln[b : b + block], ld[b : b + block]
                    changes = u[qi[bn]] - np.take(self._U, cpos[qi[bn], ki[bn]], axis=0)
                    keep[b : b + block] = self._moves_alike(changes, np.take(self._S, ipos[bn, bd], axis=0))
                ln, ld = ln[keep], ld[keep]
                # Whole arrays, not match by match: a client chooses how many matches its queries
                # make (up to tables x depth x step_depth each), so their cost must not be Python's.
                rows = qi[ln]
                linked[rows] = True
                add_peers(parents, rows, np.take(self._client, ipos[ln, ld]))
                _, first = np.unique(rows, return_index=True)  # each row's first match
                first = first[~filing[rows[first]]]
                new = rows[first]
                steps[new] = u[new] - np.take(self._U, cpos[new, ki[ln[first]]], axis=0)  # a verified step: the query's own from now on
                filing = filing.copy()
                filing[new] = True
            rows = np.flatnonzero(filing)
            if rows.size:
                mv = np.abs(steps[rows, :r]) >= floor
                fileable = np.count_nonzero(mv, axis=1) >= min(_PROBE_MIN, r)
                rows = rows[fileable]
                if rows.size:
                    self._pending += list(zip(self._step_bucket(steps[rows, :r], mv[fileable]).tolist(), (base + rows).tolist()))
                    self._step_last = max(self._step_last, float(ts[rows].max()))

    def _step_bucket(self, step: np.ndarray, moved: np.ndarray) -> np.ndarray:
        """(n,) the bucket of each step (n, probe) in the table of steps: per probe feature, its
        size to the factor of two and its sign, every sign flipped so that the first moved feature
        is positive (a step and its opposite file together)."""
        floor = self._floor[: step.shape[1]]
        mag = np.frexp(np.maximum(np.abs(step) / floor, 1.0))[1]  # floor(log2) + 1, exactly (log2 rounds near powers of two)
        mag[~moved] = 0
        signed = np.where(step < 0, -mag, mag)
        first = signed[np.arange(step.shape[0]), np.argmax(moved, axis=1)]
        np.negative(signed, out=signed, where=(first < 0)[:, None])
        q = (signed + 64).astype(np.uint64)
        h = splitmix64((q * self._step_mix[: step.shape[1]]).sum(axis=1, dtype=np.uint64))
        return (h >> _U64(64 - self.params.step_bits)).astype(np.int64)

    def _flush(self, chunk_start: int, undo: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """File the steps of completed chunks into the table (each bucket keeps its ``step_depth`` most recent)."""
        done = [(b, i) for b, i in self._pending if i < chunk_start]
        if not done:
            return
        self._pending = [(b, i) for b, i in self._pending if i >= chunk_start]
        buckets = np.array([b for b, _ in done], dtype=np.int64)[:, None]
        ids = np.array([i for _, i in done], dtype=np.int64)
        _, order, starts, rank_sorted = recent(buckets, self._step_fill, self._step_slots, self.params.step_depth, ids)
        file(buckets, order, starts, rank_sorted, self._step_fill, self._step_slots, self.params.step_depth, undo, ids)
        pos = ids % self._alloc
        self._remember(np.abs(self._S[pos, : self._probe]), self._ts[pos], undo)

    def _remember(self, sizes: np.ndarray, times: np.ndarray, undo: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Add the sizes (n, probe) of newly filed steps, sent at ``times``, to the known sizes: a
        size already known (the same on three quarters of the probe features) only brings its
        time forward; a new one takes the place of the size seen longest ago. Sizes that move
        fewer probe features than that can decide nothing and are not kept."""
        if self._known_time.size == 0:
            return
        need = _sized_need(sizes.shape[1])
        keep = count_true(sizes >= self._floor[: sizes.shape[1]]) >= need
        sizes, times = sizes[keep], times[keep]
        if times.size == 0:
            return
        known, when = self._known_size.copy(), self._known_time.copy()
        # Most steps repeat a known size (an attack's steps all have its own): those at once ...
        match = self._same_sizes(known[None, :, :], sizes[:, None, :]) >= need  # (n, known)
        seen = match.any(axis=1)
        np.maximum.at(when, np.argmax(match[seen], axis=1), times[seen])
        # ... then the new ones, one by one (they may repeat each other).
        for size, t in zip(sizes[~seen], times[~seen].tolist()):
            same = np.flatnonzero(self._same_sizes(known, size) >= need)
            if same.size:
                when[same[0]] = max(when[same[0]], t)
            else:
                j = int(np.argmin(when))
                known[j], when[j] = size, t
        self._write(slice(None), undo, ((self._known_size, known), (self._known_time, when)))

    def _moves_alike(self, step: np.ndarray, other: np.ndarray) -> np.ndarray:
        """Per row of ``step`` and ``other`` (n, width): whether the two steps move every feature they
        both move in the same direction (or every one in the opposite direction), most of them by
        the same amount: the same attack configuration following the same substitute model. Every
        sign must agree: independent attackers with the same configuration train substitutes of
        their own, whose gradients differ in a few signs."""
        p = self.params
        a, b = np.abs(step), np.abs(other)
        moved = (a >= self._floor) & (b >= self._floor)
        nb = count_true(moved)
        agree = count_true(moved & ((step > 0) == (other > 0)))
        same = np.where((agree > 0)[:, None], np.abs(step - other), np.abs(step + other))
        close = count_true(moved & (same <= p.tolerance * np.maximum(a, b)))
        return (nb >= self._min_moved) & ((agree == 0) | (agree == nb)) & (close >= p.agreement * nb)

    @staticmethod
    def _write(at: slice | np.ndarray, undo: list[tuple[np.ndarray, np.ndarray, np.ndarray]], items: tuple[tuple[np.ndarray, np.ndarray], ...]) -> None:
        """Write each (array, values) at rows ``at``, keeping what was there in ``undo``."""
        for array, values in items:
            undo.append((array, at, array[at].copy()))  # type: ignore[arg-type]
            array[at] = values

    def _bounds(self, step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per probe feature of ``step`` (..., r), the sizes a change must have to repeat it there
        (within ``tolerance``: |a - s| <= tolerance·max(a, s)); an empty range where the step did not move it."""
        size = np.abs(step)
        lo = size * (1.0 - self.params.tolerance)
        hi = size / (1.0 - self.params.tolerance)
        lo[size < self._floor[: step.shape[-1]]] = np.inf
        return lo, hi

    def _continues(self, delta: np.ndarray, step: np.ndarray, cross: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Whether each change ``delta`` (n, width) repeats the parent's own ``step``: the
        same size on the features both moved, not back along the parent's step; and whether it goes on
        along the parent's step (three points on one line: a step, but honest data has such lines too).

        Where the step is another client's (``cross``), the change must also move mostly the
        features the step moved (``overlap``). Otherwise a step that moves only features whose
        natural values are predictable (pixels nearly always 0) is continued by natural records,
        and frames their senders (tests/test_links_framing.py). A client's own lattice, clipped
        at the data's bounds where features saturate, keeps the looser rule: its changes are
        compared only with other clients' verified steps, never linked to its own points."""
        p = self.params
        a, b = np.abs(delta), np.abs(step)
        da, db = a >= self._floor, b >= self._floor
        both = da & db
        nb = both.sum(axis=1)
        tol = p.tolerance * np.maximum(a, b)
        along = (both & (np.abs(delta - step) <= tol)).sum(axis=1)
        back = (both & (np.abs(delta + step) <= tol)).sum(axis=1)
        close = along + back
        ok = (nb >= self._min_moved) & (close >= p.agreement * nb) & (back <= p.returns * close)
        ok &= ~cross | (nb >= p.overlap * (da | db).sum(axis=1))  # the change moves the features the step moved, and few others
        return ok, ok & (along > p.returns * close)

    # -- the index ---------------------------------------------------------------------------
    def _grow(self) -> None:
        """Double the rows (up to the index's capacity); rows keep their places (ids below the old size)."""
        new = min(self._cap, max(2 * self._alloc, self._INITIAL_ROWS))

        def grown(a: np.ndarray) -> np.ndarray:
            out = np.zeros((new, *a.shape[1:]), dtype=a.dtype)
            out[: a.shape[0]] = a
            return out

        self._U, self._S, self._Up, self._lo, self._hi = grown(self._U), grown(self._S), grown(self._Up), grown(self._lo), grown(self._hi)
        self._ts, self._digest, self._client = grown(self._ts), grown(self._digest), grown(self._client)
        self._far_seen, self._reach = grown(self._far_seen), grown(self._reach)
        self._alloc = new

    def _expire(self, now: float) -> None:
        """Move the oldest live id past the entries older than the TTL (event time)."""
        limit = now - self.params.ttl_seconds
        if self._alloc == 0:
            return
        lo = max(self._oldest, self._next - self._alloc)
        if lo >= self._next or self._ts[lo % self._alloc] >= limit:
            return
        # The first live id, in windows that double: O(ids expired), not O(index) per block, once
        # entries age out one after another and every block finds the oldest one expired.
        width = 256
        while lo < self._next:
            ids = np.arange(lo, min(lo + width, self._next))
            fresh = np.flatnonzero(self._ts[ids % self._alloc] >= limit)
            if fresh.size:
                self._oldest = int(ids[fresh[0]])
                return
            lo, width = int(ids[-1]) + 1, 2 * width
        self._oldest = self._next

    def index_size(self) -> int:
        """Queries currently held by the index (live, not past the TTL)."""
        return self._next - max(self._oldest, self._next - self._alloc) if self._alloc else 0

    # -- shared state ----------------------------------------------------------------------------
    def shared_state(self) -> State | None:
        if self._inv is None:
            return None
        lo = max(self._oldest, self._next - self._alloc) if self._alloc else self._next
        pos = np.arange(lo, self._next, dtype=np.int64) % max(self._alloc, 1)
        return {
            "ids": np.array([lo, self._next], dtype=np.int64),
            "U": self._U[pos], "S": self._S[pos],
            "ts": self._ts[pos], "digest": self._digest[pos], "client": self._client[pos],
            "slots": self._slots.copy(), "fill": self._fill.copy(),
            "own_slots": self._own_slots.copy(), "own_fill": self._own_fill.copy(),
            "step_slots": self._step_slots.copy(), "step_fill": self._step_fill.copy(), "step_last": np.array(self._step_last),
            "pending": np.array(self._pending, dtype=np.int64).reshape(-1, 2),
            "known_size": self._known_size.copy(), "known_time": self._known_time.copy(),
            # Which saved entry holds each point in the buckets: repeats take rows too, so the rows
            # alone do not say it once the first entry of a point has expired.
            "filed": np.array([(d, i) for d, i in self._filed.items() if lo <= i < self._next], dtype=np.uint64).reshape(-1, 2),
        }

    def load_shared_state(self, state: State) -> None:
        if self._inv is None:
            raise ValueError("links shared state needs the model's reference first")
        lo, nxt = (int(v) for v in np.asarray(state["ids"], dtype=np.int64))
        n = nxt - lo
        width = self._cols.size
        shapes = {"U": (n, width), "S": (n, width), "ts": (n,), "digest": (n,), "client": (n,)}
        if n < 0 or n > self._cap or any(np.asarray(state[k]).shape != s for k, s in shapes.items()):
            raise ValueError("links shared state does not fit these parameters")
        if not 0 <= lo <= nxt < _MAX_ID:
            raise ValueError("links shared state holds ids, counts or times out of range")
        if np.asarray(state["slots"]).shape != self._slots.shape or np.asarray(state["fill"]).shape != self._fill.shape:
            raise ValueError("links shared state does not fit these parameters")
        if np.asarray(state["step_slots"]).shape != self._step_slots.shape or np.asarray(state["step_fill"]).shape != self._step_fill.shape:
            raise ValueError("links shared state does not fit these parameters")
        # The table of the clients' own queries: snapshots of earlier versions lack it (it starts empty).
        own = ("own_slots", "own_fill") if "own_slots" in state or "own_fill" in state else ()
        if own and not all(k in state and np.asarray(state[k]).shape == getattr(self, f"_{k}").shape for k in own):
            raise ValueError("links shared state does not fit these parameters")
        pending = np.asarray(state["pending"], dtype=np.int64).reshape(-1, 2)
        # Every id a table holds is one the index gave (or -1), every count and bucket in range: a
        # snapshot that says otherwise would make every later block fail, and be saved again.
        tables = [np.asarray(state[k]) for k in ("slots", "step_slots", *own[:1])]
        ids_ok = all(a.size == 0 or (a.min() >= -1 and a.max() < nxt) for a in (*tables, pending[:, 1]))
        # Pending steps are those of the chunk under way and of one just completed (filed at the next piece).
        chunk = self.params.chunk
        ids_ok = ids_ok and len(pending) <= 2 * chunk and (pending.size == 0 or pending[:, 1].min() >= nxt - nxt % chunk - chunk)
        # A bucket's count is at most one per id ever given.
        counts_ok = all(np.asarray(state[k]).size == 0 or 0 <= np.asarray(state[k]).min() and np.asarray(state[k]).max() <= nxt
                        for k in ("fill", "step_fill", *own[1:]))
        buckets_ok = pending.size == 0 or (pending[:, 0].min() >= 0 and pending[:, 0].max() < self._step_fill.size)
        times_ok = bool(np.isfinite(np.asarray(state["ts"], dtype=np.float64)).all()) and float(state["step_last"]) < np.inf  # -inf: no step yet
        times_ok = times_ok and all(bool(np.isfinite(np.asarray(state[k], dtype=np.float64)).all()) for k in ("U", "S"))  # inputs and steps too
        if not (ids_ok and counts_ok and buckets_ok and times_ok):
            raise ValueError("links shared state holds ids, counts or times out of range")
        known_size, known_time = np.asarray(state["known_size"], dtype=np.float32), np.asarray(state["known_time"], dtype=np.float64)
        if known_size.shape != self._known_size.shape or known_time.shape != self._known_time.shape:
            raise ValueError("links shared state does not fit these parameters")
        if not (np.isfinite(known_size).all() and (known_size >= 0).all() and (known_time < np.inf).all()):  # -inf: no size
            raise ValueError("links shared state holds known step sizes or times out of range")
        filed = None
        if "filed" in state:  # (snapshots of earlier versions lack it: see the end)
            filed = np.asarray(state["filed"], dtype=np.uint64).reshape(-1, 2)
            at = filed[:, 1].astype(np.int64)  # (an id beyond int64 turns negative, and out of range)
            digests = np.asarray(state["digest"], dtype=np.uint64)
            if filed.size and not ((at >= lo).all() and (at < nxt).all() and (digests[np.clip(at - lo, 0, n - 1)] == filed[:, 0]).all()
                                   and np.unique(filed[:, 0]).size == len(filed)):
                raise ValueError("links shared state holds ids, counts or times out of range")
        self._reset()
        while self._alloc < min(max(nxt, 1), self._cap):
            self._grow()
        pos = np.arange(lo, nxt, dtype=np.int64) % self._alloc
        for name, array in (("U", self._U), ("S", self._S), ("ts", self._ts), ("digest", self._digest), ("client", self._client)):
            array[pos] = np.asarray(state[name], dtype=array.dtype)
        r = self._Up.shape[1]
        self._Up[pos] = self._U[pos, :r]
        self._lo[pos], self._hi[pos] = self._bounds(self._S[pos, :r])
        self._far_seen[pos], self._reach[pos] = self._off_manifold(self._U[pos])  # not saved: recomputed from the inputs
        self._slots[...] = np.asarray(state["slots"], dtype=np.int64)
        self._fill[...] = np.asarray(state["fill"], dtype=np.int64)
        if own:
            self._own_slots[...] = np.asarray(state["own_slots"], dtype=np.int64)
            self._own_fill[...] = np.asarray(state["own_fill"], dtype=np.int64)
        self._step_slots[...] = np.asarray(state["step_slots"], dtype=np.int64)
        self._step_fill[...] = np.asarray(state["step_fill"], dtype=np.int64)
        self._step_last = float(state["step_last"])
        self._pending = [(int(b), int(i)) for b, i in pending]
        self._next, self._oldest = nxt, lo
        self._known_size[...], self._known_time[...] = known_size, known_time
        if filed is not None:
            self._filed = dict(zip(filed[:, 0].tolist(), filed[:, 1].tolist()))
            return
        # A snapshot of an earlier version: which entry holds each point in the buckets, guessed
        # from the rows: the first of its repeats, or a later one sent when the one before had
        # passed the TTL (wrong where that first entry was saved no more).
        ttl = self.params.ttl_seconds
        stamp: dict[int, float] = {}
        for i, digest, t in zip(range(lo, nxt), self._digest[pos].tolist(), self._ts[pos].tolist()):
            if digest not in stamp or stamp[digest] < t - ttl:
                self._filed[digest], stamp[digest] = i, t


def disjoint(lo: np.ndarray, hi: np.ndarray) -> list[tuple[float, float]]:
    """The union of the closed ranges [lo, hi] (empty where lo is inf) as disjoint ranges, in order."""
    keep = np.isfinite(lo)
    order = np.argsort(lo[keep], kind="stable")
    out: list[tuple[float, float]] = []
    for start, end in zip(lo[keep][order].tolist(), hi[keep][order].tolist()):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _sized_need(r: int) -> int:
    """Probe features (of ``r``) a change must move by one size, or by a known step's sizes, to be
    taken as the step a query was made by: three quarters of them, and at least ``_PROBE_MIN``."""
    return max(min(_PROBE_MIN, r), -(-3 * r // 4))


def row_bytes(width: int, probe: int) -> int:
    """Bytes of one indexed query: its input and its step in ``width`` moving features (float32),
    the probe copy and the two bounds of its step on ``probe`` of them, its time, digest and
    client (8 bytes each), its off-manifold flag and the bound on its distance to the anchors."""
    return 8 * width + 12 * min(probe, width) + 8 + 8 + 8 + 1 + 4


def index_rows(params: LinksParams, width: int) -> int:
    """Queries the index keeps for inputs of ``width`` moving features: ``max_queries``, fewer
    where their rows would take more than ``max_index_mib``, never fewer than two chunks."""
    fit = int(params.max_index_mib * 2**20) // row_bytes(width, params.probe)
    return min(params.max_queries, max(2 * params.chunk, fit))


def pairs_per_block(width: int) -> int:
    """(query, candidate) pairs compared feature by feature at once, for inputs of ``width`` features."""
    return max(1, _PAIR_VALUES // max(width, 1))


def add_peers(parents: np.ndarray, rows: np.ndarray, peers: np.ndarray) -> None:
    """Name, per row of ``parents`` (n, slots; 0: a free slot, filled from the left), the distinct
    ``peers`` (client keys) of its entries in ``rows``, in their order, in the free slots, after
    the peers already named.

    Past ``_FEW_PEERS`` entries, only the first ``2 x slots`` distinct peers of each row are
    looked at one by one (the rest could never take a slot): a client chooses how many
    matches its queries make, and their number must not set the cost."""
    if rows.size == 0:
        return
    if rows.size > _FEW_PEERS:
        n = rows.size
        order = np.lexsort((np.arange(n), peers, rows))  # by row, then peer, then as given
        r, p = rows[order], peers[order]
        first = np.ones(n, dtype=bool)
        first[1:] = (r[1:] != r[:-1]) | (p[1:] != p[:-1])
        at = np.sort(order[first])  # each (row, peer) once, where it first came, in the given order
        by_row = np.argsort(rows[at], kind="stable")
        rs = rows[at][by_row]
        starts = np.flatnonzero(np.r_[True, rs[1:] != rs[:-1]])
        rank = np.empty(at.size, dtype=np.int64)
        rank[by_row] = np.arange(at.size) - np.repeat(starts, np.diff(np.r_[starts, at.size]))
        at = at[rank < 2 * parents.shape[1]]
        rows, peers = rows[at], peers[at]
    slots = parents.shape[1]
    named: dict[int, list[int]] = {}
    for row, peer in zip(rows.tolist(), peers.tolist()):
        have = named.get(row)
        if have is None:
            have = named[row] = [q for q in parents[row].tolist() if q]
        if len(have) < slots and peer not in have:
            have.append(peer)
    for row, have in named.items():
        parents[row, : len(have)] = have


def first_pairs(mask: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (row, column) indexes of ``mask`` (m, K), row by row in column order, keeping only the
    first column of each row that names a given index row ``pos`` (m, K): a query's candidates
    come from several hash tables, so one entry can come back up to ``tables`` times, and a
    cluster of near inputs (one client can send one) would otherwise be compared that many times over."""
    qi, ki = np.nonzero(mask)
    if qi.size < 2:
        return qi, ki
    at = pos[qi, ki].astype(np.int64)
    _, first = np.unique(qi.astype(np.int64) * (int(at.max()) + 1) + at, return_index=True)
    first.sort()
    return qi[first], ki[first]


def recent(
    buckets: np.ndarray, fill: np.ndarray, slots: np.ndarray, depth: int, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Candidates of a run of queries in bucket tables that keep each bucket's ``depth`` most recent entries.

    ``buckets`` (n, T): each query's bucket in each of T tables (flat indexes into
    ``fill``, entries ever filed per bucket, and ``slots``, ``depth`` entry ids per bucket);
    the queries are entries ``ids``, in time order.
    Returns the (n, T x depth) ids each query sees, most recent first per table, exactly as
    if the queries had been filed one at a time (earlier queries of the run first, then
    the buckets' slots; -1 for none), and the sort (order, run starts, ranks) that
    :func:`file` reuses.
    """
    n, tables = buckets.shape
    take = np.take
    flat = buckets.reshape(-1)
    order = np.argsort(flat, kind="stable")
    sf = flat[order]
    first = np.ones(flat.size, dtype=bool)
    first[1:] = sf[1:] != sf[:-1]
    starts = np.flatnonzero(first)
    rank_sorted = np.arange(flat.size) - np.repeat(starts, np.diff(np.append(starts, flat.size)))
    j = np.arange(depth)
    filled = take(fill, flat)
    # Each query sees its buckets' slots, most recent first ...
    pos = ((filled - 1) % depth)[:, None] - j
    pos += depth * (pos < 0)
    pos += (flat * depth)[:, None]
    cand = take(slots, pos)
    cand[j >= np.minimum(filled, depth)[:, None]] = -1
    # ... after the earlier queries of the run in the same bucket, if any (done apart: on spread
    # traffic they are few).
    later = np.flatnonzero(rank_sorted)  # positions in the sort
    if later.size:
        rows = order[later]
        rank = rank_sorted[later][:, None]
        pred = take(ids, take(order, np.maximum(later[:, None] - 1 - j, 0)) // tables)
        back = j - rank
        f = filled[rows][:, None]
        slot_ids = take(slots, flat[rows][:, None] * depth + (f - 1 - np.maximum(back, 0)) % depth)
        cand[rows] = np.where(j < rank, pred, np.where((back >= 0) & (back < np.minimum(f, depth)), slot_ids, -1))
    cand = cand.reshape(n, tables * depth)
    return cand, order, starts, rank_sorted


def file(
    buckets: np.ndarray, order: np.ndarray, starts: np.ndarray, rank_sorted: np.ndarray, fill: np.ndarray, slots: np.ndarray,
    depth: int, undo: list[tuple[np.ndarray, np.ndarray, np.ndarray]], ids: np.ndarray,
) -> None:
    """File the run of queries of :func:`recent` in their buckets (each keeps its ``depth`` most recent), logging what it overwrites."""
    n, tables = buckets.shape
    sf = buckets.reshape(-1)[order]
    counts = np.diff(np.append(starts, sf.size))
    keep = rank_sorted >= np.repeat(counts, counts) - depth
    kb = sf[keep]
    at_slot = kb * depth + (np.take(fill, kb) + rank_sorted[keep]) % depth
    undo.append((slots, at_slot, slots[at_slot]))
    slots[at_slot] = np.take(ids, order[keep] // tables)
    ub = sf[starts]
    undo.append((fill, ub, fill[ub]))
    fill[ub] += counts


def anchor_sample(x: np.ndarray, anchors: int, seed: int) -> np.ndarray | None:
    """Up to ``anchors`` distinct rows of ``x``, drawn uniformly with ``seed``; None when fewer
    than two: no spacing to measure. (Finding the distinct rows takes a sorted copy of ``x``,
    as the reference's quantiles already do.)"""
    if anchors < 2:
        return None
    distinct = np.unique(x, axis=0)
    if distinct.shape[0] < 2:
        return None
    rng = np.random.default_rng([seed, distinct.shape[0]])
    return distinct[np.sort(rng.choice(distinct.shape[0], min(anchors, distinct.shape[0]), replace=False))]


def anchor_spacing(anchors: np.ndarray, span: np.ndarray) -> float:
    """The FAR_QUANTILE of the anchors' RMS distances to their nearest other anchor, over the
    features that move (``span`` > 0), in units of their spans."""
    moving = span > 0
    a = anchors[:, moving].astype(np.float64)
    a = (a - a.mean(axis=0)) / span[moving]  # centred: distances do not move, rounding far from zero would
    return float(np.quantile(nearest_rms(a, a, exclude_self=True), FAR_QUANTILE))


def sent_within(before: np.ndarray, digests: np.ndarray, window: int) -> np.ndarray:
    """(n,) whether each of ``digests`` (a client's next queries, in order) repeats one of the
    ``window`` queries just before it, ``before`` (its last queries, oldest first) included:
    the same answer as a ring of ``window`` checked and written one query at a time."""
    seq = np.concatenate((before[-window:] if window else before[:0], digests))
    order = np.argsort(seq, kind="stable")
    same = seq[order[1:]] == seq[order[:-1]]
    prev = np.full(seq.size, -window - 1, dtype=np.int64)
    prev[order[1:][same]] = order[:-1][same]
    at = np.arange(seq.size)
    return (at - prev <= window)[seq.size - digests.size :]


def nearest_rms(q: np.ndarray, a: np.ndarray, exclude_self: bool = False, a_sq: np.ndarray | None = None, block: int = 1024) -> np.ndarray:
    """(n,) RMS distance (over the columns) from each row of ``q`` to the nearest row of ``a``;
    with ``exclude_self``, ``q`` is ``a`` and each row's own is left out. Block by block: memory
    stays ``block x len(a)``."""
    a = np.asarray(a, dtype=np.float64 if q.dtype == np.float64 else np.float32)
    sq = np.einsum("ij,ij->i", a, a) if a_sq is None else a_sq
    out = np.empty(q.shape[0], dtype=np.float64)
    for start in range(0, q.shape[0], block):
        part = q[start : start + block]
        d2 = np.einsum("ij,ij->i", part, part)[:, None] - 2.0 * (part @ a.T) + sq[None, :]
        if exclude_self:
            d2[np.arange(part.shape[0]), np.arange(start, start + part.shape[0])] = np.inf
        out[start : start + block] = np.sqrt(np.maximum(d2.min(axis=1), 0.0) / max(q.shape[1], 1))
    return out


def precision_units(x: np.ndarray) -> np.ndarray:
    """(d,) one unit of each feature's precision: 10**-k for the fewest decimals k that 99 % of the values are written with."""
    out = np.full(x.shape[1], 10.0**-_MAX_DECIMALS)
    done = np.zeros(x.shape[1], dtype=bool)
    for k in range(_MAX_DECIMALS + 1):
        scaled = x * 10.0**k
        ok = ~done & (np.mean(np.abs(scaled - np.round(scaled)) < 1e-6 * np.maximum(1.0, np.abs(scaled)), axis=0) >= 0.99)
        out[ok] = 10.0**-k
        done |= ok
    return out
