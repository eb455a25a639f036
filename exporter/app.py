"""``monitaur-exporter run``: wires the pipeline to the tailer, the HTTP server and checkpoints.

One ingest thread tails the files and, between reads, copies the state and the file
offsets for a checkpoint, so the saved state and the saved offsets always describe the
same set of lines: a clean restart neither loses nor repeats a line, and an attacker gets
no clean slate from a deploy. A writer thread encodes and writes the copy while tailing
goes on.
"""

from __future__ import annotations

import logging
import threading
import time

from exporter.atomic import atomic_write, atomic_write_bytes
from exporter.config import Settings
from exporter.metrics import Metrics
from exporter.pipeline import Pipeline
from exporter.profile import Profile
from exporter.server import ExporterHTTPServer
from exporter.snapshot import dump
from exporter.tailer import Tailer

log = logging.getLogger("monitaur.app")
STATE_FILE = "state.npz"
OFFSETS_FILE = "offsets.json"


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
        self._writer: threading.Thread | None = None  # the checkpoint being written, if any
        self._server: ExporterHTTPServer | None = None
        state_dir = settings.state.dir
        self.state_path = state_dir / STATE_FILE if state_dir is not None else None
        self.offsets_path = state_dir / OFFSETS_FILE if state_dir is not None else None

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def _sink(self, lines: list[bytes]) -> None:
        self.pipeline.ingest_lines(lines)

    def start(self) -> None:
        self._restore()
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

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def _ingest_loop(self) -> None:
        interval = self.settings.files.poll_interval_seconds
        next_checkpoint = time.monotonic() + self.settings.state.checkpoint_interval_seconds
        while not self._stop.is_set():
            try:
                self.tailer.poll_once()
                self.pipeline.expire()
            except Exception:  # keep ingesting; the failure is logged with its traceback
                log.exception("ingest cycle failed")
            if time.monotonic() >= next_checkpoint:
                self.checkpoint(wait=False)
                next_checkpoint = time.monotonic() + self.settings.state.checkpoint_interval_seconds
            self._wake.wait(interval)
            self._wake.clear()

    def checkpoint(self, wait: bool = True) -> None:
        """Save client state, then file offsets; failures are counted and logged, never fatal.

        Both are copied here, together (the caller's file ingestion waits for the copy:
        a tenth to a third of a checkpoint's time in ``bench/checkpoint.py``). They are
        then written here (``wait``) or by a writer thread while ingestion goes on; a
        checkpoint that comes due while the previous one is still being written is skipped.
        """
        if self.state_path is None or self.offsets_path is None:
            return
        writer = self._writer
        if writer is not None and writer.is_alive():
            if not wait:
                return
            writer.join()
        try:
            state, offsets = self.pipeline.snapshot_copy(), self.tailer.offsets_data()
        except Exception as exc:  # never fatal: the ingest loop goes on
            self.metrics.checkpoint_errors.labels("state").inc()
            log.error("cannot copy the state for a checkpoint: %s", exc)
            return
        if wait:
            self._write_checkpoint(state, offsets)
            return
        self._writer = threading.Thread(target=self._write_checkpoint, args=(state, offsets), name="monitaur-checkpoint", daemon=True)
        self._writer.start()

    def _write_checkpoint(self, state: dict, offsets: bytes) -> None:
        assert self.state_path is not None and self.offsets_path is not None
        ok = True
        try:
            atomic_write(self.state_path, lambda fh: dump(state, fh))
        except Exception as exc:
            ok = False
            self.metrics.checkpoint_errors.labels("state").inc()
            log.error("cannot write state snapshot %s: %s", self.state_path, exc)
        try:
            atomic_write_bytes(self.offsets_path, offsets)
        except Exception as exc:
            ok = False
            self.metrics.checkpoint_errors.labels("offsets").inc()
            log.error("cannot write offsets checkpoint %s: %s", self.offsets_path, exc)
        if ok:
            self.metrics.checkpoint_last_success.set(time.time())

    def _restore(self) -> None:
        if self.state_path is not None and self.state_path.exists():
            try:
                with open(self.state_path, "rb") as fh:
                    n = self.pipeline.restore(fh)
                log.info("restored state of %d clients from %s", n, self.state_path)
            except Exception as exc:
                self.metrics.checkpoint_errors.labels("state").inc()
                aside = self.state_path.with_name(f"{self.state_path.name}.corrupt-{int(time.time())}")
                log.error("cannot read state snapshot %s (%s); starting empty and keeping it as %s", self.state_path, exc, aside)
                try:
                    self.state_path.rename(aside)
                except OSError:
                    pass
        if self.offsets_path is not None:
            self.tailer.load_offsets(self.offsets_path)

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
