"""Passive tailing of JSON-lines files: globs, rotation, copytruncate and offset checkpoints.

The tailer has no thread of its own: the app calls :meth:`Tailer.poll_once` from its
ingest loop on a timer, and sooner when the optional watchdog observer started by
:meth:`Tailer.watch` signals a change. The periodic rescan is what guarantees progress;
notifications only cut latency.

**Identity.** A file is identified by ``(st_dev, st_ino)`` and read through its own open
descriptor, so a renamed file is still read to its end. A fingerprint of its first bytes
tells a known file from a new one that reused its inode, and notices a copytruncate that
was refilled before we looked. Only complete lines are delivered, and a saved offset
never points inside a line that was delivered.

**Origin.** Each file carries its *origin*: the tailed path (matched by ``files.paths``)
at which it was first seen. Its line, rotation and truncation counters are labelled by
the origin, so that they survive renames.

**Rotation.** Rotated files are found again under their logrotate names, in the origin's
directory and in ``files.rotated_dirs``: ``<name>.<suffix>``, ``<name>-<suffix>``,
``<name>_<suffix>``, and ``<stem>.<suffix><ext>`` (logrotate's ``extension``), where the
suffix starts with a digit (``.1``, ``-20261205``, ``.2026-12-05_10``). Compressed names
never match.

- A file renamed away from its tailed path is followed through its descriptor until it
  has had no new bytes for ``files.rotated_idle_seconds``, so lines written after the
  rename are read. It is then closed; its position is kept while it is still there under
  a rotated name, and it is opened again if it grows.
- A file under a rotated name that was never seen is read from the start: it was
  created and rotated away between two polls, or while the exporter was down. Two kinds
  are not read: a copy of a known file (same first bytes: copytruncate's copy, or a
  backup), and anything there when its origin is first seen (history, as at a first start).
  A copy is never read on its own, even as it grows (it may be caught half-written), and is
  marked as one in checkpoints; an empty rotated file is judged once it has bytes. A listed
  file is read through a descriptor checked to be that (device, inode), never by a path that
  the writer may have renamed another file onto since the listing.
- Copytruncate: when a file is truncated (or its first bytes change), the unread rest of
  its old content is read from the copy, the rotated file that starts with the same bytes,
  before the file is read again from the start. Only lines written between the copy and
  the truncate are lost, in neither file: that is copytruncate's own race.

**Durability.** A full checkpoint (state and offsets, :mod:`exporter.persist`) saves
positions that match the state written with it: :meth:`offsets_snapshot`, confirmed
with ``commit`` once written. Each file also keeps its *durable* position: the one that
matches the last state written (the checkpoint's, or where this process started reading
a file seen since). Any change to the set of files, their places or their contents (a
rotation, a truncation, a new file) is recorded at once, before any line of the poll is
delivered, by calling :attr:`Tailer.on_change`, which writes :meth:`durable_offsets`. A
restart after SIGKILL then reads again exactly what the restored state lacks, wherever
rotation has moved it.

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
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from exporter import reasons
from exporter.atomic import atomic_write_bytes
from exporter.config import FilesConfig
from exporter.jsonparse import is_blank
from exporter.metrics import Metrics

CHUNK_BYTES = 1024 * 1024
POLL_BUDGET_BYTES = 4 * 1024 * 1024  # read per poll (~1 s of work), so that a backlog cannot hold off checkpoints, health or a stop
FINGERPRINT_BYTES = 256
CHECKPOINT_VERSION = 2  # 2 added origins; version 1 checkpoints are read too
ERROR_LOG_INTERVAL_SECONDS = 60.0
MAX_REMEMBERED_PATHS = 10_000
FAMILY_RESCAN_SECONDS = 10.0
COPY_CHECK_BYTES = 4096  # compared, besides the first bytes, to tell a copy from a file that starts alike  # rotated names are also listed whenever the tailed paths change
# Our own opens and reads of watched files must not wake the ingest loop.
_QUIET_EVENTS = frozenset({"opened", "closed_no_write"})
_MAGIC = re.compile(r"[*?[]")
# What follows a rotated file's name (or stem): a separator, then a digit, then date/number characters.
_SUFFIX = re.compile(r"[0-9][0-9.\-_:TZ]*")
_EXT = re.compile(r"\.[A-Za-z][A-Za-z0-9]*")
_SEPARATORS = ".-_"
_COMPRESSED = frozenset({".gz", ".bz2", ".xz", ".zst", ".lz4", ".lzma", ".lzo", ".z", ".zip", ".br"})

Key = tuple[int, int]  # (st_dev, st_ino)
FpIndex = dict[int, dict[str, list[tuple[Key, str]]]]  # fingerprint length -> fingerprint -> [(file, its path)]


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


def _best_fingerprint(durable: _Pos, current: _Pos) -> _Pos:
    """``durable`` with ``current``'s fingerprint if longer: both are of the same content, fingerprinted as it grew."""
    if current.fp_len > durable.fp_len:
        return _Pos(durable.offset, durable.skipping, current.fp_len, current.fp)
    return durable


