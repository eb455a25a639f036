"""Is ingestion working? ``/healthz`` and the ``monitaur_ingest_*`` gauges answer from one check.

Unhealthy, each with its reason:

- ``ingest_failing``: the last ``health.max_failed_cycles`` ingest cycles in a row raised;
- ``ingest_stalled``: the ingest loop is not running, or has not finished a cycle for
  ``health.stall_seconds`` (hung);
- ``file_stalled``: a tailed file has unread bytes and nothing of it has been read for
  ``health.stall_seconds``;
- ``checkpoint_failing``: the last ``health.max_failed_checkpoints`` checkpoint writes of
  one kind (state or offsets) failed.

The check only reads values that the ingest thread publishes whole (no lock that a stuck
ingestion could hold), so it answers even while ingestion is stuck, which is when it matters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter.config import HealthConfig

REASONS = ("ingest_failing", "ingest_stalled", "file_stalled", "checkpoint_failing")
MAX_LISTED_FILES = 10  # stalled files named in /healthz; the rest are counted


@dataclass(frozen=True)
class Problem:
    reason: str  # one of REASONS
    detail: str


@dataclass(frozen=True)
class Health:
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "unhealthy", "problems": [{"reason": p.reason, "detail": p.detail} for p in self.problems]}


class HealthCheck:
    """Tracks the ingest loop's cycles and judges health from them, the files' progress and the checkpoints.

    ``progress()`` gives the files with unread bytes (``Tailer.progress``),
    ``checkpoint_failures()`` the consecutive failed writes by kind
    (``Checkpointer.failures``; None without a state dir), ``running()`` whether the
    ingest thread is alive.
    """

    def __init__(
        self,
        cfg: HealthConfig,
        running: Callable[[], bool],
        progress: Callable[[], Iterable[Any]],
        checkpoint_failures: Callable[[], Mapping[str, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.running = running
        self.progress = progress
        self.checkpoint_failures = checkpoint_failures
        self.clock = clock
        self.failed_cycles = 0
        self.cycle_at = clock()  # when the last cycle finished (or the check was made)

    def cycle(self, ok: bool) -> None:
        """Called by the ingest loop after each cycle."""
        self.failed_cycles = 0 if ok else self.failed_cycles + 1
        self.cycle_at = self.clock()

    def check(self) -> Health:
        now = self.clock()
        stall = self.cfg.stall_seconds
        problems: list[Problem] = []
        if self.failed_cycles >= self.cfg.max_failed_cycles:
            problems.append(Problem("ingest_failing", f"the last {self.failed_cycles} ingest cycles failed; see the log"))
        if not self.running():
            problems.append(Problem("ingest_stalled", "the ingest loop is not running"))
        elif now - self.cycle_at > stall:
            problems.append(Problem("ingest_stalled", f"no ingest cycle has finished for {now - self.cycle_at:.0f}s"))
        stalled = sorted((p for p in self.progress() if p.unread_bytes > 0 and now - p.since > stall), key=lambda p: p.since)
        if stalled:
            named = ", ".join(f"{p.path} ({p.unread_bytes} bytes unread for {now - p.since:.0f}s)" for p in stalled[:MAX_LISTED_FILES])
            more = f" and {len(stalled) - MAX_LISTED_FILES} more" if len(stalled) > MAX_LISTED_FILES else ""
            problems.append(Problem("file_stalled", named + more))
        if self.checkpoint_failures is not None:
            for kind, n in sorted(self.checkpoint_failures().items()):
                if n >= self.cfg.max_failed_checkpoints:
                    problems.append(Problem("checkpoint_failing", f"the last {n} {kind} checkpoint writes failed; see the log"))
        return Health(tuple(problems))


class HealthCollector(Collector):
    """``monitaur_ingest_healthy`` and ``monitaur_ingest_problem{reason}``, from the check at scrape time.

    Every reason is exported from the start, at 0 while it does not hold.
    """

    def __init__(self, check: Callable[[], Health]) -> None:
        self._check = check

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> list[GaugeMetricFamily]:
        health = self._check()
        healthy = GaugeMetricFamily("monitaur_ingest_healthy", "1 while /healthz answers 200: ingestion, file progress and checkpoints work.")
        healthy.add_metric([], 1.0 if health.ok else 0.0)
        problem = GaugeMetricFamily("monitaur_ingest_problem", "1 while this reason makes /healthz answer 503.", labels=["reason"])
        found = {p.reason for p in health.problems}
        for reason in REASONS:
            problem.add_metric([reason], 1.0 if reason in found else 0.0)
        return [healthy, problem]
