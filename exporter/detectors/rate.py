"""Query volume: how fast a client has been sending its recent queries."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from pydantic import Field

from exporter.detectors.base import (
    Batch,
    Detector,
    DetectorParams,
    Signals,
    State,
    WindowedParams,
    min_threshold_field,
)
from exporter.detectors.kit import ring_in_order, ring_write


class RateParams(WindowedParams):
    """Parameters of :class:`RateDetector`."""

    window: int = Field(64, ge=2, le=100_000, description="How many of the client's last timestamps the rate is measured over.")
    min_events: int = Field(20, ge=2, description="Queries needed in the window before the client can be flagged (<= window).")
    rate_scale: float = Field(
        1.0,
        gt=0.0,
        description=(
            "Queries per second at which the score is 0.5: value = rate / (rate + rate_scale). "
            "1/s is far above a person using an application (a query every few seconds at "
            "most) and far below a scripted scraper. Rates cannot be learned from reference "
            "vectors; set this per deployment, or leave it and let calibration set threshold."
        ),
    )
    threshold: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="Flag when the score reaches this (0.8 = 4 x rate_scale, 4 queries/s by default) with min_events queries in the window.",
    )
    min_threshold: float = min_threshold_field(0.8)
    min_span: float = Field(
        1.0,
        gt=0.0,
        description=(
            "Seconds: the shortest time span a rate is measured over. Guards equal timestamps "
            "(batch jobs, second-resolution logs) against division by zero; the rate of n "
            "queries sharing one timestamp is (n - 1) / min_span."
        ),
    )


class RateDetector(Detector):
    """Flags a client that sends queries fast, sustained over its last ``window`` queries.

    What it catches: volume. Model extraction needs many answers (thousands for
    retraining attacks, millions for data-free ones), decision-based adversarial search
    thousands per input, and both are scripted, so they run at machine speed. A person
    behind an application sends a query every few seconds at most.

    How: a ring keeps the client's last ``window`` event timestamps. After each event,
    the rate is ``(n - 1) / max(t_last - t_first, min_span)`` queries per second over the
    n timestamps in the window (event time, so replays judge as live traffic did; equal
    timestamps are safe). The score is ``rate / (rate + rate_scale)``, 0.5 at
    ``rate_scale`` queries/s; flagged when it reaches ``threshold`` with
    ``n >= min_events``.

    Burstiness ``B = (sigma - mu) / (sigma + mu)`` of the window's inter-arrival times
    (Goh & Barabási 2008: -1 periodic, 0 Poisson, towards 1 bursty) is available from
    :meth:`burstiness` but not folded into the score: scripts tend to be periodic and
    people bursty, yet benign batch jobs are periodic too and attackers can add jitter,
    so neither direction is evidence on its own.

    What it misses: slow attacks (a few queries a minute for weeks), attacks split over
    many clients (Sybil), and it cannot tell a benign high-volume integration (a batch
    job, a backend service) from a scraper: set ``rate_scale``/``threshold`` per
    deployment, or exempt such clients downstream. Every event is judged.

    Cost per batch of m events: O(window + m) in a fixed number of numpy operations.
    State per client: ``8 * window + 8`` bytes (a float64 timestamp per slot, an int64
    counter); 520 bytes with the defaults.
    """

    name: ClassVar[str] = "rate"
    Params: ClassVar[type[DetectorParams]] = RateParams
    threshold_param: ClassVar[str | None] = "threshold"
    default_enabled: ClassVar[bool] = True
    verdict: ClassVar[bool] = False  # batch jobs and backends are fast too: volume alone is no evidence
    params: RateParams

    def init_state(self) -> State:
        return {"ts_buf": np.zeros(self.params.window, dtype=np.float64), "ts_count": np.zeros((), dtype=np.int64)}

    def rates(self, state: State, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Push timestamps ``ts``; return the rate (queries/s) over the window after each, and the window sizes."""
        p = self.params
        buf = state["ts_buf"]
        count = int(state["ts_count"])
        old = ring_in_order(buf, count)
        seq = np.concatenate((old, ts))
        m = ts.shape[0]
        n = np.minimum(np.arange(count + 1, count + m + 1), p.window)
        last = np.arange(old.shape[0], old.shape[0] + m)  # each new event's index in seq
        span = seq[last] - seq[last - n + 1]
        ring_write(buf, count, ts)
        state["ts_count"][...] = count + m
        return (n - 1) / np.maximum(span, p.min_span), n

    def update(self, state: State, batch: Batch) -> Signals | None:
        p = self.params
        rate, n = self.rates(state, batch.ts)
        values = rate / (rate + p.rate_scale)
        return Signals(values, (n >= p.min_events) & (values >= p.threshold))

    def rate(self, state: State) -> float:
        """The client's current rate in queries/s over the window (NaN before two queries)."""
        ts = ring_in_order(state["ts_buf"], int(state["ts_count"]))
        if ts.shape[0] < 2:
            return math.nan
        return (ts.shape[0] - 1) / max(float(ts[-1] - ts[0]), self.params.min_span)

    def burstiness(self, state: State) -> float:
        """(sigma - mu) / (sigma + mu) of the window's inter-arrival times; NaN with fewer than 3 timestamps or all equal."""
        ts = ring_in_order(state["ts_buf"], int(state["ts_count"]))
        if ts.shape[0] < 3:
            return math.nan
        gaps = np.diff(np.sort(ts))
        mu, sigma = float(gaps.mean()), float(gaps.std())
        if mu + sigma <= 0.0:
            return math.nan
        return (sigma - mu) / (sigma + mu)
