"""Calibration profiles: what ``calibrate`` learned from benign traffic, applied by ``run`` and ``replay``.

Per model, a profile holds the frozen feature scaling, each detector's reference
statistics (from ``Detector.fit``), each detector's calibrated threshold (the verdict
flags while any is crossed), and the false-alarm rate it promises, with how that figure
was derived. It is stored with :mod:`exporter.snapshot` (JSON + npz, no pickle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.atomic import atomic_write_bytes
from exporter.config import Settings
from exporter.detectors import enabled_detectors
from exporter.snapshot import pack, unpack

log = logging.getLogger("monitaur.profile")
PROFILE_VERSION = 2


class ProfileError(Exception):
    """A profile that cannot be used with this config or this traffic; the message says why."""


def params_digest(params: Any, threshold_param: str | None) -> str:
    """Digest of a detector's parameters, except the threshold calibration itself sets."""
    dumped = params.model_dump(mode="json")
    dumped.pop("enabled", None)
    if threshold_param:
        dumped.pop(threshold_param, None)
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ModelProfile:
    """What calibration learned about one model."""

    modality: str
    input_dim: int | None
    num_classes: int | None
    scaling: dict[str, np.ndarray] | None  # Scaling.state() of the model's inputs
    references: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)  # detector -> calibrated threshold
    promise: dict[str, Any] = field(default_factory=dict)  # the false-alarm rate promised, and how it was derived
    params: dict[str, str] = field(default_factory=dict)  # detector -> params digest at calibration
    groups: dict[str, Any] = field(default_factory=dict)  # the group threshold, and the benign groups it rests on (exporter.groups)
    clients: int = 0
    events: int = 0


@dataclass
class Profile:
    """A calibration profile for one or more models."""

    target_fpr: float
    models: dict[str, ModelProfile]
    created_at: float = field(default_factory=time.time)

    def save(self, path: Path | str) -> None:
        doc = {
            "version": PROFILE_VERSION,
            "created_at": self.created_at,
            "target_fpr": self.target_fpr,
            "models": {name: vars(mp) for name, mp in self.models.items()},
        }
        atomic_write_bytes(Path(path), pack(doc))

    @classmethod
    def load(cls, path: Path | str) -> "Profile":
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ProfileError(f"cannot read profile {str(path)!r}: {exc.strerror or exc}") from None
        try:
            doc = unpack(data)
        except ValueError:
            raise ProfileError(f"{str(path)!r} is not a MONITAUR calibration profile") from None
        if not isinstance(doc, dict) or doc.get("version") != PROFILE_VERSION:
            found = doc.get("version") if isinstance(doc, dict) else None
            raise ProfileError(
                f"{str(path)!r}: profile version {found!r}, this exporter reads version {PROFILE_VERSION}; run `monitaur-exporter calibrate` again"
            )
        try:
            models = {name: ModelProfile(**mp) for name, mp in doc["models"].items()}
        except (KeyError, TypeError) as exc:
            raise ProfileError(f"{str(path)!r}: malformed profile ({exc})") from None
        return cls(target_fpr=float(doc["target_fpr"]), models=models, created_at=float(doc["created_at"]))

    def check(self, settings: Settings) -> list[str]:
        """Raise :class:`ProfileError` where the profile contradicts the config; return warnings."""
        warnings: list[str] = []
        specs = enabled_detectors(settings)
        for name, mp in self.models.items():
            mcfg = settings.models.get(name)
            if mcfg is not None:
                if mcfg.input_dim is not None and mp.input_dim is not None and mcfg.input_dim != mp.input_dim:
                    raise ProfileError(
                        f"model {name!r}: the profile was calibrated on {mp.input_dim} input features, the config says models.{name}.input_dim = {mcfg.input_dim}"
                    )
                if mcfg.num_classes is not None and mp.num_classes is not None and mcfg.num_classes != mp.num_classes:
                    raise ProfileError(
                        f"model {name!r}: the profile was calibrated on {mp.num_classes} classes, the config says models.{name}.num_classes = {mcfg.num_classes}"
                    )
                if mcfg.modality is not None and mcfg.modality != mp.modality:
                    raise ProfileError(f"model {name!r}: the profile is for {mp.modality} inputs, the config says {mcfg.modality}")
            for det, (cls, params) in specs.items():
                if det not in mp.params:
                    warnings.append(f"model {name!r}: detector {det!r} is not in the profile; it runs uncalibrated")
                elif mp.params[det] != params_digest(params, cls.threshold_param):
                    warnings.append(f"model {name!r}: detector {det!r} was calibrated with other parameters; its calibration is ignored")
        if self.models and settings.models and not set(self.models) & set(settings.models):
            raise ProfileError(
                f"the profile covers models {sorted(self.models)}, the config defines {sorted(settings.models)}: none in common"
            )
        return warnings


def load_profile(path: Path | str | None, settings: Settings) -> Profile | None:
    """Load and check a profile (or return None); warnings are logged."""
    if path is None:
        return None
    profile = Profile.load(path)
    for w in profile.check(settings):
        log.warning("%s", w)
    return profile