def _starts_with(head: bytes, fp_len: int, fp: str | None) -> bool:
    """Whether ``head`` begins with the content fingerprinted as ``(fp_len, fp)``."""
    return fp is not None and len(head) >= fp_len and _hash(head[:fp_len]) == fp


def _changed_since(path: str, key: Key, size: int, pos: _Pos, verify: bool) -> bool:
    """Whether a file we closed at ``pos``, ``size`` bytes now, must be opened again to be read.

    It must if it was written to or truncated since: its size changed, or it is shorter than
    its fingerprint (truncated, even back to the size we had read to). With ``verify``,
    also if its first bytes changed at the same size (one more read per file). Without it,
    a closed file truncated and refilled to exactly its size is not noticed.
    """
    if size != pos.offset or size < pos.fp_len:
        return True
    if not verify or pos.fp is None:
        return False
    head = _read_head(path, key)
    return head is not None and not _starts_with(head, pos.fp_len, pos.fp)


def rotated_origins(name: str) -> list[str]:
    """The file names of which ``name`` can be a rotated copy (see the module docstring).

    ``app.jsonl.1`` -> ``app.jsonl``; ``app.jsonl-20261205`` -> ``app.jsonl``;
    ``app-20261205.jsonl`` -> ``app.jsonl`` (logrotate's ``extension``); ``app.jsonl.1.gz`` -> none.
    A name with several separators has several candidates (``app.jsonl.2026-12-05``: also
    ``app.jsonl.2026``); the caller looks them up among the tailed names.
    """
    out: list[str] = []
    for i in range(1, len(name) - 1):
        if name[i] not in _SEPARATORS or not name[i + 1].isdigit():
            continue
        base, rest = name[:i], name[i + 1 :]
        if _SUFFIX.fullmatch(rest):
            out.append(base)
        for m in _EXT.finditer(rest):
            if m.end() == len(rest) and m.group().lower() not in _COMPRESSED and _SUFFIX.fullmatch(rest[: m.start()]):
                out.append(base + m.group())
    return out


@dataclass(slots=True)
class _Pos:
    """A position in one content of a file, with the fingerprint of that content."""

    offset: int
    skipping: bool
    fp_len: int
    fp: str | None


@dataclass(eq=False)
class _File:
    """A followed file: its open fd and how far it has been consumed."""

    path: str  # where it is now, as far as we know
    origin: str  # the tailed path it was first seen at: the label of its counters
    fd: int
    key: Key
    durable: _Pos  # where a restart from the last written state would resume this content
    gen: int  # identifies the content: a new number when it is replaced (copytruncate)
    offset: int = 0  # every byte before it was delivered or rejected; what is checkpointed
    partial: bytearray = field(default_factory=bytearray)  # incomplete last line, starting at offset
    skipping: bool = False  # inside a rejected over-long line: discard up to its newline
    fp_len: int = 0
    fp: str | None = None
    size: int = 0  # at the last look
    rotated: bool = False  # no longer at a tailed path: followed until idle
    active_at: float = 0.0  # monotonic time of its last new bytes (or of its rotation)
    progress_at: float = 0.0  # monotonic time it last had nothing unread, or its position advanced

    @property
    def read_pos(self) -> int:
        return self.offset + len(self.partial)

    def pos(self) -> _Pos:
        return _Pos(self.offset, self.skipping, self.fp_len, self.fp)


@dataclass(eq=False)
class _Known:
    """A known file without an open descriptor: restored from a checkpoint, rotated and idle, a copy, or history."""

    pos: _Pos
    durable: _Pos
    path: str
    origin: str
    gen: int
    copy: bool = False  # a copy of content we know: never read on its own, even as it grows (it may still be being copied)


@dataclass(frozen=True)
class OffsetsSnapshot:
    """Positions copied for a full checkpoint: ``data`` to write, ``commit()`` once it is written with its state."""

    data: bytes
    commit: Callable[[], None]


@dataclass(frozen=True)
class Progress:
    """A tailed file with unread bytes: how many, and since when nothing of it has been read."""

    path: str
    unread_bytes: int
    since: float  # time.monotonic()


