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
from typing import Any, Callable, Iterable

from exporter import reasons
from exporter.config import ModelConfig, Settings
from exporter.detectors import Detector, ModelContext
from exporter.events import Decoder, Event, Rejected
from exporter.logutil import RateLimitedLog
from exporter.metrics import ClientCollector, Metrics
from exporter.snapshot import pack, unpack
from exporter.state import ClientState, ClientStore
from exporter.stats import FeatureStats

log = logging.getLogger("monitaur.pipeline")
SNAPSHOT_VERSION = 1


@dataclass(slots=True)
class ModelRuntime:
    """A model's detectors, built once its input shape is known."""

    context: ModelContext
    detectors: list[Detector]
    versions: dict[str, str]


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
    ) -> None:
        self.settings = settings
        self.specs = settings.detector_params()
        self.metrics = metrics or Metrics(self.specs)
        self.clock = clock
        self.lock = threading.RLock()
        self.decoder = Decoder(settings)
        self.runtimes: dict[str, ModelRuntime] = {}
        self._on_evict = on_evict
        self.store = ClientStore(settings.state.max_clients, settings.state.idle_ttl_seconds, self._evicted)
        self.collector = ClientCollector(self.store, settings.metrics.max_client_series, self.lock, self.specs)
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
            for item in items:
                now = self.clock()
                try:
                    event = decode(item, now)
                except Rejected as rej:
                    self.reject(rej.reason, rej.message)
                    result.rejected[rej.reason] += 1
                    continue
                self.process(event, now)
                result.accepted += 1
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
        )
        detectors = [cls(params, context) for cls, params in self.specs.values()]
        rt = self.runtimes[model] = ModelRuntime(context, detectors, {d.name: d.state_version() for d in detectors})
        return rt

    def process(self, event: Event, now: float | None = None) -> ClientState:
        """Run every detector on one decoded event and update the client's verdict."""
        now = self.clock() if now is None else now
        with self.lock:
            rt = self._runtime(event)
            if event.vector is not None and rt.context.stats is not None:
                rt.context.stats.update(event.vector)
            client = self.store.touch(event.client, now)
            client.total += 1
            client.queries[event.model] = client.queries.get(event.model, 0) + 1
            states = client.detector_state.setdefault(event.model, {})
            flagged_now: list[str] = []
            m = self.metrics
            for det in rt.detectors:
                name = det.name
                state = states.get(name)
                if state is None:
                    state = states[name] = det.init_state()
                start = time.perf_counter()
                try:
                    signal = det.update(state, event)
                    if signal is not None and not (math.isfinite(signal.value) and 0.0 <= signal.value <= 1.0):
                        raise ValueError(f"score {signal.value!r} is outside [0, 1]")
                except Exception as exc:  # a broken detector must not stop the others
                    m.detector_errors.labels(name).inc()
                    self._errors.log(logging.ERROR, name, "detector %s failed on an event of model %s: %s", name, event.model, type(exc).__name__)
                    continue
                finally:
                    m.detector_duration.labels(name).observe(time.perf_counter() - start)
                if signal is None:
                    continue
                client.scores[name] = float(signal.value)
                client.current[name] = bool(signal.flagged)
                if signal.flagged:
                    flagged_now.append(name)
                    client.flags[name] = client.flags.get(name, 0) + 1
                    client.first_flagged.setdefault(name, client.total)
            self._verdict(client)
            m.events.labels(event.model).inc()
            confidence = event.confidence
            if confidence is not None:
                m.prediction_confidence.labels(event.model).observe(confidence)
            self.collector.count_event(client, event.model, flagged_now)
            m.tracked_clients.set(len(self.store))
            return client

    def _verdict(self, client: ClientState) -> None:
        was = client.suspicious
        client.suspicious = any(client.current.values())
        client.score = max(client.scores.values(), default=0.0)
        if client.suspicious and client.first_flagged_query is None:
            client.first_flagged_query = client.total
        if client.suspicious and not was:
            names = ", ".join(n for n, on in client.current.items() if on)
            log.info("client %s flagged by %s at its query %d", client.client_id, names, client.total)

    def _evicted(self, client: ClientState, reason: str) -> None:
        self.metrics.client_evictions.labels(reason).inc()
        self.collector.forget(client.client_id)
        if self._on_evict is not None:
            self._on_evict(client, reason)

    def expire(self) -> None:
        """Sweep idle clients (called periodically, so TTLs pass even without traffic)."""
        with self.lock:
            self.store.expire(self.clock())
            self.metrics.tracked_clients.set(len(self.store))

    # -- snapshots -----------------------------------------------------------
    def snapshot(self) -> bytes:
        """All state worth keeping across a restart, as bytes."""
        with self.lock:
            clients = []
            for c in self.store.values():
                clients.append(
                    {
                        "id": c.client_id,
                        "last_seen": c.last_seen,
                        "total": c.total,
                        "queries": c.queries,
                        "scores": c.scores,
                        "current": c.current,
                        "flags": c.flags,
                        "first_flagged": c.first_flagged,
                        "first_flagged_query": c.first_flagged_query,
                        "detectors": {
                            model: {name: {"version": self.runtimes[model].versions.get(name, ""), "state": st} for name, st in per.items()}
                            for model, per in c.detector_state.items()
                            if model in self.runtimes
                        },
                    }
                )
            models = {
                name: {"stats": rt.context.stats.to_state() if rt.context.stats is not None else None} for name, rt in self.runtimes.items()
            }
            return pack({"version": SNAPSHOT_VERSION, "saved_at": self.clock(), "decoder": self.decoder.learned(), "models": models, "clients": clients})

    def restore(self, data: bytes) -> int:
        """Load a snapshot made by :meth:`snapshot`; return the number of clients restored.

        Detector state made under other parameters or shapes is dropped (that detector
        starts afresh for the client) rather than misread.
        """
        doc = unpack(data)
        if not isinstance(doc, dict) or doc.get("version") != SNAPSHOT_VERSION:
            raise ValueError("unsupported state snapshot version")
        with self.lock:
            self.decoder.restore(doc.get("decoder", {}))
            stats = {name: m.get("stats") for name, m in doc.get("models", {}).items()}
            dropped = 0
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
                c.suspicious = any(c.current.values())
                c.score = max(c.scores.values(), default=0.0)
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
