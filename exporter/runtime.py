"""Per-model detector sets: built from the config and the calibration profile on a model's first event.

A :class:`ModelRuntime` holds everything that judges one model's traffic: its detectors,
the fusion stage, the feature scaling and benign references they use, and the live
:class:`~exporter.baseline.Baseline` that learns those when no profile gives them.
:class:`Runtimes` builds them on demand, one per model, and bounds them: model names
come from clients, so :class:`ModelAdmission` decides which names get a runtime at all
(``model_admission`` in the config), before the decoder learns anything about them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from exporter.baseline import Baseline, BaselinePlan
from exporter import reasons
from exporter.config import ModelAdmissionConfig, ModelConfig, Settings
from exporter.detectors import enabled_detectors
from exporter.detectors.base import Detector, ModelContext, Reference, State
from exporter.detectors.kit import Scaling, winsorize
from exporter.fusion import Fusion
from exporter.metrics import Metrics
from exporter.profile import ModelProfile, Profile, params_digest

log = logging.getLogger("monitaur.runtime")

# (input_dim, num_classes, modality) of a model as the decoder knows it
Shape = tuple[int | None, int | None, str | None]


@dataclass(slots=True)
class ModelRuntime:
    """A model's detectors and fusion, and the scaling and references they judge with."""

    context: ModelContext
    detectors: list[Detector]
    fusion: Fusion
    versions: dict[str, str]  # detector (and "fusion") -> digest of what shapes its state
    baseline: Baseline | None  # learns the references live when no profile gives them
    events: Any  # the model's metric children, looked up once
    durations: dict[str, Any]
    references: dict[str, State] = field(default_factory=dict)  # what the detectors loaded, for snapshots

    @property
    def cross_client(self) -> list[Detector]:
        """Detectors with a cross-client stage (:meth:`Detector.prepare`), in run order."""
        return [d for d in self.detectors if type(d).prepare is not Detector.prepare]

    def use_reference(self, scaling: Scaling | None, references: dict[str, State]) -> None:
        """Judge from now on with this feature scaling and these detectors' references."""
        self.context.scaling = scaling
        loaded: dict[str, State] = {}
        for det in self.detectors:
            ref = references.get(det.name)
            if ref is None:
                continue
            try:
                det.load_reference(ref)
            except (ValueError, KeyError, TypeError) as exc:  # the detector keeps judging as before
                log.error("detector %s of model %s cannot use its reference: %s", det.name, self.context.name, exc)
                continue
            loaded[det.name] = ref
        self.references = loaded

    def refit(self) -> None:
        """Learn the scaling and every detector's reference from the live baseline's sample."""
        assert self.baseline is not None
        sample = self.baseline.sample()
        if sample.shape[0] < 2:
            return
        x = winsorize(sample, self.baseline.plan.trim)  # what any one client contributed is bounded twice: per client, and here
        scaling = Scaling.fit(x, self.baseline.plan.trim)
        reference = Reference(x, None, scaling)
        fitted: dict[str, State] = {}
        for det in self.detectors:
            try:
                found = det.fit(reference)
            except Exception as exc:  # a detector that cannot fit keeps judging as before
                log.error("detector %s could not learn from the live baseline of model %s: %s", det.name, self.context.name, type(exc).__name__)
                continue
            if found:
                fitted[det.name] = found
        self.use_reference(scaling, fitted)
        self.baseline.release()
        log.info("model %s: reference learned from %d live inputs (%d offered)", self.context.name, x.shape[0], self.baseline.offered)


class ModelAdmission:
    """Which model names get state of their own (``model_admission`` in the config).

    A name is admitted once and for good. The configured models, ``default_model`` and
    the profile's models are admitted from the start; another name is admitted on its
    first valid event if it is in ``allowed`` or matches ``pattern`` (any name when
    neither is set), while fewer than ``max_models`` models are admitted. The decoder
    asks :meth:`refusal` before it learns anything from an event, and calls
    :meth:`admit` once the event is valid, so an invalid event takes no place.
    """

    def __init__(self, config: ModelAdmissionConfig, always: Iterable[str] = ()) -> None:
        self.max_models = config.max_models
        self._open = config.open
        self._allowed = frozenset(config.allowed)
        self._pattern = re.compile(config.pattern) if config.pattern is not None else None
        self._always = frozenset(always)
        self.admitted: set[str] = set(self._always)  # read on every event: a set lookup
        self._order: list[str] = []  # names admitted from traffic, in admission order (for snapshots)

    @classmethod
    def for_settings(cls, settings: Settings, profile: Profile | None = None) -> "ModelAdmission":
        """The admission of a pipeline: configured, default and profile models always admitted."""
        always = {settings.default_model, *settings.models, *(profile.models if profile is not None else ())}
        return cls(settings.model_admission, always)

    def refusal(self, model: str) -> tuple[str, str] | None:
        """None when ``model`` is or may be admitted; else the rejection reason and message. Changes nothing."""
        if model in self.admitted:
            return None
        if not (self._open or model in self._allowed or (self._pattern is not None and self._pattern.fullmatch(model))):
            return reasons.MODEL_NOT_ALLOWED, f"model '{model}' is not admitted (model_admission.allowed, model_admission.pattern)"
        if len(self.admitted) >= self.max_models:
            return reasons.TOO_MANY_MODELS, f"model '{model}' would exceed model_admission.max_models ({self.max_models})"
        return None

    def admit(self, model: str) -> None:
        """Record ``model`` as admitted (after :meth:`refusal` allowed it)."""
        if model not in self.admitted:
            self.admitted.add(model)
            self._order.append(model)

    def readmit(self, model: str) -> bool:
        """Admit a model saved in a snapshot if the current policy admits it; whether it is admitted."""
        if self.refusal(model) is not None:
            return False
        self.admit(model)
        return True

    def saved(self) -> list[str]:
        """The names admitted from traffic, in admission order, for a snapshot."""
        return list(self._order)


