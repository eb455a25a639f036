"""The one interface every detector implements.

A detector is configured once per model (``Params`` + :class:`ModelContext`) and keeps
no per-client data itself: each client's history lives in an explicit ``State`` (a dict
of numpy arrays) that the pipeline owns, bounds, snapshots and restores. ``update`` reads
one event and that client's state, mutates the state, and returns a :class:`Signal`.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from exporter.events import Event
    from exporter.stats import FeatureStats

State = dict[str, np.ndarray]


class DetectorParams(BaseModel):
    """Parameters shared by all detectors; each detector subclasses this."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True


class Signal(NamedTuple):
    """A detector's verdict on a client after one event.

    ``value`` is the client's score in [0, 1] (1 = most suspicious); ``flagged`` says
    whether the score crossed the detector's threshold.
    """

    value: float
    flagged: bool


@dataclass(slots=True)
class ModelContext:
    """What a detector may know about the model it watches."""

    name: str
    modality: str | None
    input_dim: int | None
    num_classes: int | None
    stats: "FeatureStats | None" = None


class Detector(ABC):
    """Base class: subclasses set ``name`` and ``Params`` and implement the two methods.

    ``update`` returns None when the event carries nothing this detector can judge
    (an image for a text-only detector, a label-only answer for a probability test);
    that is different from a "not suspicious" signal. An exception raised by ``update``
    is counted as a detector error by the pipeline, never as "not suspicious".
    """

    name: ClassVar[str]
    Params: ClassVar[type[DetectorParams]] = DetectorParams
    default_enabled: ClassVar[bool] = True

    def __init__(self, params: DetectorParams, context: ModelContext) -> None:
        self.params = params
        self.context = context

    @abstractmethod
    def init_state(self) -> State:
        """A fresh, empty per-client state of bounded size."""

    @abstractmethod
    def update(self, state: State, event: "Event") -> Signal | None:
        """Fold ``event`` into ``state``; return the client's current signal."""

    def state_version(self) -> str:
        """A digest of everything that shapes the state; a snapshot whose digest differs is discarded."""
        ident = {
            "detector": self.name,
            "params": self.params.model_dump(mode="json"),
            "input_dim": self.context.input_dim,
            "num_classes": self.context.num_classes,
            "modality": self.context.modality,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
