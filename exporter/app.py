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

from exporter.config import Settings
from exporter.health import Health, HealthCheck, HealthCollector
from exporter.metrics import Metrics
from exporter.persist import Checkpointer
from exporter.pipeline import Pipeline
from exporter.profile import Profile
from exporter.server import ExporterHTTPServer
from exporter.tailer import Tailer

log = logging.getLogger("monitaur.app")


class App:
    """The running exporter: start(), then stop() on SIGTERM."""

    def __init__(self, settings: Settings, profile: Profile | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.detector_params())
        self.pipeline = Pipeline(settings, self.metrics, profile=profile)
        self.tailer = Tailer(settings.files, self._sink, self.metrics, self.pipeline.reject, logging.getLogger("monitaur.tailer"))
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: ExporterHTTPServer | None = None
        state_dir = settings.state.dir
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
        self._server = ExporterHTTPServer(
            (s.listen.host, s.listen.port), self.pipeline, s.push.all_tokens(), s.push.enabled, s.push.max_body_bytes, self.healthy
        )
        self._server.serve_in_thread()
        self.tailer.watch(self._wake)
        self._thread = threading.Thread(target=self._ingest_loop, name="monitaur-ingest", daemon=True)
        self._thread.start()
        host, port = self.address
        log.info("listening on http://%s:%d (metrics at /metrics); tailing %s", host, port, ", ".join(s.files.paths) or "nothing")

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
        self.checkpoint()
        self.tailer.close()
        log.info("stopped")
