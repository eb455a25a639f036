"""Reaction: what a gateway needs to act on verdicts, and what an operator needs to override them.

:class:`Reaction` holds the operators' overrides (:mod:`exporter.overrides`), releases and
blocks clients (:meth:`Reaction.release`, :meth:`Reaction.block`: lists of clients, so
that a linked group can be acted on as one), says whether a client is blocked
(:meth:`Reaction.block_state`) and, with ``reaction.enabled``, runs the decision endpoint
(:class:`DecisionProcess`, :mod:`exporter.decision`).

**Blocked** means: flagged (the sticky verdict, :mod:`exporter.verdict`) and not
released, or blocked by hand and not released. A flagged client evicted from the store
stays blocked while its flag would hold (``verdict.hold_seconds`` after its last flag),
from the recently-flagged record.

**The decision table** (client -> until) is derived from the verdicts and the overrides,
and published to the decision process only when either changes (``Verdicts.version``,
``Overrides.version``): a publisher thread checks every :data:`PUBLISH_EVERY` seconds,
under the pipeline's lock for the verdicts (a moment), and sends the difference. While it
gets the lock it also confirms the table as fresh, at least every second; if it cannot
(ingestion stuck inside a batch, or the exporter hung), the decision process calls the
table stale after ``reaction.stale_seconds`` and answers by ``reaction.on_error``.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Iterable, Sequence

from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter import decision
from exporter.logutil import printable
from exporter.overrides import ACTIONS, BLOCK, RELEASE, FILE, Override, OverrideError, Overrides, block_until

if TYPE_CHECKING:
    from exporter.config import ReactionConfig, Settings
    from exporter.pipeline import Pipeline
    from exporter.verdict import FlagRecord, RecentFlag

log = logging.getLogger("monitaur.reaction")

PUBLISH_EVERY = 0.1  # seconds between checks for changed flags or overrides
CONFIRM_EVERY = 1.0  # seconds between confirmations of an unchanged table
READER_GRACE = 2.0  # seconds a restart waits for the ended process's last report of its counts
LOCK_WAIT = 1.0  # the longest the publisher waits for the pipeline's lock at a time


@dataclass(frozen=True, slots=True)
class BlockState:
    """Whether a client is blocked now, and why.

    ``blocked``: by its flag or by hand (the allowlist aside); ``until``: when the block
    ends if nothing changes (None: while the flag holds, or until released);
    ``source``: ``verdict`` or ``manual`` (the later-ending one when both);
    ``allowlisted``: in ``reaction.allowlist``, so never blocked by the endpoint.
    """

    blocked: bool
    source: str | None
    until: float | None
    allowlisted: bool
    manual: Override | None


class Reaction:
    """Overrides, block states and (with ``reaction.enabled``) the decision process of one pipeline."""

    def __init__(self, settings: "Settings", pipeline: "Pipeline") -> None:
        self.config = settings.reaction
        self.pipeline = pipeline
        self.hold = settings.verdict.hold_seconds
        state_dir = settings.state.dir
        self.overrides = Overrides(state_dir / FILE if state_dir is not None else None, self.config.max_manual_blocks)
        self.allowlist = frozenset(self.config.allowlist)
        r = pipeline.metrics.registry
        self.overrides_total = Counter("monitaur_overrides", "Operators' overrides through the clients API, by action (block, release).", ["action"], registry=r)
        for action in ACTIONS:
            self.overrides_total.labels(action)
        self.decisions = DecisionProcess(self.config, settings.log_level, self) if self.config.enabled else None
        r.register(DecisionCollector(self))

    # -- life -----------------------------------------------------------------------------
    def start(self) -> None:
        """Load the saved overrides, apply again releases a restored snapshot predates, start the decision endpoint."""
        self.overrides.load()
        self._reapply_releases()
        if self.decisions is not None:
            self.decisions.start()

    def stop(self) -> None:
        if self.decisions is not None:
            self.decisions.stop()

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the decision endpoint listens (None when it is disabled)."""
        return self.decisions.address if self.decisions is not None else None

    def _reapply_releases(self) -> None:
        """A release answered before a crash may be missing from the snapshot restored: its flag (same first time) is open again."""
        view = self.pipeline.view
        for r in self.overrides.releases():
            flag = _open_flag(view.client(r.client), view.recently_flagged_one(r.client))
            if flag is not None and flag.first_at == r.flag_first_at:
                self.pipeline.release(r.client, r.who, r.reason)
                log.info("release of client %s by %s applied again (the snapshot restored predates it)", r.client, r.who)

    # -- overrides ------------------------------------------------------------------------
    def release(self, clients: Sequence[str], who: str, reason: str, group: str | None = None) -> tuple[list[Override], bool]:
        """Release ``clients``: clear their flags (restarting their detector state) and end their manual blocks.

        Returns the records of the clients that had something to release, and whether
        they were saved. A client with neither a flag nor a block is left out.
        """
        now = self.pipeline.clock()
        released: list[tuple[str, float | None]] = []
        for client in clients:
            flag = self.pipeline.release(client, who, reason)  # logs the release of a flag, with who and why
            if flag is not None:
                released.append((client, flag.first_at))
            elif self.overrides.block_of(client, now) is not None:
                released.append((client, None))
                log.info("client %s: manual block ended by %s: %s", client, who, printable(reason))
        if not released:
            return [], True
        records, saved = self.overrides.release(released, who, reason, now, group)
        self.overrides_total.labels(RELEASE).inc(len(records))
        return records, saved

    def block(self, clients: Sequence[str], who: str, reason: str, group: str | None = None) -> tuple[list[Override], bool]:
        """Block ``clients`` by hand for ``reaction.block_seconds`` (or until released).

        Raises :class:`OverrideError`: ``allowlisted`` (an allowlisted client is never
        blocked), ``too_many_blocks``.
        """
        listed = [c for c in clients if c in self.allowlist]
        if listed:
            raise OverrideError("allowlisted", f"{len(listed)} of the clients are in reaction.allowlist, which is never blocked")
        now = self.pipeline.clock()
        records, saved = self.overrides.block(clients, who, reason, now, block_until(now, self.config.block_seconds), group)
        self.overrides_total.labels(BLOCK).inc(len(records))
        for r in records:
            until = "until released" if r.until is None else f"for {r.until - r.at:.0f} s"
            log.info("client %s blocked by %s %s: %s", r.client, r.who, until, printable(r.reason))
        return records, saved

    # -- block state ----------------------------------------------------------------------
    def verdict_until(self, tracked_flagged: bool, recent: "RecentFlag | None") -> float | None:
        """Until when a client's flag blocks it: ``inf`` while a tracked client's flag holds; an evicted
        client's flag while its hold lasts (its last flag + ``verdict.hold_seconds``); None if not flagged."""
        if tracked_flagged:
            return math.inf
        if recent is not None and recent.flag.open:
            return recent.flag.last_at + self.hold
        return None

    def block_state(self, client: str, tracked_flagged: bool, recent: "RecentFlag | None") -> BlockState:
        """A client's block state now (the same rule as the decision table's)."""
        now = self.pipeline.clock()
        by_flag = self.verdict_until(tracked_flagged, recent)
        if by_flag is not None and by_flag <= now:
            by_flag = None
        manual = self.overrides.block_of(client, now)
        by_hand = (math.inf if manual.until is None else manual.until) if manual is not None else None
        ends = [t for t in (by_flag, by_hand) if t is not None]
        if not ends:
            return BlockState(False, None, None, client in self.allowlist, None)
        source = "manual" if by_hand is not None and (by_flag is None or by_hand > by_flag) else "verdict"
        until = max(ends)
        return BlockState(True, source, None if math.isinf(until) else until, client in self.allowlist, manual)

    def table(self, since: tuple[int, int] | None = None) -> tuple[tuple[int, int], dict[str, float] | None] | None:
        """The decision table (client -> until) with what it depends on (the verdicts' and the
        overrides' versions); the table is None if those are still ``since``. None if the
        pipeline's lock is not free within :data:`LOCK_WAIT` (then nothing is confirmed)."""
        lock = self.pipeline.lock
        if not lock.acquire(timeout=LOCK_WAIT):
            return None
        try:
            version = (self.pipeline.verdicts.version, self.overrides.version)
            if version == since:
                return version, None
            tracked, recent = self.pipeline.view.flagged_ids()
        finally:
            lock.release()
        out = dict.fromkeys(tracked, math.inf)
        for client, last_at in recent:
            out.setdefault(client, last_at + self.hold)
        for client, b in self.overrides.blocks(self.pipeline.clock()).items():
            until = math.inf if b.until is None else b.until
            out[client] = max(until, out.get(client, until))
        return version, out


