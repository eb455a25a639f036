"""Detector registry: built-in detectors, ``monitaur.detectors`` entry points and config plugins.

The registry is computed from constants and the config, never mutated at import time,
so that two pipelines in one process cannot disturb each other. The configuration
(:mod:`exporter.config`) stays plain data: :func:`enabled_detectors` resolves its
``detectors``, ``plugins`` and ``fusion.inputs`` sections where a pipeline is built.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from exporter.config import ConfigError

from exporter.detectors.base import (
    Batch,
    ClientMetric,
    Detector,
    DetectorParams,
    ModelContext,
    Signals,
    State,
)

if TYPE_CHECKING:
    from exporter.config import Settings

__all__ = ["Batch", "ClientMetric", "Detector", "DetectorParams", "ModelContext", "Signals", "State", "BUILTIN", "available_detectors", "enabled_detectors",
           "resolve_detectors"]

# name -> "module:Class", in the order detectors run.
BUILTIN: dict[str, str] = {
    "confidence": "exporter.detectors.confidence:ConfidenceDetector",
    "repetition": "exporter.detectors.repetition:RepetitionDetector",
    "near_duplicate": "exporter.detectors.near_duplicate:NearDuplicateDetector",
    "prada": "exporter.detectors.prada:PradaDetector",
    "knn": "exporter.detectors.knn:KnnDetector",
    "fingerprint": "exporter.detectors.fingerprint:FingerprintDetector",
    "ood": "exporter.detectors.ood:OodDetector",
    "coverage": "exporter.detectors.coverage:CoverageDetector",
    "steps": "exporter.detectors.steps:StepsDetector",
    "links": "exporter.detectors.links:LinksDetector",
    "rate": "exporter.detectors.rate:RateDetector",
}
RESERVED = {"fusion", "risk"}  # the verdict's names: not detector names (the verdict is configured under `fusion:`)


def _load(spec: str, where: str) -> type[Detector]:
    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{where}: cannot load {spec!r} ({exc})") from None
    if not (isinstance(obj, type) and issubclass(obj, Detector)):
        raise ValueError(f"{where}: {spec!r} is not a Detector subclass")
    return obj


def _check_name(cls: type[Detector], name: str, where: str) -> None:
    if getattr(cls, "name", None) != name:
        raise ValueError(f"{where}: the class declares name {getattr(cls, 'name', None)!r}; register it under that name")


def available_detectors(plugins: dict[str, str] | None = None) -> dict[str, str]:
    """Every known detector name -> its 'module:Class' spec."""
    found = dict(BUILTIN)
    for ep in entry_points(group="monitaur.detectors"):
        if ep.name not in RESERVED:
            found.setdefault(ep.name, ep.value)
    for name, spec in (plugins or {}).items():
        if name in BUILTIN or name in RESERVED:
            raise ValueError(f"plugins.{name}: the name is taken by a built-in detector or the verdict")
        if ":" not in spec:
            raise ValueError(f"plugins.{name}: expected 'module:Class', got {spec!r}")
        found[name] = spec
    return found


def resolve_detectors(config: dict[str, dict[str, Any]], plugins: dict[str, str] | None = None) -> dict[str, tuple[type[Detector], DetectorParams]]:
    """Validate the ``detectors`` config section; return enabled detectors in run order.

    A detector listed in the config is enabled unless it says ``enabled: false``; one not
    listed runs if it is enabled by default.
    """
    known = available_detectors(plugins)
    for name, section in config.items():
        if name in RESERVED:
            raise ValueError(f"detectors.{name}: the fused verdict is not a detector; configure it under `fusion:`")
        if name not in known:
            raise ValueError(f"detectors.{name}: unknown detector; available: {', '.join(known)}")
        if section is not None and not isinstance(section, dict):
            raise ValueError(f"detectors.{name}: expected a mapping of parameters")
    enabled: dict[str, tuple[type[Detector], DetectorParams]] = {}
    for name, spec in known.items():
        cls = _load(spec, f"detectors.{name}")
        _check_name(cls, name, f"detectors.{name}")
        try:
            params = cls.Params(**(config.get(name) or {}))
        except ValidationError as exc:
            problems = "; ".join(
                f"detectors.{name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
            )
            raise ValueError(problems) from None
        on = params.enabled if name in config else cls.default_enabled
        if on:
            enabled[name] = (cls, params)
    return enabled


def enabled_detectors(settings: "Settings") -> dict[str, tuple[type[Detector], DetectorParams]]:
    """The config's enabled detectors in run order, each with its validated ``Params``.

    Also checks that ``fusion.inputs`` names enabled detectors. Raises
    :class:`~exporter.config.ConfigError` naming the offending key. Cheap enough to call
    wherever a pipeline, its metrics or a report is built (modules are imported once).
    """
    try:
        enabled = resolve_detectors(settings.detectors, settings.plugins)
    except ValueError as exc:
        raise ConfigError([_split_key(line) for line in str(exc).split("; ")]) from None
    unknown = [name for name in settings.fusion.inputs or [] if name not in enabled]
    if unknown:
        raise ConfigError([("fusion.inputs", f"{', '.join(unknown)} is not an enabled detector; enabled: {', '.join(enabled)}")])
    return enabled


def _split_key(problem: str) -> tuple[str, str]:
    """``"detectors.x.window: must be ..."`` -> ``("detectors.x.window", "must be ...")``."""
    key, sep, msg = problem.partition(": ")
    return (key, msg) if sep and " " not in key else ("", problem)