class Runtimes:
    """The model runtimes of one pipeline, built on demand."""

    def __init__(self, settings: Settings, metrics: Metrics, profile: Profile | None, shape: Callable[[str], Shape],
                 plan: BaselinePlan = BaselinePlan()) -> None:
        self.settings = settings
        self.specs = enabled_detectors(settings)
        self.metrics = metrics
        self.profile = profile
        self._shape = shape
        self._plan = plan
        self._by_model: dict[str, ModelRuntime] = {}
        self.admission = ModelAdmission.for_settings(settings, profile)

    def __contains__(self, model: object) -> bool:
        return model in self._by_model

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_model.items())

    def get(self, model: str) -> ModelRuntime | None:
        return self._by_model.get(model)

    def build(self, model: str) -> ModelRuntime:
        """The model's runtime, built once the decoder knows the model's shape.

        The decoder admits a model before its first event gets here; a model built
        otherwise (events made in code) is recorded as admitted, so that every runtime is.
        """
        rt = self._by_model.get(model)
        if rt is not None:
            return rt
        self.admission.admit(model)
        dim, k, modality = self._shape(model)
        mcfg = self.settings.models.get(model) or ModelConfig()
        mp = self.profile.models.get(model) if self.profile is not None else None
        context = ModelContext(
            name=model,
            modality=mcfg.modality or modality,
            input_dim=mcfg.input_dim or dim,
            num_classes=mcfg.num_classes or k,
            detectors=tuple(self.specs),
        )
        detectors: list[Detector] = []
        versions: dict[str, str] = {}
        references: dict[str, State] = {}
        for name, (cls, params) in self.specs.items():
            calibrated = mp is not None and mp.params.get(name) == params_digest(params, cls.threshold_param)
            if calibrated and cls.threshold_param and name in mp.thresholds:  # type: ignore[union-attr]
                params = params.model_copy(update={cls.threshold_param: mp.thresholds[name]})  # type: ignore[union-attr]
            det = cls(params, context)
            versions[name] = det.state_version()
            if calibrated and name in mp.references:  # type: ignore[union-attr]
                references[name] = mp.references[name]  # type: ignore[union-attr]
                # State built against one reference (cells, scales) means nothing under another.
                versions[name] += f":ref@{self.profile.created_at!r}"  # type: ignore[union-attr]
            detectors.append(det)
        chosen = self.settings.fusion.inputs
        fusion = Fusion(
            self.settings.fusion,
            [d.name for d in detectors if (d.name in chosen if chosen is not None else type(d).verdict)],
            {d.name: float(getattr(d.params, type(d).threshold_param)) for d in detectors if type(d).threshold_param},
        )
        versions["fusion"] = fusion.state_version()
        baseline = None
        if mp is None:
            if self.profile is not None:
                log.warning("model %s is not in the calibration profile; it learns its reference from live traffic", model)
            if context.input_dim:
                baseline = Baseline(context.input_dim, self._plan)
        m = self.metrics
        m.prediction_confidence.observe_many(model, np.zeros(0))  # the model's series exist from now on
        rt = ModelRuntime(context, detectors, fusion, versions, baseline, m.events.labels(model),
                          {d.name: m.detector_duration.labels(d.name) for d in detectors})
        if mp is not None:
            rt.use_reference(_profile_scaling(mp, context.input_dim), references)
        self._by_model[model] = rt
        return rt


def _profile_scaling(mp: ModelProfile, dim: int | None) -> Scaling | None:
    return Scaling.from_state(mp.scaling, dim) if mp.scaling is not None else None
