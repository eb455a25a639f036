"""Share of exact repeats: catches clients that resend the same inputs over and over."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from exporter.canonical import canonical_digest
from exporter.detectors.base import Detector, DetectorParams, Signal, State
from exporter.ring import Ring, new_ring

if TYPE_CHECKING:
    from exporter.events import Event


class RepetitionParams(DetectorParams):
    """Parameters of :class:`RepetitionDetector`."""

    window: int = Field(200, ge=1, le=100_000, description="How many of the client's last inputs are remembered (as 64-bit digests).")
    min_events: int = Field(20, ge=1, description="Inputs needed in the window before the client can be flagged (<= window).")
    flag_ratio: float = Field(0.5, gt=0.0, le=1.0, description="Flag when at least this share of the window's inputs repeated an earlier one.")

    @field_validator("min_events")
    @classmethod
    def _min_events_fit(cls, value: int, info: ValidationInfo) -> int:
        window = info.data.get("window")
        if window is not None and value > window:
            raise ValueError(f"must not exceed window ({window}), or the client could never be flagged")
        return value


class RepetitionDetector(Detector):
    """Flags a client when many of its recent inputs are exact repeats of inputs in the window.

    What it catches: clients replaying the same queries — checking whether answers are
    deterministic, averaging out output noise or rounding defences, collecting the
    answers of a fixed query set repeatedly, or scripted loops. Benign clients repeat
    too (retries, refreshes), but rarely most of the time.

    How: each input is reduced to a 64-bit digest of its canonical form
    (:func:`exporter.canonical.canonical_digest`: floats rounded to 6 significant digits,
    text NFKC-casefolded with whitespace collapsed, images by decoded pixels, not file
    bytes). An event is a repeat when its digest is already among the last ``window``
    digests. The score is the share of repeats among the window's events,
    ``repeats / max(n, min_events)``, so a new client's score ramps up rather than
    jumping to 1 (from ``min_events`` events on it is exactly the share); the client is
    flagged when ``n >= min_events`` and the score is at least ``flag_ratio``.
    Near-but-not-exact repeats are the ``near_duplicate`` detector's business.

    Not judged (returns None): events without any input.

    Cost per event: hashing the input, O(input size), plus O(window) comparisons.
    State per client: ``9 * window + 16`` bytes (a uint64 digest and a bool flag per slot,
    two int64 counters); 1816 bytes with the defaults.
    """

    name: ClassVar[str] = "repetition"
    Params: ClassVar[type[DetectorParams]] = RepetitionParams
    params: RepetitionParams

    def init_state(self) -> State:
        digests = new_ring(self.params.window, dtype=np.uint64)
        repeats = new_ring(self.params.window, dtype=np.bool_)
        return {
            "digest_buf": digests["buf"],
            "digest_count": digests["count"],
            "repeat_buf": repeats["buf"],
            "repeat_count": repeats["count"],
        }

    def update(self, state: State, event: "Event") -> Signal | None:
        digest = canonical_digest(event)
        if digest is None:
            return None
        d = np.uint64(digest)
        digests = Ring({"buf": state["digest_buf"], "count": state["digest_count"]})
        repeats = Ring({"buf": state["repeat_buf"], "count": state["repeat_count"]})
        is_repeat = bool(np.any(digests.values() == d))
        digests.push(d)
        repeats.push(is_repeat)
        flags = repeats.values()
        n = flags.shape[0]
        value = min(float(np.count_nonzero(flags)) / max(n, self.params.min_events), 1.0)
        return Signal(value, n >= self.params.min_events and value >= self.params.flag_ratio)