class Tailer:
    """Follows the files matching ``cfg.paths`` and hands their complete lines to ``sink``.

    ``sink`` receives lists of at most ``batch_lines`` lines (bytes, newline stripped;
    blank lines, empty or only whitespace, skipped). ``reject`` is called with a reason
    for each line that is dropped. Methods are safe to call from different threads (one
    lock); ``sink`` and :attr:`on_change` are called with that lock held, and ``sink``
    should not raise: if it does, the exception propagates and the lines of the chunk
    being delivered may be delivered again.
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
        # Called (lock held) when the known files change, to record durable_offsets() at once.
        self.on_change: Callable[[], None] | None = None
        # Files with unread bytes after the last poll; replaced whole, so readable without the lock.
        self.progress: tuple[Progress, ...] = ()
        self.more = False  # the last poll stopped at its budget: poll again at once
        self._files: dict[Key, _File] = {}
        self._known: dict[Key, _Known] = {}
        self._path_keys: dict[str, Key] = {}  # last file seen at each path, to count rotations
        self._glob_seen: dict[Key, str] = {}  # the last glob scan, to notice changes
        self._copies: dict[tuple[Key, int], Key] = {}  # (file, content replaced) -> the copy holding its rest
        self._commits: deque[dict[Key, tuple[int, _Pos]]] = deque()
        self._checkpoint_version: int | None = None  # of the checkpoint loaded; None: first start
        self._polled = False
        self._family_due = 0.0
        self._changed = False
        self._gen = 0
        self._origins: set[str] = set()  # origins with counter series
        self._gauge_paths: set[str] = set()
        self._unopened: dict[str, Progress] = {}  # tailed paths that cannot be opened
        self._logged_at: dict[str, float] = {}
        self._delivered = 0
        self._observer: Any = None
        self._lock = threading.RLock()

    # -- checkpoints ----------------------------------------------------------
    def load_offsets(self, path: Path) -> None:
        """Restore positions saved by :meth:`save_offsets` or :meth:`durable_offsets`; used as files are found.

        A missing checkpoint is a first start. An unreadable or corrupt one is counted in
        ``checkpoint_errors{kind="offsets"}`` and logged, and tailing starts fresh.
        """
        try:
            version, saved = _parse_checkpoint(Path(path).read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError) as exc:
            self.metrics.checkpoint_errors.labels("offsets").inc()
            detail = exc.strerror if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            self.log.warning("offset checkpoint %s is unusable (%s); starting fresh", path, detail)
            return
        with self._lock:
            self._checkpoint_version = version
            for key, (pos, path_, origin, copy) in saved.items():
                self._known[key] = _Known(pos, pos, path_, origin, self._new_gen(), copy)
                self._path_keys[path_] = key

    def save_offsets(self, path: Path) -> None:
        """Write every file's current position atomically, as versioned JSON (:meth:`offsets_data`).

        Raises ``OSError`` if the write fails; counting that is the caller's business.
        """
        atomic_write_bytes(Path(path), self.offsets_data())

    def offsets_data(self) -> bytes:
        """Every known file's current position, as the versioned JSON :meth:`save_offsets` writes."""
        return self.offsets_snapshot().data

    def offsets_snapshot(self) -> OffsetsSnapshot:
        """Current positions for a full checkpoint; its ``commit()`` makes them the durable ones.

        Call ``commit()`` only once the state copied at the same moment is written too.
        It may be called from another thread.
        """
        with self._lock:
            self._apply_commits()
            entries = [(k, f.pos(), f.path, f.origin, False) for k, f in self._files.items()]
            entries += [(k, e.pos, e.path, e.origin, e.copy) for k, e in self._known.items()]
            positions = {k: (f.gen, f.pos()) for k, f in self._files.items()}
            positions.update((k, (e.gen, e.pos)) for k, e in self._known.items())
        return OffsetsSnapshot(_encode(entries), lambda: self._commits.append(positions))

    def durable_offsets(self) -> bytes:
        """The durable position of every known file (see the module docstring), as checkpoint JSON.

        Written alone (without a state snapshot) when the known files change: it never
        runs ahead of the state last written.
        """
        with self._lock:
            self._apply_commits()
            entries = [(k, _best_fingerprint(f.durable, f.pos()), f.path, f.origin, False) for k, f in self._files.items()]
            entries += [(k, _best_fingerprint(e.durable, e.pos), e.path, e.origin, e.copy) for k, e in self._known.items()]
        return _encode(entries)

    def _apply_commits(self) -> None:
        """Make committed positions durable: per file if its content is unchanged, else for the copy that holds it."""
        while self._commits:
            positions = self._commits.popleft()
            for key, (gen, pos) in positions.items():
                entry = self._files.get(key) or self._known.get(key)
                if entry is not None and entry.gen == gen:
                    entry.durable = pos
                    continue
                copy = self._copies.get((key, gen))  # replaced since the copy: its copy holds that content now
                target = (self._files.get(copy) or self._known.get(copy)) if copy is not None else None
                if target is not None:
                    target.durable = pos

    def _new_gen(self) -> int:
        self._gen += 1
        return self._gen

    # -- tailing --------------------------------------------------------------
    def poll_once(self) -> int:
        """Rescan the globs and rotated names and deliver every complete line now available; return how many.

        A file that fails (permission denied, vanished mid-read) is logged and skipped;
        the others are still read, and the failing one is retried on the next poll.
        """
        with self._lock:
            self._delivered = 0
            now = time.monotonic()
            self._apply_commits()
            found = self._scan()
            first, self._polled = not self._polled, True
            if first and self._checkpoint_version != CHECKPOINT_VERSION:
                seen_origins: set[str] = set()  # a first start (or an old checkpoint): every rotated file is history
            else:
                seen_origins = {f.origin for f in self._files.values()} | {e.origin for e in self._known.values()}
            fingerprints = self._fingerprints({})  # before the opens below: a replaced content's copy is still recognised
            self._follow(found, now)
            self._open_tailed(found, first, now)
            self._fingerprints(fingerprints)  # and after: a copy of a file first seen in this poll is recognised too
            if first or found != self._glob_seen or now >= self._family_due:
                self._rotated_names(found, seen_origins, fingerprints, now, verify=first)
                self._family_due = now + FAMILY_RESCAN_SECONDS
            self._glob_seen = found
            sizes = {f.key: self._check(f, now) for f in list(self._files.values())}
            if self._changed and self.on_change is not None:
                self._changed = False
                self.on_change()  # the rotation is on disk before any of its lines is delivered
            budget = POLL_BUDGET_BYTES
            for f in sorted(self._files.values(), key=lambda f: not f.rotated):  # rotated files first: older lines
                size = sizes.get(f.key)
                if size is None:
                    size = self._check(f, now)  # a copy adopted during the checks
                if size is None:
                    continue
                if budget <= 0:
                    f.progress_at = now  # waiting its turn behind a backlog, not stuck
                    continue
                before = f.read_pos
                self._read(f, min(size, f.read_pos + budget), now)
                budget -= f.read_pos - before
            self.more = budget <= 0
            self._retire_idle(now)
            self._update_series(found)
            self._publish_progress()
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

    def _fingerprints(self, out: FpIndex) -> FpIndex:
        """Add the contents we know to ``out``, by fingerprint length and fingerprint -> (file, its path): to recognise their copies."""
        entries = [(k, f.pos(), f.path) for k, f in self._files.items()] + [(k, e.pos, e.path) for k, e in self._known.items()]
        for key, pos, path in entries:
            if pos.fp is not None:
                files = out.setdefault(pos.fp_len, {}).setdefault(pos.fp, [])
                if (key, path) not in files:
                    files.append((key, path))
        return out

    def _is_copy(self, fd: int, head: bytes, fingerprints: FpIndex, where: dict[Key, str]) -> bool:
        """Whether the unknown file open as ``fd`` (first bytes ``head``) is a copy of content we know.

        Copytruncate's copy, or a backup. It is one if it starts with the bytes a followed
        file starts with now (a copy may be caught while it is being written, shorter than
        a fingerprint), or with a content we recorded (by its fingerprint). If that content
        is still in its own file, the last COPY_CHECK_BYTES they both have must match too:
        files of repetitive lines can start alike without one being a copy of the other. If
        it is gone (truncated, replaced, deleted), the first bytes are all there is to go by.
        ``where``: the files' paths as just listed (a known file's own may be out of date).
        """
        for f in self._files.values():
            if _pread(f.fd, len(head), 0) == head and _same_tail(f.fd, fd, len(head)):
                self._refingerprint(f, _pread(f.fd, FINGERPRINT_BYTES, 0) or b"")  # so that its truncation, even before we read it, shows
                return True
        for n, by_fp in fingerprints.items():
            if len(head) < n:
                continue
            for key, known_path in by_fp.get(_hash(head[:n]), ()):
                f = self._files.get(key)
                original = os.dup(f.fd) if f is not None else _open_as(where.get(key, known_path), key)
                if original is None:
                    return True  # the original is gone
                try:
                    theirs = _pread(original, n, 0)
                    if theirs is not None and (theirs != head[:n] or _same_tail(original, fd, n)):
                        return True  # its file holds other content now (truncated), or the same to its end
                finally:
                    os.close(original)
        return False

    def _follow(self, found: dict[Key, str], now: float) -> None:
        """Update where each followed file is; mark those that left the tailed paths as rotated."""
        for key, f in self._files.items():
            path = found.get(key)
            if path is not None:
                if path != f.path or f.rotated:
                    f.path, f.rotated, self._changed = path, False, True
            elif not f.rotated:
                f.rotated, f.active_at, self._changed = True, now, True
                self.log.info("%s: rotated away; following it until idle for %gs", f.path, self.cfg.rotated_idle_seconds)

    def _open_tailed(self, found: dict[Key, str], first: bool, now: float) -> None:
        """Open files at tailed paths that we do not follow yet: known ones where we left them, new ones per ``start_at``."""
        for key, path in found.items():
            if key in self._files:
                continue
            new = key not in self._known
            f = self._open(path, path, now, at_end=new and first and self._checkpoint_version is None and self.cfg.start_at == "end")
            if f is not None and new:
                before = self._path_keys.get(path)
                if before is not None and before != f.key:
                    self.metrics.file_rotations.labels(f.origin).inc()
                    self.log.info("%s: rotated; reading the new file from the start", path)

    def _rotated_names(self, found: dict[Key, str], seen_origins: set[str], fingerprints: FpIndex, now: float, verify: bool = False) -> None:
        """List the rotated names of every origin; follow what moved, reopen what grew, read what is new.

        ``verify`` (the first poll of a process): also reopen known files whose first bytes
        changed while they kept their size, so that a copytruncate refilled to the same size
        while the exporter was down is noticed. Later, only a change of size is.
        """
        family = self._list_rotated({f.origin for f in self._files.values()} | {e.origin for e in self._known.values()} | set(found.values()))
        where = {**{k: p for k, (p, _, _) in family.items()}, **found}
        for key, (path, origin, size) in family.items():
            if key in found:
                continue
            f = self._files.get(key)
            if f is not None:
                if f.path != path:
                    f.path, self._changed = path, True
                continue
            known = self._known.get(key)
            if known is not None:
                if known.path != path:
                    known.path, self._changed = path, True
                if not known.copy and _changed_since(path, key, size, known.pos, verify):
                    self._open(path, origin, now, rotated=True, expect=key)
                continue
            # Read through a descriptor of this very file: the writer may rename others onto its path meanwhile.
            fd = _open_as(path, key)
            if fd is None:
                continue  # moved or gone since the listing: seen again at the next one
            try:
                head = _pread(fd, FINGERPRINT_BYTES, 0)
                if not head:
                    continue  # unreadable, or empty: perhaps a copy just begun; decided once it has bytes
                copy = origin in seen_origins and self._is_copy(fd, head, fingerprints, where)
            finally:
                os.close(fd)
            fp_len, fp = _fingerprint(head)
            if copy or origin not in seen_origins:
                pos = _Pos(size, False, fp_len, fp)  # history, or a copy of content we know: not read
                self._known[key] = _Known(pos, pos, path, origin, self._new_gen(), copy)
                self._changed = True
            else:
                self.log.info("%s: a rotated file of %s we have not seen; reading it from the start", path, origin)
                self._open(path, origin, now, rotated=True, expect=key)
        for key in [k for k in self._known if k not in found and k not in family]:
            del self._known[key]  # gone, or out of reach: it cannot come back
            self._changed = True

    def _list_rotated(self, origins: Iterable[str]) -> dict[Key, tuple[str, str, int]]:
        """Regular files under rotated names of ``origins``: key -> (path, origin, size)."""
        by_dir: dict[str, dict[str, str]] = {}
        for origin in origins:
            d, name = os.path.split(origin)
            for rd in [d] + [os.path.join(d, os.path.expanduser(r)) for r in self.cfg.rotated_dirs]:
                by_dir.setdefault(os.path.normpath(rd), {})[name] = origin
        out: dict[Key, tuple[str, str, int]] = {}
        for d, names in by_dir.items():
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            for entry in entries:
                origin = next((names[n] for n in rotated_origins(entry.name) if n in names), None)
                if origin is None:
                    continue
                try:
                    st = entry.stat()
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    out.setdefault((st.st_dev, st.st_ino), (entry.path, origin, st.st_size))
        return out

    def _open(
        self, path: str, origin: str, now: float, at_end: bool = False, rotated: bool = False, resume: bool = True, expect: Key | None = None
    ) -> _File | None:
        """Open a file and decide where to start: where we left it if it is known (and ``resume``), else the start or end.

        A known file keeps its origin, and leaves ``_known``; if it cannot be opened, it stays
        there. With ``expect``, nothing is opened unless ``path`` still holds that file.
        """
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                self._warn(path, "cannot open", exc)
                if not rotated:
                    self._unopened.setdefault(path, Progress(path, _size(path), now))
            return None  # a known file stays known, to be tried again
        self._unopened.pop(path, None)
        try:
            st = os.fstat(fd)  # authoritative: the path may have been replaced since the scan
            key = (st.st_dev, st.st_ino)
            if key in self._files or (expect is not None and key != expect):  # renamed under us
                os.close(fd)
                return None
            head = os.pread(fd, FINGERPRINT_BYTES, 0)
        except OSError as exc:
            os.close(fd)
            self._warn(path, "cannot open", exc)
            return None
        known = self._known.pop(key, None)
        fp_len, fp = _fingerprint(head)
        start = _Pos(0, False, fp_len, fp)
        origin = known.origin if known is not None else origin
        f = _File(path, origin, fd, key, start, self._new_gen(), fp_len=fp_len, fp=fp, rotated=rotated, active_at=now, progress_at=now)
        self._files[key] = f
        self._changed = True
        self._ensure_series(origin)
        if known is not None and resume:
            self._resume(f, known, head, st.st_size)
        elif at_end:
            self._skip_to_end(f, st.st_size)
        return f

    def _resume(self, f: _File, known: _Known, head: bytes, size: int) -> None:
        """Continue where ``known`` left off if the file still holds that content; else read it again from the start."""
        pos = known.pos
        if pos.offset <= size and (pos.fp is None or _starts_with(head, pos.fp_len, pos.fp)):
            f.offset, f.skipping, f.durable, f.gen = pos.offset, pos.skipping, known.durable, known.gen
            if pos.offset:
                self.log.info("%s: resuming at byte %d", f.path, pos.offset)
            return
        if pos.offset > size or size < pos.fp_len:
            self.metrics.file_truncations.labels(f.origin).inc()
            self.log.info("%s: truncated while we were not reading it; reading it from the start", f.path)
        else:
            self.log.info("%s: a different file reuses a known inode; reading it from the start", f.path)
        self._adopt_copy(f, pos, known.durable, known.gen)

    def _skip_to_end(self, f: _File, size: int) -> None:
        """``start_at: end``: start after the last complete line, so a line being written is not cut in half."""
        start = max(0, size - self.cfg.max_line_bytes - 1)
        nl = os.pread(f.fd, size - start, start).rfind(b"\n")
        if nl >= 0:
            f.offset = start + nl + 1
        elif start > 0:  # the unfinished last line is already too long: skip its rest
            f.offset, f.skipping = size, True
        f.durable = f.pos()

    def _adopt_copy(self, f: _File, old: _Pos, durable: _Pos, gen: int) -> None:
        """After ``f``'s content ``old`` was replaced: read the rest of it from its copy under a rotated name, if any.

        The copy is a file under a rotated name that starts with the old content's bytes and
        reaches past ``old.offset`` (one we never saw first, then the largest); it is read from
        there and inherits the old content's durable position.
        """
        if old.fp is None:
            return
        best: tuple[bool, int, str, Key] | None = None
        for key, (path, _, size) in self._list_rotated([f.origin]).items():
            rank = (key not in self._known, size)  # a file we never saw first: a copy made since
            if key in self._files or size < old.offset or (best is not None and rank <= best[:2]):
                continue
            head = _read_head(path, key)
            if head is not None and _starts_with(head, old.fp_len, old.fp):
                best = (*rank, path, key)
        if best is None:
            if old.offset:
                self.log.info("%s: no copy of its old content found under a rotated name; its unread rest is lost", f.path)
            return
        _, _, path, key = best
        c = self._open(path, f.origin, f.active_at, rotated=True, resume=False, expect=key)
        if c is None:
            return
        # A new content number: positions of a checkpoint copied before now belong to f, not to c.
        c.offset, c.skipping, c.durable, c.gen = old.offset, old.skipping, durable, self._new_gen()
        self._copies[(f.key, gen)] = c.key
        while len(self._copies) > MAX_REMEMBERED_PATHS:
            del self._copies[next(iter(self._copies))]
        self.log.info("%s: reading the rest of its old content from %s, from byte %d", f.path, path, old.offset)

    def _check(self, f: _File, now: float) -> int | None:
        """Look at ``f``: its size now, after handling a truncation or replaced content; None if it cannot be read."""
        try:
            size = os.fstat(f.fd).st_size
            head = os.pread(f.fd, FINGERPRINT_BYTES, 0)
        except OSError as exc:
            self._warn(f.path, "read failed", exc)
            return None
        f.size = size
        replaced = f.fp is not None and not _starts_with(head, f.fp_len, f.fp)
        if size < f.read_pos or replaced:
            self.metrics.file_truncations.labels(f.origin).inc()
            self.log.info("%s: truncated (size %d, was at %d); reading it from the start", f.path, size, f.read_pos)
            old, durable, gen = f.pos(), f.durable, f.gen
            f.offset, f.partial, f.skipping = 0, bytearray(), False
            f.fp_len, f.fp = _fingerprint(head)
            f.gen, f.durable = self._new_gen(), _Pos(0, False, f.fp_len, f.fp)
            self._changed = True
            self._adopt_copy(f, old, durable, gen)
        else:
            self._refingerprint(f, head)
        return size

    def _refingerprint(self, f: _File, head: bytes) -> None:
        """Fingerprint ``f`` again from ``head`` (its first bytes now) if it has grown: from nothing to one line, or to 256 bytes.

        Not if ``head`` no longer starts with the content fingerprinted so far: that is a
        truncation, for :meth:`_check` to see.
        """
        if f.fp_len < FINGERPRINT_BYTES and (f.fp is None or _starts_with(head, f.fp_len, f.fp)):
            had, (f.fp_len, f.fp) = f.fp, _fingerprint(head)
            self._changed |= had is None and f.fp is not None  # the durable record can now tell this content from the next

    def _read(self, f: _File, size: int, now: float) -> None:
        """Deliver the complete lines of ``f`` up to ``size`` (at most its size at the check); update its metrics and progress."""
        before = f.read_pos
        try:
            self._read_lines(f, size)
        except OSError as exc:
            self._warn(f.path, "read failed", exc)
            return
        if f.read_pos != before:
            f.active_at = now
        if f.read_pos != before or f.read_pos >= size:
            f.progress_at = now
        self.metrics.file_size.labels(f.path).set(max(f.size, f.read_pos))
        self.metrics.file_offset.labels(f.path).set(f.offset)

    def _read_lines(self, f: _File, size: int) -> None:
        """Read ``f`` in chunks up to ``size`` (a snapshot, so a busy file cannot starve the rest).

        Each byte is scanned for newlines once, so a long line arriving in many small
        appends costs linear time; at most ``max_line_bytes`` of it are ever buffered.
        After each chunk is read, the file must still start with its fingerprinted bytes:
        a copytruncate refilled between the check and the read would otherwise hand over
        new content at the old content's offsets.
        """
        cap = self.cfg.max_line_bytes
        while f.read_pos < size:
            data = os.pread(f.fd, CHUNK_BYTES, f.read_pos)
            if not data or (f.fp is not None and not _starts_with(os.pread(f.fd, f.fp_len, 0), f.fp_len, f.fp)):
                break  # truncated (and perhaps refilled) since the check: these bytes may be new content; the next poll sees it
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
                    self.metrics.file_lines.labels(f.origin).inc(len(lines))
                    self._delivered += len(lines)
                f.offset += len(f.partial) + end - start
                f.partial = bytearray()
                start = end
            f.partial += data[start:]
            if len(f.partial) > cap:  # rejected now; the rest of it is skipped, not buffered
                self.reject(reasons.LINE_TOO_LONG)
                f.offset += len(f.partial)
                f.partial, f.skipping = bytearray(), True

    def _retire_idle(self, now: float) -> None:
        """Close rotated files read to their end and idle for ``rotated_idle_seconds``; remember those still on disk."""
        for f in [f for f in self._files.values() if f.rotated and f.read_pos >= f.size]:
            if now - f.active_at < self.cfg.rotated_idle_seconds:
                continue
            try:
                linked = os.fstat(f.fd).st_nlink > 0
            except OSError:
                linked = False
            self._close(f)
            if linked:  # forgotten at the next listing of rotated names if it is not there
                self._known[f.key] = _Known(f.pos(), f.durable, f.path, f.origin, f.gen)
            self._changed = True

    def _close(self, f: _File) -> None:
        del self._files[f.key]
        try:
            os.close(f.fd)
        except OSError:
            pass

    # -- metrics and health ---------------------------------------------------
    def _ensure_series(self, origin: str) -> None:
        """Create an origin's counters at 0, so that increase() sees its first rotation."""
        if origin not in self._origins:
            self._origins.add(origin)
            for metric in (self.metrics.file_lines, self.metrics.file_rotations, self.metrics.file_truncations):
                metric.labels(origin)

    def _update_series(self, found: dict[Key, str]) -> None:
        """Drop the series of origins and paths no longer tailed; remember which file each path holds."""
        live = {f.origin for f in self._files.values()} | set(found.values())
        for origin in self._origins - live:
            self.metrics.forget_origin(origin)
            self._logged_at.pop(origin, None)
        self._origins &= live
        paths = {f.path for f in self._files.values()}
        for path in self._gauge_paths - paths:
            self.metrics.forget_path(path)
        self._gauge_paths = paths
        for path in [p for p in self._unopened if p not in found.values()]:
            del self._unopened[path]
        for f in self._files.values():
            self._path_keys.pop(f.path, None)  # re-insert last: the oldest are trimmed first
            self._path_keys[f.path] = f.key
        while len(self._path_keys) > MAX_REMEMBERED_PATHS:
            del self._path_keys[next(iter(self._path_keys))]

    def _publish_progress(self) -> None:
        self.progress = tuple(
            Progress(f.path, f.size - f.read_pos, f.progress_at) for f in self._files.values() if f.size > f.read_pos
        ) + tuple(p for p in self._unopened.values() if p.unread_bytes > 0)

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
                self._known[f.key] = _Known(f.pos(), f.durable, f.path, f.origin, f.gen)
                self._close(f)


