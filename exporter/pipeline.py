"""The one pipeline every source feeds: decode, validate, update per-client state, run detectors.

``run`` (tailer + push) and ``replay`` drive the same :class:`Pipeline`; only the clock
differs (wall time in ``run``, event time in ``replay``). All mutation happens under
``Pipeline.lock`` so tailer, push handlers and scrapes see consistent state.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable

import numpy as np

from exporter import reasons
from exporter.config import ModelConfig, Settings
from exporter.detectors import FUSION, Batch, Detector, ModelContext, Signals
from exporter.events import Decoder, Event, Rejected
from exporter.logutil import RateLimitedLog
from exporter.metrics import ClientCollector, Metrics
from exporter.names import MAX_CLIENT_LENGTH, MAX_MODEL_LENGTH, is_valid_name
from exporter.profile import Profile, params_digest
from exporter.snapshot import pack, unpack
from exporter.state import ClientState, ClientStore
from exporter.stats import FeatureStats

log = logging.getLogger("monitaur.pipeline")
SNAPSHOT_VERSION = 1
VERDICT = FUSION  # the detector whose flag is the client's verdict, when enabled
_SNAPSHOT_CHUNK = 200  # clients copied per hold of the lock when snapshotting


@dataclass(slots=True)
class ModelRuntime:
    """A model's detectors, built once its input shape is known."""

    context: ModelContext
    detectors: list[Detector]
    versions: dict[str, str]
    events: Any  # the model's metric children, looked up once
    durations: dict[str, Any]


@dataclass(slots=True)
class IngestResult:
    """Counts of one batch: accepted events, and rejections by reason."""

    accepted: int
    rejected: Counter[str]


