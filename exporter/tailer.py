"""Passive tailing of JSON-lines files: globs, rotation, copytruncate and offset checkpoints.

The tailer has no thread of its own: the app calls :meth:`Tailer.poll_once` from its
ingest loop on a timer, and sooner when the optional watchdog observer started by
:meth:`Tailer.watch` signals a change. The periodic rescan is what guarantees progress;
notifications only cut latency.

A file is identified by ``(st_dev, st_ino)`` and kept open, so that a file renamed away
by rotation can still be drained to its end before its successor is read. A fingerprint
of the file's first bytes tells a checkpointed file from a new one that reused its inode,
and notices a copytruncate that was refilled before we looked. Only complete lines are
delivered, and the checkpointed offset never points inside a line that was delivered.

Log messages name paths and counts only, never line contents: model inputs are sensitive.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from exporter import reasons
from exporter.atomic import atomic_write_bytes
from exporter.config import FilesConfig
from exporter.jsonparse import is_blank
from exporter.metrics import Metrics

CHUNK_BYTES = 1024 * 1024
FINGERPRINT_BYTES = 256
CHECKPOINT_VERSION = 1
ERROR_LOG_INTERVAL_SECONDS = 60.0
MAX_REMEMBERED_PATHS = 10_000
# Our own opens and reads of watched files must not wake the ingest loop.
_QUIET_EVENTS = frozenset({"opened", "closed_no_write"})
_MAGIC = re.compile(r"[*?[]")

Key = tuple[int, int]  # (st_dev, st_ino)


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _fingerprint(head: bytes) -> tuple[int, str | None]:
    """Fingerprint a file from its first (up to FINGERPRINT_BYTES) bytes ``head``.

    Returns ``(bytes covered, hash)``: the first 256 bytes once the file has that many,
    else its first line including the newline, else ``(0, None)``. The length is kept
    with the hash so that a file fingerprinted while short is still recognised after
    it has grown.
    """
    n = FINGERPRINT_BYTES if len(head) >= FINGERPRINT_BYTES else head.find(b"\n") + 1
    return (n, _hash(head[:n])) if n else (0, None)


@dataclass
class _File:
    """One tracked file: its open fd and how far it has been consumed."""

    path: str
    fd: int
    key: Key
    offset: int = 0  # every byte before it was delivered or rejected; what is checkpointed
    partial: bytearray = field(default_factory=bytearray)  # incomplete last line, starting at offset
    skipping: bool = False  # inside a rejected over-long line: discard up to its newline
    fp_len: int = 0
    fp: str | None = None

    @property
    def read_pos(self) -> int:
        return self.offset + len(self.partial)


@dataclass
class _Saved:
    """A checkpointed position, waiting for its file to be found again."""

    offset: int
    skipping: bool
    fp_len: int
    fp: str | None
    path: str


class Tailer:
    """Follows the files matching ``cfg.paths`` and hands their complete lines to ``sink``.

    ``sink`` receives lists of at most ``batch_lines`` lines (bytes, newline stripped;
    blank lines, empty or only whitespace, skipped). ``reject`` is called with a reason
    for each line that is dropped. Methods are safe to call from different threads (one lock); ``sink`` is
    called with that lock held and should not raise: if it does, the exception
    propagates and the lines of the chunk being delivered may be delivered again.
    """

    def __init__(
        self,
        cfg: FilesConfig,
        sink: Callable[[list[bytes]], None],
        metrics: Metrics,
        reject: Callable[[str], None],
        logger: logging.Logger | None = None,
        batch_lines: int = 1000,
    ) -> None:
        self.cfg = cfg
        self.sink = sink
        self.metrics = metrics
        self.reject = reject
        self.log = logger or logging.getLogger(__name__)
        self.batch_lines = max(1, batch_lines)
        self._files: dict[Key, _File] = {}
        self._saved: dict[Key, _Saved] = {}  # restored checkpoint entries not matched yet
        self._path_keys: dict[str, Key] = {}  # last file seen at each path, to count rotations
        self._initial: set[Key] | None = None  # files present at the first poll (start_at=end)
        self._logged_at: dict[str, float] = {}
        self._delivered = 0
        self._observer: Any = None
        self._lock = threading.Lock()

    # -- checkpoints ----------------------------------------------------------
    def load_offsets(self, path: Path) -> None:
        """Restore positions saved by :meth:`save_offsets`; used as files are found.

        A missing checkpoint is a first start. An unreadable or corrupt one is counted in
        ``checkpoint_errors{kind="offsets"}`` and logged, and tailing starts fresh.
        """
        try:
            saved = _parse_checkpoint(Path(path).read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError) as exc:
            self.metrics.checkpoint_errors.labels("offsets").inc()
            detail = exc.strerror if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            self.log.warning("offset checkpoint %s is unusable (%s); starting fresh", path, detail)
            return
        with self._lock:
            self._saved = saved

    def save_offsets(self, path: Path) -> None:
        """Write every file's position atomically, as versioned JSON (:meth:`offsets_data`).

        Raises ``OSError`` if the write fails; counting that is the caller's business.
        """
        atomic_write_bytes(Path(path), self.offsets_data())

    def offsets_data(self) -> bytes:
        """Every file's position as the versioned JSON :meth:`save_offsets` writes.

        Positions restored but not yet matched to a file are kept.
        """
        with self._lock:
            positions = dict(self._saved)
            positions.update((f.key, _saved_of(f)) for f in self._files.values())
        entries = [
            {"dev": dev, "ino": ino, "fingerprint": s.fp, "fingerprint_bytes": s.fp_len,
             "offset": s.offset, "skipping": s.skipping, "path": s.path}
            for (dev, ino), s in positions.items()
        ]
        return json.dumps({"version": CHECKPOINT_VERSION, "files": entries}, separators=(",", ":")).encode("utf-8")

    # -- tailing --------------------------------------------------------------
    def poll_once(self) -> int:
        """Rescan the globs and deliver every complete line now available; return how many.

        A file that fails (permission denied, vanished mid-read) is logged and skipped;
        the others are still read, and the failing one is retried on the next poll.
        """
        with self._lock:
            self._delivered = 0
            found = self._scan()
            if self._initial is None:
                self._initial = set(found)
            tailed_before = {f.path for f in self._files.values()}
            # Known files first: a rotated file is drained before its successor is read.
            for key, f in list(self._files.items()):
                if key in found:
                    f.path = found[key]  # followed across a rename
                self._read(f)
                if key not in found:
                    self._drop(f)
            for key, path in found.items():
                if key not in self._files and (f := self._open(path)) is not None:
                    if self._path_keys.get(path, f.key) != f.key:
                        self.metrics.file_rotations.labels(path).inc()
                        self.log.info("%s: rotated; reading the new file from the start", path)
                    self._read(f)
            tailed = {f.path for f in self._files.values()}
            for path in tailed_before - tailed:
                self.metrics.forget_file(path)
                self._logged_at.pop(path, None)
            for f in self._files.values():
                self._path_keys.pop(f.path, None)  # re-insert last: the oldest are trimmed first
                self._path_keys[f.path] = f.key
            while len(self._path_keys) > MAX_REMEMBERED_PATHS:
                del self._path_keys[next(iter(self._path_keys))]
            # A checkpointed file that no longer exists will not come back.
            self._saved = {k: s for k, s in self._saved.items() if k in found}
            return self._delivered

    def _scan(self) -> dict[Key, str]:
        """Regular files matching the globs now, by identity (first path wins for hard links)."""
        found: dict[Key, str] = {}
        paths = sorted({p for pattern in self.cfg.paths for p in glob.glob(os.path.expanduser(pattern))})
        for path in paths:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # vanished since the glob
            except OSError as exc:
                self._warn(path, "cannot stat", exc)
                continue
            if stat.S_ISREG(st.st_mode):
                found.setdefault((st.st_dev, st.st_ino), path)
        return found

    def _open(self, path: str) -> _File | None:
        """Open a newly found file and decide where to start reading it."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                self._warn(path, "cannot open", exc)
            return None
        try:
            st = os.fstat(fd)  # authoritative: the path may have been replaced since the scan
            key = (st.st_dev, st.st_ino)
            if key in self._files:  # renamed under us onto a path we already follow
                os.close(fd)
                return None
            f = _File(path=path, fd=fd, key=key)
            head = os.pread(fd, FINGERPRINT_BYTES, 0)
            f.fp_len, f.fp = _fingerprint(head)
            self._start_position(f, head, st.st_size)
        except OSError as exc:
            os.close(fd)
            self._warn(path, "cannot open", exc)
            return None
        self._files[key] = f
        return f

    def _start_position(self, f: _File, head: bytes, size: int) -> None:
        """Resume from a matching checkpoint, else start at the beginning or the end."""
        saved = self._saved.pop(f.key, None)
        if saved is not None:
            if saved.offset > size:
                self.metrics.file_truncations.labels(f.path).inc()
                self.log.info("%s: truncated while we were down; reading from the start", f.path)
            elif saved.fp is not None and _hash(head[: saved.fp_len]) == saved.fp and len(head) >= saved.fp_len:
                f.offset, f.skipping = saved.offset, saved.skipping
                self.log.info("%s: resuming at byte %d", f.path, f.offset)
            elif saved.fp is not None:
                self.log.info("%s: a different file reuses a checkpointed inode; reading from the start", f.path)
            return
        if self.cfg.start_at == "end" and self._initial is not None and f.key in self._initial:
            # Start after the last complete line, so a line being written is not cut in half.
            start = max(0, size - self.cfg.max_line_bytes - 1)
            nl = os.pread(f.fd, size - start, start).rfind(b"\n")
            if nl >= 0:
                f.offset = start + nl + 1
            elif start > 0:  # the unfinished last line is already too long: skip its rest
                f.offset, f.skipping = size, True

    def _read(self, f: _File) -> None:
        """Deliver the complete lines of ``f`` up to its current size; update its metrics."""
        try:
            size = os.fstat(f.fd).st_size
            head = os.pread(f.fd, FINGERPRINT_BYTES, 0)
            replaced = f.fp is not None and (len(head) < f.fp_len or _hash(head[: f.fp_len]) != f.fp)
            if size < f.read_pos or replaced:
                self.metrics.file_truncations.labels(f.path).inc()
                self.log.info("%s: truncated (size %d, was at %d); reading from the start", f.path, size, f.read_pos)
                f.offset, f.partial, f.skipping = 0, bytearray(), False
            if replaced or f.fp_len < FINGERPRINT_BYTES:
                f.fp_len, f.fp = _fingerprint(head)  # new content, or grown from one line to 256 bytes
            self._read_lines(f, size)
        except OSError as exc:
            self._warn(f.path, "read failed", exc)
            return
        self.metrics.file_size.labels(f.path).set(size)
        self.metrics.file_offset.labels(f.path).set(f.offset)

    def _read_lines(self, f: _File, size: int) -> None:
        """Read ``f`` in chunks up to ``size`` (a snapshot, so a busy file cannot starve the rest).

        Each byte is scanned for newlines once, so a long line arriving in many small
        appends costs linear time; at most ``max_line_bytes`` of it are ever buffered.
        """
        cap = self.cfg.max_line_bytes
        while f.read_pos < size:
            data = os.pread(f.fd, CHUNK_BYTES, f.read_pos)
            if not data:
                break  # truncated under us; the next poll notices
            start = 0
            if f.skipping:
                start = data.find(b"\n") + 1
                if start == 0:
                    f.offset += len(data)
                    continue
                f.offset += start
                f.skipping = False
            end = data.rfind(b"\n", start) + 1  # just after the chunk's last complete line
            if end:
                parts = data[start : end - 1].split(b"\n")
                parts[0] = bytes(f.partial) + parts[0]
                lines = [p for p in parts if len(p) <= cap and not is_blank(p)]  # blank lines are skipped, as in push
                for _ in range(sum(1 for p in parts if len(p) > cap)):
                    self.reject(reasons.LINE_TOO_LONG)
                for i in range(0, len(lines), self.batch_lines):
                    self.sink(lines[i : i + self.batch_lines])
                if lines:
                    self.metrics.file_lines.labels(f.path).inc(len(lines))
                    self._delivered += len(lines)
                f.offset += len(f.partial) + end - start
                f.partial = bytearray()
                start = end
            f.partial += data[start:]
            if len(f.partial) > cap:  # rejected now; the rest of it is skipped, not buffered
                self.reject(reasons.LINE_TOO_LONG)
                f.offset += len(f.partial)
                f.partial, f.skipping = bytearray(), True

    def _drop(self, f: _File) -> None:
        """Stop following a file that no longer matches the globs (already drained)."""
        del self._files[f.key]
        try:
            os.close(f.fd)
        except OSError:
            pass

    def _warn(self, path: str, what: str, exc: OSError) -> None:
        """Log a per-file problem at most once per path per ERROR_LOG_INTERVAL_SECONDS."""
        now = time.monotonic()
        if now - self._logged_at.get(path, -ERROR_LOG_INTERVAL_SECONDS) >= ERROR_LOG_INTERVAL_SECONDS:
            self._logged_at[path] = now
            self.log.warning("%s: %s: %s", path, what, exc.strerror or type(exc).__name__)

    # -- notifications and shutdown ---------------------------------------------
    def watch(self, wake: threading.Event) -> None:
        """In ``notify`` mode, set ``wake`` on any change in the globs' directories.

        Directories that do not exist (yet) are not watched: the periodic rescan still
        picks up their files. In ``poll`` mode this does nothing.
        """
        if self.cfg.mode != "notify" or self._observer is not None:
            return
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type not in _QUIET_EVENTS:
                    wake.set()

        observer = Observer()
        observer.daemon = True
        observer.start()  # first, so that one failing directory cannot fail the others
        handler = _Wake()
        watched = 0
        for directory, recursive in _watch_dirs(self.cfg.paths).items():
            if not os.path.isdir(directory):
                self.log.warning("cannot watch %s: not a directory; relying on the periodic rescan", directory)
                continue
            try:
                observer.schedule(handler, directory, recursive=recursive)
                watched += 1
            except OSError as exc:
                self.log.warning("cannot watch %s (%s); relying on the periodic rescan", directory, exc.strerror or exc)
        if watched:
            with self._lock:
                self._observer = observer
        else:
            observer.stop()
            observer.join(timeout=5)

    def close(self) -> None:
        """Stop the observer and close every fd.

        Positions are kept, so :meth:`save_offsets` after ``close`` still saves them, and a
        later :meth:`poll_once` resumes where this left off.
        """
        with self._lock:
            observer, self._observer = self._observer, None
        if observer is not None:  # first, so closing our fds raises no inotify events mid-stop
            observer.stop()
            observer.join(timeout=5)
        with self._lock:
            for f in list(self._files.values()):
                self._saved[f.key] = _saved_of(f)
                self._drop(f)


