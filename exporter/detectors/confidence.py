"""Share of low-confidence answers: catches clients that probe the decision boundary."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from exporter.detectors.base import Detector, DetectorParams, Signal, State
from exporter.ring import Ring, new_ring

if TYPE_CHECKING:
    from exporter.events import Event

Measure = Literal["entropy", "max_prob", "margin"]

DEFAULT_THRESHOLDS: dict[str, float] = {"margin": 0.2, "max_prob": 0.6, "entropy": 0.5}
"""Per-measure default of ``threshold``, used when the config does not set one.

* margin 0.2: the top class leads the runner-up by less than 20 points, i.e. the input
  sits near a boundary between two classes, whatever the number of classes.
* max_prob 0.6: the winner holds less than 60 % of the mass (for a binary model this is
  the same cut as margin 0.2).
* entropy 0.5: the distribution is spread over a sizeable share of the classes, e.g.
  uniform over 3 or more of 10; this catches off-distribution noise queries rather than
  boundary probing, because a two-class tie has normalized entropy ln 2 / ln K only.
"""


class ConfidenceParams(DetectorParams):
    """Parameters of :class:`ConfidenceDetector`."""

    measure: Measure = Field(
        "margin",
        description=(
            "How an answer's confidence is measured: 'margin' = p1 - p2 (top-1 minus top-2 "
            "probability, independent of the number of classes), 'max_prob' = p1, 'entropy' "
            "= 1 - H(p) / ln K (normalized entropy, K classes). All lie in [0, 1]."
        ),
    )
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        validate_default=True,
        description="An answer is low-confidence when its confidence is below this; unset = the measure's default (margin 0.2, max_prob 0.6, entropy 0.5).",
    )
    window: int = Field(100, ge=1, le=100_000, description="How many of the client's last judged answers are kept.")
    min_events: int = Field(20, ge=1, description="Judged answers needed in the window before the client can be flagged (<= window).")
    flag_ratio: float = Field(0.5, gt=0.0, le=1.0, description="Flag when at least this share of the window's answers is low-confidence.")

    @field_validator("threshold")
    @classmethod
    def _default_threshold(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None and "measure" in info.data:
            return DEFAULT_THRESHOLDS[info.data["measure"]]
        return value

    @field_validator("min_events")
    @classmethod
    def _min_events_fit(cls, value: int, info: ValidationInfo) -> int:
        window = info.data.get("window")
        if window is not None and value > window:
            raise ValueError(f"must not exceed window ({window}), or the client could never be flagged")
        return value


def _entropy_confidence(p: np.ndarray) -> float:
    """1 - H(p) / ln K, in [0, 1]: 1 for a one-hot answer, 0 for the uniform one."""
    k = p.shape[0]
    logs = np.log(np.where(p > 0.0, p, 1.0))  # 0 * log 0 = 0
    h = -float(np.dot(p, logs))
    return 1.0 - h / math.log(k)


def probs_confidence(probs: np.ndarray, measure: Measure) -> float | None:
    """The confidence of one probability vector under ``measure``, clipped to [0, 1].

    Returns None when the vector cannot be judged (fewer than 2 classes, no mass, or
    non-finite values). The vector is renormalized, so a slightly unnormalized answer
    cannot push the score outside [0, 1].
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    if p.shape[0] < 2 or not np.all(np.isfinite(p)):
        return None
    p = np.clip(p, 0.0, None)
    total = float(p.sum())
    if total <= 0.0:
        return None
    p = p / total
    if measure == "max_prob":
        conf = float(p.max())
    elif measure == "margin":
        top2 = np.partition(p, p.shape[0] - 2)[-2:]
        conf = float(top2[1] - top2[0])
    else:
        conf = _entropy_confidence(p)
    return min(max(conf, 0.0), 1.0)


def label_score_confidence(score: float, measure: Measure) -> float:
    """The confidence of a label-only answer whose winning label has probability ``score``.

    Only the winner's probability is known, so the answer is read two-class style: the
    remaining mass is taken to be the runner-up's. That is exact for binary models and
    is the near-boundary case (two competing classes) for larger ones:
    max_prob = s, margin = max(2s - 1, 0), entropy = 1 - H(s, 1 - s) / ln 2.
    """
    s = min(max(float(score), 0.0), 1.0)
    if measure == "max_prob":
        return s
    if measure == "margin":
        return max(2.0 * s - 1.0, 0.0)
    return _entropy_confidence(np.array([s, 1.0 - s]))


class ConfidenceDetector(Detector):
    """Flags a client when most of its recent answers were low-confidence.

    What it catches: decision-boundary probing. Boundary-search attacks (HopSkipJump,
    Boundary Attack, Tramèr-style path finding) and active-learning model extraction
    deliberately query inputs the model is unsure about, because those carry the most
    information about where the boundary lies. Ordinary traffic is mostly far from a
    boundary, so a model usually answers it confidently; a client whose answers are
    mostly uncertain is unusual.

    How: each answer gets a confidence in [0, 1] (see ``measure``); it is "low" below
    ``threshold``. A ring keeps the last ``window`` low/not-low flags. The score is the
    share of low answers, ``low / max(n, min_events)`` with n judged answers in the window,
    so a new client's score ramps up instead of jumping to 1 on its first answer (from
    ``min_events`` answers on it is exactly the share). The client is flagged when
    ``n >= min_events`` and the score is at least ``flag_ratio``.

    Not judged (returns None): events without probabilities and without a label score.
    A label-only answer with a score is judged via :func:`label_score_confidence`.

    Cost per event: O(K) for K classes plus O(window) to count the flags.
    State per client: ``window + 8`` bytes (one bool per slot, an int64 counter);
    108 bytes with the defaults.
    """

    name: ClassVar[str] = "confidence"
    Params: ClassVar[type[DetectorParams]] = ConfidenceParams
    params: ConfidenceParams

    def init_state(self) -> State:
        ring = new_ring(self.params.window, dtype=np.bool_)
        return {"low_buf": ring["buf"], "low_count": ring["count"]}

    def confidence(self, event: "Event") -> float | None:
        """The event's confidence under the configured measure, or None if it has none."""
        measure: Measure = self.params.measure
        if event.probs is not None:
            return probs_confidence(event.probs, measure)
        if event.label_score is not None and math.isfinite(event.label_score):
            return label_score_confidence(event.label_score, measure)
        return None

    def update(self, state: State, event: "Event") -> Signal | None:
        conf = self.confidence(event)
        if conf is None:
            return None
        threshold = self.params.threshold
        assert threshold is not None  # filled in by the validator
        ring = Ring({"buf": state["low_buf"], "count": state["low_count"]})
        ring.push(conf < threshold)
        flags = ring.values()
        n = flags.shape[0]
        value = float(np.count_nonzero(flags)) / max(n, self.params.min_events)
        value = min(max(value, 0.0), 1.0)
        return Signal(value, n >= self.params.min_events and value >= self.params.flag_ratio)