class Pipeline:
    """Decodes events and runs every enabled detector on each client's state."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        on_evict: Callable[[ClientState, str], None] | None = None,
        event_time: bool = False,
        profile: Profile | None = None,
        observer: Callable[[Batch, str, Signals], None] | None = None,
    ) -> None:
        self.settings = settings
        self.specs = settings.detector_params()
        self.metrics = metrics or Metrics(self.specs)
        self.clock = clock
        self.event_time = event_time  # replay: a batch's last event time is "now"
        self.lock = threading.RLock()
        self.decoder = Decoder(settings)
        self.profile = profile
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
        self.runtimes: dict[str, ModelRuntime] = {}
        self._on_evict = on_evict
        self.store = ClientStore(settings.state.max_clients, settings.state.idle_ttl_seconds, self._evicted)
        self.collector = ClientCollector(
            self.store,
            settings.metrics.max_client_series,
            self.lock,
            self.specs,
            self.peer_matches,
            self.metrics.client_series,
            [m for cls, _ in self.specs.values() for m in cls.client_metrics],
            self.client_values,
        )
        self.metrics.registry.register(self.collector)
        self.metrics.tracked_clients_limit.set(settings.state.max_clients)
        self.metrics.client_series_limit.set(settings.metrics.max_client_series)
        self._rejects = RateLimitedLog(log)
        self._errors = RateLimitedLog(log, interval=60.0)

    # -- ingestion -----------------------------------------------------------
    def ingest_lines(self, lines: Iterable[bytes | str]) -> IngestResult:
        """Decode and process JSON-lines records; bad ones are rejected, never fatal."""
        return self._ingest(lines, self.decoder.decode_line)

    def ingest_objects(self, objs: Iterable[Any]) -> IngestResult:
        """Decode and process already-parsed JSON values."""
        return self._ingest(objs, self.decoder.decode_object)

    def _ingest(self, items: Iterable[Any], decode: Callable[[Any, float | None], Event]) -> IngestResult:
        result = IngestResult(0, Counter())
        with self.lock:
            events: list[Event] = []
            for item in items:
                try:
                    events.append(decode(item, self.clock()))
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
    def _runtime(self, event: Event) -> ModelRuntime:
        rt = self.runtimes.get(event.model)
        if rt is None:
            rt = self._build_runtime(event.model, event.modality, None)
        return rt

    def _build_runtime(self, model: str, modality: str, stats: dict[str, Any] | None) -> ModelRuntime:
        """Instantiate the detectors for a model once the decoder knows its shape."""
        mcfg = self.settings.models.get(model) or ModelConfig()
        dim = mcfg.input_dim or self.decoder.learned_input_dims.get(model)
        mp = self.profile.models.get(model) if self.profile is not None else None
        if mp is not None and mp.stats is not None:
            stats = mp.stats  # calibrated standardization, frozen
        fs = None
        if dim is not None:
            fs = FeatureStats.from_state(stats) if stats is not None else FeatureStats(dim)
            if fs.dim != dim:
                fs = FeatureStats(dim)
        context = ModelContext(
            name=model,
            modality=mcfg.modality or modality,
            input_dim=dim,
            num_classes=mcfg.num_classes or self.decoder.learned_num_classes.get(model),
            stats=fs,
            detectors=tuple(self.specs),
        )
        detectors = []
        versions: dict[str, str] = {}
        for name, (cls, params) in self.specs.items():
            calibrated = mp is not None and mp.params.get(name) == params_digest(params, cls.threshold_param)
            if calibrated and cls.threshold_param and name in mp.thresholds:  # type: ignore[union-attr]
                params = params.model_copy(update={cls.threshold_param: mp.thresholds[name]})  # type: ignore[union-attr]
            det = cls(params, context)
            versions[name] = det.state_version()
            if calibrated and name in mp.references:  # type: ignore[union-attr]
                det.load_reference(mp.references[name])  # type: ignore[union-attr]
                # State built against one reference (cells, scales) means nothing under another.
                versions[name] += f":ref@{self.profile.created_at!r}"  # type: ignore[union-attr]
            detectors.append(det)
        if self.profile is not None and mp is None:
            log.warning("model %s is not in the calibration profile; its detectors run uncalibrated", model)
        m = self.metrics
        m.prediction_confidence.observe_many(model, np.zeros(0))  # the model's series exist from now on
        rt = self.runtimes[model] = ModelRuntime(
            context,
            detectors,
            versions,
            m.events.labels(model),
            {d.name: m.detector_duration.labels(d.name) for d in detectors},
        )
        return rt

    def process(self, events: list[Event], now: float | None = None) -> None:
        """Run every detector on decoded events, one batch per (client, model) run.

        Events of one client keep their order. Across clients, a block is handled client
        by client: per-client detectors are unaffected, while state shared across clients
        (the fingerprint index, coverage counts, online feature statistics) sees the
        block's events grouped by client rather than interleaved.
        """
        if not events:
            return
        groups: dict[tuple[str, str], list[Event]] = {}
        for e in events:
            groups.setdefault((e.client, e.model), []).append(e)
        with self.lock:
            for (client_id, model), evs in groups.items():
                when = evs[-1].ts if self.event_time else (self.clock() if now is None else now)
                self._process_batch(Batch(client_id, model, evs), when)
            self.metrics.tracked_clients.set(len(self.store))

    def _process_batch(self, batch: Batch, now: float) -> None:
        m = self.metrics
        n = len(batch)
        rt = self._runtime(batch.events[0])
        stats = rt.context.stats
        if stats is not None and batch.vectors is not None:
            stats.update_many(batch.vectors)
        client = self.store.touch(batch.client, now)
        before = client.total
        client.total += n
        client.queries[batch.model] = client.queries.get(batch.model, 0) + n
        states = client.detector_state.setdefault(batch.model, {})
        first_flag: dict[str, int] = {}
        flag_counts: dict[str, int] = {}
        for det in rt.detectors:
            name = det.name
            state = states.get(name)
            if state is None:
                state = states[name] = det.init_state()
            start = time.perf_counter()
            try:
                signals = det.update(state, batch)
                if signals is not None:
                    _check(signals, n)
            except Exception as exc:  # a broken detector must not stop the others
                m.detector_errors.labels(name).inc(n)
                self._errors.log(logging.ERROR, name, "detector %s failed on %d events of model %s: %s", name, n, batch.model, type(exc).__name__)
                continue
            finally:
                rt.durations[name].observe((time.perf_counter() - start) / n)
            if signals is None:
                continue
            batch.signals[name] = signals
            if self.observer is not None:
                self.observer(batch, name, signals)
            judged = np.flatnonzero(~np.isnan(signals.values))
            if judged.size == 0:
                continue
            last = judged[-1]
            client.scores[name] = float(signals.values[last])
            client.current[name] = bool(signals.flagged[last])
            hits = np.flatnonzero(signals.flagged)
            if hits.size:
                first_flag[name] = before + int(hits[0]) + 1
                flag_counts[name] = int(hits.size)
                client.flags[name] = client.flags.get(name, 0) + int(hits.size)
                client.first_flagged.setdefault(name, first_flag[name])
        self._verdict(client, first_flag)
        rt.events.inc(n)
        self.metrics.prediction_confidence.observe_many(batch.model, batch.confidence)
        self.collector.count_events(client, batch.model, n, flag_counts)

    def _verdict(self, client: ClientState, first_flag: dict[str, int], announce: bool = True) -> None:
        """The client's overall verdict: the fused ``risk`` detector's when enabled, else any detector's."""
        was = client.suspicious
        if VERDICT in self.specs:
            client.suspicious = client.current.get(VERDICT, False)
            client.score = client.scores.get(VERDICT, 0.0)
            first = first_flag.get(VERDICT)
        else:
            client.suspicious = any(client.current.values())
            client.score = max(client.scores.values(), default=0.0)
            first = min(first_flag.values(), default=None)
        if first is not None and client.first_flagged_query is None:
            client.first_flagged_query = first
        if announce and client.suspicious and not was:
            names = ", ".join(n for n, on in client.current.items() if on)
            log.info("client %s flagged by %s at its query %d", client.client_id, names, client.first_flagged_query or client.total)

    def peer_matches(self, client_id: str) -> tuple[int, dict[str, int]]:
        """Cross-client evidence for a client, summed over models and detectors."""
        total, peers = 0, Counter[str]()
        for rt in self.runtimes.values():
            for det in rt.detectors:
                n, p = det.peer_matches(client_id)
                total += n
                peers.update(p)
        return total, dict(peers)

    def client_values(self, client: ClientState) -> list[tuple[str, str, float]]:
        """(metric, model, value) of the detectors' per-client statistics (``Detector.client_metrics``).

        Called at scrape time, under the lock. A detector that fails here is logged
        (rate-limited) and left out of that scrape, which goes on.
        """
        out: list[tuple[str, str, float]] = []
        for model, per in client.detector_state.items():
            rt = self.runtimes.get(model)
            for det in rt.detectors if rt is not None else ():
                state = per.get(det.name)
                if not det.client_metrics or state is None:
                    continue
                try:
                    values = det.client_values(state)
                except Exception as exc:
                    self._errors.log(logging.ERROR, f"{det.name}:client_values", "detector %s failed to report client statistics: %s", det.name, type(exc).__name__)
                    continue
                out += [(name, model, float(v)) for name, v in values.items() if math.isfinite(v)]
        return out

    def _evicted(self, client: ClientState, reason: str) -> None:
        self.metrics.client_evictions.labels(reason).inc()
        self.collector.forget(client.client_id)
        for rt in self.runtimes.values():
            for det in rt.detectors:
                det.forget_client(client.client_id)
        if self._on_evict is not None:
            self._on_evict(client, reason)

    def expire(self) -> None:
        """Sweep idle clients (called periodically, so TTLs pass even without traffic)."""
        with self.lock:
            self.store.expire(self.clock())
            self.metrics.tracked_clients.set(len(self.store))

    # -- snapshots -----------------------------------------------------------
    def snapshot(self) -> bytes:
        """All state worth keeping across a restart, as bytes (checkpoints stream
        :meth:`snapshot_copy` to the file with :func:`exporter.snapshot.dump` instead)."""
        return pack(self.snapshot_copy())

    def snapshot_copy(self) -> dict[str, Any]:
        """A private copy of all state worth keeping across a restart.

        The state is copied under the lock a chunk of clients at a time, so that
        ingestion and scrapes wait for one chunk (milliseconds), not for the whole
        snapshot; encoding the copy runs without the lock. Clients are saved in LRU
        order as of the start; one evicted meanwhile is left out, one arriving meanwhile
        waits for the next checkpoint.
        """
        with self.lock:
            ids = [c.client_id for c in self.store.values()]
            models = {
                name: {
                    "stats": rt.context.stats.to_state() if rt.context.stats is not None else None,
                    "shared": {
                        d.name: {"version": rt.versions[d.name], "state": st}
                        for d in rt.detectors
                        if (st := d.shared_state()) is not None
                    },
                }
                for name, rt in self.runtimes.items()
            }
            head = {"version": SNAPSHOT_VERSION, "saved_at": self.clock(), "decoder": self.decoder.learned(), "models": _copied(models)}
        clients = []
        for start in range(0, len(ids), _SNAPSHOT_CHUNK):
            with self.lock:
                for client_id in ids[start : start + _SNAPSHOT_CHUNK]:
                    if client_id in self.store:
                        clients.append(self._client_record(self.store[client_id]))
        return {**head, "clients": clients}

    def _client_record(self, c: ClientState) -> dict[str, Any]:
        """A client's part of a snapshot, with copies of its detector state (under the lock)."""
        return {
            "id": c.client_id,
            "last_seen": c.last_seen,
            "total": c.total,
            "queries": dict(c.queries),
            "scores": dict(c.scores),
            "current": dict(c.current),
            "flags": dict(c.flags),
            "first_flagged": dict(c.first_flagged),
            "first_flagged_query": c.first_flagged_query,
            "detectors": {
                model: {name: {"version": self.runtimes[model].versions.get(name, ""), "state": _copied(st)} for name, st in per.items()}
                for model, per in c.detector_state.items()
                if model in self.runtimes
            },
        }

    def restore(self, data: bytes | BinaryIO) -> int:
        """Load a snapshot made by :meth:`snapshot` (bytes, or a binary file); return the number of clients restored.

        Detector state made under other parameters or shapes is dropped (that detector
        starts afresh for the client) rather than misread.
        """
        doc = unpack(data)
        if not isinstance(doc, dict) or doc.get("version") != SNAPSHOT_VERSION:
            raise ValueError("unsupported state snapshot version")
        unsafe = _drop_invalid_names(doc)
        if unsafe:
            log.warning("dropped %d clients or models of the snapshot whose names are not valid (printable text) any more", unsafe)
        with self.lock:
            self.decoder.restore(doc.get("decoder", {}))
            stats = {name: m.get("stats") for name, m in doc.get("models", {}).items()}
            dropped = 0
            for model, m in doc.get("models", {}).items():
                rt = self._restore_runtime(model, stats.get(model))
                for det in rt.detectors if rt is not None else []:
                    shared = m.get("shared", {}).get(det.name)
                    if shared is not None and shared["version"] == rt.versions[det.name]:
                        det.load_shared_state(shared["state"])
            for raw in doc.get("clients", []):
                c = ClientState(
                    client_id=raw["id"],
                    last_seen=float(raw["last_seen"]),
                    total=int(raw["total"]),
                    queries={k: int(v) for k, v in raw["queries"].items()},
                    scores={k: float(v) for k, v in raw["scores"].items() if k in self.specs},
                    current={k: bool(v) for k, v in raw["current"].items() if k in self.specs},
                    flags={k: int(v) for k, v in raw["flags"].items()},
                    first_flagged={k: int(v) for k, v in raw["first_flagged"].items()},
                    first_flagged_query=raw["first_flagged_query"],
                )
                for model, per in raw.get("detectors", {}).items():
                    rt = self._restore_runtime(model, stats.get(model))
                    if rt is None:
                        continue
                    kept = {name: e["state"] for name, e in per.items() if rt.versions.get(name) == e["version"]}
                    dropped += len(per) - len(kept)
                    c.detector_state[model] = kept
                self._verdict(c, {}, announce=False)
                self.store.put(c)
            if dropped:
                log.warning("dropped %d detector states made under another configuration; those detectors start afresh", dropped)
            self.metrics.tracked_clients.set(len(self.store))
            return len(self.store)

    def _restore_runtime(self, model: str, stats: dict[str, Any] | None) -> ModelRuntime | None:
        """Rebuild a model's runtime from what the decoder learned before the restart."""
        if model in self.runtimes:
            return self.runtimes[model]
        modality = (self.settings.models.get(model) or ModelConfig()).modality or self.decoder.learned_modalities.get(model)
        return None if modality is None else self._build_runtime(model, modality, stats)


