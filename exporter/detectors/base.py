"""The one interface every detector implements.

A detector is configured once per model (``Params`` + :class:`ModelContext`) and keeps
no per-client data itself: each client's history lives in an explicit ``State`` (a dict
of numpy arrays) that the pipeline owns, bounds, snapshots and restores.

``update`` takes a :class:`Batch` — consecutive events of *one* client for *one* model,
in time order — and returns one score per event. Batching is what makes numpy pay:
a client's events arriving together are judged with a few array operations instead of
a Python loop of small ones. A batch of one is the same computation.

Detectors that need knowledge across clients (a shared fingerprint index) keep it in
``shared_state``, one per model, also snapshotted, and update it in :meth:`Detector.prepare`,
which sees every client's events of a :class:`Block` in time order before the per-client
``update`` calls: so a verdict does not depend on how events were cut into blocks.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from exporter.canonical import all_flat_vectors, canonical_digests

if TYPE_CHECKING:
    from exporter.detectors.kit import Scaling
    from exporter.events import Event

State = dict[str, np.ndarray]


class DetectorParams(BaseModel):
    """Parameters shared by all detectors; each detector subclasses this."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True


def min_threshold_field(default: float) -> Any:
    """The ``min_threshold`` parameter of a detector with a threshold: calibration never sets
    the threshold below it (:mod:`exporter.calibrate`)."""
    return Field(
        default, ge=0.0, le=1.0,
        description="Calibration never sets the threshold below this: what the detector can tell apart at best, whatever a small benign sample shows.",
    )


class WindowedParams(DetectorParams):
    """Parameters of detectors that judge a client over a window of its last events.

    Subclasses declare ``window`` and ``min_events``; a ``min_events`` larger than the
    window could never be reached, so it is rejected here once for all of them.
    """

    @field_validator("min_events", check_fields=False)
    @classmethod
    def _min_events_fit(cls, value: int, info: ValidationInfo) -> int:
        window = info.data.get("window")
        if window is not None and value > window:
            raise ValueError(f"must not exceed window ({window}), or the client could never be flagged")
        return value


class Signals(NamedTuple):
    """A detector's verdict on a client after each event of a batch.

    ``values[i]`` is the client's score in [0, 1] right after event ``i`` (1 = most
    suspicious), or NaN where the event gave the detector nothing to judge;
    ``flagged[i]`` says whether the score had crossed the detector's threshold.
    """

    values: np.ndarray
    flagged: np.ndarray

    @classmethod
    def constant(cls, n: int, value: float, flagged: bool) -> "Signals":
        return cls(np.full(n, value, dtype=np.float64), np.full(n, flagged, dtype=bool))


class ClientMetric(NamedTuple):
    """A per-client statistic a detector exports beside its score, labelled by client and model.

    ``name`` is the full metric name (a counter's without ``_total``); the values come
    from :meth:`Detector.client_values`.
    """

    name: str
    kind: Literal["counter", "gauge"]
    documentation: str


@dataclass(slots=True)
class Reference:
    """Benign data of one model, from which detectors learn reference statistics (``fit``).

    It comes from calibration (``monitaur-exporter calibrate``) or, without a profile,
    from the model's live baseline (:mod:`exporter.baseline`).
    """

    vectors: np.ndarray | None  # (n, d) input vectors, each feature winsorized (one client's extremes bounded)
    probs: np.ndarray | None  # (n, K) probabilities, NaN rows where unknown
    scaling: "Scaling | None"  # the feature scaling learned from the same data
    # The same inputs as they were sent, where the source is trusted (calibration data); None:
    # only ``vectors`` (the live baseline, which any client feeds). Winsorizing moves a natural
    # record with one extreme feature off the data; a detector that needs where benign inputs
    # really lie (``links``' anchors) takes these.
    unclipped: np.ndarray | None = None


@dataclass(slots=True)
class ModelContext:
    """What a detector may know about the model it watches.

    ``scaling`` is the model's feature scaling (:class:`~exporter.detectors.kit.Scaling`):
    from the calibration profile, or from the live baseline once it has learned one
    (None before that). It is replaced, never modified, so a detector may cache what it
    derives from it and check ``is`` to see whether it changed.
    """

    name: str
    modality: str | None
    input_dim: int | None
    num_classes: int | None
    scaling: "Scaling | None" = None
    detectors: tuple[str, ...] = ()  # names of the model's enabled detectors, in run order


def _stacked(rows: list[np.ndarray | None]) -> np.ndarray | None:
    """The (m, n) float array of 1-D float rows of one length; None if a row is missing or of another length.

    One ``np.array`` call, which refuses ragged rows itself, costs a third of a Python
    check of every row followed by ``np.stack``.
    """
    try:
        out = np.array(rows)
    except ValueError:  # rows of different lengths, or a None among arrays
        return None
    return out if out.ndim == 2 and out.dtype.kind == "f" else None


