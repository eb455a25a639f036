"""Canonical forms and digests of model inputs, shared by the duplicate detectors.

Two requests that a person would call "the same input" should produce the same digest
even when their wire encoding differs: a float printed as ``0.1`` or ``0.1000000001``,
a sentence typed with different case, Unicode compatibility forms or spacing, a picture
sent once as PNG and once as a JPEG whose pixels decode identically. So the digest is
taken over a canonical form of the *decoded* input, never over the raw request bytes.

A batch's digests are computed once and shared by the detectors (``Batch.digests``);
a single event's are memoized in ``event.cache``. Texts and images are hashed with
BLAKE2b, vectors with a vectorised hash tree (:func:`vector_digests`); both are stable
across processes and platforms (unlike Python's salted ``hash()``), so they survive
state snapshots.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from exporter.hashing import splitmix64

if TYPE_CHECKING:
    from exporter.events import Event

__all__ = [
    "DIGEST_FORMAT",
    "SIGNIFICANT_DIGITS",
    "all_flat_vectors",
    "canonical_digest",
    "canonical_digests",
    "canonical_text",
    "event_text",
    "round_significant",
    "vector_digests",
]

SIGNIFICANT_DIGITS = 6
"""Float inputs are compared after rounding to this many significant decimal digits,
which absorbs float formatting and serialization noise (``0.30000000000000004``) but
keeps any change a client would make on purpose."""

DIGEST_FORMAT = "2"
"""Version of the digest scheme. Detectors that store digests include it in their
``state_format``, so state saved under another scheme is discarded, not misread."""

_DIGEST_KEY = "canonical_digest"
_LOG10_2 = math.log10(2.0)
_POW10_ZERO = 330  # _POW10[_POW10_ZERO + k] == 10.0**k, for every k a float64 exponent can need
_POW10 = np.array([10.0**k if k < 309 else math.inf for k in range(-_POW10_ZERO, 330)])
_U64 = np.uint64
_VECTOR_SEED = 0x6D6F6E2D76656374  # "mon-vect"
_PAIR = 0x9FB21C651E98DF25  # odd: multiplying by it is a bijection modulo 2**64
_PAD = 0x2545F4914F6CDD1D  # stands in for the missing partner of an odd position out
_TEXT_KEY = "canonical_text"
CHUNK_ROWS = 2048  # rows hashed at a time: whole blocks' intermediates would not stay in the CPU cache


def round_significant(values: np.ndarray, digits: int = SIGNIFICANT_DIGITS) -> np.ndarray:
    """Round every element of ``values`` to ``digits`` significant decimal digits (float64).

    Vectorised. Zero stays zero and ``-0.0`` becomes ``0.0`` so both signs of zero
    canonicalize alike; non-finite values pass through. The result equals Python's
    ``float(f"{x:.{digits - 1}e}")`` element by element: the scale is an exactly
    representable power of ten, and the rare magnitudes where it would not be (below
    ~1e-17 or above ~1e27) are rounded through decimal text instead.
    """
    x = np.asarray(values, dtype=np.float64)
    # Whole numbers below 10**digits have at most `digits` significant digits already:
    # counts, pixel values and category codes, the usual tabular inputs, skip the arithmetic.
    whole = np.abs(x) < 10.0 ** min(digits, 15)
    whole &= x == np.floor(x)
    if whole.all():
        return x + 0.0  # -0.0 -> 0.0
    a = np.abs(x)
    # The decimal exponent floor(log10 |x|), exactly: the binary exponent e2 of a normal
    # number (2**e2 <= |x| < 2**(e2 + 1), read from its bits: cheaper than frexp) gives it
    # to within one, and a comparison with the power of ten above settles it. Zero gets
    # e2 = 0 (any scale rounds it to itself); subnormals read as 2**-1023, which only
    # sends them, like every magnitude below 1e-17, through decimal text below; inf and
    # NaN read as 2**1024 and pass through.
    e2 = (a.view(np.int64) >> 52) - 1023
    e2[a == 0.0] = 0
    exponent = np.floor(e2 * _LOG10_2).astype(np.int64)
    exponent += a >= _POW10.take(exponent + (1 + _POW10_ZERO))  # in range: |e2| <= 1024
    shift = (digits - 1) - exponent  # decimals to keep after the point
    lo, hi = int(shift.min()), int(shift.max())
    # A power of ten is exact in float64 up to 10**22, so for those shifts the scale is
    # exact and equal rounded values give bit-identical floats.
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite values pass through
        if 0 <= lo and hi <= 22:  # all magnitudes below 10**digits: the usual case
            up = _POW10.take(shift + _POW10_ZERO)
            out = np.rint(x * up)
            out /= up
        else:
            up = _POW10[np.clip(shift, 0, 22) + _POW10_ZERO]
            down = _POW10[np.clip(-shift, 0, 22) + _POW10_ZERO]
            out = np.where(shift >= 0, np.round(x * up) / up, np.round(x / down) * down)
    if lo < -22 or hi > 22:
        # Magnitudes below 1e-17 or above 1e27 are rare; round them through decimal text.
        extreme = ((shift > 22) | (shift < -22)) & np.isfinite(x) & (x != 0.0)
        if extreme.any():
            out[extreme] = [float(f"{val:.{digits - 1}e}") for val in x[extreme]]
    return out + 0.0  # -0.0 -> 0.0


def canonical_text(text: str) -> str:
    """The canonical form of a text input: NFKC, casefolded, whitespace collapsed and stripped.

    NFKC folds compatibility forms (full-width letters, ligatures, superscripts) into
    their plain equivalents; casefold is the aggressive, locale-free lower-casing meant
    for caseless matching; NFKC is applied again because casefolding can produce
    unnormalized sequences. Runs of any Unicode whitespace become one ASCII space.
    """
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(folded.split())


def event_text(event: "Event") -> str | None:
    """The canonical text of a text event (memoized in ``event.cache``), or None."""
    if event.text is None:
        return None
    cached = event.cache.get(_TEXT_KEY)
    if cached is None:
        cached = canonical_text(event.text)
        event.cache[_TEXT_KEY] = cached
    return cached


def _pixel_bytes(image: np.ndarray) -> bytes:
    """Decoded pixels as bytes: uint8 as is, anything else (pixels from a float vector) rounded."""
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image).tobytes()
    return np.ascontiguousarray(round_significant(image)).tobytes()


def canonical_digest(event: "Event") -> int | None:
    """A 64-bit digest of the event's canonical input, or None if the event has no input.

    * text: :func:`canonical_text`, UTF-8, through BLAKE2b.
    * image (``event.image`` set): the decoded pixel array's bytes plus its shape and
      dtype, not the file bytes, so the same picture re-encoded (PNG vs. another PNG
      encoder, metadata added) has the same digest (BLAKE2b).
    * vector (tabular, or flat image pixels without a configured shape):
      :func:`vector_digests` of the vector rounded to :data:`SIGNIFICANT_DIGITS`
      significant digits.

    A tag per kind keeps, e.g., a text and a vector with equal bytes apart. The result
    is an ``int`` in ``[1, 2**64)`` (never 0, which marks "no input" in digest arrays).
    """
    cached = event.cache.get(_DIGEST_KEY)
    if cached is not None:
        return int(cached)
    if event.text is None and event.image is None:
        if event.vector is None:
            return None
        vec = np.asarray(event.vector, dtype=np.float64)
        digest = int(vector_digests(vec.reshape(1, -1))[0]) if vec.ndim == 1 else _blake(b"n", vec.shape, _pixel_bytes(vec))
    elif event.text is not None:
        digest = _blake(b"t", (), (event_text(event) or "").encode("utf-8"))
    else:
        img = np.asarray(event.image)
        digest = _blake(b"i" + (b"u8" if img.dtype == np.uint8 else b"f8"), img.shape, _pixel_bytes(img))
    event.cache[_DIGEST_KEY] = digest
    return digest


def _blake(tag: bytes, shape: tuple[int, ...], data: bytes) -> int:
    h = hashlib.blake2b(digest_size=8, person=b"monitaur-canon")
    h.update(tag)
    h.update(np.asarray(shape, dtype=np.int64).tobytes())
    h.update(data)
    return int.from_bytes(h.digest(), "little") | 1


@lru_cache(maxsize=64)
def _position_keys(length: int) -> np.ndarray:
    """A fixed pseudo-random 64-bit key per position of a ``length``-long vector."""
    keys = splitmix64(np.arange(length, dtype=np.uint64) ^ np.uint64(_VECTOR_SEED ^ (length << 32)))
    keys.setflags(write=False)
    return keys


def vector_digests(vectors: np.ndarray) -> np.ndarray:
    """(m,) uint64 digests of the rows of an (m, d) array, after :func:`round_significant`; never 0.

    Every rounded value's float64 bits are mixed with a key of its position, and the
    row is folded pairwise, level by level, each pair mixed again (a hash tree over the
    positions), so the whole batch is hashed with a few dozen array operations instead
    of one BLAKE2b call per row. Every step is a bijection of its 64-bit input, so two
    vectors that differ in one value never collide; unrelated vectors collide with
    probability about 2**-64. It is not a cryptographic hash, and need not be: a client
    that forges a collision only makes its own queries count as exact repeats, which
    the ``repetition`` detector counts.

    Rows are hashed :data:`CHUNK_ROWS` at a time, so that the intermediate arrays stay in
    the CPU cache (``bench/throughput.py`` measures the effect on replay).
    """
    v = np.asarray(vectors, dtype=np.float64)
    if v.shape[0] > CHUNK_ROWS:
        return np.concatenate([_vector_digests(v[i : i + CHUNK_ROWS]) for i in range(0, v.shape[0], CHUNK_ROWS)])
    return _vector_digests(v)


def _vector_digests(vectors: np.ndarray) -> np.ndarray:
    x = round_significant(vectors)
    m, d = x.shape
    h = splitmix64(np.ascontiguousarray(x).view(np.uint64) ^ _position_keys(d))
    while h.shape[1] > 1:
        if h.shape[1] % 2:
            h = np.concatenate((h, np.full((m, 1), _PAD, dtype=np.uint64)), axis=1)
        h = splitmix64(h[:, 0::2] * _U64(_PAIR) + h[:, 1::2])
    tag = _U64(_VECTOR_SEED ^ d)
    out = splitmix64((h[:, 0] if d else np.zeros(m, dtype=np.uint64)) ^ tag)
    out |= _U64(1)
    return out


def all_flat_vectors(events: Sequence["Event"]) -> bool:
    """Whether every event's input is a flat vector of one length, so they stack into (m, d)."""
    first = events[0].vector if events else None
    if first is None or first.ndim != 1:
        return False
    shape = first.shape
    return all(e.vector is not None and e.text is None and e.image is None and e.vector.shape == shape for e in events)


def canonical_digests(events: Sequence["Event"], vectors: np.ndarray | None = None) -> np.ndarray:
    """(m,) uint64 :func:`canonical_digest` of each event, 0 for an event without input.

    ``vectors``, when given, is the already stacked ``(m, d)`` matrix of the events'
    vectors (``Batch.vectors``, for a batch of flat vectors only): it is digested at
    once. Otherwise flat vectors of equal length are stacked and digested together, and
    texts and images one at a time (memoized in ``event.cache``).
    """
    m = len(events)
    if vectors is not None and vectors.ndim == 2 and vectors.shape[0] == m:
        return vector_digests(vectors)
    out = np.zeros(m, dtype=np.uint64)
    groups: dict[int, list[int]] = {}  # vector length -> positions
    for i, e in enumerate(events):
        if e.text is None and e.image is None and isinstance(v := e.vector, np.ndarray) and v.ndim == 1:
            groups.setdefault(v.shape[0], []).append(i)
        else:
            out[i] = canonical_digest(e) or 0
    for idx in groups.values():
        out[idx] = vector_digests(np.stack([np.asarray(events[i].vector, dtype=np.float64) for i in idx]))
    return out
