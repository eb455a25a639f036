"""Share of low-margin answers: catches clients that walk along the decision boundary."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from pydantic import Field

from exporter.detectors.base import (
    Batch,
    Detector,
    DetectorParams,
    ModelContext,
    Reference,
    Signals,
    State,
    WindowedParams,
)
from exporter.detectors.kit import share_signals


class BoundaryParams(WindowedParams):
    """Parameters of :class:`BoundaryDetector`."""

    margin: float = Field(
        0.15,
        gt=0.0,
        le=1.0,
        description="An answer is low-margin when its top-1 minus top-2 probability is below this (the input sits near a boundary between two classes).",
    )
    window: int = Field(100, ge=1, le=100_000, description="How many of the client's last judged answers are kept.")
    min_events: int = Field(20, ge=1, description="Judged answers needed in the window before the client can be flagged (<= window).")
    threshold: float = Field(
        0.4,
        ge=0.0,
        le=1.0,
        description=(
            "Flag when at least this share of the window's answers is low-margin. Benign traffic "
            "has few (a few percent on a well-trained model); a boundary walk has most. "
            "Calibration overwrites it per model."
        ),
    )


class BoundaryDetector(Detector):
    """Flags a client when a large share of its recent answers had a small top-1/top-2 margin.

    What it catches: queries placed on purpose near the decision boundary, where an
    answer tells the most about the model. Active-learning extraction (ActiveThief's
    uncertainty sampling picks the attacker's pool inputs with the smallest margin),
    Tramèr et al.'s line search and path finding (binary search between two points of
    different classes), and decision-based adversarial walks (HopSkipJump, Boundary
    Attack) that keep their iterate on the boundary. A benign client's inputs are mostly
    far from a boundary, so its answers are mostly confident.

    How: an answer is low-margin when ``p1 - p2 < margin`` (the two largest
    probabilities of ``batch.top2``; independent of the number of classes). A ring keeps
    the last ``window`` low/not-low flags. The score is the share of low-margin answers,
    ``low / max(n, min_events)`` with n judged answers in the window, so a new client's
    score ramps up instead of jumping to 1 on its first answer (from ``min_events``
    answers on it is exactly the share); flagged when ``n >= min_events`` and the score
    reaches ``threshold``. ``fit`` learns the benign low-margin rate of the model
    (:attr:`benign_rate`, for reports and for choosing ``threshold``); it changes
    nothing else.

    Not judged: label-only answers and answers without probabilities (NaN; None when the
    whole batch has none). The ``confidence`` detector reads label scores two-class style;
    this one needs the runner-up's probability.

    What it misses: attacks on label-only APIs, attacks that query far from the boundary
    (random or natural-data extraction: see ``ood`` and ``coverage``), boundary walks
    diluted below ``threshold`` by confident queries, and models that are uncertain on
    most benign inputs (calibrate ``threshold``).

    Cost per batch of m answers: O(m) plus one cumulative sum over ``window + m`` flags,
    in a fixed number of numpy operations (``batch.top2`` is shared with other detectors).
    State per client: ``window + 8`` bytes (a bool per slot, an int64 counter); 108 bytes
    with the defaults.
    """

    name: ClassVar[str] = "boundary"
    Params: ClassVar[type[DetectorParams]] = BoundaryParams
    threshold_param: ClassVar[str | None] = "threshold"
    default_enabled: ClassVar[bool] = True
    params: BoundaryParams

    def __init__(self, params: DetectorParams, context: ModelContext) -> None:
        super().__init__(params, context)
        self.benign_rate = math.nan  # the reference's low-margin share, once known

    def fit(self, reference: Reference) -> State | None:
        probs = reference.probs
        if probs is None or probs.ndim != 2 or probs.shape[1] < 2:
            return None
        low = self.low_margin(_top2(np.asarray(probs, dtype=np.float64)))
        known = low[~np.isnan(low)]
        if known.size == 0:
            return None
        return {"benign_rate": np.asarray(float(known.mean()), dtype=np.float64)}

    def load_reference(self, reference: State) -> None:
        rate = float(reference["benign_rate"])
        if not 0.0 <= rate <= 1.0:
            raise ValueError("boundary reference: benign_rate must lie in [0, 1]")
        self.benign_rate = rate

    def init_state(self) -> State:
        return {"low_buf": np.zeros(self.params.window, dtype=np.bool_), "low_count": np.zeros((), dtype=np.int64)}

    def low_margin(self, top2: np.ndarray) -> np.ndarray:
        """(m,) 1.0 where p1 - p2 < margin, 0.0 where not, NaN where the answer has no probabilities."""
        margin = top2[:, 0] - top2[:, 1]
        out = (margin < self.params.margin).astype(np.float64)
        out[np.isnan(margin)] = np.nan
        return out

    def update(self, state: State, batch: Batch) -> Signals | None:
        top2 = batch.top2
        if top2 is None:
            return None
        margin = top2[:, 0] - top2[:, 1]
        judged = np.flatnonzero(~np.isnan(margin))
        p = self.params
        return share_signals(state["low_buf"], state["low_count"], margin[judged] < p.margin, judged, len(batch), p.min_events, p.threshold)


def _top2(p: np.ndarray) -> np.ndarray:
    """(n, 2) the two largest entries of each row (NaN rows stay NaN)."""
    if p.shape[1] == 2:
        return -np.sort(-p, axis=1)
    return -np.partition(-p, 1, axis=1)[:, :2]
