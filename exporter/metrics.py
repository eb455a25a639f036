"""Every metric the exporter exposes, in its own registry.

Self-metrics are ordinary prometheus_client instruments. Per-client series come from
:class:`ClientCollector`, which builds them at scrape time from the client store, so
that the cardinality guard (top-N by risk plus every flagged client, the rest under
``client="__other__"``) and the removal of evicted clients' series cannot drift from
the state they describe.

The client's verdict is ``monitaur_client_suspicious``, sticky (:mod:`exporter.verdict`);
its current fused risk moves in ``monitaur_client_risk``. A flagged client also has its
flag's times (``monitaur_client_flagged_timestamp_seconds``, with the flagging query's model,
``monitaur_client_last_flagged_timestamp_seconds``), its query number at the flag
(``monitaur_client_flagged_query``) and the detectors over their calibrated thresholds
at the flag with how far (``monitaur_client_flag_threshold_ratio``): the facts a
notification states. Flagged clients always have their own series, so these are never
aggregated under ``__other__``.
"""

from __future__ import annotations

import platform
import re
import threading
from collections import defaultdict
from typing import TYPE_CHECKING, Iterable

import numpy as np
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from prometheus_client.registry import Collector

from exporter import __version__, reasons
from exporter.fusion import FUSION
from exporter.names import is_valid_name
from exporter.state import EVICTION_REASONS
from exporter.verdict import CLEAR_CAUSES

if TYPE_CHECKING:
    from exporter.detectors import ClientMetric
    from exporter.state import ClientState
    from exporter.view import ClientView

# The collector's own per-client families; detectors' ClientMetrics take other names.
CLIENT_FAMILIES = (
    "monitaur_client_queries",
    "monitaur_client_flags",
    "monitaur_client_score",
    "monitaur_client_risk",
    "monitaur_client_suspicious",
    "monitaur_client_flagged_timestamp_seconds",
    "monitaur_client_last_flagged_timestamp_seconds",
    "monitaur_client_flagged_query",
    "monitaur_client_flag_threshold_ratio",
    "monitaur_client_cross_client_matches",
    "monitaur_client_peer_matches",
)
_CLIENT_METRIC_NAME = re.compile(r"monitaur_client_[a-z0-9_]+")

OTHER = "__other__"
CONFIDENCE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
DURATION_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)

# `_created` series double the exposition for no benefit to alerting.
prometheus_client.disable_created_metrics()


