"""The one pipeline every source feeds: decode -> client state -> detectors -> fusion -> sinks.

``run`` (tailer + push) and ``replay`` drive the same :class:`Pipeline`; only the clock
differs (wall time in ``run``, event time in ``replay``). All mutation happens under
``Pipeline.lock``; readers get :attr:`Pipeline.view`.

Events are processed a block at a time, per model, in arrival (time) order:

1. the cross-client stage (:meth:`Detector.prepare`) sees the whole block, every client's
   events in time order, and updates state shared across clients;
2. each client's events of the block form one :class:`Batch`, judged by every detector
   and then by the fusion stage, which gives the verdict; a flag it raises is sticky
   (:mod:`exporter.verdict`) until :meth:`Pipeline.release`, the hold, or eviction.

Per-client detectors give a batch the same results as its events one at a time, and the
cross-client stage sees events in time order whatever the block, so verdicts do not
depend on how events are cut into blocks: the live exporter, ``replay`` and ``calibrate``
agree. A model's live baseline (:mod:`exporter.baseline`) ends a block exactly at the
event where it refits, for the same reason.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable

import numpy as np

from exporter import persist, reasons
from exporter.baseline import BaselinePlan
from exporter.detectors import Batch, Signals, enabled_detectors
from exporter.detectors.base import Block, Detector, State
from exporter.events import Decoder, Event, Rejected
from exporter.fusion import FUSION
from exporter.groups import GroupBook, GroupCollector, GroupSummary, links_params
from exporter.logutil import RateLimitedLog
from exporter.metrics import ClientCollector, Metrics
from exporter.profile import Profile
from exporter.runtime import ModelRuntime, Runtimes, Shape
from exporter.state import ClientState, ClientStore
from exporter.verdict import FlagRecord, RecentlyFlagged, Verdicts
from exporter.view import ClientView

log = logging.getLogger("monitaur.pipeline")


@dataclass(slots=True)
class IngestResult:
    """Counts of one batch: accepted events, and rejections by reason."""

    accepted: int
    rejected: Counter[str]


class Pipeline:
    """Decodes events and runs every model's detectors and fusion on each client's state."""

    def __init__(
        self,
        settings: Any,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        on_evict: Callable[[ClientState, str], None] | None = None,
        event_time: bool = False,
        profile: Profile | None = None,
        observer: Callable[[Batch, str, Signals], None] | None = None,
        plan: BaselinePlan = BaselinePlan(),
    ) -> None:
        self.settings = settings
        self.specs = enabled_detectors(settings)
        self.metrics = metrics or Metrics(self.specs)
        self.clock = clock
        self.event_time = event_time  # replay: a batch's last event time is "now"
        self.lock = threading.RLock()
        self.runtimes = Runtimes(settings, self.metrics, profile, self._shape, plan)
        self.decoder = Decoder(settings, self.runtimes.admission)
        self.observer = observer
        if profile is not None:
            # A calibrated model's shape is known before its first event: others are rejected.
            for name, mp in profile.models.items():
                self.decoder.restore(
                    {
                        "input_dims": {name: mp.input_dim} if mp.input_dim else {},
                        "num_classes": {name: mp.num_classes} if mp.num_classes else {},
                        "modalities": {name: mp.modality},
                    }
                )
        self._on_evict = on_evict
        self.store = ClientStore(settings.state.max_clients, settings.state.idle_ttl_seconds, self._evicted)
        self.recently_flagged = RecentlyFlagged(settings.verdict.max_recently_flagged)
        self.verdicts = Verdicts(settings.verdict.hold_seconds, self.recently_flagged, self.store, self.metrics, self._forget, event_time)
        self.groups = GroupBook(self._queries_on, profile)
        self.view = ClientView(self.lock, self.store, self.runtimes, self.recently_flagged, self.group_summaries)
        self.collector = ClientCollector(
            self.view,
            settings.metrics.max_client_series,
            self.specs,
            self.metrics.client_series,
            [m for cls, _ in self.specs.values() for m in cls.client_metrics],
        )
        self.metrics.registry.register(self.collector)
        self.metrics.registry.register(GroupCollector(self.group_summaries, self._group_limits, self.group_models))
        self.metrics.tracked_clients_limit.set(settings.state.max_clients)
        self.metrics.client_series_limit.set(settings.metrics.max_client_series)
        self._rejects = RateLimitedLog(log)
        self._errors = RateLimitedLog(log, interval=60.0)

    def _shape(self, model: str) -> Shape:
        d = self.decoder
        return d.learned_input_dims.get(model), d.learned_num_classes.get(model), d.learned_modalities.get(model)

    # -- ingestion -----------------------------------------------------------
    def ingest_lines(self, lines: Iterable[bytes | str]) -> IngestResult:
        """Decode and process JSON-lines records; bad ones are rejected, never fatal."""
        return self._ingest(lines, self.decoder.decode_line)

    def ingest_objects(self, objs: Iterable[Any]) -> IngestResult:
        """Decode and process already-parsed JSON values."""
        return self._ingest(objs, self.decoder.decode_object)

    def _ingest(self, items: Iterable[Any], decode: Callable[[Any, float | None, float | None], Event]) -> IngestResult:
        result = IngestResult(0, Counter())
        with self.lock:
            events: list[Event] = []
            for item in items:
                try:
                    now = self.clock()
                    events.append(decode(item, now, now))  # nothing stamped far after the clock (limits.max_future_seconds)
                except Rejected as rej:
                    self.reject(rej.reason, rej.message)
                    result.rejected[rej.reason] += 1
                except Exception as exc:  # the last resort: an unforeseen failure rejects its one event only
                    self.reject(reasons.INTERNAL_ERROR, f"decoding raised {type(exc).__name__}")
                    result.rejected[reasons.INTERNAL_ERROR] += 1
            self.process(events)
            result.accepted = len(events)
        return result

    def reject(self, reason: str, message: str = "") -> None:
        """Count a rejected event and log it (rate-limited); messages never carry raw inputs."""
        self.metrics.events_rejected.labels(reason).inc()
        self._rejects.log(logging.WARNING, reason, "rejected event: %s: %s", reason, message or reason)

    # -- detection -----------------------------------------------------------
    def process(self, events: list[Event], now: float | None = None) -> None:
        """Judge decoded events, in order: per model, a block at a time (see the module docstring)."""
        if not events:
            return
        by_model: dict[str, list[Event]] = {}
        for e in events:
            by_model.setdefault(e.model, []).append(e)
        with self.lock:
            for model, evs in by_model.items():
                self._process_model(self.runtimes.build(model), evs, now)
            self.metrics.tracked_clients.set(len(self.store))

    def _process_model(self, rt: ModelRuntime, events: list[Event], now: float | None) -> None:
        """One model's events, as blocks that end where the live baseline refits."""
        start = 0
        while start < len(events):
            evs = events[start:] if start else events
            baseline = rt.baseline
            offered: list[int] = []
            if baseline is not None and not baseline.done:
                clients = [e.client for e in evs]
                known = {c: (st.queries.get(rt.context.name, 0) if (st := self.store.get(c)) is not None else 0) for c in set(clients)}
                offered = baseline.offers(clients, known)
                cut = baseline.cut(offered)
                if cut is not None:
                    evs = evs[:cut]
                    offered = [i for i in offered if i < cut]
            block = Block(rt.context.name, evs)
            self._judge_block(rt, block, now)
            if baseline is not None and offered:
                rows = [evs[i].vector for i in offered if evs[i].vector is not None and evs[i].vector.shape == (baseline.dim,)]
                if rows and baseline.add(np.stack(rows)):
                    rt.refit()
            start += len(evs)

    def _judge_block(self, rt: ModelRuntime, block: Block, now: float | None) -> None:
        n = len(block)
        for det in rt.cross_client:
            started = time.perf_counter()
            try:
                det.prepare(block)
            except Exception as exc:  # a broken detector must not stop the others
                block.prepared.pop(det.name, None)
                self._detector_failed(det.name, n, block.model, exc)
            finally:
                rt.durations[det.name].observe((time.perf_counter() - started) / n)
        spent = dict.fromkeys(rt.durations, 0.0)  # seconds per detector over the block's batches
        for client_id, rows in block.rows_by_client.items():
            evs = block.events if len(rows) == n else [block.events[i] for i in rows.tolist()]
            when = evs[-1].ts if self.event_time else (self.clock() if now is None else now)
            try:
                self._judge(rt, Batch(client_id, block.model, evs, block, rows), when, spent)
            except Exception as exc:  # the last resort around the verdict and the client's bookkeeping: other clients go on
                self._detector_failed(FUSION, len(rows), block.model, exc)
        for name, seconds in spent.items():  # one observation per block and detector: time per event, averaged
            if seconds:
                rt.durations[name].observe(seconds / n)
        self._judge_groups(rt, block)
        rt.events.inc(n)
        self.metrics.prediction_confidence.observe_many(block.model, block.confidence)

    def _judge(self, rt: ModelRuntime, batch: Batch, now: float, spent: dict[str, float]) -> None:
        """Run every detector, then fusion, on one client's batch, and update the client's state;
        each detector's time is added to ``spent``."""
        n = len(batch)
        model = batch.model
        returning = self.verdicts.returning(batch.client)
        client = self.store.touch(batch.client, now)
        self.verdicts.arrive(client, now, returning)
        before = client.total
        client.total += n
        client.queries[model] = client.queries.get(model, 0) + n
        states = client.detector_state.setdefault(model, {})
        signals: dict[str, Signals] = {}
        flag_counts: dict[str, int] = {}
        for det in rt.detectors:
            name = det.name
            started = time.perf_counter()
            try:
                found = _update_all_or_nothing(det, states, batch)
            except Exception as exc:  # a broken detector must not stop the others; its state is as before
                self._detector_failed(name, n, model, exc)
                continue
            finally:
                spent[name] += time.perf_counter() - started
            if found is None:
                continue
            signals[name] = found
            if self.observer is not None:
                self.observer(batch, name, found)
            judged = np.flatnonzero(~np.isnan(found.values))
            if judged.size == 0:
                continue
            last = judged[-1]
            client.scores[name] = float(found.values[last])
            client.current[name] = bool(found.flagged[last])
            hits = np.flatnonzero(found.flagged)
            if hits.size:
                flag_counts[name] = int(hits.size)
                client.flags[name] = client.flags.get(name, 0) + int(hits.size)
                client.first_flagged.setdefault(name, before + int(hits[0]) + 1)
        fstate = client.fusion_state.get(model)
        if fstate is None:
            fstate = client.fusion_state[model] = rt.fusion.init_state()
        self.groups.note(batch, signals)
        judged = rt.fusion.judge(fstate, signals, n)
        if judged is not None:
            if self.observer is not None:
                self.observer(batch, FUSION, judged.signals)
            self.verdicts.record(client, judged, batch, before, now)
        self.collector.count_events(client, model, n, flag_counts)

    # -- the sticky verdict (exporter.verdict) ---------------------------------
    def release(self, client_id: str, who: str, reason: str) -> FlagRecord | None:
        """Clear a client's flag on an operator's word, and restart its detector state.

        For a tracked client or one in the recently-flagged record. Returns the flag
        released (a copy), or None if the client was not flagged. The client's next
        queries are judged afresh: the history that flagged it does not flag it again.
        """
        with self.lock:
            return self.verdicts.release(client_id, who, reason, self.clock())

    def _forget(self, client_id: str, groups: bool = True) -> None:
        """Drop what is kept about a client outside its own state: the detectors' shared indexes
        and (``groups``) its links in the groups. On release and eviction, all of it: that history
        judges it no more. When its flag lapses, its own detection restarts, but its links to other
        clients stay: they are the groups' evidence, which expires by the ``links`` TTL, not by
        the verdict's hold."""
        if groups:
            self.groups.forget(client_id)
        for _, rt in self.runtimes:
            for det in rt.detectors:
                det.forget_client(client_id)

    # -- groups (exporter.groups) ----------------------------------------------------------
    def _judge_groups(self, rt: ModelRuntime, block: Block) -> None:
        """Fold the block's cross-client links into the model's groups (after every client's batch was judged)."""
        model = block.model
        try:
            self.groups.process(model, links_params(rt), block)
        except Exception as exc:  # groups are a reading of the links, never a reason to lose the block
            self._detector_failed("links", len(block), model, exc)

    def _queries_on(self, client: str, model: str) -> int:
        """A client's queries on a model so far (what groups' scores are taken over); 0 if untracked."""
        st = self.store.get(client)
        return st.queries.get(model, 0) if st is not None else 0

    def group_ids(self, client_id: str) -> list[str]:
        """The groups a client is in (at most one per model), under the lock."""
        with self.lock:
            return self.groups.of(client_id)

    def group_summaries(self, only: str | None = None) -> list[GroupSummary]:
        """Every group (flagged first, then by score), or only the group ``only`` (if it exists), under the lock."""
        with self.lock:
            return self.groups.summaries(only)

    def group_models(self) -> list[str]:
        """The models whose groups are kept, under the lock."""
        with self.lock:
            return self.groups.models()

    def _group_limits(self, model: str) -> tuple[int, int]:
        params = links_params(self.runtimes.get(model))
        return (params.max_group_series, params.max_member_series) if params is not None else (0, 0)

    def _detector_failed(self, name: str, n: int, model: str, exc: Exception) -> None:
        self.metrics.detector_errors.labels(name).inc(n)
        self._errors.log(logging.ERROR, name, "detector %s failed on %d events of model %s: %s", name, n, model, type(exc).__name__)

    def _evicted(self, client: ClientState, reason: str) -> None:
        self.metrics.client_evictions.labels(reason).inc()
        self.collector.forget(client.client_id)
        self._forget(client.client_id)
        self.verdicts.evicted(client, reason)
        if self._on_evict is not None:
            self._on_evict(client, reason)

    def expire(self) -> None:
        """Sweep idle clients and lapsed flags (called periodically, so TTLs and holds pass even without traffic)."""
        with self.lock:
            now = self.clock()
            self.verdicts.sweep(now)
            self.store.expire(now)
            self.groups.expire(now)
            self.metrics.tracked_clients.set(len(self.store))

    # -- persistence (exporter.persist) ---------------------------------------
    def snapshot_copy(self) -> dict[str, Any]:
        """A private copy of all state worth keeping across a restart (:func:`exporter.persist.copy_state`)."""
        return persist.copy_state(self.lock, self.store, self.runtimes, self.decoder, self.clock(), self.recently_flagged, self.groups)

    def restore(self, data: bytes | BinaryIO) -> int:
        """Load a snapshot (:func:`exporter.persist.restore`); return the number of clients restored."""
        n = persist.restore(data, self.lock, self.store, self.runtimes, self.decoder, self.recently_flagged, self.groups)
        self.verdicts.restored()
        self.metrics.tracked_clients.set(n)
        return n


