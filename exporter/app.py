"""``monitaur-exporter run``: wires the pipeline to the tailer, the HTTP server and checkpoints.

One ingest thread tails the files and, between reads, copies the state and the file
offsets for a checkpoint (:class:`exporter.persist.Checkpointer`), so the saved state
and the saved offsets always describe the same set of lines: a clean restart neither
loses nor repeats a line, and an attacker gets no clean slate from a deploy.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from exporter import webconfig
from exporter.api import ClientsAPI
from exporter.group_numbers import FILE as GROUP_NUMBERS, NumberReservations
from exporter.groups_api import GroupsAPI
from exporter.clientpage import client_page
from exporter.config import Settings, api_enabled
from exporter.detectors import enabled_detectors
from exporter.health import Health, HealthCheck, HealthCollector
from exporter.metrics import Metrics
from exporter.persist import Checkpointer
from exporter.pipeline import Pipeline
from exporter.profile import Profile
from exporter.reaction import Reaction
from exporter.server import ConnectionLimits, ExporterHTTPServer
from exporter.tailer import Tailer

log = logging.getLogger("monitaur.app")


def _http_server(s: Settings, pipeline: Pipeline, healthy: Callable[[], Health], reaction: Reaction) -> ExporterHTTPServer:
    """The HTTP server as ``listen`` and ``push`` configure it (the web config is read here, again, after validation)."""
    web = webconfig.load(s.listen.web_config_file) if s.listen.web_config_file is not None else None
    if web is not None and web.basic_auth_users and web.tls is None and not s.listen.is_loopback:
        log.warning("basic auth without TLS on %s: passwords cross the network in clear (set tls_server_config in %s)",
                    s.listen.host, s.listen.web_config_file)
    limits = ConnectionLimits(
        max_connections=s.listen.max_connections,
        header_timeout=s.listen.header_timeout_seconds,
        body_timeout=s.listen.body_timeout_seconds,
        idle_timeout=s.listen.idle_timeout_seconds,
        write_timeout=s.listen.write_timeout_seconds,
    )
    clients = ClientsAPI(pipeline, reaction, s.api.all_tokens(), group_of=lambda client: next(iter(pipeline.group_ids(client)), None))
    clients.groups = GroupsAPI(pipeline.view, clients.client, clients.override, reaction.allowlist)
    if not api_enabled(s) and s.api.enabled is None:
        log.warning("the clients API (/api/v1/clients) is off: listen.host %s is not loopback and api.tokens is empty", s.listen.host)
    return ExporterHTTPServer(
        (s.listen.host, s.listen.port), pipeline, s.push.all_tokens(), s.push.enabled, s.push.max_body_bytes, healthy, limits, web,
        clients if api_enabled(s) else None, lambda client: client_page(pipeline, clients, client),
    )


class App:
    """The running exporter: start(), then stop() on SIGTERM."""

    def __init__(self, settings: Settings, profile: Profile | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(enabled_detectors(settings))
        self.pipeline = Pipeline(settings, self.metrics, profile=profile)
        self.reaction = Reaction(settings, self.pipeline)  # overrides, and the decision endpoint (exporter.reaction)
        self.tailer = Tailer(settings.files, self._sink, self.metrics, self.pipeline.reject, logging.getLogger("monitaur.tailer"))
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: ExporterHTTPServer | None = None
        state_dir = settings.state.dir
        if state_dir is not None:
            self.pipeline.groups.keep_numbers(NumberReservations(state_dir / GROUP_NUMBERS))
        self.checkpointer = (
            Checkpointer(state_dir, self.metrics, lambda: self.pipeline.snapshot_copy(), lambda: self.tailer.offsets_snapshot())
            if state_dir is not None
            else None
        )
        self._record_rotations()
        self.health = HealthCheck(
            settings.health, self._running, lambda: self.tailer.progress, (lambda: self.checkpointer.failures) if self.checkpointer else None
        )
        self.metrics.registry.register(HealthCollector(self.health.check))

    def _record_rotations(self) -> None:
        """Have the tailer write its durable offsets as soon as it sees a rotation (see exporter.tailer)."""
        checkpointer = self.checkpointer
        if checkpointer is None:
            return

        def record() -> None:
            checkpointer.write_offsets(self.tailer.durable_offsets)  # a failure is counted and logged there

        self.tailer.on_change = record

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def _sink(self, lines: list[bytes]) -> None:
        self.pipeline.ingest_lines(lines)

    def restore(self) -> None:
        """Load the last checkpoint: client state, then file offsets (nothing without a state dir).

        Per-client counters then count from 0, as every counter of a new process does
        (see ``ClientCollector.rebase``); the clients' lifetime totals stay in their state.
        """
        if self.checkpointer is not None:
            self.checkpointer.load(self.pipeline.restore, self.tailer.load_offsets)
            self.pipeline.collector.rebase()

    def start(self) -> None:
        self.restore()
        s = self.settings
        self.reaction.start()
        self._server = _http_server(s, self.pipeline, self.healthy, self.reaction)
        self._server.serve_in_thread()
        self.tailer.watch(self._wake)
        self._thread = threading.Thread(target=self._ingest_loop, name="monitaur-ingest", daemon=True)
        self._thread.start()
        host, port = self.address
        log.info("listening on %s://%s:%d (metrics at /metrics); tailing %s", self._server.scheme, host, port, ", ".join(s.files.paths) or "nothing")

    def healthy(self) -> Health:
        """What /healthz answers (see exporter.health)."""
        return self.health.check()

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def _ingest_loop(self) -> None:
        interval = self.settings.files.poll_interval_seconds
        next_checkpoint = time.monotonic() + self.settings.state.checkpoint_interval_seconds
        while not self._stop.is_set():
            ok = True
            try:
                self.tailer.poll_once()
                self.pipeline.expire()
            except Exception:  # keep ingesting; the failure is logged with its traceback
                ok = False
                log.exception("ingest cycle failed")
            self.health.cycle(ok)
            if time.monotonic() >= next_checkpoint:
                self.checkpoint(wait=False)
                next_checkpoint = time.monotonic() + self.settings.state.checkpoint_interval_seconds
            if not (ok and self.tailer.more):  # a backlog is read on at once, a poll's budget at a time
                self._wake.wait(interval)
            self._wake.clear()

    def checkpoint(self, wait: bool = True) -> None:
        """Save client state and file offsets (see :class:`Checkpointer`); nothing without a state dir."""
        if self.checkpointer is not None:
            self.checkpointer.checkpoint(wait)

    def stop(self) -> None:
        """Stop accepting pushes, finish the current batch, save a final checkpoint, close."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.reaction.stop()
        self.checkpoint()
        self.tailer.close()
        log.info("stopped")