def _saved_of(f: _File) -> _Saved:
    return _Saved(offset=f.offset, skipping=f.skipping, fp_len=f.fp_len, fp=f.fp, path=f.path)


def _parse_checkpoint(raw: bytes) -> dict[Key, _Saved]:
    """Validate and decode a checkpoint; raises ValueError (or KeyError/TypeError) if unusable."""

    def nat(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError("expected a non-negative integer")
        return value

    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"not a version {CHECKPOINT_VERSION} offset checkpoint")
    saved: dict[Key, _Saved] = {}
    for e in doc["files"]:
        fp, fp_len = e["fingerprint"], nat(e["fingerprint_bytes"])
        if not (fp is None or isinstance(fp, str)) or fp_len > FINGERPRINT_BYTES:
            raise ValueError("bad fingerprint")
        saved[(nat(e["dev"]), nat(e["ino"]))] = _Saved(
            offset=nat(e["offset"]), skipping=bool(e.get("skipping", False)), fp_len=fp_len, fp=fp, path=str(e.get("path", ""))
        )
    return saved


def _watch_dirs(patterns: list[str]) -> dict[str, bool]:
    """Directory to watch for each glob -> whether recursively (wildcards in the directory part)."""
    dirs: dict[str, bool] = {}
    for pattern in patterns:
        parent = os.path.dirname(os.path.expanduser(pattern)) or "."
        base = parent
        while _MAGIC.search(base):
            base = os.path.dirname(base) or "."
        key = os.path.abspath(base)
        dirs[key] = dirs.get(key, False) or base != parent
    return dirs
