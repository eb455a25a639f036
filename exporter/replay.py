"""``monitaur-exporter replay``: the forensic mode.

Runs the same pipeline as ``run`` over historical logs, as fast as it can, in event
time order, with event time as the clock (so TTLs behave as they would have live),
and reports per client when and by which detectors it was first flagged.

Per client: ``flagged`` (ever), ``first_flagged_query`` and ``flagged_at`` (the first
flag, query number and event time), ``last_flagged_at`` (the last event the verdict
flagged), ``flag_detectors`` (the detectors over their calibrated thresholds when the
latest flag opened, value / threshold, strongest first), ``flagged_at_end`` (the sticky
verdict after the last event: false only if the flag lapsed, ``verdict.hold_seconds``
without a new flag), ``score`` (the fused risk at the end) and, per detector, its own
first flag and last value.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from operator import attrgetter
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from exporter import reasons
from exporter.config import Settings
from exporter.detectors import Batch, Signals, enabled_detectors
from exporter.events import Event, Rejected
from exporter.fit import fit_warnings
from exporter.inputs import bounded_lines, log_files, open_log
from exporter.pipeline import Pipeline
from exporter.profile import Profile
from exporter.state import ClientState

log = logging.getLogger("monitaur.replay")

# Events handed to the pipeline at once. Each client's events of a block form one batch, in
# order, and batches of a few hundred events are where numpy pays: 262,144 replays 100k
# events of 500 clients ~15% faster than 65,536. The price is coarser time order *across*
# clients inside a block, which only state shared by clients sees (a fingerprint match is
# then found from the later-processed client's side); detection per client is unchanged.
BLOCK = 262_144


class Progress:
    """Throttled progress lines on a terminal's stderr; silent when stderr is not a terminal."""

    def __init__(self, stream: TextIO, enabled: bool | None = None, every: float = 0.5) -> None:
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.every = every
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, phase: str, done: int, total: int, unit: str, events: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < self.every and done < total):
            return
        self._last = now
        rate = events / max(now - self.start, 1e-9)
        pct = 100.0 * done / total if total else 100.0
        self.stream.write(f"\r{phase}: {pct:5.1f}% of {total:,} {unit}, {events:,} events, {rate:,.0f} events/s   ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def existing_files(paths: list[str]) -> list[Path]:
    """Files, globs and directories -> the files to read, in order (:func:`exporter.inputs.log_files`;
    :class:`~exporter.inputs.InputError` names what is missing or unreadable)."""
    return log_files(paths)


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector (reference counting still frees everything).

    Decoding and detection make no reference cycles, while every collection rescans the
    events read so far: in a 100k-event replay, 3 full and ~320 young collections took
    0.18 s (3%). The switch is process-wide; replay and calibrate are batch jobs. Whatever
    cycles do form are collected once the GC runs again.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def read_events(paths: list[Path], pipeline: Pipeline, max_line: int, progress: Progress, rejected: Counter[str]) -> list[Event]:
    """Decode every line of ``paths`` with the pipeline's decoder, in event-time order; count rejections.

    A log holds no event from the future: events stamped more than
    ``limits.max_future_seconds`` after the moment reading began are rejected
    (``future_timestamp``), as in live ingestion. Sorted last, one such event would
    otherwise become the replay's "now" and expire everything kept by event time (the
    ``links`` index, groups' edges) before the report is written.
    """
    with _no_cyclic_gc():
        return _read_events(paths, pipeline, max_line, progress, rejected, pipeline.clock())


def _read_events(
    paths: list[Path], pipeline: Pipeline, max_line: int, progress: Progress, rejected: Counter[str], clock: float
) -> list[Event]:
    total = sum(os.path.getsize(p) for p in paths)
    done = 0
    events: list[Event] = []
    decode = pipeline.decoder.decode_line
    for path in paths:
        last_ts = 0.0  # an event without a timestamp keeps its place after the one before it
        before = done
        with open_log(path) as (fh, position):  # plain or compressed; InputError if not text
            for line in bounded_lines(fh, max_line):
                if line is None:
                    pipeline.reject(reasons.LINE_TOO_LONG, f"line longer than {max_line} bytes")
                    rejected[reasons.LINE_TOO_LONG] += 1
                    continue
                if not line or line.isspace():  # blank; no copy, unlike strip()
                    continue
                try:
                    event = decode(line, last_ts, clock)
                except Rejected as rej:
                    pipeline.reject(rej.reason, rej.message)
                    rejected[rej.reason] += 1
                    continue
                last_ts = event.ts
                events.append(event)
                if len(events) % 1000 == 0:
                    progress.update("reading", before + position(), total, "bytes", len(events))
        done = before + os.path.getsize(path)
    progress.update("reading", total, total, "bytes", len(events))
    events.sort(key=attrgetter("ts"))  # stable: equal timestamps keep file order
    return events


def run_blocks(pipeline: Pipeline, events: list[Event], progress: Progress, phase: str = "detecting") -> None:
    """Feed time-ordered events to the pipeline a block at a time (batches form per client)."""
    with _no_cyclic_gc():
        for i in range(0, len(events), BLOCK):
            block = events[i : i + BLOCK]
            pipeline.process(block)
            progress.update(phase, i + len(block), len(events), "events", i + len(block))
    progress.update(phase, len(events), len(events), "events", len(events))


def _summary(c: ClientState, detectors: list[str]) -> dict[str, Any]:
    flag = c.flag.as_dict() if c.flag is not None else None
    return {
        "queries": c.total,
        "flagged": c.first_flagged_query is not None,
        "first_flagged_query": c.first_flagged_query,
        "flagged_at": c.first_flagged_at,
        "last_flagged_at": flag["last_at"] if flag else None,
        "flag_detectors": flag["detectors"] if flag else None,
        "flagged_at_end": c.suspicious,
        "score": round(c.score, 6),
        "detectors": {
            name: {"flagged": name in c.first_flagged, "first_flagged_query": c.first_flagged.get(name), "value": round(c.scores.get(name, 0.0), 6)}
            for name in detectors
        },
    }


def _merge(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """Join two lives of a client that was evicted and came back: indexes continue."""
    offset = earlier["queries"]

    def first(a: int | None, b: int | None) -> int | None:
        return a if a is not None else (b + offset if b is not None else None)

    merged = dict(later)
    merged["queries"] = offset + later["queries"]
    merged["first_flagged_query"] = first(earlier["first_flagged_query"], later["first_flagged_query"])
    merged["flagged"] = merged["first_flagged_query"] is not None
    merged["flagged_at"] = earlier["flagged_at"] if earlier["flagged_at"] is not None else later["flagged_at"]
    if later["last_flagged_at"] is None:  # the later life was not flagged: the earlier flag is the latest
        merged["last_flagged_at"], merged["flag_detectors"] = earlier["last_flagged_at"], earlier["flag_detectors"]
    merged["detectors"] = {
        n: {
            "flagged": earlier["detectors"][n]["flagged"] or d["flagged"],
            "first_flagged_query": first(earlier["detectors"][n]["first_flagged_query"], d["first_flagged_query"]),
            "value": d["value"],
        }
        for n, d in later["detectors"].items()
    }
    return merged


def replay(
    settings: Settings,
    paths: list[str],
    progress_stream: TextIO = sys.stderr,
    progress: bool | None = None,
    profile: Profile | None = None,
    observer: Callable[[Batch, str, Signals], None] | None = None,
    at_end: Callable[[Pipeline], None] | None = None,
) -> dict[str, Any]:
    """Replay the logs at ``paths`` (globs allowed) and return the report.

    ``observer`` sees every detector's and the fusion's signals (``Pipeline(observer=...)``),
    and ``at_end`` the pipeline once every event is judged: ``replay --html`` records its
    timelines with them (:class:`exporter.timelines.TimelineRecorder`).
    """
    files = existing_files(paths)
    names = list(enabled_detectors(settings))
    report: dict[str, dict[str, Any]] = {}

    def keep(client: ClientState, reason: str) -> None:
        summary = _summary(client, names)
        prev = report.get(client.client_id)
        report[client.client_id] = _merge(prev, summary) if prev else summary

    pipeline = Pipeline(settings, on_evict=keep, event_time=True, profile=profile, observer=observer)
    bar = Progress(progress_stream, progress)
    rejected: Counter[str] = Counter()
    events = read_events(files, pipeline, settings.files.max_line_bytes, bar, rejected)
    warnings = fit_warnings(profile, events, rejected) if profile is not None else []
    run_blocks(pipeline, events, bar)
    bar.close()
    if at_end is not None:
        at_end(pipeline)
    for client in pipeline.store.values():
        keep(client, "end")
    for w in warnings:
        log.warning("%s", w)
    groups = group_report(pipeline, report)
    return {
        "clients": dict(sorted(report.items())),
        "groups": groups,
        "events": {"accepted": len(events), "rejected": dict(sorted(rejected.items()))},
        **({"warnings": warnings} if warnings else {}),
    }


def group_report(pipeline: Pipeline, clients: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The groups of linked clients at the end (exporter.groups), and each client's group in ``clients``."""
    found = pipeline.group_summaries()
    for entry in clients.values():
        entry["group"] = None
    for g in found:
        for m in g.members:
            if m.client in clients:
                clients[m.client]["group"] = g.group
    return {g.group: g.as_dict() for g in found}