def _read_head(path: str, key: Key) -> bytes | None:
    """The first FINGERPRINT_BYTES bytes of the file ``key`` at ``path``; None if it cannot be read, or ``path`` holds another file now."""
    fd = _open_as(path, key)
    if fd is None:
        return None
    try:
        return _pread(fd, FINGERPRINT_BYTES, 0)
    finally:
        os.close(fd)


def _same_tail(a: int, b: int, n: int) -> bool:
    """Whether two open files, alike in their first ``n`` bytes, end alike too: the last COPY_CHECK_BYTES (after the first ``n``) both have."""
    try:
        end = min(os.fstat(a).st_size, os.fstat(b).st_size)
        start = max(n, end - COPY_CHECK_BYTES)
        return end <= start or os.pread(a, end - start, start) == os.pread(b, end - start, start)
    except OSError:
        return False


def _pread(fd: int, length: int, offset: int) -> bytes | None:
    """``os.pread``, or None if the read fails."""
    try:
        return os.pread(fd, length, offset)
    except OSError:
        return None


def _open_as(path: str, key: Key) -> int | None:
    """An fd of the file at ``path`` if it is still the file ``key``, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == key:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _encode(entries: Iterable[tuple[Key, _Pos, str, str, bool]]) -> bytes:
    files = [
        {"dev": dev, "ino": ino, "fingerprint": p.fp, "fingerprint_bytes": p.fp_len, "offset": p.offset, "skipping": p.skipping, "path": path, "origin": origin}
        | ({"copy": True} if copy else {})
        for (dev, ino), p, path, origin, copy in entries
    ]
    return json.dumps({"version": CHECKPOINT_VERSION, "files": files}, separators=(",", ":")).encode("utf-8")


def _parse_checkpoint(raw: bytes) -> tuple[int, dict[Key, tuple[_Pos, str, str, bool]]]:
    """Validate and decode a checkpoint: (version, key -> (position, path, origin, whether a copy)).

    Raises ValueError (or KeyError/TypeError) if unusable. Version 1 had no origins:
    a file's origin is then the path it was saved at. ``copy`` is optional (absent: false),
    so that older exporters still read these checkpoints.
    """

    def nat(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError("expected a non-negative integer")
        return value

    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("version") not in (1, CHECKPOINT_VERSION):
        raise ValueError(f"not a version 1 or {CHECKPOINT_VERSION} offset checkpoint")
    saved: dict[Key, tuple[_Pos, str, str, bool]] = {}
    for e in doc["files"]:
        fp, fp_len = e["fingerprint"], nat(e["fingerprint_bytes"])
        if not (fp is None or isinstance(fp, str)) or fp_len > FINGERPRINT_BYTES:
            raise ValueError("bad fingerprint")
        path = str(e.get("path", ""))
        pos = _Pos(nat(e["offset"]), bool(e.get("skipping", False)), fp_len, fp)
        saved[(nat(e["dev"]), nat(e["ino"]))] = (pos, path, str(e.get("origin") or path), e.get("copy", False) is True)
    return int(doc["version"]), saved


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
