"""Blacklight (Li et al., USENIX Security 2022): query fingerprints in one index shared by all clients."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from functools import lru_cache
from typing import ClassVar

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from exporter.canonical import CHUNK_ROWS, DIGEST_FORMAT
from exporter.detectors.base import (
    Batch,
    Block,
    Detector,
    DetectorParams,
    ModelContext,
    Signals,
    State,
    WindowedParams,
    min_threshold_field,
)
from exporter.detectors.kit import share_signals
from exporter.hashing import splitmix64
from exporter.images import MAX_HASHED_SIDE, downscale

_U64 = np.uint64
_PRIME = 0x100000001B3  # the 64-bit FNV prime: odd, so invertible modulo 2**64
_PRIME_INV = pow(_PRIME, -1, 1 << 64)
_HASH_SEED = 0x626C61636B6C6974  # "blacklit"
_QMAX = float(1 << 40)  # quantized values are clipped to +-this, far inside int64


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P**i and P**-i modulo 2**64 for i < n, as read-only uint64 views of a shared table."""
    fwd, inv = _power_table(max(1024, 1 << (n - 1).bit_length()))
    return fwd[:n], inv[:n]


@lru_cache(maxsize=8)
def _power_table(size: int) -> tuple[np.ndarray, np.ndarray]:
    """P**i and P**-i modulo 2**64 for i < ``size`` (a power of two), by doubling.

    Each step appends the table so far times P**len (uint64 products wrap modulo 2**64),
    so the cost is a few numpy passes, not a Python loop per value. Tables are powers of
    two in size, so all cached tables together take at most twice the largest.
    """
    fwd = np.ones(1, dtype=np.uint64)
    inv = np.ones(1, dtype=np.uint64)
    while fwd.shape[0] < size:
        k = fwd.shape[0]
        fwd = np.concatenate([fwd, fwd * _U64(pow(_PRIME, k, 1 << 64))])
        inv = np.concatenate([inv, inv * _U64(pow(_PRIME_INV, k, 1 << 64))])
    fwd.setflags(write=False)
    inv.setflags(write=False)
    return fwd, inv


def window_hashes(q: np.ndarray, window: int, stride: int) -> np.ndarray:
    """64-bit hashes of the sliding windows of each row of the integer matrix ``q`` (m, n).

    Window ``s`` (positions s..s+w-1) hashes to splitmix64(sum_j q[s+j] * P**j mod 2**64) | 1,
    where w = min(window, n). All windows of all rows come from one cumulative sum of
    ``q[i] * P**i`` — window s's sum divided by P**s, and P is odd so that division
    is a multiplication by its inverse modulo 2**64 — so the cost is O(m n) whatever w.
    Equal contents give equal hashes wherever the window sits (as in Blacklight, which
    hashes window contents only). Always odd, never 0: 0 marks an empty fingerprint slot.
    """
    m, n = q.shape
    w = min(window, n)
    fwd, inv = _powers(n)
    cum = np.zeros((m, n + 1), dtype=np.uint64)
    np.cumsum(q.astype(np.int64).view(np.uint64) * fwd, axis=1, dtype=np.uint64, out=cum[:, 1:])
    sums = cum[:, w::stride] - cum[:, : n - w + 1 : stride]
    sums *= inv[: n - w + 1 : stride]
    sums ^= _U64(_HASH_SEED ^ w)
    h = splitmix64(sums)
    h |= _U64(1)
    return h


def top_hashes(h: np.ndarray, k: int) -> np.ndarray:
    """(m, k) the k largest distinct hashes of each row, ascending; 0 fills rows with fewer than k."""
    s = np.sort(h, axis=1)
    dup = s[:, 1:] == s[:, :-1]
    if dup.any():  # equal windows inside a query (constant stretches): keep one
        s[:, 1:][dup] = 0
        s.sort(axis=1)
    if s.shape[1] >= k:
        return np.ascontiguousarray(s[:, -k:])
    out = np.zeros((h.shape[0], k), dtype=np.uint64)
    out[:, k - s.shape[1] :] = s
    return out


_MASK31 = (1 << 31) - 1


def _pack(entries: np.ndarray) -> np.ndarray:
    """Entry ids as stored in the index: their low 31 bits."""
    return (entries & _MASK31).astype(np.uint32)


def _unpack(stored: np.ndarray, ref: np.ndarray | int) -> np.ndarray:
    """Entry ids from :func:`_pack`: the largest id <= ``ref`` with the stored low bits.

    Live entries span fewer than 2**30 ids (max_queries * top_k < 2**30), so ids in the
    live window are recovered exactly. Anything else (an empty or overwritten bucket)
    decodes to a dead id, or to a live entry whose stored hash is then checked.
    """
    return ref - ((ref - stored.astype(np.int64)) & _MASK31)


_NO_LINK = 1 << 31  # further back than any live entry (max_queries * top_k < 2**30)