def _drop_invalid_names(doc: dict[str, Any]) -> int:
    """Remove, in place, the clients and models of a snapshot whose names ``exporter.names`` refuses; return how many.

    A snapshot written before names were validated may hold ids that no exposition,
    log line or alert can carry (a lone surrogate made every scrape fail).
    """
    models = doc.get("models", {})
    bad_models = [m for m in models if not is_valid_name(m, MAX_MODEL_LENGTH)]
    for m in bad_models:
        del models[m]
    clients = doc.get("clients", [])
    kept = [c for c in clients if is_valid_name(c["id"], MAX_CLIENT_LENGTH)]
    for c in kept:
        for per_model in (c["queries"], c.get("detectors", {})):
            for m in [m for m in per_model if not is_valid_name(m, MAX_MODEL_LENGTH)]:
                del per_model[m]
    doc["clients"] = kept
    return len(bad_models) + len(clients) - len(kept)


def _copied(x: Any) -> Any:
    """A copy of nested dicts and lists whose arrays are copied too (other values are immutable)."""
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, dict):
        return {k: _copied(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copied(v) for v in x]
    return x


def _check(signals: Signals, n: int) -> None:
    """Reject malformed detector output, so it is counted as an error rather than trusted."""
    values, flagged = signals
    if values.shape != (n,) or flagged.shape != (n,):
        raise ValueError(f"signals of shape {values.shape}/{flagged.shape} for a batch of {n}")
    judged = values[~np.isnan(values)]
    if judged.size and (judged.min() < 0.0 or judged.max() > 1.0):
        raise ValueError("a score is outside [0, 1]")