class Block:
    """Events of one model, in time order, with stacked views computed on demand.

    A block is what the cross-client stage sees (:meth:`Detector.prepare`): all the
    clients' events of a processed chunk, so that state shared across clients is updated
    in time order whatever the batching. :class:`Batch` (one client's events) reads its
    views from its block. ``prepared`` holds each detector's per-event results of the
    cross-client stage, aligned with ``events``; ``flagged`` the per-event flags of the
    client batches, for the stages after them that ask for a detector's (the groups).
    """

    def __init__(self, model: str, events: list["Event"]) -> None:
        self.model = model
        self.events = events
        self.prepared: dict[str, tuple[np.ndarray, ...]] = {}
        self.flagged: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.events)

    @cached_property
    def ts(self) -> np.ndarray:
        return np.fromiter((e.ts for e in self.events), dtype=np.float64, count=len(self.events))

    @cached_property
    def rows_by_client(self) -> dict[str, np.ndarray]:
        """Each client's rows of the block, in time order; clients in order of their first event."""
        rows: dict[str, list[int]] = {}
        for i, e in enumerate(self.events):
            rows.setdefault(e.client, []).append(i)
        out = {c: np.asarray(r, dtype=np.int64) for c, r in rows.items()}
        for r in out.values():
            r.flags.writeable = False  # shared by the client batches and the groups stage
        return out

    @cached_property
    def vectors(self) -> np.ndarray | None:
        """(m, d) input vectors, or None unless every event carries one of the same length."""
        return _stacked([e.vector for e in self.events])

    @cached_property
    def probs(self) -> np.ndarray | None:
        """(m, K) probabilities, NaN rows for events without them; None if no event has them."""
        rows = [e.probs for e in self.events]
        k = next((len(r) for r in rows if r is not None), None)
        if k is None:
            return None
        stacked = _stacked(rows)
        if stacked is not None:
            return stacked
        out = np.full((len(rows), k), np.nan)
        for i, r in enumerate(rows):
            if r is not None and len(r) == k:
                out[i] = r
        return out

    @cached_property
    def confidence(self) -> np.ndarray:
        """(m,) top-1 probability or label score; NaN where unknown."""
        p = self.probs
        if p is None:
            return np.array([np.nan if (c := e.confidence) is None else c for e in self.events], dtype=np.float64)
        out = p.max(axis=1)  # NaN rows (events without probabilities) stay NaN
        for i in np.flatnonzero(np.isnan(out)).tolist():
            score = self.events[i].label_score
            if score is not None:
                out[i] = score
        return out

    @cached_property
    def top2(self) -> np.ndarray | None:
        """(m, 2) the two largest probabilities per event (NaN rows where unknown)."""
        p = self.probs
        if p is None:
            return None
        part = -np.partition(-p, 1, axis=1)[:, :2] if p.shape[1] > 2 else -np.sort(-p, axis=1)
        return part

    @cached_property
    def flat_vectors(self) -> np.ndarray | None:
        """(m, d) input vectors when every event's input is a flat vector of one length, else None.

        Unlike :attr:`vectors`, None also when an event has a text or image besides its vector.
        """
        return self.vectors if all_flat_vectors(self.events) else None

    @cached_property
    def digests(self) -> np.ndarray:
        """(m,) uint64 canonical digest of each event's input (:mod:`exporter.canonical`); 0 for none."""
        return canonical_digests(self.events, self.flat_vectors)

    @cached_property
    def predicted(self) -> np.ndarray:
        """(m,) predicted class index; -1 where unknown (label-only answers have no index)."""
        p = self.probs
        if p is None:
            return np.full(len(self.events), -1, dtype=np.int64)
        out = np.argmax(np.nan_to_num(p, nan=-1.0), axis=1).astype(np.int64)
        out[np.isnan(p[:, 0])] = -1
        return out


def _sliced(name: str) -> cached_property:  # type: ignore[type-arg]
    """A :class:`Batch` view: its block's view at the batch's rows, else computed from its own events.

    A block's view can be None (or unusable) where a batch's is not, e.g. when another
    client's event in the block has no vector: then the batch computes its own.
    """
    compute = getattr(Block, name).func

    def view(self: "Batch") -> object:
        parent = self.block
        if parent is not None:
            full = getattr(parent, name)
            if full is not None:
                return full[self.rows]
        return compute(self)

    view.__doc__ = getattr(Block, name).__doc__
    view.__name__ = name
    return cached_property(view)


