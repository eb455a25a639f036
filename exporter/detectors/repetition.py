"""Share of exact repeats: catches clients that resend the same inputs over and over."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from exporter.canonical import DIGEST_FORMAT
from exporter.detectors.base import (
    Batch,
    Detector,
    DetectorParams,
    Signals,
    State,
    WindowedParams,
    min_threshold_field,
)
from exporter.detectors.kit import new_ring, ring_in_order, ring_write, share_signals


class RepetitionParams(WindowedParams):
    """Parameters of :class:`RepetitionDetector`."""

    window: int = Field(200, ge=1, le=100_000, description="How many of the client's last inputs are remembered (as 64-bit digests).")
    min_events: int = Field(20, ge=1, description="Inputs needed in the window before the client can be flagged (<= window).")
    flag_ratio: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="Flag when at least this share of the window's inputs repeated an earlier one (a batch job run twice "
        "repeats half of its inputs; a flood nearly all).",
    )
    min_threshold: float = min_threshold_field(0.5)
    max_gap_seconds: float = Field(
        10.0,
        gt=0.0,
        description="An input counts as a repeat when it was last sent at most this long before (event time): a "
        "scripted loop re-sends within seconds, a monitor re-sending its fixed set every few minutes does not flood.",
    )


class RepetitionDetector(Detector):
    """Flags a client when many of its recent inputs are exact repeats of inputs in the window.

    What it catches: clients replaying the same queries — checking whether answers are
    deterministic, averaging out output noise or rounding defences, collecting the
    answers of a fixed query set repeatedly, or scripted loops. Benign clients repeat
    too (retries, refreshes), but rarely most of the time.

    How: each input is reduced to a 64-bit digest of its canonical form
    (:func:`exporter.canonical.canonical_digest`: floats rounded to 6 significant digits,
    text NFKC-casefolded with whitespace collapsed, images by decoded pixels, not file
    bytes). An event is a repeat when its digest is among the last ``window`` digests
    and was last sent at most ``max_gap_seconds`` before (event time): a loop re-sending
    an input within seconds floods, a monitor re-sending a fixed set every few minutes or
    a batch job run again tomorrow does not. The score is the share of repeats among the window's events,
    ``repeats / max(n, min_events)``, so a new client's score ramps up rather than
    jumping to 1 (from ``min_events`` events on it is exactly the share); the client is
    flagged when ``n >= min_events`` and the score is at least ``flag_ratio``.
    Near-but-not-exact repeats are the ``near_duplicate`` detector's business.

    Not judged (NaN, or None for a whole batch): events without any input.

    Cost per batch of m events: hashing each input, O(input size) (a batch's vectors are
    rounded and hashed together, :func:`exporter.canonical.vector_digests`; the digests
    are shared with the other detectors through ``Batch.digests``), plus a stable sort of the ``window + m`` digests of the
    old window followed by the batch, which finds every event's previous occurrence,
    repeats inside the batch included.
    State per client: ``9 * window + 16`` bytes (a uint64 digest and a bool flag per slot,
    two int64 counters); 1816 bytes with the defaults.
    """

    name: ClassVar[str] = "repetition"
    Params: ClassVar[type[DetectorParams]] = RepetitionParams
    threshold_param = "flag_ratio"
    state_format = f"digest-{DIGEST_FORMAT}:gap-1"
    params: RepetitionParams

    def init_state(self) -> State:
        digests = new_ring(self.params.window, dtype=np.uint64)
        repeats = new_ring(self.params.window, dtype=np.bool_)
        return {
            "digest_buf": digests["buf"],
            "digest_count": digests["count"],
            "ts_buf": np.zeros(self.params.window, dtype=np.float64),  # when each digest was sent
            "repeat_buf": repeats["buf"],
            "repeat_count": repeats["count"],
        }

    def update(self, state: State, batch: Batch) -> Signals | None:
        found = batch.digests
        every = bool(found.all())
        judged = np.arange(len(batch)) if every else np.flatnonzero(found)
        if judged.size == 0:
            return None
        new = found if every else found[judged]
        ts = batch.ts if every else batch.ts[judged]
        count = int(state["digest_count"])
        old = ring_in_order(state["digest_buf"], count)
        times = np.concatenate((ring_in_order(state["ts_buf"], count), ts))
        prev = previous_within(np.concatenate((old, new)), old.shape[0], self.params.window)
        start = old.shape[0]
        is_repeat = (prev >= 0) & (times[start:] - times[np.maximum(prev, 0)] <= self.params.max_gap_seconds)
        ring_write(state["digest_buf"], count, new)
        ring_write(state["ts_buf"], count, ts)
        state["digest_count"][...] = count + new.shape[0]
        p = self.params
        return share_signals(state["repeat_buf"], state["repeat_count"], is_repeat, None if every else judged, len(batch), p.min_events, p.flag_ratio)


def previous_within(seq: np.ndarray, start: int, window: int) -> np.ndarray:
    """For each position ``p >= start`` of ``seq``: the position of the latest occurrence of
    ``seq[p]`` in ``seq[p - window : p]``, or -1.

    A stable argsort puts equal values next to each other in position order, so each
    position's previous occurrence is its neighbour in that order; one comparison with
    ``p - window`` answers for all positions at once, repeats inside the new block included.
    """
    order = np.argsort(seq, kind="stable")
    ranked = seq[order]
    prev = np.full(seq.shape[0], -1, dtype=np.int64)
    same = ranked[1:] == ranked[:-1]
    prev[order[1:][same]] = order[:-1][same]
    p = np.arange(start, seq.shape[0])
    q = prev[start:]
    return np.where((q >= 0) & (q >= p - window), q, -1)
