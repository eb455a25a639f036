"""Share of low-confidence answers: catches clients that probe the decision boundary."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from exporter.detectors.base import (
    Batch,
    Detector,
    DetectorParams,
    Signals,
    State,
    WindowedParams,
    min_threshold_field,
)
from exporter.detectors.kit import new_ring, share_signals

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


class ConfidenceParams(WindowedParams):
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
    min_threshold: float = min_threshold_field(0.25)

    @field_validator("threshold")
    @classmethod
    def _default_threshold(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None and "measure" in info.data:
            return DEFAULT_THRESHOLDS[info.data["measure"]]
        return value


def _entropy_confidences(p: np.ndarray) -> np.ndarray:
    """Row-wise 1 - H(p) / ln K of normalized (m, K) rows, in [0, 1]: 1 one-hot, 0 uniform."""
    logs = np.log(np.where(p > 0.0, p, 1.0))  # 0 * log 0 = 0
    h = -np.einsum("ij,ij->i", p, logs)
    return 1.0 - h / math.log(p.shape[1])


def probs_confidences(probs: np.ndarray, measure: Measure) -> np.ndarray:
    """The confidence of each row of an (m, K) probability matrix, clipped to [0, 1].

    NaN for rows that cannot be judged (fewer than 2 classes, no mass, or non-finite
    values). Each row is renormalized, so a slightly unnormalized answer cannot push the
    score outside [0, 1]. Every row is computed independently of the others.
    """
    p = np.asarray(probs, dtype=np.float64)
    m, k = p.shape
    if k < 2 or m == 0:
        return np.full(m, np.nan)
    ok = np.isfinite(p).all(axis=1)
    p = np.maximum(p, 0.0)
    total = np.add.reduce(p, axis=1)
    ok &= total > 0.0
    all_ok = np.count_nonzero(ok) == m
    if not all_ok:  # keep unusable rows out of the arithmetic (no inf - inf warnings)
        p = np.where(ok[:, None], p, 1.0)
        total = np.where(ok, total, float(k))
    p = p / total[:, None]
    if measure == "max_prob":
        conf = p.max(axis=1)
    elif measure == "margin":
        top2 = np.partition(p, k - 2, axis=1)
        conf = top2[:, k - 1] - top2[:, k - 2]
    else:
        conf = _entropy_confidences(p)
    conf = np.minimum(np.maximum(conf, 0.0), 1.0)
    return conf if all_ok else np.where(ok, conf, np.nan)


def probs_confidence(probs: np.ndarray, measure: Measure) -> float | None:
    """The confidence of one probability vector under ``measure`` (see :func:`probs_confidences`).

    Returns None when the vector cannot be judged.
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    conf = float(probs_confidences(p[None, :], measure)[0])
    return None if math.isnan(conf) else conf


def label_score_confidences(scores: np.ndarray, measure: Measure) -> np.ndarray:
    """The confidence of label-only answers whose winning labels have probabilities ``scores``.

    Only the winner's probability is known, so the answer is read two-class style: the
    remaining mass is taken to be the runner-up's. That is exact for binary models and
    is the near-boundary case (two competing classes) for larger ones:
    max_prob = s, margin = max(2s - 1, 0), entropy = 1 - H(s, 1 - s) / ln 2.
    Scores are clipped to [0, 1] first.
    """
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    if measure == "max_prob":
        return s
    if measure == "margin":
        return np.maximum(2.0 * s - 1.0, 0.0)
    return np.clip(_entropy_confidences(np.stack([s, 1.0 - s], axis=1)), 0.0, 1.0)


def label_score_confidence(score: float, measure: Measure) -> float:
    """The confidence of one label-only answer (see :func:`label_score_confidences`)."""
    return float(label_score_confidences(np.array([float(score)]), measure)[0])


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

    Not judged (NaN, or None for a whole batch): events without probabilities and
    without a label score. A label-only answer with a score is judged via
    :func:`label_score_confidences`.

    Cost per batch of m events: O(m * K) for K classes plus O(window + m) to count the
    flags, in a fixed number of numpy operations (one cumulative sum over the old window
    followed by the new flags gives every event's window share).
    State per client: ``window + 8`` bytes (one bool per slot, an int64 counter);
    108 bytes with the defaults.
    """

    name: ClassVar[str] = "confidence"
    Params: ClassVar[type[DetectorParams]] = ConfidenceParams
    threshold_param = "flag_ratio"
    params: ConfidenceParams

    def init_state(self) -> State:
        ring = new_ring(self.params.window, dtype=np.bool_)
        return {"low_buf": ring["buf"], "low_count": ring["count"]}

    def confidences(self, batch: Batch) -> np.ndarray:
        """(m,) each event's confidence under the configured measure; NaN where it has none.

        Probability answers are judged from their probabilities (an unusable vector is
        not judged, it does not fall back to a label score); label-only answers from a
        finite label score.
        """
        measure: Measure = self.params.measure
        events = batch.events
        probs = batch.probs
        # The usual case: every event has probabilities of one class count. Batch.probs
        # has a NaN row exactly where an event has none or another count (accepted
        # probabilities are finite).
        if probs is not None and not np.isnan(probs[:, 0]).any():
            return probs_confidences(probs, measure)
        out = np.full(len(events), np.nan)
        rows = [i for i, e in enumerate(events) if e.probs is not None]
        if rows:
            assert probs is not None
            out[rows] = probs_confidences(probs[rows], measure)
            k = probs.shape[1]
            for i in rows:  # another class count than the batch's first (rare): judged alone
                if len(events[i].probs) != k:  # type: ignore[arg-type]
                    out[i] = probs_confidences(np.asarray(events[i].probs, dtype=np.float64)[None, :], measure)[0]
        scores = [
            (i, e.label_score) for i, e in enumerate(events) if e.probs is None and e.label_score is not None and math.isfinite(e.label_score)
        ]
        if scores:
            idx, values = zip(*scores)
            out[list(idx)] = label_score_confidences(np.array(values, dtype=np.float64), measure)
        return out

    def update(self, state: State, batch: Batch) -> Signals | None:
        conf = self.confidences(batch)
        judged = np.flatnonzero(conf == conf)  # not NaN
        threshold = self.params.threshold
        assert threshold is not None  # filled in by the validator
        low = conf[judged] < threshold
        return share_signals(state["low_buf"], state["low_count"], low, judged, len(batch), self.params.min_events, self.params.flag_ratio)