def _back(entries: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """Links as stored: ``entry - previous entry`` as uint32, or 2**31 (dead) for none."""
    return np.where(prev >= 0, np.minimum(entries - prev, _NO_LINK), _NO_LINK).astype(np.uint32)


@lru_cache(maxsize=65536)
def client_key(client: str) -> int:
    """A stable 64-bit key of a client id (BLAKE2b), stored in the index instead of the string."""
    return int.from_bytes(hashlib.blake2b(client.encode("utf-8"), digest_size=8, person=b"monitaur-client").digest(), "little")


class FingerprintParams(WindowedParams):
    """Parameters of :class:`FingerprintDetector`."""

    quantum: float = Field(0.5, gt=0.0, description="Vector inputs: standardized features are quantized to steps of this many standard deviations (floor).")
    window_size: int = Field(16, ge=1, le=4096, description="Features per hashed sliding window (clamped to the input length).")
    stride: int = Field(1, ge=1, le=4096, description="Step between sliding windows.")
    top_k: int = Field(20, ge=1, le=512, description="A query's fingerprint: its top_k largest distinct window hashes.")
    match_threshold: int = Field(10, ge=1, description="Two queries match when their fingerprints share at least this many hashes (<= top_k).")
    chain_depth: int = Field(
        4,
        ge=1,
        le=1024,
        description="Per hash, how many of the most recent earlier queries holding it are compared (bounds the work per query; near-duplicates are found among the most recent).",
    )
    ttl_seconds: float = Field(86_400.0, gt=0.0, description="Indexed queries older than this (event time) no longer match.")
    max_queries: int = Field(200_000, ge=16, le=100_000_000, description="Queries kept in the shared index (all clients of the model); the oldest are evicted first.")
    window: int = Field(100, ge=1, le=100_000, description="How many of the client's last judged queries the share of matched queries is taken over.")
    min_events: int = Field(10, ge=1, description="Judged queries needed in the window before the client can be flagged (<= window).")
    threshold: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="Flag when at least this share of the window's queries matched an earlier query (the client's own or another client's). Calibration overwrites it per model.",
    )
    min_threshold: float = min_threshold_field(0.3)
    max_peers: int = Field(5, ge=1, le=100, description="Peers remembered per client for peer_matches (the heaviest, by a space-saving count).")
    max_tracked_clients: int = Field(10_000, ge=1, le=10_000_000, description="Clients with cross-client evidence remembered (least recently matched forgotten first).")
    image_quantum: int = Field(50, ge=1, le=255, description="Encoded images (no vector): 8-bit pixels are quantized to multiples of this (Blacklight).")
    image_window: int = Field(20, ge=1, description="Encoded images: pixel values per window, for images of at most large_image_values values (Blacklight: 20 for 32x32x3).")
    image_stride: int = Field(1, ge=1, description="Encoded images: window step, for images of at most large_image_values values.")
    large_image_values: int = Field(3072, ge=1, description="Images with more pixel values than this use the large-image window and stride.")
    large_image_window: int = Field(50, ge=1, description="Window of large images (Blacklight: 50).")
    large_image_stride: int = Field(25, ge=1, description="Stride of large images (Blacklight: 25).")

    @field_validator("match_threshold")
    @classmethod
    def _fits_top_k(cls, value: int, info: ValidationInfo) -> int:
        k = info.data.get("top_k")
        if k is not None and value > k:
            raise ValueError(f"must not exceed top_k ({k}), or no two queries could match")
        return value

    @field_validator("max_queries")
    @classmethod
    def _entries_fit(cls, value: int, info: ValidationInfo) -> int:
        k = info.data.get("top_k")
        if k is not None and value * k >= 1 << 30:
            raise ValueError(f"max_queries * top_k must stay below 2**30 (index links are 32-bit), got {value * k}")
        return value