def _open_flag(summary: Any, recent: "RecentFlag | None") -> "FlagRecord | None":
    if summary is not None and summary.flag is not None and summary.flag.open:
        return summary.flag
    if recent is not None and recent.flag.open:
        return recent.flag
    return None


def table_change(old: dict[str, float], new: dict[str, float]) -> tuple[dict[str, float], list[str]]:
    """What turns ``old`` into ``new``: entries set (new or changed) and clients removed."""
    set_ = {c: u for c, u in new.items() if old.get(c) != u}
    unset = [c for c in old if c not in new]
    return set_, unset


def _zero_counts() -> dict[str, dict[str, int]]:
    return {"decisions": dict.fromkeys(decision.DECISIONS, 0), "errors": dict.fromkeys(decision.ERRORS, 0)}


def _wire(table: dict[str, float]) -> dict[str, float | None]:
    return {c: (None if math.isinf(u) else u) for c, u in table.items()}


class DecisionProcess:
    """The decision endpoint's process (:mod:`exporter.decision`): started, fed and restarted by the exporter.

    The exporter owns the listening socket, so the process can be restarted without
    refusing a connection (they wait in the backlog). A publisher thread sends the
    decision table when it changes, confirms it while it is current, and restarts the
    process if it dies; a reader thread collects its counts.
    """

    def __init__(self, config: "ReactionConfig", log_level: str, reaction: Reaction) -> None:
        self.config = config
        self.reaction = reaction
        self.child_config = decision.DecisionConfig(
            mode=config.mode, client_header=config.client_header, secret_header=config.secret_header, secret=config.shared_secret(),
            allowlist=tuple(config.allowlist), on_error=config.on_error, stale_seconds=config.stale_seconds,
            cache_seconds=config.cache_seconds, max_connections=config.listen.max_connections,
            header_timeout=config.listen.header_timeout_seconds, idle_timeout=config.listen.idle_timeout_seconds, log_level=log_level,
        )
        self.sock: socket.socket | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.published: dict[str, float] | None = None  # the table the process has
        self.table_size = 0
        self.restarts = 0
        self._version: tuple[int, int] | None = None
        self._confirmed = 0.0
        self._base = _zero_counts()  # the counts of the processes that ended
        self._current = _zero_counts()  # the running process's own (each process reports its totals)
        self._reader: threading.Thread | None = None
        self._counts_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self.sock is not None
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind the listener (an error here stops the exporter's start, as for the main port), start the process and the publisher."""
        listen = self.config.listen
        family = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM)[0][0]
        self.sock = socket.create_server((listen.host, listen.port), family=family, backlog=1024)
        self.sock.set_inheritable(True)
        self._spawn()
        self._publish()  # the first table before anyone asks, where the lock allows
        self._thread = threading.Thread(target=self._run, name="monitaur-decision-publisher", daemon=True)
        self._thread.start()
        host, port = self.address
        log.info("decisions for gateways on http://%s:%d (mode %s, on_error %s, cache %d s)", host, port, self.config.mode,
                 self.config.on_error, self.config.cache_seconds)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        proc = self.proc
        if proc is not None:
            try:
                assert proc.stdin is not None
                proc.stdin.close()  # the process exits at the end of its input
            except OSError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.sock is not None:
            self.sock.close()

    # -- the process ------------------------------------------------------------------------
    def _spawn(self) -> None:
        assert self.sock is not None
        fd = self.sock.fileno()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter.decision", str(fd)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(fd,), close_fds=True,
        )
        self.published = None
        self._send({"config": self.child_config.as_dict()})
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read_counts, args=(self.proc.stdout, self._current), name="monitaur-decision-counts", daemon=True)
        self._reader.start()

    def _send(self, msg: dict[str, Any]) -> bool:
        proc = self.proc
        if proc is None or proc.stdin is None:
            return False
        try:
            proc.stdin.write(json.dumps(msg).encode() + b"\n")
            proc.stdin.flush()
        except (OSError, ValueError):
            return False  # the process died: the publisher restarts it
        return True

    def _read_counts(self, out: IO[bytes], into: dict[str, dict[str, int]]) -> None:
        """Keep the totals a process reports, line by line, in ``into`` (that process's own counts)."""
        for line in out:
            try:
                counts = json.loads(line)
                fresh = {k: {n: int(v) for n, v in counts[k].items() if n in into[k]} for k in ("decisions", "errors")}
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            with self._counts_lock:
                for k in fresh:
                    into[k].update(fresh[k])

    def counts(self) -> dict[str, dict[str, int]]:
        """Decisions and errors since the exporter started, over every run of the process."""
        with self._counts_lock:
            return {k: {n: self._base[k][n] + self._current[k][n] for n in self._base[k]} for k in self._base}

    def _restart(self) -> None:
        proc = self.proc
        code = proc.returncode if proc is not None else None
        log.error("the decision process exited (code %s); starting it again", code)
        if self._reader is not None:
            self._reader.join(timeout=READER_GRACE)  # its last report, written before it exited
        with self._counts_lock:
            # A report read after this goes to the old process's dict, which nobody reads any
            # more: a few decisions may go uncounted, but the totals never go down or double.
            for k in self._base:
                for n in self._base[k]:
                    self._base[k][n] += self._current[k][n]
            self._current = _zero_counts()
        self.restarts += 1
        self._version = None
        self._spawn()

    # -- publishing ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(PUBLISH_EVERY):
            try:
                if self.proc is not None and self.proc.poll() is not None:
                    self._restart()
                self._publish()
            except Exception:  # never let the publisher die: decisions would go stale
                log.exception("publishing decisions failed")

    def _publish(self) -> None:
        """Send the table if flags or overrides changed since, else confirm it (at most every second)."""
        found = self.reaction.table(self._version if self.published is not None else None)
        if found is None:
            return  # the pipeline's lock is busy: no confirmation, the table may go stale
        version, table = found
        now = time.monotonic()
        if table is not None:
            if self.published is None:
                sent = self._send({"table": _wire(table)})
            else:
                set_, unset = table_change(self.published, table)
                sent = self._send({"set": _wire(set_), "unset": unset}) if set_ or unset else self._send({"fresh": 1})
            if sent:
                self.published, self._version, self._confirmed = table, version, now
                self.table_size = len(table)
        elif now - self._confirmed >= CONFIRM_EVERY and self._send({"fresh": 1}):
            self._confirmed = now


class DecisionCollector(Collector):
    """``monitaur_decisions_total{decision}``, ``monitaur_decision_errors_total{reason}`` (every value from 0)
    and ``monitaur_decision_table_clients``, from the decision process's reports."""

    def __init__(self, reaction: Reaction) -> None:
        self.reaction = reaction

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable:
        d = self.reaction.decisions
        counts = d.counts() if d is not None else _zero_counts()
        decisions = CounterMetricFamily(
            "monitaur_decisions", "Answers of the decision endpoint for gateways, by decision (see docs/reaction.md).", labels=["decision"]
        )
        for name in decision.DECISIONS:
            decisions.add_metric([name], counts["decisions"][name])
        errors = CounterMetricFamily(
            "monitaur_decision_errors", "Decision requests answered by reaction.on_error (or refused), by reason.", labels=["reason"]
        )
        for name in decision.ERRORS:
            errors.add_metric([name], counts["errors"][name])
        table = GaugeMetricFamily("monitaur_decision_table_clients", "Blocked clients in the decision table published to the endpoint.")
        table.add_metric([], d.table_size if d is not None else 0)
        return [decisions, errors, table]