class Batch(Block):
    """Consecutive events of one client and one model: what :meth:`Detector.update` judges.

    Built by the pipeline from a :class:`Block` (``block`` and the batch's ``rows`` in
    it, whose views it slices), or standalone from events (tests, tools).
    """

    def __init__(self, client: str, model: str, events: list["Event"], block: Block | None = None, rows: np.ndarray | None = None) -> None:
        super().__init__(model, events)
        self.client = client
        self.block = block
        self.rows = rows if rows is not None else np.arange(len(events))

    def prepared_for(self, name: str) -> tuple[np.ndarray, ...] | None:
        """Detector ``name``'s cross-client results (:meth:`Detector.prepare`) for this batch's events."""
        if self.block is None:  # a standalone batch is its own block
            return self.prepared.get(name)
        found = self.block.prepared.get(name)
        return None if found is None else tuple(a[self.rows] for a in found)

    ts = _sliced("ts")
    vectors = _sliced("vectors")
    probs = _sliced("probs")
    confidence = _sliced("confidence")
    top2 = _sliced("top2")
    flat_vectors = _sliced("flat_vectors")
    digests = _sliced("digests")
    predicted = _sliced("predicted")


class Detector(ABC):
    """Base class: subclasses set ``name`` and ``Params`` and implement ``init_state`` and ``update``.

    ``update`` puts NaN in ``Signals.values`` for events with nothing this detector can
    judge (an image for a text-only test, a label-only answer for a probability test),
    or returns None when that holds for the whole batch; that is different from a
    "not suspicious" score. An exception raised by ``update`` is counted by the pipeline
    as a detector error for every event of the batch, never as "not suspicious".
    """

    name: ClassVar[str]
    Params: ClassVar[type[DetectorParams]] = DetectorParams
    default_enabled: ClassVar[bool] = True
    # The Params field that is this detector's flag threshold on ``Signals.values``
    # (flag when value >= threshold, once enough events are judged). Calibration sets it
    # per model for a target false-alarm rate; None means the detector is not calibrated.
    threshold_param: ClassVar[str | None] = None
    # Bumped when what the state holds changes meaning (e.g. the digest scheme), so that a
    # snapshot saved by an older release is discarded instead of misread.
    state_format: ClassVar[str] = "1"
    # Per-client statistics exported beside the score (see client_values).
    client_metrics: ClassVar[tuple[ClientMetric, ...]] = ()
    # Whether the detector's flag counts toward the verdict unless ``fusion.inputs`` says
    # otherwise: a signal that honest clients produce as a matter of course (volume) is
    # exported and alerted on, but is no evidence of extraction on its own.
    verdict: ClassVar[bool] = True

    def __init__(self, params: DetectorParams, context: ModelContext) -> None:
        self.params = params
        self.context = context

    @abstractmethod
    def init_state(self) -> State:
        """A fresh, empty per-client state of bounded size."""

    @abstractmethod
    def update(self, state: State, batch: Batch) -> Signals | None:
        """Fold the batch into ``state``; return the client's signal after each event.

        If it raises (or returns malformed signals), the pipeline puts ``state`` back as
        it was before the batch and counts a detector error: an update need not undo
        its own partial changes.
        """

    # -- optional hooks --------------------------------------------------------
    def prepare(self, block: Block) -> None:
        """The cross-client stage: called once per block, before :meth:`update` on its batches.

        A detector with state shared across clients (an index of every client's queries)
        updates it here, from all the clients' events in time order, and leaves per-event
        results in ``block.prepared[self.name]`` (a tuple of arrays aligned with the
        block's events) for :meth:`update` to read with :meth:`Batch.prepared_for`. Done
        this way, verdicts do not depend on how events are cut into blocks.

        It must be all or nothing: if it raises, the shared state must be as it was
        before the block (the pipeline cannot copy shared state for every block; it
        counts the error and judges the block without this detector).
        """

    def fit(self, reference: Reference) -> State | None:
        """Learn reference statistics from benign data (calibration); None if nothing to learn."""
        return None

    def load_reference(self, reference: State) -> None:
        """Use reference statistics made by :meth:`fit` (from a calibration profile)."""

    def client_values(self, state: State) -> dict[str, float]:
        """The client's values of :attr:`client_metrics`, by metric name; NaN or absent: not exported.

        Called at scrape time for the clients exported with their own series: it should
        be cheap (a few array reductions over the state).
        """
        return {}

    def peer_matches(self, client: str) -> tuple[int, dict[str, int]]:
        """Cross-client evidence: (queries of ``client`` that matched other clients' queries,
        the other clients with the most matches -> counts). Exported per client."""
        return 0, {}

    def shared_state(self) -> State | None:
        """State shared by all clients of the model (None if the detector has none)."""
        return None

    def load_shared_state(self, state: State) -> None:
        """Restore what :meth:`shared_state` returned before a restart. State that does not fit or
        hold together raises ``ValueError`` before anything changes: the restore then leaves the
        index empty, with a warning, and restores the rest."""

    def forget_client(self, client: str) -> None:
        """Called when a client is evicted, for detectors that index clients in shared state."""

    def state_version(self) -> str:
        """A digest of everything that shapes the state; a snapshot whose digest differs is discarded."""
        ident = {
            "detector": self.name,
            "format": self.state_format,
            "params": self.params.model_dump(mode="json"),
            "input_dim": self.context.input_dim,
            "num_classes": self.context.num_classes,
            "modality": self.context.modality,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