# The index's cursors (rows allocated, table bits, next and oldest query ids) and arrays
# (ring: hashes, links, times, digests, client keys; head table), as a failed block restores them.
_IndexRefs = tuple[int, int, int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class _Evidence:
    """Cross-client evidence of one client: queries that matched another client's, and top peers."""

    __slots__ = ("cross", "peers")

    def __init__(self) -> None:
        self.cross = 0
        self.peers: dict[int, int] = {}


class FingerprintDetector(Detector):
    """Flags a client when many of its queries nearly duplicate earlier queries of any client.

    What it catches: query-based adversarial search (HopSkipJump, Boundary, SimBA, NES,
    Square), whose hundreds of queries are tiny perturbations of one input, within a
    handful of dozens of queries — including when the search is split over many API
    keys (Sybils), because the index of fingerprints is shared by all clients of the
    model: each member's queries match the other members' earlier ones.

    How (Blacklight): a query is quantized — standardized features floored to steps of
    ``quantum`` standard deviations; for encoded images without a vector, 8-bit pixels
    floored to multiples of ``image_quantum`` — and its sliding windows (``window_size``
    values, ``stride`` apart) are hashed (:func:`window_hashes`: a polynomial hash
    modulo 2**64 mixed by splitmix64, the same in every process). The ``top_k`` largest
    distinct hashes are the fingerprint. A small perturbation changes few quantized
    values, hence few windows, and most of the fingerprint survives; unrelated inputs
    share almost none. A query matches an earlier indexed query when they share at
    least ``match_threshold`` hashes, ignoring earlier queries with the same canonical
    digest (exact repeats, e.g. a popular input sent by many clients, are the
    ``repetition`` detector's business) and those older than ``ttl_seconds``.

    The index, all numpy arrays: a ring of the last ``max_queries`` queries (fingerprint,
    event time, canonical digest, 64-bit client key; grown on demand), per entry (one
    hash of one query) a link to the previous entry with the same hash, and a head
    table with, per bucket of hashes (the hash's top bits; at least two buckets per
    entry), the newest entry. A query is compared with the ``chain_depth`` most recent
    earlier queries holding each of its hashes: a vectorized head lookup (checked
    against the hash stored at the entry), gathers along the links, and a sort of the at
    most ``top_k * chain_depth`` candidates to count shared hashes. Approximations,
    for bounded work and memory: only those ``chain_depth`` queries per hash are
    compared; and when a later hash takes a bucket over, the earlier hash's queries can
    no longer be found — after n later distinct hashes a hash survives with probability
    about exp(-n / buckets), i.e. practically always for the recent queries that a
    search produces, and about 60 % for the oldest queries of a full index. Queries leave
    the index when overwritten (oldest first) and, at the start of a batch, when the
    oldest ones are past the TTL.

    Score: the share of matched queries among the client's last ``window`` judged
    queries, ``matched / max(n, min_events)``; flagged when ``n >= min_events`` and the
    score is at least ``threshold``. Cross-client evidence: per client, the number of
    its queries that matched another client's query and the ``max_peers`` heaviest
    peers (a space-saving count: a newcomer replaces the lightest peer and inherits its
    count + 1, so counts are upper bounds for late peers), for up to
    ``max_tracked_clients`` clients (least recently matched dropped); see
    :meth:`peer_matches`. :meth:`forget_client` drops a client's own record; its queries
    stay in the index (they are evidence about other clients). Peers are reported by
    client id when the id is among the last ``4 * max_tracked_clients`` clients seen,
    else as ``#`` + the hex client key.

    What it misses: attacks without near-duplicate queries (uniform random queries,
    natural-data extraction, JbDA's large steps), and perturbations that change many
    quantized values at once (random transforms before each query, large steps).
    Benign clients whose inputs vary little (sensor readings, drafts edited and
    resubmitted) match too: calibration of ``threshold`` accounts for them.

    Batching: matching and indexing happen in :meth:`prepare`, over all the clients'
    queries of a block in time order, and a block is judged exactly as its queries one
    at a time would be (a lookup sees what earlier queries of the block put in its
    bucket), provided event times do not decrease (TTL eviction happens at block
    starts; expired queries never match anyway). The index grows at the same query
    counts whatever the batching, so verdicts do not depend on how events are cut
    into blocks; :meth:`update` only folds each client's matches into its window.
    Vectors are quantized on the model's feature scaling and not judged before the
    model has one. After a restore (:meth:`load_shared_state`) the head table is rebuilt from the
    queries, so hashes an earlier bucket take-over had hidden are found again.

    Not judged (NaN, or None for a whole batch): events without a vector of the model's
    length and without decodable 8-bit image pixels.

    Cost per batch of m events with n features: O(m n) hashing and a row sort of the
    window hashes, canonical digests (memoized, shared with ``repetition``), one
    vectorized head lookup and insert for the ``m * top_k`` hashes and, only when some
    hash was seen before, up to ``chain_depth`` gathers of (m, top_k) links and a sort of
    (m, top_k * chain_depth) candidates; no per-event Python work.
    State per client: ``window + 24`` bytes (a bool per window slot, three int64
    counters); 124 bytes with the defaults. Shared index per model, at capacity:
    ``12 * top_k + 24`` bytes per query (264 with the defaults: 53 MB at 200,000
    queries; the ring grows with the traffic) plus the head table, 4 bytes per bucket
    (at least two buckets per allocated entry, grown four-fold at a time: 32 MiB for a full
    index of 200,000 x 20 hashes, 128 KiB for a model's first 256 queries), plus the
    names and evidence of up to ``max_tracked_clients`` clients. Memory follows the
    model's traffic: the ring and the table start small and grow as the index fills.
    """

    name: ClassVar[str] = "fingerprint"
    Params: ClassVar[type[DetectorParams]] = FingerprintParams
    threshold_param: ClassVar[str | None] = "threshold"
    # How often a benign client's queries match earlier queries depends on everybody else's
    # traffic (its volume, popular inputs): a calibration sample cannot pin that down, so
    # the share is cross-client evidence (peers, groups, its own alert), not a verdict input.
    verdict: ClassVar[bool] = False
    state_format: ClassVar[str] = f"digest-{DIGEST_FORMAT}:scaling-1"  # the index stores digests, and hashes of scaled inputs
    default_enabled: ClassVar[bool] = True
    params: FingerprintParams

    _INITIAL_ROWS = 256  # ring rows allocated at the first query; doubled as the index fills
    _MIN_BITS = 12
    _GROWTH_BITS = 2  # the head table grows four-fold at a time: rebuilt at every other doubling of the ring
    _CHUNK = 1024  # queries matched at once (bounds the temporary arrays)

    def __init__(self, params: DetectorParams, context: ModelContext) -> None:
        super().__init__(params, context)
        self._dim = context.input_dim
        self._cap = self.params.max_queries
        self._reset()

    def _reset(self) -> None:
        k = self.params.top_k
        self._alloc = 0  # rows allocated (grown on demand up to max_queries)
        self._hashes = np.zeros((0, k), dtype=np.uint64)  # fingerprints, 0 = empty slot
        self._prev = np.zeros((0, k), dtype=np.uint32)  # link: how many entries back the previous one with the same hash is (see _back)
        self._ts = np.zeros(0, dtype=np.float64)
        self._digest = np.zeros(0, dtype=np.uint64)
        self._client = np.zeros(0, dtype=np.uint64)
        self._bits = 0  # the head table has 2**bits buckets (top bits of the hash)
        self._head = np.zeros(0, dtype=np.uint32)  # per bucket of hashes: the newest entry (low 31 bits, see _pack)
        self._next = 0  # id of the next query
        self._oldest = 0  # ids below this have left the index
        self._evidence: OrderedDict[int, _Evidence] = OrderedDict()  # client key -> evidence (LRU)
        self._names: OrderedDict[int, str] = OrderedDict()  # client key -> client id (LRU)

    # -- per-client state ----------------------------------------------------------
    def init_state(self) -> State:
        return {
            "match_buf": np.zeros(self.params.window, dtype=np.bool_),
            "match_count": np.zeros((), dtype=np.int64),
            "matched": np.zeros((), dtype=np.int64),  # queries that matched any earlier query, ever
            "cross": np.zeros((), dtype=np.int64),  # queries that matched another client's query, ever
        }

    # -- fingerprints ----------------------------------------------------------------
    def fingerprints(self, batch: Block) -> tuple[np.ndarray, np.ndarray]:
        """(positions of the judged events, their (m, top_k) fingerprints, ascending, 0 = empty slot)."""
        p = self.params
        events = batch.events
        scaling = self.context.scaling
        d = self._dim if scaling is not None and scaling.dim == self._dim else None  # vectors need the model's scaling
        x = batch.flat_vectors
        if d and x is not None and x.shape[1] == d:
            return np.arange(len(events)), self._vector_prints(x)
        rows: list[int] = []
        prints: list[np.ndarray] = []
        vec_rows = [i for i, e in enumerate(events) if d and e.vector is not None and e.vector.shape == (d,)]
        if vec_rows:
            rows += vec_rows
            prints.append(self._vector_prints(np.stack([events[i].vector for i in vec_rows])))
        taken = set(vec_rows)
        for i, e in enumerate(events):
            if i in taken or e.image is None:
                continue
            img = np.asarray(e.image)
            if img.dtype != np.uint8 or img.size == 0:
                continue
            rows.append(i)
            prints.append(self._image_prints(img))
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, p.top_k), dtype=np.uint64)
        order = np.argsort(np.asarray(rows), kind="stable")
        return np.asarray(rows, dtype=np.int64)[order], np.concatenate(prints)[order]

    def _vector_prints(self, x: np.ndarray) -> np.ndarray:
        """Fingerprints of vector rows, :data:`CHUNK_ROWS` rows at a time, so that the window
        sums and hashes stay in the CPU cache instead of streaming a whole block's through
        memory (``bench/throughput.py`` measures the effect on replay)."""
        p = self.params
        scaling = self.context.scaling
        assert scaling is not None  # checked by fingerprints()
        out = np.empty((x.shape[0], p.top_k), dtype=np.uint64)
        for start in range(0, x.shape[0], CHUNK_ROWS):
            z = scaling.apply(x[start : start + CHUNK_ROWS])
            z *= 1.0 / p.quantum
            q = np.floor(np.clip(z, -_QMAX, _QMAX, out=z)).astype(np.int64)
            out[start : start + CHUNK_ROWS] = top_hashes(window_hashes(q, p.window_size, p.stride), p.top_k)
        return out

    def _image_prints(self, img: np.ndarray) -> np.ndarray:
        p = self.params
        # Bounded work whatever the size: Blacklight's large-image windows (50, stride 25)
        # see at most 256 x 256 x 3 values, and _powers' tables stay small.
        img = downscale(img, MAX_HASHED_SIDE)
        q = (img.reshape(1, -1) // p.image_quantum).astype(np.int64)
        if q.shape[1] > p.large_image_values:
            w, s = p.large_image_window, p.large_image_stride
        else:
            w, s = p.image_window, p.image_stride
        return top_hashes(window_hashes(q, w, s), p.top_k)

    # -- detection -----------------------------------------------------------------
    def prepare(self, block: Block) -> None:
        """Match every client's queries of the block against the shared index, in time order, then index them.

        Leaves per event (``block.prepared``): 1.0 when the query matched an earlier one,
        0.0 when not, NaN when not judged; and whether it matched another client's query.

        All or nothing: if anything raises, the index is put back as it was before the
        block (an undo log of what each chunk overwrote, and the arrays and cursors of
        before any growth), and the names and cross-client evidence, written last, are
        untouched.
        """
        n = len(block)
        matched = np.full(n, np.nan)
        foreign = np.zeros(n, dtype=bool)
        block.prepared[self.name] = (matched, foreign)
        idx, prints = self.fingerprints(block)
        m = idx.shape[0]
        if m == 0:
            return
        events = block.events
        every = m == n
        dig = block.digests if every else block.digests[idx]
        ts = block.ts if every else block.ts[idx]
        names = [events[i].client for i in idx.tolist()]
        keys = np.fromiter((client_key(c) for c in names), dtype=np.uint64, count=m)
        hit = np.zeros(m, dtype=bool)
        peers: list[tuple[int, set[int]]] = []
        before = self._index_refs()
        undo: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        try:
            self._expire(float(ts[0]))
            start = 0
            while start < m:
                # Chunks end where the index grows, so it grows at the same query whatever the batching.
                room = self._alloc - self._next if self._alloc < self._cap else self._cap
                if room <= 0:
                    self._grow()
                    continue
                stop = min(m, start + self._CHUNK, start + room)
                hit[start:stop], other = self._match_and_insert(prints[start:stop], ts[start:stop], dig[start:stop], keys[start:stop], undo)
                if other is not None:
                    for r, found in enumerate(other):
                        if found:
                            foreign[idx[start + r]] = True
                            peers.append((int(keys[start + r]), found))
                start = stop
        except BaseException:
            for array, at, old in reversed(undo):
                array[at] = old
            self._restore_refs(before)
            raise
        # The index holds the whole block: now the names and evidence (dict updates only).
        for key, client in dict(zip(keys.tolist(), names)).items():
            self._remember_name(key, client)
        for key, found in peers:
            self._record_peers(key, found)
        matched[idx] = hit

    def _index_refs(self) -> "_IndexRefs":
        """The index's arrays (by reference: growth replaces them) and cursors, to undo a failed block."""
        return (self._alloc, self._bits, self._next, self._oldest, self._hashes, self._prev, self._ts, self._digest, self._client, self._head)

    def _restore_refs(self, refs: "_IndexRefs") -> None:
        (self._alloc, self._bits, self._next, self._oldest, self._hashes, self._prev, self._ts, self._digest, self._client, self._head) = refs

    def update(self, state: State, batch: Batch) -> Signals | None:
        found = batch.prepared_for(self.name)
        if found is None:
            return None
        matched, foreign = found
        judged = np.flatnonzero(matched == matched)  # not NaN
        hits = matched[judged] > 0.0
        state["matched"][...] = int(state["matched"]) + int(np.count_nonzero(hits))
        state["cross"][...] = int(state["cross"]) + int(np.count_nonzero(foreign))
        p = self.params
        return share_signals(state["match_buf"], state["match_count"], hits, judged, len(batch), p.min_events, p.threshold)

    def _match_and_insert(
        self, prints: np.ndarray, ts: np.ndarray, dig: np.ndarray, me: np.ndarray, undo: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, list[set[int]] | None]:
        """Match each query against the index (earlier queries only, this batch's included), then index them.

        Entry ``e = query id * top_k + slot`` is one hash of one query; each entry links
        to the previous entry with the same hash, and the head table gives, per bucket of
        hashes, the newest entry. The batch is judged exactly as if its queries came one
        at a time (lookup, then insert): a lookup sees the newest entry put into its
        bucket by an earlier query of the batch, else the table's head. Returns per
        query whether it matched, and (when any query matched another client's) per
        query the set of other clients' keys it matched. ``me`` holds each query's client key.
        Every value is computed before the first write, and what the writes overwrite is
        appended to ``undo`` (array, positions, old values).
        """
        p = self.params
        k, cap, depth, need = p.top_k, self._cap, p.chain_depth, p.match_threshold
        m = prints.shape[0]
        base = self._next
        qid = base + np.arange(m, dtype=np.int64)
        flat = prints.ravel()
        entries = base * k + np.arange(m * k, dtype=np.int64)
        bucket, head = self._find(flat)
        # The bucket's newest entry from an earlier query of the batch, if any, else the
        # table's head; it links the entry only when it holds the same hash.
        present = flat != 0
        bucket[~present] = -1
        # A bucket's entries in entry (= query) order: sorting unique (bucket, position)
        # keys is a stable argsort at the price of a plain sort.
        n = bucket.shape[0]
        keys = np.sort(bucket * n + np.arange(n))
        order = keys % n
        ranked = keys // n  # == bucket[order]; buckets < 2**37 and n <= 2**19: no overflow
        group = np.ones(n, dtype=bool)
        group[1:] = ranked[1:] != ranked[:-1]
        if (group | (ranked < 0)).all():  # no bucket got two entries of this batch: the table answers
            prev = head
        else:
            at = np.arange(n)
            qnum = order // k
            run = group.copy()
            run[1:] |= qnum[1:] != qnum[:-1]
            run_start = np.maximum.accumulate(np.where(run, at, 0))
            earlier = run_start > np.maximum.accumulate(np.where(group, at, 0))  # an earlier query put one here
            before = order[np.maximum(run_start - 1, 0)]
            linked = np.where(earlier, np.where(flat[before] == flat[order], entries[before], -1), head[order])
            prev = np.empty(n, dtype=np.int64)
            prev[order] = linked
            prev[~present] = -1
        # Walk the links: up to `depth` earlier queries per (query, hash). A dead link
        # (no link, overwritten, expired) leads below the query's floor, and so does
        # everything after it, since links only go back.
        floor = np.maximum(qid - cap, self._oldest)
        cands = np.full((m, k, depth), -1, dtype=np.int64)
        cur = prev.reshape(m, k)
        first = base * k
        links = self._prev.reshape(-1)
        span = self._alloc * k
        walked = bool((prev >= 0).any())
        for step in range(depth if walked else 0):
            cq = cur // k
            cands[:, :, step] = cq
            if step + 1 == depth or not (cq >= floor[:, None]).any():
                break
            nxt = cur - links[cur % span]  # entry e sits at flat e mod (rows * k)
            in_batch = cur >= first
            if in_batch.any():  # links of this batch's entries are not in the ring yet
                nxt = np.where(in_batch, prev[np.where(in_batch, cur - first, 0)], nxt)
            cur = nxt
        width = k * depth
        found = cands.reshape(-1)
        matched = np.zeros(m, dtype=bool)
        other: list[set[int]] | None = None
        hits = np.flatnonzero(found >= np.repeat(floor, width)) if walked else found[:0]
        if hits.size:
            # Candidates are earlier queries holding one of the query's hashes: drop exact
            # repeats (same digest) and those past the TTL, then count shared hashes.
            cid = found[hits]
            row = hits // width
            c_ts, c_dig = self._ts[cid % cap], self._digest[cid % cap]
            local = cid >= base  # earlier queries of this batch
            if local.any():
                li = cid[local] - base
                c_ts[local] = ts[li]
                c_dig[local] = dig[li]
            hits = hits[(c_dig != dig[row]) & (c_ts >= ts[row] - p.ttl_seconds)]
        if hits.size:
            keyed = -1 - np.arange(m * width, dtype=np.int64)  # distinct negatives never pair up
            keyed[hits] = found[hits]
            srt = np.sort(keyed.reshape(m, width), axis=1)
            # a query id repeated `need` times in a sorted row: `need` shared hashes
            runs = (srt[:, need - 1 :] == srt[:, : width - need + 1]) & (srt[:, need - 1 :] >= 0)
            matched = runs.any(axis=1)
            if matched.any():
                rows, cols = np.nonzero(runs)
                qids = srt[rows, cols]
                clients = np.where(qids >= base, me[np.minimum(np.maximum(qids - base, 0), m - 1)], self._client[qids % cap])
                foreign = clients != me[rows]
                if foreign.any():
                    other = [set() for _ in range(m)]
                    for r, c in zip(rows[foreign].tolist(), clients[foreign].tolist()):
                        other[r].add(c)
        # Index the batch: ring rows, then the heads of its hashes (the newest entry of each).
        pos = qid % cap
        links = _back(entries, prev).reshape(m, k)
        last = ranked >= 0
        last[:-1] &= group[1:]
        buckets = ranked[last]
        newest = _pack(entries[order[last]])  # a bucket's newest entry of the batch
        for array, at in ((self._hashes, pos), (self._prev, pos), (self._ts, pos), (self._digest, pos), (self._client, pos), (self._head, buckets)):
            undo.append((array, at, array[at]))  # fancy indexing copies
        self._hashes[pos] = prints
        self._prev[pos] = links
        self._ts[pos] = ts
        self._digest[pos] = dig
        self._client[pos] = me
        self._head[buckets] = newest
        self._next = base + m
        self._oldest = max(self._oldest, self._next - cap)  # overwritten
        return matched, other

    def _find(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bucket of each hash, and its newest live entry in the index (-1: none).

        The head of a bucket is checked against the hash stored in the ring at its
        entry, so a bucket taken over by another hash, a stale head or an empty bucket
        never answers for the wrong hash.
        """
        k = self.params.top_k
        bucket = (hashes >> _U64(64 - self._bits)).astype(np.int64)
        heads = _unpack(self._head[bucket], self._next * k - 1)
        live = heads >= max(self._oldest, self._next - self._cap) * k
        held = self._hashes.reshape(-1)[heads % (self._alloc * k)]  # entry e sits at flat e mod (rows * k)
        return bucket, np.where(live & (held == hashes), heads, -1)

    # -- the index -----------------------------------------------------------------
    def _grow(self) -> None:
        """Double the ring (up to max_queries); the head table keeps at least two buckets per entry.

        Memory follows the traffic: the table is sized for the rows allocated, not for a
        full index. When the doubled ring needs a larger table, the table grows
        ``2**_GROWTH_BITS``-fold at once (up to a full index's size) and is rebuilt
        (:meth:`_relink`), so it is rebuilt at every other doubling of the ring rather than
        at each one. Growth happens at the same query counts whatever the batching.
        """
        new = min(self._cap, max(2 * self._alloc, self._INITIAL_ROWS))
        k = self.params.top_k

        def grown(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
            out = np.zeros(shape, dtype=a.dtype)
            out[: a.shape[0]] = a
            return out

        self._hashes = grown(self._hashes, (new, k))
        self._prev = grown(self._prev, (new, k))
        self._ts = grown(self._ts, (new,))
        self._digest = grown(self._digest, (new,))
        self._client = grown(self._client, (new,))
        self._alloc = new
        need = max(self._MIN_BITS, (2 * new * k - 1).bit_length())  # at least two buckets per entry
        if need > self._bits:
            full = max(self._MIN_BITS, (2 * self._cap * k - 1).bit_length())
            self._bits = min(need + self._GROWTH_BITS - 1, full)
            self._relink()

    def _relink(self) -> None:
        """Rebuild the head table from the live entries (after the table grew, or a restore)."""
        k, cap = self.params.top_k, self._cap
        ids = np.arange(self._oldest, self._next, dtype=np.int64)
        flat = self._hashes[ids % cap].ravel()
        present = flat != 0
        # Each bucket's newest entry, as 1 + its offset from the oldest live entry (0: none;
        # live entries span fewer than 2**30 ids), then packed like every stored entry id.
        base = self._oldest * k
        head = np.zeros(1 << self._bits, dtype=np.uint32)  # one table, filled in place (page faults dominate the cost)
        offsets = (ids[:, None] * k + np.arange(k)).ravel()[present] - (base - 1)
        np.maximum.at(head, (flat[present] >> _U64(64 - self._bits)).astype(np.int64), offsets.astype(np.uint32))
        held = np.flatnonzero(head)
        newest = _pack(head[held].astype(np.int64) + (base - 1))
        # empty buckets decode to an id 2**30 entries back: dead, whatever the live window
        head.fill(int(_pack(np.array(self._next * k - (1 << 30)))))
        head[held] = newest
        self._head = head

    def _relink_chains(self) -> None:
        """Rebuild every live entry's link to the previous entry with the same hash (after a restore)."""
        k, cap = self.params.top_k, self._cap
        ids = np.arange(self._oldest, self._next, dtype=np.int64)
        pos = ids % cap
        flat = self._hashes[pos].ravel()
        entries = (ids[:, None] * k + np.arange(k)).ravel()
        order = np.argsort(flat, kind="stable")
        ranked = flat[order]
        same = (ranked[1:] == ranked[:-1]) & (ranked[1:] != 0)
        prev = np.full(flat.shape[0], -1, dtype=np.int64)
        prev[order[1:][same]] = entries[order[:-1][same]]
        self._prev[pos] = _back(entries, prev).reshape(-1, k)

    def _expire(self, now: float) -> None:
        """Evict the oldest queries while they are past the TTL (event time)."""
        limit = now - self.params.ttl_seconds
        cap = self._cap
        stop = self._oldest
        if stop >= self._next or self._ts[stop % cap] >= limit:
            return
        while stop < self._next:
            chunk = min(self._next - stop, 1024)
            fresh = np.flatnonzero(self._ts[(stop + np.arange(chunk)) % cap] >= limit)
            if fresh.size:
                stop += int(fresh[0])
                break
            stop += chunk
        self._oldest = stop

    # -- cross-client evidence ---------------------------------------------------------
    def _remember_name(self, key: int, client: str) -> None:
        names = self._names
        if key in names:
            names.move_to_end(key)
            return
        names[key] = client
        if len(names) > 4 * self.params.max_tracked_clients:
            names.popitem(last=False)

    def _record_peers(self, me: int, found: set[int]) -> None:
        """Count one query of client ``me`` that matched queries of the clients ``found``."""
        ev = self._evidence.get(me)
        if ev is None:
            ev = self._evidence[me] = _Evidence()
            if len(self._evidence) > self.params.max_tracked_clients:
                self._evidence.popitem(last=False)
        else:
            self._evidence.move_to_end(me)
        limit = self.params.max_peers
        peers = ev.peers
        ev.cross += 1
        for peer in found:
            if peer in peers:
                peers[peer] += 1
            elif len(peers) < limit:
                peers[peer] = 1
            else:  # space-saving: the newcomer takes the lightest peer's place and count
                lightest = min(peers, key=peers.__getitem__)
                peers[peer] = peers.pop(lightest) + 1

    def peer_matches(self, client: str) -> tuple[int, dict[str, int]]:
        ev = self._evidence.get(client_key(client))
        if ev is None:
            return 0, {}
        out: dict[str, int] = {}
        for key, n in sorted(ev.peers.items(), key=lambda kv: -kv[1]):
            out[self._names.get(key, f"#{key:016x}")] = n
        return ev.cross, out

    def forget_client(self, client: str) -> None:
        self._evidence.pop(client_key(client), None)

    # -- shared state ------------------------------------------------------------------
    def shared_state(self) -> State | None:
        k = self.params.top_k
        pos = np.arange(self._oldest, self._next, dtype=np.int64) % self._cap
        names = list(self._names.items())
        blob = [n.encode("utf-8") for _, n in names]
        offsets = np.zeros(len(blob) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blob], out=offsets[1:])
        owners = list(self._evidence.items())
        peer_owner, peer_key, peer_count = [], [], []
        for i, (_, ev) in enumerate(owners):
            for key, n in ev.peers.items():
                peer_owner.append(i)
                peer_key.append(key)
                peer_count.append(n)
        empty = pos.size == 0
        return {
            "ids": np.array([self._oldest, self._next], dtype=np.int64),
            "hashes": np.zeros((0, k), dtype=np.uint64) if empty else self._hashes[pos],
            "ts": np.zeros(0) if empty else self._ts[pos],
            "digest": np.zeros(0, dtype=np.uint64) if empty else self._digest[pos],
            "client": np.zeros(0, dtype=np.uint64) if empty else self._client[pos],
            "name_keys": np.array([key for key, _ in names], dtype=np.uint64),
            "name_blob": np.frombuffer(b"".join(blob), dtype=np.uint8).copy(),
            "name_offsets": offsets,
            "owner_keys": np.array([key for key, _ in owners], dtype=np.uint64),
            "owner_cross": np.array([ev.cross for _, ev in owners], dtype=np.int64),
            "peer_owner": np.array(peer_owner, dtype=np.int64),
            "peer_keys": np.array(peer_key, dtype=np.uint64),
            "peer_counts": np.array(peer_count, dtype=np.int64),
        }

    def load_shared_state(self, state: State) -> None:
        k, cap = self.params.top_k, self._cap
        oldest, nxt = (int(v) for v in np.asarray(state["ids"], dtype=np.int64))
        hashes = np.asarray(state["hashes"], dtype=np.uint64)
        n = nxt - oldest
        if n < 0 or n > cap or hashes.shape != (n, k) or any(np.asarray(state[f]).shape != (n,) for f in ("ts", "digest", "client")):
            raise ValueError(f"fingerprint shared state does not fit top_k={k}, max_queries={cap}")
        self._reset()
        while self._alloc < min(nxt, cap):
            self._grow()
        if n:
            pos = np.arange(oldest, nxt, dtype=np.int64) % cap
            self._hashes[pos] = hashes
            self._ts[pos] = np.asarray(state["ts"], dtype=np.float64)
            self._digest[pos] = np.asarray(state["digest"], dtype=np.uint64)
            self._client[pos] = np.asarray(state["client"], dtype=np.uint64)
        self._oldest, self._next = oldest, nxt
        if n:
            self._relink_chains()
            self._relink()
        blob = np.asarray(state["name_blob"], dtype=np.uint8).tobytes()
        offsets = np.asarray(state["name_offsets"], dtype=np.int64).tolist()
        for i, key in enumerate(np.asarray(state["name_keys"], dtype=np.uint64).tolist()):
            self._names[key] = blob[offsets[i] : offsets[i + 1]].decode("utf-8")
        evidence = []
        for key, cross in zip(np.asarray(state["owner_keys"], dtype=np.uint64).tolist(), np.asarray(state["owner_cross"], dtype=np.int64).tolist()):
            ev = _Evidence()
            ev.cross = cross
            self._evidence[key] = ev
            evidence.append(ev)
        for o, key, c in zip(
            np.asarray(state["peer_owner"], dtype=np.int64).tolist(),
            np.asarray(state["peer_keys"], dtype=np.uint64).tolist(),
            np.asarray(state["peer_counts"], dtype=np.int64).tolist(),
        ):
            evidence[o].peers[key] = c

    def index_size(self) -> int:
        """Queries currently held by the shared index (live, not yet evicted)."""
        return self._next - self._oldest


