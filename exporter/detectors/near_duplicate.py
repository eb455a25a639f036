"""Share of near-duplicate inputs: catches query-based search around one input."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import imagehash
import numpy as np
from PIL import Image
from pydantic import Field

from exporter.canonical import DIGEST_FORMAT, event_text
from exporter.detectors.base import (
    Batch,
    Detector,
    DetectorParams,
    ModelContext,
    Signals,
    State,
    WindowedParams,
    min_threshold_field,
)
from exporter.detectors.kit import ring_write, scatter, window_shares
from exporter.hashing import splitmix64
from exporter.images import MAX_HASHED_SIDE, downscale

if TYPE_CHECKING:
    from exporter.events import Event

# Kinds of stored fingerprints; 0 marks a never-written slot.
KIND_EMPTY = 0
KIND_IMAGE = 1
KIND_TEXT = 2
KIND_VECTOR = 3

_U64 = np.uint64
_MASK_SHIFTS = np.arange(64, dtype=np.uint64)
_SHINGLE_PRIME = _U64(0x100000001B3)  # the 64-bit FNV prime, odd so the polynomial hash mixes well
_SIMHASH_CHUNK = 1 << 16  # shingles voted per pass, bounds the temporary bit matrix to 4 MiB


def text_simhash(text: str, shingle: int) -> int | None:
    """64-bit SimHash of the character ``shingle``-grams of ``text`` (None for empty text).

    Each shingle gets a 64-bit hash: a polynomial hash of its Unicode code points
    (computed for all shingles at once by a rolling sum over ``shingle`` shifted slices)
    passed through :func:`splitmix64`. Every bit of the SimHash is the majority vote of
    that bit over all shingles (counted with multiplicity). Texts that share most
    shingles get hashes a small Hamming distance apart; the expected distance is about
    ``64 * angle / pi`` between the texts' shingle-count vectors. A text shorter than
    ``shingle`` characters is a single shingle.
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.uint64)
    n = codes.shape[0]
    if n == 0:
        return None
    k = min(shingle, n)
    m = n - k + 1
    h = np.zeros(m, dtype=np.uint64)
    for j in range(k):  # over the shingle length, not over the history
        h = h * _SHINGLE_PRIME + codes[j : j + m]
    hashes = splitmix64(h).astype("<u8")
    votes = np.zeros(64, dtype=np.int64)
    for start in range(0, m, _SIMHASH_CHUNK):
        block = hashes[start : start + _SIMHASH_CHUNK]
        bits = np.unpackbits(block.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
        votes += bits.sum(axis=0, dtype=np.int64)
    majority = (2 * votes > m).astype(np.uint8)
    return int(np.packbits(majority, bitorder="little").view("<u8")[0])


def _hashable_pixels(image: np.ndarray) -> np.ndarray | None:
    """The image as a 2-D grey or H x W x 3 uint8 array that PIL accepts, or None.

    uint8 pixels are used as they are (alpha dropped). Pixels from a float vector
    (any range: 0..1, 0..16, 0..255) are min-max scaled to 0..255; a perceptual hash
    compares DCT coefficients with their median, so an affine rescaling does not
    change it beyond 8-bit quantization.
    """
    a = np.asarray(image)
    if a.ndim == 3:
        channels = a.shape[2]
        if channels == 1:
            a = a[:, :, 0]
        elif channels in (3, 4):
            a = a[:, :, :3]
        else:
            a = a.astype(np.float64).mean(axis=2)
    if a.ndim not in (2, 3) or a.size == 0:
        return None
    if a.dtype != np.uint8:
        f = np.asarray(a, dtype=np.float64)
        if not np.all(np.isfinite(f)):
            return None
        lo, span = float(f.min()), float(np.ptp(f))
        a = np.zeros(f.shape, dtype=np.uint8) if span == 0.0 else np.rint((f - lo) * (255.0 / span)).astype(np.uint8)
    return np.ascontiguousarray(a)


def image_phash(image: np.ndarray) -> int | None:
    """64-bit perceptual hash (``imagehash.phash``) of decoded pixels, or None if unusable."""
    pixels = _hashable_pixels(image)
    if pixels is None:
        return None
    # phash resamples to 32 x 32 anyway; a block-mean reduction first bounds its cost
    # (6 ms for 1024 x 1024 x 3, 2 ms with it) and changes a large image's hash by a few bits.
    bits = imagehash.phash(Image.fromarray(downscale(pixels, MAX_HASHED_SIDE))).hash.ravel()
    return int(np.packbits(bits, bitorder="little").view("<u8")[0])


def _rademacher_projection(dim: int, k: int) -> np.ndarray:
    """A fixed ``dim x k`` random +-1/sqrt(k) matrix, derived from splitmix64 of the entry index.

    Johnson-Lindenstrauss: it keeps Euclidean distances within a few percent (relative
    error ~ 1/sqrt(2k)), and it is identical in every process and numpy version, so
    projected vectors in a snapshot stay comparable with new ones.
    """
    idx = np.arange(dim * k, dtype=np.uint64)
    signs = (splitmix64(idx) >> _U64(63)).astype(np.float64) * 2.0 - 1.0
    return (signs / math.sqrt(k)).reshape(dim, k)


class NearDuplicateParams(WindowedParams):
    """Parameters of :class:`NearDuplicateDetector`."""

    window: int = Field(100, ge=1, le=10_000, description="How many of the client's last inputs are kept for comparison.")
    min_events: int = Field(40, ge=1, description="Judged inputs needed in the window before the client can be flagged (<= window): 40, so that a short burst of form edits or sliders is not enough.")
    flag_ratio: float = Field(0.9, gt=0.0, le=1.0, description="Flag when at least this share of the window's inputs were near-duplicates.")
    min_threshold: float = min_threshold_field(0.3)
    image_hamming_tolerance: int = Field(
        8, ge=0, le=64, description="Images match when their 64-bit perceptual hashes differ in at most this many bits."
    )
    text_hamming_tolerance: int = Field(
        12,
        ge=0,
        le=64,
        description=(
            "Texts match when their 64-bit SimHashes differ in at most this many bits. One changed "
            "word in a ~60-character sentence moves the hash by ~10 bits (median); unrelated "
            "sentences sit near 30."
        ),
    )
    text_shingle: int = Field(4, ge=1, le=32, description="Length in characters of the shingles a text's SimHash is built from.")
    tabular_tolerance: float = Field(
        0.05,
        gt=0.0,
        description="Vectors match when the RMS per-feature distance of their standardized values is at most this (in standard deviations).",
    )
    max_vector_dim: int = Field(
        128,
        ge=1,
        le=65_536,
        description="Vectors longer than this are stored as a fixed random projection to this many dimensions, bounding the state.",
    )


class NearDuplicateDetector(Detector):
    """Flags a client when many of its recent inputs nearly duplicate another recent input.

    What it catches: query-based search around one input. Decision-based adversarial
    attacks (HopSkipJump, Boundary Attack), gradient estimation by finite differences,
    and word-substitution text attacks all send long runs of slight variants of the same
    input: tiny perturbations, a brightened or re-compressed picture, a sentence with one
    word swapped. Independent benign inputs are rarely that close to each other. Exact
    repeats are left to the ``repetition`` detector: an input counts as a near-duplicate
    only if a previous input in the window is within tolerance *and* has another
    canonical digest (:func:`exporter.canonical.canonical_digest`).

    How, per modality, against the last ``window`` inputs of the same kind:

    * image (decoded pixels, ``event.image``): 64-bit ``imagehash.phash``; match when the
      Hamming distance is at most ``image_hamming_tolerance``.
    * text: 64-bit SimHash of character ``text_shingle``-grams of the canonical text
      (:func:`text_simhash`); match when the Hamming distance is at most
      ``text_hamming_tolerance``.
    * vector (tabular, or image pixels sent as a flat array without ``image_shape``):
      standardized with the model's feature scaling (not judged before the model has
      one: see :class:`~exporter.detectors.kit.Scaling`); match when ``||a - b|| / sqrt(dim)``, the RMS
      per-feature distance in standard deviations, is at most ``tabular_tolerance``.
      Vectors are stored standardized with the scaling of their time; when the live
      baseline replaces it (a few times early in a model's life), old and new vectors
      use slightly different scales, and a tolerance is approximate anyway. Inputs longer than ``max_vector_dim`` are stored as a fixed
      random projection (distances kept within a few percent).

    The score is the share of the window's inputs that were near-duplicates,
    ``near / max(n, min_events)`` (so a new client ramps up rather than jumping to 1);
    the client is flagged when ``n >= min_events`` and the score is at least
    ``flag_ratio``. ``pairs`` counts every (new input, earlier input) match, cumulatively.

    Not judged (NaN, or None for a whole batch): events without input, empty text,
    images that cannot be hashed, and vectors when the context has no ``input_dim`` (no
    ring was allocated).

    Batches: a batch's inputs are compared with the ring and with each other at once,
    one (m, window) and one (m, m) matrix per fingerprint type, counting only earlier
    inputs at most ``window`` positions back, so the result is exactly that of feeding
    the events one by one. Vector distances come from one matrix product per block
    (a prefilter with a margin for rounding); only the pairs it cannot rule out are
    measured on their own difference vectors, which decide. Long batches are cut into
    blocks that keep a (block, window + block, D) worst case (every pair close) near 16 MiB.

    Cost per event: image O(H * W) to downscale plus a 32 x 32 DCT; text O(len * shingle)
    (both per event, memoized); vector O(dim * max_vector_dim) to project when longer,
    then O((window + m) * D) for the distance product, plus O(D) per pair the product
    cannot rule out (few on benign traffic, most on a search around one input); plus
    O(window + m) Hamming distances and digest comparisons, all in a fixed number of
    numpy operations per batch.

    State per client, in bytes, with W = ``window``:
    ``16 + 10 * W + 8 * W * [modality != "tabular"] + 4 * W * D``, where
    ``D = min(input_dim, max_vector_dim)`` when ``input_dim`` is known and the modality is
    not text, else 0 (counter and pair total 16; kind 1 + near-duplicate flag 1 + digest 8
    per slot; a uint64 hash per slot unless the model is tabular; float32 vectors).
    Defaults: 26,616 for a 64-feature tabular model; 1,816 for text or image-file models.
    """

    name: ClassVar[str] = "near_duplicate"
    Params: ClassVar[type[DetectorParams]] = NearDuplicateParams
    threshold_param = "flag_ratio"
    state_format = f"digest-{DIGEST_FORMAT}"
    params: NearDuplicateParams

    def __init__(self, params: DetectorParams, context: ModelContext) -> None:
        super().__init__(params, context)
        self._input_dim: int = 0
        self._vector_dim: int = 0
        self._projection: np.ndarray | None = None
        if context.input_dim and context.modality != "text":
            self._input_dim = int(context.input_dim)
            self._vector_dim = min(self._input_dim, self.params.max_vector_dim)
            if self._input_dim > self.params.max_vector_dim:
                self._projection = _rademacher_projection(self._input_dim, self._vector_dim)
        self._hash_slots: int = 0 if context.modality == "tabular" else self.params.window

    def init_state(self) -> State:
        w = self.params.window
        return {
            "count": np.zeros((), dtype=np.int64),
            "pairs": np.zeros((), dtype=np.int64),
            "kind": np.zeros(w, dtype=np.uint8),
            "near": np.zeros(w, dtype=np.bool_),
            "digest": np.zeros(w, dtype=np.uint64),
            "hash": np.zeros(self._hash_slots, dtype=np.uint64),
            "vec": np.zeros((w, self._vector_dim), dtype=np.float32),
        }

    # -- fingerprints ---------------------------------------------------------
    def _hash_fingerprint(self, event: "Event") -> tuple[int, int] | None:
        """(kind, 64-bit hash) of a text or image input, memoized in ``event.cache``; None if unusable."""
        if event.text is not None:
            key = f"simhash{self.params.text_shingle}"
            if key not in event.cache:
                text = event_text(event)
                event.cache[key] = text_simhash(text, self.params.text_shingle) if text else None
            fp = event.cache[key]
            return None if fp is None or self._hash_slots == 0 else (KIND_TEXT, fp)
        if event.image is not None:
            if "phash" not in event.cache:
                event.cache["phash"] = image_phash(event.image)
            fp = event.cache["phash"]
            return None if fp is None or self._hash_slots == 0 else (KIND_IMAGE, fp)
        return None

    def _vector_fingerprints(self, events: list["Event"], rows: list[int], stacked: np.ndarray | None) -> np.ndarray:
        """(len(rows), D) float32 stored form of the vector inputs at ``rows``: standardized, projected.

        ``stacked`` is ``Batch.vectors`` when every event is a flat vector, else None.
        """
        if stacked is not None and len(rows) == len(events):
            x = stacked.astype(np.float64, copy=False)
        else:
            x = np.stack([np.asarray(events[i].vector, dtype=np.float64).ravel() for i in rows])
        scaling = self.context.scaling
        assert scaling is not None  # callers judge vectors only once the model has a scaling
        z = scaling.apply(x)
        if self._projection is not None:
            # One matrix-vector product per row: a blocked matrix product could round a
            # row differently depending on how many rows share the batch.
            z = np.stack([row @ self._projection for row in z])
        return z.astype(np.float32)

    def _fingerprints(
        self, events: list["Event"], digests: np.ndarray, stacked: np.ndarray | None
    ) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Positions of the judged events, and their kinds, hashes, digests and stored vectors (None: none judged)."""
        judged: list[int] = []  # positions of the events with a usable fingerprint, in order
        kind_list: list[int] = []
        hash_list: list[int] = []
        vector_rows: list[int] = []  # positions of the vector inputs among ``judged``
        for i, e in enumerate(events):
            if digests[i] == 0:
                continue
            if e.text is None and e.image is None:  # a vector
                if self._vector_dim and e.vector is not None and self._scaled():
                    if np.size(e.vector) != self._input_dim:  # checked for all before the state changes
                        raise ValueError(f"input has {np.size(e.vector)} values; the detector was set up for {self._input_dim}")
                    vector_rows.append(len(judged))
                    judged.append(i)
                    kind_list.append(KIND_VECTOR)
                    hash_list.append(0)
                continue
            found = self._hash_fingerprint(e)
            if found is not None:
                judged.append(i)
                kind_list.append(found[0])
                hash_list.append(found[1])
        j = len(judged)
        if j == 0:
            return None
        kinds = np.array(kind_list, dtype=np.uint8)
        hashes = np.array(hash_list, dtype=np.uint64)
        if len(vector_rows) == j:
            vecs = self._vector_fingerprints(events, judged, stacked)
        else:
            vecs = np.zeros((j, self._vector_dim), dtype=np.float32)
            if vector_rows:
                vecs[vector_rows] = self._vector_fingerprints(events, [judged[r] for r in vector_rows], stacked)
        return judged, kinds, hashes, digests[judged], vecs

    # -- the detector ------------------------------------------------------------
    def update(self, state: State, batch: Batch) -> Signals | None:
        events = batch.events
        m = len(events)
        stacked = batch.flat_vectors
        digests = batch.digests
        if stacked is not None and self._vector_dim and stacked.shape[1] == self._input_dim and self._scaled():
            # The usual case, a batch of a tabular model: every event is a vector.
            judged = list(range(m))
            kinds = np.full(m, KIND_VECTOR, dtype=np.uint8)
            hashes = np.zeros(m, dtype=np.uint64)
            digest_arr = digests
            vecs = self._vector_fingerprints(events, judged, stacked)
        else:
            found = self._fingerprints(events, digests, stacked)
            if found is None:
                return None
            judged, kinds, hashes, digest_arr, vecs = found
        j = len(judged)
        step = self._chunk_size()
        if j <= step:
            values, flagged = self._update_block(state, kinds, digest_arr, hashes, vecs)
        else:
            values = np.empty(j)
            flagged = np.empty(j, dtype=bool)
            for lo in range(0, j, step):
                hi = lo + step
                values[lo:hi], flagged[lo:hi] = self._update_block(state, kinds[lo:hi], digest_arr[lo:hi], hashes[lo:hi], vecs[lo:hi])
        return scatter(m, judged, values, flagged)

    def _scaled(self) -> bool:
        """Whether vectors can be judged: the model has a feature scaling of their length."""
        scaling = self.context.scaling
        return scaling is not None and scaling.dim == self._input_dim

    def _chunk_size(self) -> int:
        """Events compared per block: bounds the worst case, every pair close, to ~16 MiB of differences."""
        w, d = self.params.window, max(self._vector_dim, 1)
        budget = (16 << 20) // 8 // d
        return max(1, int((math.sqrt(w * w + 4 * budget) - w) / 2))

    def _update_block(
        self, state: State, kinds: np.ndarray, digests: np.ndarray, hashes: np.ndarray, vecs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Judge ``j`` consecutive fingerprinted inputs against the ring and each other, then store them.

        New input ``t`` (0-based in the block) compares with the inputs of the same kind
        and another digest among the ``window`` inputs before it: the ring slots not yet
        overwritten by the block's inputs ``0 .. t-1`` (slot ``s`` is overwritten by input
        ``(s - count) % window``), and the block's inputs ``u`` with
        ``t - window <= u < t``. Ring and block are compared with one (j, W) and one
        (j, j) matrix per fingerprint type.
        """
        w = self.params.window
        j = kinds.shape[0]
        count = int(state["count"])
        filled = min(count, w)
        ring_kind, ring_digest = state["kind"][:filled], state["digest"][:filled]
        ring_cand = (ring_kind[None, :] == kinds[:, None]) & (ring_digest[None, :] != digests[:, None])
        ring_close = np.zeros_like(ring_cand)
        if j > 1:
            t = np.arange(j)
            ring_cand &= ((np.arange(filled) - count) % w)[None, :] >= t[:, None]
            back = t[:, None] - t[None, :]
            new_cand = (back > 0) & (back <= w) & (kinds[None, :] == kinds[:, None]) & (digests[None, :] != digests[:, None])
            new_close = np.zeros_like(new_cand)

        is_vec = kinds == KIND_VECTOR
        n_vec = int(np.count_nonzero(is_vec))
        if n_vec:
            cols = np.flatnonzero(ring_kind == KIND_VECTOR)
            if n_vec == j:  # the usual case: a tabular model
                new_vec = vecs
                if cols.size:
                    ring_close[:, cols] = self._close_vectors(state["vec"][cols], new_vec, ring_cand[:, cols])
                if j > 1:
                    new_close[:] = self._close_vectors(new_vec, new_vec, new_cand)
            else:
                rows = np.flatnonzero(is_vec)
                new_vec = vecs[rows]
                if cols.size:
                    ring_close[np.ix_(rows, cols)] = self._close_vectors(state["vec"][cols], new_vec, ring_cand[np.ix_(rows, cols)])
                if j > 1:
                    new_close[np.ix_(rows, rows)] = self._close_vectors(new_vec, new_vec, new_cand[np.ix_(rows, rows)])
        if n_vec < j:
            rows = np.flatnonzero(~is_vec)
            tolerance = np.where(kinds[rows] == KIND_IMAGE, self.params.image_hamming_tolerance, self.params.text_hamming_tolerance)[:, None]
            new_hash = hashes[rows, None]
            ring_close[rows] = np.bitwise_count(np.bitwise_xor(state["hash"][None, :filled], new_hash)) <= tolerance
            if j > 1:
                new_close[rows] = np.bitwise_count(np.bitwise_xor(hashes[None, :], new_hash)) <= tolerance

        matches = np.count_nonzero(ring_cand & ring_close, axis=1)
        if j > 1:
            matches += np.count_nonzero(new_cand & new_close, axis=1)
        ring_write(state["kind"], count, kinds)
        ring_write(state["digest"], count, digests)
        if state["hash"].shape[0]:
            ring_write(state["hash"], count, hashes)
        if state["vec"].shape[1]:
            ring_write(state["vec"], count, vecs)
        values, flagged = window_shares(state["near"], count, matches > 0, self.params.min_events, self.params.flag_ratio)
        state["count"][...] = count + j
        state["pairs"][...] = int(state["pairs"]) + int(matches.sum())
        return values, flagged

    def _close_vectors(self, a: np.ndarray, b: np.ndarray, wanted: np.ndarray) -> np.ndarray:
        """(len(b), len(a)) whether each ``wanted`` pair's RMS per-feature distance is within tolerance.

        ``a`` and ``b`` are the stored float32 fingerprints. A float32 Gram-matrix product
        (``|a|^2 + |b|^2 - 2 a.b``, several times cheaper than float64) rules out the
        pairs that are clearly apart; the few left are decided on their own difference
        vectors in float64, so the answer is the same whatever else is in the batch. The
        margin, 3e-5 of the squared norms, covers the product's float32 rounding (at most
        about ``2 D * 2**-24`` of them, 8e-6 for 64 features); products too large for
        float32 are redone in float64.
        """
        limit = self.params.tabular_tolerance**2 * self._input_dim  # on squared distances
        margin = 3e-5
        with np.errstate(over="ignore", invalid="ignore"):
            a_sq = np.einsum("ij,ij->i", a, a)
            b_sq = np.einsum("ij,ij->i", b, b)
            norms = b_sq[:, None] + a_sq[None, :]
            approx = norms - 2.0 * (b @ a.T)
        if not np.isfinite(approx).all():  # float32 overflowed: huge inputs
            a, b = a.astype(np.float64), b.astype(np.float64)
            a_sq, b_sq = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
            norms = b_sq[:, None] + a_sq[None, :]
            approx = norms - 2.0 * (b @ a.T)
            margin = 1e-10
        maybe = wanted & (approx <= limit + margin * norms)
        close = np.zeros(maybe.shape, dtype=bool)
        rows, cols = np.nonzero(maybe)
        if rows.size:
            diff = b[rows].astype(np.float64) - a[cols].astype(np.float64)
            close[rows, cols] = np.sqrt(np.einsum("ij,ij->i", diff, diff) / self._input_dim) <= self.params.tabular_tolerance
        return close