class Metrics:
    """The exporter's metric instruments, bound to a private registry."""

    def __init__(self, detectors: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter("monitaur_events", "Events accepted, by model.", ["model"], registry=r)
        self.events_rejected = Counter("monitaur_events_rejected", "Events rejected, by reason.", ["reason"], registry=r)
        self.prediction_confidence = BulkHistogram(
            "monitaur_prediction_confidence",
            "Top-1 probability (or label score) of the model's answers.",
            "model",
            CONFIDENCE_BUCKETS,
        )
        r.register(self.prediction_confidence)
        self.detector_duration = Histogram(
            "monitaur_detector_duration_seconds", "Time a detector spent on one event.", ["detector"], buckets=DURATION_BUCKETS, registry=r
        )
        self.detector_errors = Counter(
            "monitaur_detector_errors", "Events a detector, or the verdict stage (detector=\"fusion\"), failed to judge.", ["detector"], registry=r
        )
        self.tracked_clients = Gauge("monitaur_tracked_clients", "Clients with state in memory.", registry=r)
        self.tracked_clients_limit = Gauge("monitaur_tracked_clients_limit", "Configured maximum of tracked clients.", registry=r)
        self.client_evictions = Counter("monitaur_client_evictions", "Clients dropped from state, by reason (lru, lru_flagged, ttl).", ["reason"], registry=r)
        self.flags_cleared = Counter(
            "monitaur_flags_cleared", "Flags cleared without an eviction, by cause (released by an operator, hold_expired).", ["cause"], registry=r
        )
        self.recently_flagged = Gauge("monitaur_recently_flagged_clients", "Evicted flagged clients whose flag is remembered.", registry=r)
        self.recently_flagged_limit = Gauge(
            "monitaur_recently_flagged_clients_limit", "Configured maximum of remembered evicted flagged clients.", registry=r
        )
        self.client_series = Gauge("monitaur_client_series", "Clients exported with their own series.", registry=r)
        self.client_series_limit = Gauge("monitaur_client_series_limit", "Configured top-N of clients with their own series.", registry=r)
        # Counters are labelled by the tailed path a file was first seen at, which rotation does not change;
        # the gauges by the path a file is at now, so that a rotated file being drained shows its own lag.
        self.file_lines = Counter("monitaur_file_lines", "Lines read from the files tailed at a path (rotated ones included).", ["path"], registry=r)
        self.file_offset = Gauge("monitaur_file_offset_bytes", "Read position in a file being read, by its current path.", ["path"], registry=r)
        self.file_size = Gauge("monitaur_file_size_bytes", "Size of a file being read, by its current path.", ["path"], registry=r)
        self.file_rotations = Counter("monitaur_file_rotations", "Rotations (a new file at a tailed path).", ["path"], registry=r)
        self.file_truncations = Counter("monitaur_file_truncations", "Truncations (copytruncate) of a file tailed at a path.", ["path"], registry=r)
        self.checkpoint_errors = Counter("monitaur_checkpoint_errors", "Failed checkpoint writes or reads, by kind.", ["kind"], registry=r)
        self.checkpoint_last_success = Gauge(
            "monitaur_checkpoint_last_success_timestamp_seconds", "When state and offsets were last saved.", registry=r
        )
        self.push_requests = Counter("monitaur_push_requests", "HTTP push requests, by status code.", ["code"], registry=r)
        self.build_info = Gauge("monitaur_build_info", "Build information.", ["version", "python"], registry=r)
        self.build_info.labels(__version__, platform.python_version()).set(1)
        # Zero-initialise the fixed label sets so that rate() and absent() work from the first scrape.
        for reason in reasons.ALL:
            self.events_rejected.labels(reason)
        for name in (*detectors, FUSION):
            self.detector_errors.labels(name)
        for kind in ("offsets", "state"):
            self.checkpoint_errors.labels(kind)
        for reason in EVICTION_REASONS:
            self.client_evictions.labels(reason)
        for cause in CLEAR_CAUSES:
            self.flags_cleared.labels(cause)

    def forget_origin(self, path: str) -> None:
        """Remove a tailed path's counters once no file of it is read any more."""
        for metric in (self.file_lines, self.file_rotations, self.file_truncations):
            try:
                metric.remove(path)
            except KeyError:
                pass

    def forget_path(self, path: str) -> None:
        """Remove the gauges of a path no file being read is at any more."""
        for metric in (self.file_offset, self.file_size):
            try:
                metric.remove(path)
            except KeyError:
                pass


class BulkHistogram(Collector):
    """A histogram with one label that takes a whole array of observations at once.

    prometheus-client's ``Histogram.observe`` costs about 2 us per value, too much on the
    per-event path of replay; here a batch of values costs one ``np.searchsorted`` and
    one ``np.bincount``. The exposition is an ordinary Prometheus histogram (cumulative
    ``_bucket`` series with ``le`` up to ``+Inf``, ``_count``, ``_sum``).
    """

    def __init__(self, name: str, documentation: str, label: str, buckets: Iterable[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = np.asarray(sorted(float(b) for b in buckets), dtype=np.float64)
        self._counts: dict[str, np.ndarray] = {}  # label value -> per-bucket (not cumulative) counts, +Inf last
        self._sums: dict[str, float] = {}
        self._lock = threading.Lock()

    def observe_many(self, label_value: str, values: np.ndarray) -> None:
        """Count every value (NaN values are skipped) under ``label_value``."""
        v = values[~np.isnan(values)]
        # le buckets: a value equal to a bound belongs to that bound's bucket
        per_bucket = np.bincount(np.searchsorted(self.bounds, v, side="left"), minlength=self.bounds.shape[0] + 1)
        with self._lock:
            counts = self._counts.get(label_value)
            if counts is None:
                counts = self._counts[label_value] = np.zeros(self.bounds.shape[0] + 1, dtype=np.int64)
                self._sums[label_value] = 0.0
            counts += per_bucket
            self._sums[label_value] += float(v.sum())

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=[self.label])]

    def collect(self) -> list[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            snapshot = [(k, np.cumsum(c).tolist(), self._sums[k]) for k, c in self._counts.items()]
        for value, cumulative, total in snapshot:
            les = [floatToGoString(b) for b in self.bounds.tolist()] + ["+Inf"]
            family.add_metric([value], list(zip(les, cumulative)), total)
        return [family]


class ClientCollector(Collector):
    """Builds the per-client series at scrape time, under the cardinality guard.

    A client has its own series while it is among the top ``limit`` by risk, or flagged.
    Events of the other clients are counted under ``client="__other__"`` *as they happen*,
    so that ``__other__``'s counters never go backwards when membership changes.

    Client ids, model and peer names are label values only when ``exporter.names``
    accepts them: one id that cannot be encoded would otherwise fail every scrape. The
    decoder and snapshot restore already refuse such names; this is the second line.

    Per-client counters count from the start of the process, like every other counter:
    after a restore, :meth:`rebase` makes each client's restored totals their zero. A
    SIGKILL's snapshot is older than what the killed process exported, so resuming from
    it would step the counters back, and rate() would read the step as a huge increase.
    A reset to 0 is what rate() expects of a restart. The clients' lifetime totals stay
    in their state (the landing page's "queries" column).
    """

    def __init__(
        self,
        view: "ClientView",
        limit: int,
        detectors: Iterable[str],
        series_gauge: Gauge | None = None,
        client_metrics: Iterable["ClientMetric"] = (),
        peers: bool = True,
    ) -> None:
        self.client_metrics = list(client_metrics)
        names = [m.name for m in self.client_metrics]
        for name in names:
            if not _CLIENT_METRIC_NAME.fullmatch(name) or name.endswith("_total") or name in CLIENT_FAMILIES or names.count(name) > 1:
                raise ValueError(f"detector client metric {name!r}: needs a unique name monitaur_client_<lowercase>, without _total")
        self.view = view
        self.series_gauge = series_gauge
        self.peers = peers
        self.limit = limit
        self.detectors = list(detectors)
        self.exported: set[str] = set()
        self.other_queries: dict[str, int] = defaultdict(int)
        self.other_flags: dict[str, int] = defaultdict(int)
        self._counters = {m.name for m in self.client_metrics if m.kind == "counter"}
        self._base: dict[str, dict[tuple[str, str], float]] = {}  # client -> (family, label) -> its value at rebase()

    def describe(self) -> list:
        return []

    # -- called by the pipeline, under its lock ------------------------------
    def count_events(self, client: "ClientState", model: str, n: int, flags: dict[str, int]) -> None:
        """Account ``n`` events of ``client`` (``flags``: flagged events per detector) to its own series or to ``__other__``."""
        if client.client_id not in self.exported:
            if client.suspicious or len(self.exported) < self.limit:
                # Flagged clients always get their own series; others while there is room.
                self.exported.add(client.client_id)
                return
            self.other_queries[model] += n
            for name, k in flags.items():
                self.other_flags[name] += k

    def forget(self, client_id: str) -> None:
        """Drop an evicted client; its series vanish from the next scrape."""
        self.exported.discard(client_id)
        self._base.pop(client_id, None)

    def rebase(self) -> None:
        """Make every tracked client's counters count from now (called once, after a snapshot restore)."""
        self._base = self.view.read(lambda clients: {c.client_id: b for c in clients if (b := self._counter_values(c))})

    def _counter_values(self, c: "ClientState") -> dict[tuple[str, str], float]:
        """The client's per-client counter values, by (family, model or detector label); zeros left out."""
        values: dict[tuple[str, str], float] = {("queries", m): n for m, n in c.queries.items()}
        values.update((("flags", d), n) for d, n in c.flags.items())
        if self.peers:
            values[("cross", "")] = self.view.peer_matches(c.client_id)[0]
        if self._counters:
            values.update(((name, model), v) for name, model, v in self.view.client_values(c) if name in self._counters)
        return {k: v for k, v in values.items() if v}

    def refresh(self, clients: list["ClientState"]) -> None:
        """Recompute the exported set: every flagged client plus the top-N by score."""
        flagged = {c.client_id for c in clients if c.suspicious}
        ranked = sorted((c for c in clients if c.client_id not in flagged), key=lambda c: c.score, reverse=True)
        self.exported = flagged | {c.client_id for c in ranked[: self.limit]}
        if self.series_gauge is not None:
            self.series_gauge.set(len(self.exported))

    # -- scrape ---------------------------------------------------------------
    def collect(self) -> Iterable:
        return self.view.read(self._families)

    def _families(self, found: Iterable["ClientState"]) -> list:
        clients = list(found)
        self.refresh(clients)
        queries = CounterMetricFamily("monitaur_client_queries", "Queries by client and model.", labels=["client", "model"])
        flags = CounterMetricFamily("monitaur_client_flags", "Events at which a detector flagged the client.", labels=["client", "detector"])
        score = GaugeMetricFamily("monitaur_client_score", "Client's current score per detector, 0 to 1.", labels=["client", "detector"])
        risk = GaugeMetricFamily("monitaur_client_risk", "Client's current fused risk, 0 to 1 (0.5: its strongest detector at its threshold).", labels=["client"])
        suspicious = GaugeMetricFamily(
            "monitaur_client_suspicious", "1 while the client is flagged: from the verdict's first flag until released, lapsed or evicted.", labels=["client"]
        )
        flagged_at = GaugeMetricFamily(
            "monitaur_client_flagged_timestamp_seconds", "When the verdict first flagged the client, on the model of the flagging query (flagged clients only).",
            labels=["client", "model"],
        )
        last_flagged_at = GaugeMetricFamily(
            "monitaur_client_last_flagged_timestamp_seconds", "When the verdict last flagged the client; the hold counts from here (flagged clients only).", labels=["client"]
        )
        flagged_query = GaugeMetricFamily("monitaur_client_flagged_query", "The client's query number at its first flag (flagged clients only).", labels=["client"])
        evidence = GaugeMetricFamily(
            "monitaur_client_flag_threshold_ratio",
            "Value over calibrated threshold, at the client's first flag, of each detector that flagged it there (flagged clients only).",
            labels=["client", "detector"],
        )
        cross = CounterMetricFamily("monitaur_client_cross_client_matches", "Queries of the client that matched other clients' queries.", labels=["client"])
        peer = GaugeMetricFamily("monitaur_client_peer_matches", "Matches between the client's queries and a peer's (top peers).", labels=["client", "peer"])
        stats = {
            m.name: (CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily)(m.name, m.documentation, labels=["client", "model"])
            for m in self.client_metrics
        }
        other_score: dict[str, float] = {}
        other_risk: float | None = None
        for c in clients:
            if c.client_id not in self.exported:
                for name, value in c.scores.items():
                    other_score[name] = max(other_score.get(name, 0.0), value)
                other_risk = max(other_risk or 0.0, c.score)
                continue
            if not is_valid_name(c.client_id):
                continue  # defense in depth: the decoder and restore already refuse such ids
            base = self._base.get(c.client_id, {})

            def since_start(family: str, label: str, value: float) -> float:
                return max(0.0, value - base.get((family, label), 0.0))

            for model, n in c.queries.items():
                if is_valid_name(model):
                    queries.add_metric([c.client_id, model], since_start("queries", model, n))
            for name in self.detectors:
                flags.add_metric([c.client_id, name], since_start("flags", name, c.flags.get(name, 0)))
                if name in c.scores:
                    score.add_metric([c.client_id, name], c.scores[name])
            risk.add_metric([c.client_id], c.score)
            suspicious.add_metric([c.client_id], 1.0 if c.suspicious else 0.0)
            if c.flag is not None and c.flag.open:
                flagged_at.add_metric([c.client_id, c.flag.model if is_valid_name(c.flag.model) else ""], c.flag.first_at)
                last_flagged_at.add_metric([c.client_id], c.flag.last_at)
                flagged_query.add_metric([c.client_id], c.flag.first_query)
                for name, ratio in c.flag.detectors.items():
                    if is_valid_name(name):
                        evidence.add_metric([c.client_id, name], ratio)
            if self.peers:
                total, peers = self.view.peer_matches(c.client_id)
                cross.add_metric([c.client_id], since_start("cross", "", total))
                for other, n in peers.items():
                    if is_valid_name(other):
                        peer.add_metric([c.client_id, other], n)
            if stats:
                for name, model, value in self.view.client_values(c):
                    if name in stats and is_valid_name(model):
                        stats[name].add_metric([c.client_id, model], since_start(name, model, value) if name in self._counters else value)
        if self.other_queries or len(clients) > len(self.exported):
            for model, n in self.other_queries.items():
                if is_valid_name(model):
                    queries.add_metric([OTHER, model], n)
            for name in self.detectors:
                flags.add_metric([OTHER, name], self.other_flags.get(name, 0))
                if name in other_score:
                    score.add_metric([OTHER, name], other_score[name])
            if other_risk is not None:
                risk.add_metric([OTHER], other_risk)
            suspicious.add_metric([OTHER], 0.0)
        families = [queries, flags, score, risk, suspicious, flagged_at, last_flagged_at, flagged_query, evidence]
        if self.peers:
            families += [cross, peer]
        return families + list(stats.values())
