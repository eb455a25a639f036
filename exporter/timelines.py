"""Bounded per-client timelines of the risk and every detector's value: what the forensic report draws.

:class:`TimelineRecorder` is a pipeline observer (``Pipeline(observer=...)``), used by
``replay --html`` only: the pipeline calls it once per detector and once for the fusion
stage with each client's batch and its :class:`~exporter.detectors.Signals`. It keeps,
per client and model, a downsampled series of points (the client's query index, the
event time, the fused risk and each detector's value), never an input.

Bounds, all deterministic (the same log gives the same page):

* **per series**: every event is kept until ``per_client`` points; then the sampling
  stride doubles (a point is kept when its index in the series is a multiple of the
  stride) and the points already kept are thinned to the new stride, so a series holds
  between ``per_client / 2`` and ``per_client`` points spread evenly over its history;
* **pinned points**: the first fused flag (the alarm) and each detector's first flag are
  kept whatever the stride, so the page can mark them exactly;
* **in total**: past ``max_points`` points over all series, the cap of the series that
  were never flagged halves (down to ``floor``), then that of flagged ones; if that is
  not enough, the oldest never-flagged series are dropped.

The values are stored as float32 (the page draws them on a few hundred pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from exporter.detectors import Batch, Signals
from exporter.fusion import FUSION

if TYPE_CHECKING:
    from exporter.pipeline import Pipeline

PER_CLIENT = 256  # points per series before its stride doubles
MAX_POINTS = 262_144  # points over all series (~60 B each with 9 detectors: ~16 MB)
FLOOR = 16  # a series' cap never halves below this under total pressure


@dataclass(frozen=True)
class Timeline:
    """One client's series for one model, as plain data (what :mod:`exporter.report_html` draws).

    ``query`` holds the client's query index (1-based, over all its models, as in the
    replay report) of each point, ``ts`` its event time (Unix seconds), ``risk`` the fused
    risk after it (NaN where not judged) and ``values[:, j]`` detector ``detectors[j]``'s
    value after it (NaN where the detector judged nothing yet). ``alarm`` is the query
    index of the first fused flag, ``crossings`` each detector's first flag.
    """

    model: str
    detectors: tuple[str, ...]
    query: np.ndarray
    ts: np.ndarray
    risk: np.ndarray
    values: np.ndarray
    alarm: int | None = None
    crossings: Mapping[str, int] = field(default_factory=dict)


class _Series:
    """The bounded series of one (client, model); rows are appended in query order."""

    __slots__ = ("seen", "stride", "size", "local", "query", "ts", "risk", "values", "pinned", "last", "alarm", "crossings", "columns")

    def __init__(self, columns: dict[str, int]) -> None:
        self.columns = columns  # detector -> column, shared by the model's series (grows as detectors report)
        self.seen = 0  # events of this series so far
        self.stride = 1
        self.size = 0
        cap = 16
        self.local = np.zeros(cap, dtype=np.int64)  # index of each kept point within the series
        self.query = np.zeros(cap, dtype=np.int64)
        self.ts = np.zeros(cap, dtype=np.float64)
        self.risk = np.zeros(cap, dtype=np.float32)
        self.values = np.zeros((cap, 0), dtype=np.float32)
        self.pinned: dict[int, tuple[int, float, float, np.ndarray]] = {}  # local index -> point
        self.last: tuple[int, float, float, np.ndarray] | None = None
        self.alarm: int | None = None
        self.crossings: dict[str, int] = {}

    def thin(self, cap: int) -> int:
        """Double the stride until at most ``cap`` points are kept; return how many were dropped."""
        before = self.size
        while self.size > cap:
            self.stride *= 2
            keep = np.flatnonzero(self.local[: self.size] % self.stride == 0)
            for arr in (self.local, self.query, self.ts, self.risk, self.values):
                arr[: keep.size] = arr[keep]
            self.size = keep.size
        return before - self.size

    def append(self, local: np.ndarray, query: np.ndarray, ts: np.ndarray, risk: np.ndarray, values: np.ndarray, cap: int) -> int:
        """Append points (already on the current stride); return the change in the number kept."""
        before = self.size
        if values.shape[1] > self.values.shape[1]:
            self.values = np.pad(self.values, ((0, 0), (0, values.shape[1] - self.values.shape[1])), constant_values=np.nan)
        k = local.size
        need = self.size + k
        if need > self.local.shape[0]:
            grow = max(need, 2 * self.local.shape[0])
            self.local, self.query, self.ts, self.risk, self.values = (
                _grown(a, grow, self.size) for a in (self.local, self.query, self.ts, self.risk, self.values)
            )
        s = slice(self.size, need)
        self.local[s], self.query[s], self.ts[s], self.risk[s] = local, query, ts, risk
        self.values[s] = np.nan
        self.values[s, : values.shape[1]] = values
        self.size = need
        self.thin(cap)
        return self.size - before

    def timeline(self, model: str) -> Timeline:
        """The series as a :class:`Timeline`: kept, pinned and last points, in query order."""
        m = len(self.columns)
        rows: dict[int, tuple[int, float, float, np.ndarray]] = {}
        vals = self.values[: self.size]
        for i in range(self.size):
            rows[int(self.local[i])] = (int(self.query[i]), float(self.ts[i]), float(self.risk[i]), vals[i])
        rows.update(self.pinned)
        if self.last is not None:
            rows[self.seen - 1] = self.last
        order = sorted(rows)
        values = np.full((len(order), m), np.nan, dtype=np.float32)
        for i, key in enumerate(order):
            v = rows[key][3]
            values[i, : v.shape[0]] = v
        names = tuple(sorted(self.columns, key=self.columns.__getitem__))
        return Timeline(
            model=model,
            detectors=names,
            query=np.array([rows[k][0] for k in order], dtype=np.int64),
            ts=np.array([rows[k][1] for k in order], dtype=np.float64),
            risk=np.array([rows[k][2] for k in order], dtype=np.float32),
            values=values,
            alarm=self.alarm,
            crossings=dict(self.crossings),
        )


def _grown(arr: np.ndarray, rows: int, used: int) -> np.ndarray:
    """A copy of ``arr`` with room for ``rows`` rows, its first ``used`` rows kept."""
    out = np.empty((rows, *arr.shape[1:]), dtype=arr.dtype)
    out[:used] = arr[:used]
    return out


class TimelineRecorder:
    """Pipeline observer that keeps bounded per-client timelines (see the module docstring).

    The pipeline calls it for each detector's signals of a batch, then for the fusion's
    (:data:`exporter.fusion.FUSION`), so a batch is complete when its fusion call comes;
    a batch without one (a model whose verdict has no inputs) is completed when the next
    batch arrives, or by :meth:`finish`. Call :meth:`finish` with the pipeline once the
    replay is over: it records each model's thresholds and the flagged clients' peers.
    """

    def __init__(self, per_client: int = PER_CLIENT, max_points: int = MAX_POINTS, floor: int = FLOOR) -> None:
        if not 1 <= floor <= per_client <= max_points:
            raise ValueError("need 1 <= floor <= per_client <= max_points")
        self.per_client = per_client
        self.max_points = max_points
        self.floor = floor
        self.cap_quiet = per_client  # cap of series never flagged
        self.cap_flagged = per_client
        self.points = 0  # kept points over all series (pinned and last points not counted: at most 2 + detectors per series)
        self.dropped_series = 0
        self._series: dict[tuple[str, str], _Series] = {}
        self._columns: dict[str, dict[str, int]] = {}  # model -> detector -> column
        self._queries: dict[str, int] = {}  # client -> queries so far (the report's query index)
        self._batch: Batch | None = None
        self._signals: dict[str, Signals] = {}
        self.models: dict[str, dict[str, Any]] = {}  # model -> thresholds and verdict inputs (finish)
        self.peers: dict[str, dict[str, int]] = {}  # flagged client -> peer -> matches (finish)

    # -- the observer --------------------------------------------------------------------
    def __call__(self, batch: Batch, name: str, signals: Signals) -> None:
        if batch is not self._batch:
            self._flush()
            self._batch = batch
        if name == FUSION:
            self._flush(signals)
        else:
            self._signals[name] = signals

    def _flush(self, fused: Signals | None = None) -> None:
        batch, signals = self._batch, self._signals
        self._batch, self._signals = None, {}
        if batch is None:
            return
        n = len(batch)
        base = self._queries.get(batch.client, 0)
        self._queries[batch.client] = base + n
        key = (batch.client, batch.model)
        columns = self._columns.setdefault(batch.model, {})
        for name in signals:
            columns.setdefault(name, len(columns))
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = _Series(columns)
        local = s.seen + np.arange(n)
        s.seen += n
        query = base + 1 + np.arange(n)
        risk = fused.values if fused is not None else np.full(n, np.nan)
        values = np.full((n, len(columns)), np.nan, dtype=np.float32)
        for name, sig in signals.items():
            values[:, columns[name]] = sig.values
        ts = np.fromiter((e.ts for e in batch.events), dtype=np.float64, count=n)

        def point(i: int) -> tuple[int, float, float, np.ndarray]:
            return int(query[i]), float(ts[i]), float(risk[i]), values[i].copy()

        if fused is not None and s.alarm is None and (hits := np.flatnonzero(fused.flagged)).size:
            s.alarm = int(query[hits[0]])
            s.pinned[int(local[hits[0]])] = point(int(hits[0]))
        for name, sig in signals.items():
            if name not in s.crossings and (hits := np.flatnonzero(sig.flagged)).size:
                s.crossings[name] = int(query[hits[0]])
                s.pinned[int(local[hits[0]])] = point(int(hits[0]))
        s.last = point(n - 1)
        keep = np.flatnonzero(local % s.stride == 0)
        cap = self.cap_flagged if s.alarm is not None else self.cap_quiet
        self.points += s.append(local[keep], query[keep], ts[keep], risk[keep], values[keep], cap)
        if self.points > self.max_points:
            self._relieve()

    def _relieve(self) -> None:
        """Bring the total back under ``max_points``: halve caps (quiet series first), then drop quiet series."""
        while self.points > self.max_points:
            if self.cap_quiet > self.floor:
                self.cap_quiet = max(self.floor, self.cap_quiet // 2)
                flagged = False
            elif self.cap_flagged > self.floor:
                self.cap_flagged = max(self.floor, self.cap_flagged // 2)
                flagged = True
            else:
                self._drop_quiet()
                return
            for s in self._series.values():
                if (s.alarm is not None) == flagged:
                    self.points -= s.thin(self.cap_flagged if flagged else self.cap_quiet)

    def _drop_quiet(self) -> None:
        """Drop never-flagged series, oldest first, to three quarters of the total (so this stays rare)."""
        for key in [k for k, s in self._series.items() if s.alarm is None]:
            if self.points <= self.max_points * 3 // 4:
                break
            self.points -= self._series.pop(key).size
            self.dropped_series += 1

    # -- results -------------------------------------------------------------------------
    def finish(self, pipeline: "Pipeline") -> None:
        """Complete the last batch; record each model's thresholds and the flagged clients' peers."""
        self._flush()
        for model, rt in pipeline.runtimes:
            thresholds = {}
            for det in rt.detectors:
                param = type(det).threshold_param
                if param:
                    thresholds[det.name] = float(getattr(det.params, param))
            self.models[model] = {"thresholds": thresholds, "verdict_inputs": list(rt.fusion.inputs)}
        flagged = {client for (client, _), s in self._series.items() if s.alarm is not None}
        for client in sorted(flagged):
            _, peers = pipeline.view.peer_matches(client)
            if peers:
                self.peers[client] = peers

    def timelines(self, clients: Sequence[str] | None = None) -> dict[str, list[Timeline]]:
        """client -> its timelines (one per model), for ``clients`` (default: every recorded client)."""
        wanted = None if clients is None else set(clients)
        out: dict[str, list[Timeline]] = {}
        for (client, model), s in self._series.items():
            if wanted is None or client in wanted:
                out.setdefault(client, []).append(s.timeline(model))
        return out
