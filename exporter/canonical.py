"""Canonical forms and digests of model inputs, shared by the duplicate detectors.

Two requests that a person would call "the same input" should produce the same digest
even when their wire encoding differs: a float printed as ``0.1`` or ``0.1000000001``,
a sentence typed with different case, Unicode compatibility forms or spacing, a picture
sent once as PNG and once as a JPEG whose pixels decode identically. So the digest is
taken over a canonical form of the *decoded* input, never over the raw request bytes.

Every result is memoized in ``event.cache`` because several detectors may ask for it
for the same event. Digests use BLAKE2b, which is stable across processes and
platforms (unlike Python's salted ``hash()``), so they survive state snapshots.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from exporter.events import Event

__all__ = [
    "SIGNIFICANT_DIGITS",
    "all_flat_vectors",
    "canonical_digest",
    "canonical_digests",
    "canonical_text",
    "event_text",
    "round_significant",
]

SIGNIFICANT_DIGITS = 6
"""Float inputs are compared after rounding to this many significant decimal digits,
which absorbs float formatting and serialization noise (``0.30000000000000004``) but
keeps any change a client would make on purpose."""

_DIGEST_KEY = "canonical_digest"
_TEXT_KEY = "canonical_text"


def round_significant(values: np.ndarray, digits: int = SIGNIFICANT_DIGITS) -> np.ndarray:
    """Round every element of ``values`` to ``digits`` significant decimal digits (float64).

    Vectorised. Zero stays zero and ``-0.0`` becomes ``0.0`` so both signs of zero
    canonicalize alike; non-finite values pass through. The result equals Python's
    ``float(f"{x:.{digits - 1}e}")`` element by element: the scale is an exactly
    representable power of ten, and the rare magnitudes where it would not be (below
    ~1e-17 or above ~1e27) are rounded through decimal text instead.
    """
    x = np.asarray(values, dtype=np.float64)
    out = x.copy()
    nz = np.isfinite(x) & (x != 0.0)
    if nz.any():
        v = x[nz]
        exponent = np.floor(np.log10(np.abs(v))).astype(np.int64)
        shift = (digits - 1) - exponent  # decimals to keep after the point
        rounded = np.empty_like(v)
        # A power of ten is exact in float64 up to 10**22, so for those shifts the
        # scale is exact and equal rounded values give bit-identical floats.
        up = (shift >= 0) & (shift <= 22)
        down = (shift < 0) & (shift >= -22)
        scale = np.power(10.0, shift[up].astype(np.float64))
        rounded[up] = np.round(v[up] * scale) / scale
        scale = np.power(10.0, (-shift[down]).astype(np.float64))
        rounded[down] = np.round(v[down] / scale) * scale
        # Magnitudes below 1e-17 or above 1e27 are rare; round them through decimal text.
        extreme = ~(up | down)
        if extreme.any():
            rounded[extreme] = [float(f"{val:.{digits - 1}e}") for val in v[extreme]]
        out[nz] = rounded
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

    * text: :func:`canonical_text`, UTF-8.
    * image (``event.image`` set): the decoded pixel array's bytes plus its shape and
      dtype, not the file bytes, so the same picture re-encoded (PNG vs. another PNG
      encoder, metadata added) has the same digest.
    * vector (tabular, or flat image pixels without a configured shape): the float64
      bytes of the vector rounded to :data:`SIGNIFICANT_DIGITS` significant digits.

    A one-byte tag per kind keeps, e.g., a text and a vector with equal bytes apart.
    The result is an ``int`` in ``[0, 2**64)``, ready to be stored as ``np.uint64``.
    """
    cached = event.cache.get(_DIGEST_KEY)
    if cached is not None:
        return int(cached)
    h = hashlib.blake2b(digest_size=8, person=b"monitaur-canon")
    if event.text is not None:
        h.update(b"t")
        h.update((event_text(event) or "").encode("utf-8"))
    elif event.image is not None:
        img = np.asarray(event.image)
        h.update(b"i")
        h.update(np.asarray(img.shape, dtype=np.int64).tobytes())
        h.update(b"u8" if img.dtype == np.uint8 else b"f8")
        h.update(_pixel_bytes(img))
    elif event.vector is not None:
        vec = np.asarray(event.vector)
        digest = _vector_digest(np.asarray(vec.shape, dtype=np.int64).tobytes(), round_significant(vec))
        event.cache[_DIGEST_KEY] = digest
        return digest
    else:
        return None
    digest = int.from_bytes(h.digest(), "little")
    event.cache[_DIGEST_KEY] = digest
    return digest


def _vector_digest(shape_bytes: bytes, rounded: np.ndarray) -> int:
    h = hashlib.blake2b(digest_size=8, person=b"monitaur-canon")
    h.update(b"v")
    h.update(shape_bytes)
    h.update(rounded.tobytes())
    return int.from_bytes(h.digest(), "little")


def all_flat_vectors(events: Sequence["Event"]) -> bool:
    """Whether every event's input is a flat vector of one length, so they stack into (m, d)."""
    first = events[0].vector if events else None
    if first is None or first.ndim != 1:
        return False
    shape = first.shape
    return all(e.vector is not None and e.text is None and e.image is None and e.vector.shape == shape for e in events)


def canonical_digests(events: Sequence["Event"], vectors: np.ndarray | None = None) -> list[int | None]:
    """:func:`canonical_digest` of each event, with the vectors of a batch rounded at once.

    Flat vector inputs of equal length are stacked and passed through
    :func:`round_significant` together (it is element-wise, so the digests are exactly
    the per-event ones); only the hashing runs per event. ``vectors``, when given, is the
    already stacked ``(m, d)`` matrix of the events' vectors (``Batch.vectors``).
    Results are memoized in ``event.cache`` like :func:`canonical_digest`.
    """
    out: list[int | None] = [None] * len(events)
    groups: dict[int, list[int]] = {}  # vector length -> positions still to digest
    for i, e in enumerate(events):
        cached = e.cache.get(_DIGEST_KEY)
        if cached is not None:
            out[i] = int(cached)
        elif e.text is None and e.image is None and isinstance(v := e.vector, np.ndarray) and v.ndim == 1:
            groups.setdefault(v.shape[0], []).append(i)
        else:
            out[i] = canonical_digest(e)
    for length, idx in groups.items():
        if len(idx) == 1:
            out[idx[0]] = canonical_digest(events[idx[0]])
            continue
        if vectors is not None and vectors.shape == (len(events), length):
            block = vectors[idx] if len(idx) < len(events) else vectors
        else:
            block = np.stack([np.asarray(events[i].vector) for i in idx])
        rounded = round_significant(block)
        shape_bytes = np.asarray((length,), dtype=np.int64).tobytes()
        for i, row in zip(idx, rounded):
            digest = _vector_digest(shape_bytes, row)
            events[i].cache[_DIGEST_KEY] = digest
            out[i] = digest
    return out