def _update_all_or_nothing(det: Detector, states: dict[str, State], batch: Batch) -> Signals | None:
    """``det.update`` of the client's state (``states[det.name]``) with ``batch``, all or nothing.

    If the update raises, or returns malformed signals (:func:`_check`), the exception
    propagates and the state is as it was before the batch: a new client's state is
    kept only on success, and an existing one is copied first (its arrays: tens of KB
    per client) and put back on failure. So a failure never leaves a half-applied batch
    behind, and the batch need not, and must not, run again.
    """
    state = states.get(det.name)
    if state is None:
        fresh = det.init_state()
        found = det.update(fresh, batch)
        if found is not None:
            _check(found, len(batch))
        states[det.name] = fresh
        return found
    saved = {k: v.copy() if isinstance(v, np.ndarray) else copy.deepcopy(v) for k, v in state.items()}
    try:
        found = det.update(state, batch)
        if found is not None:
            _check(found, len(batch))
    except BaseException:
        state.clear()  # the detector may have replaced, added or changed arrays in place
        state.update(saved)
        raise
    return found


def _check(signals: Signals, n: int) -> None:
    """Reject malformed detector output, so it is counted as an error rather than trusted."""
    values, flagged = signals
    if values.shape != (n,) or flagged.shape != (n,):
        raise ValueError(f"signals of shape {values.shape}/{flagged.shape} for a batch of {n}")
    judged = values[~np.isnan(values)]
    if judged.size and (judged.min() < 0.0 or judged.max() > 1.0):
        raise ValueError("a score is outside [0, 1]")
