"""Share of near-duplicate inputs: catches query-based search around one input."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import imagehash
import numpy as np
from PIL import Image
from pydantic import Field, ValidationInfo, field_validator

from exporter.canonical import canonical_digest, event_text
from exporter.detectors.base import Detector, DetectorParams, ModelContext, Signal, State

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


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, vectorised over a uint64 array (wrapping arithmetic).

    A fixed, well-mixing bijection on 64-bit integers: identical on every process and
    platform, unlike Python's salted ``hash()``.
    """
    z = np.asarray(x, dtype=np.uint64) + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


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
    bits = imagehash.phash(Image.fromarray(pixels)).hash.ravel()
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


class NearDuplicateParams(DetectorParams):
    """Parameters of :class:`NearDuplicateDetector`."""

    window: int = Field(100, ge=1, le=10_000, description="How many of the client's last inputs are kept for comparison.")
    min_events: int = Field(20, ge=1, description="Judged inputs needed in the window before the client can be flagged (<= window).")
    flag_ratio: float = Field(0.3, gt=0.0, le=1.0, description="Flag when at least this share of the window's inputs were near-duplicates.")
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

    @field_validator("min_events")
    @classmethod
    def _min_events_fit(cls, value: int, info: ValidationInfo) -> int:
        window = info.data.get("window")
        if window is not None and value > window:
            raise ValueError(f"must not exceed window ({window}), or the client could never be flagged")
        return value


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
      standardized with the model's running :class:`~exporter.stats.FeatureStats` (raw
      values if the context has none); match when ``||a - b|| / sqrt(dim)``, the RMS
      per-feature distance in standard deviations, is at most ``tabular_tolerance``.
      Vectors are stored standardized as of their arrival, so while the model's
      statistics are still being learned, old and new vectors use slightly different
      scales; the drift is small once the statistics have settled, and a tolerance is
      approximate anyway. Inputs longer than ``max_vector_dim`` are stored as a fixed
      random projection (distances kept within a few percent).

    The score is the share of the window's inputs that were near-duplicates,
    ``near / max(n, min_events)`` (so a new client ramps up rather than jumping to 1);
    the client is flagged when ``n >= min_events`` and the score is at least
    ``flag_ratio``. ``pairs`` counts every (new input, earlier input) match, cumulatively.

    Not judged (returns None): events without input, empty text, images that cannot be
    hashed, and vectors when the context has no ``input_dim`` (no ring was allocated).

    Cost per event: image O(H * W) to downscale plus a 32 x 32 DCT; text O(len * shingle);
    vector O(dim * max_vector_dim) to project when longer, then O(window * D) distances;
    plus O(window) Hamming distances and digest comparisons.

    State per client, in bytes, with W = ``window``:
    ``16 + 10 * W + 8 * W * [modality != "tabular"] + 4 * W * D``, where
    ``D = min(input_dim, max_vector_dim)`` when ``input_dim`` is known and the modality is
    not text, else 0 (counter and pair total 16; kind 1 + near-duplicate flag 1 + digest 8
    per slot; a uint64 hash per slot unless the model is tabular; float32 vectors).
    Defaults: 26,616 for a 64-feature tabular model; 1,816 for text or image-file models.
    """

    name: ClassVar[str] = "near_duplicate"
    Params: ClassVar[type[DetectorParams]] = NearDuplicateParams
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
    def _fingerprint(self, event: "Event") -> tuple[int, int | np.ndarray] | None:
        """(kind, fingerprint) of the event's input, memoized in ``event.cache``; None if unusable."""
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
        if event.vector is not None:
            if self._vector_dim == 0:
                return None
            vec = np.asarray(event.vector, dtype=np.float64).ravel()
            if vec.shape[0] != self._input_dim:
                raise ValueError(f"input has {vec.shape[0]} values; the detector was set up for {self._input_dim}")
            stats = self.context.stats
            z = stats.standardize(vec) if stats is not None and stats.dim == self._input_dim else vec
            if self._projection is not None:
                z = z @ self._projection
            return KIND_VECTOR, z.astype(np.float32)
        return None

    def _matches(self, state: State, filled: int, kind: int, fp: int | np.ndarray, digest: np.uint64) -> int:
        """How many earlier inputs in the window are within tolerance and not exact repeats."""
        candidates = (state["kind"][:filled] == kind) & (state["digest"][:filled] != digest)
        if not candidates.any():
            return 0
        idx = np.flatnonzero(candidates)
        if kind == KIND_VECTOR:
            diff = state["vec"][idx].astype(np.float64) - np.asarray(fp, dtype=np.float64)
            rms = np.sqrt(np.einsum("ij,ij->i", diff, diff) / self._input_dim)
            close = rms <= self.params.tabular_tolerance
        else:
            tolerance = self.params.image_hamming_tolerance if kind == KIND_IMAGE else self.params.text_hamming_tolerance
            dist = np.bitwise_count(np.bitwise_xor(state["hash"][idx], _U64(int(fp))))  # type: ignore[arg-type]
            close = dist <= tolerance
        return int(np.count_nonzero(close))

    # -- the detector ------------------------------------------------------------
    def update(self, state: State, event: "Event") -> Signal | None:
        digest = canonical_digest(event)
        if digest is None:
            return None
        found = self._fingerprint(event)
        if found is None:
            return None
        kind, fp = found
        d = np.uint64(digest)
        w = self.params.window
        count = int(state["count"])
        filled = min(count, w)
        matches = self._matches(state, filled, kind, fp, d)

        slot = count % w
        state["kind"][slot] = kind
        state["digest"][slot] = d
        state["near"][slot] = matches > 0
        if kind == KIND_VECTOR:
            state["vec"][slot] = fp
        else:
            state["hash"][slot] = _U64(int(fp))  # type: ignore[arg-type]
        state["count"][...] = count + 1
        state["pairs"][...] = int(state["pairs"]) + matches

        n = min(count + 1, w)
        value = min(float(np.count_nonzero(state["near"][:n])) / max(n, self.params.min_events), 1.0)
        return Signal(value, n >= self.params.min_events and value >= self.params.flag_ratio)
