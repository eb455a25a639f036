"""Per-model running feature statistics, shared by every client of the model.

Distances "on standardized features" need a scale per feature. Until a calibration
profile supplies reference statistics (then ``frozen``), they are learned online from
all accepted traffic with Welford's update, so no single client dominates them.
"""

from __future__ import annotations

import numpy as np


class FeatureStats:
    """Running mean and variance of a model's input vectors."""

    MIN_STD = 1e-6

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)
        self.frozen = False
        self._std: np.ndarray | None = None  # cache, invalidated by updates

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def update(self, x: np.ndarray) -> None:
        """Fold one input vector in (ignored when frozen)."""
        if self.frozen:
            return
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)
        self._std = None

    def update_many(self, xs: np.ndarray) -> None:
        """Fold a (m, d) block in at once (Chan et al.'s parallel merge of moments)."""
        if self.frozen or xs.shape[0] == 0:
            return
        if xs.shape[0] == 1:
            self.update(xs[0])
            return
        n_b = xs.shape[0]
        mean_b = xs.mean(axis=0)
        m2_b = ((xs - mean_b) ** 2).sum(axis=0)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n_b / n)
        self.count = n
        self._std = None

    @property
    def std(self) -> np.ndarray:
        """Per-feature standard deviation; constant features get 1 so they neither vanish nor explode."""
        if self._std is None:
            if self.count < 2:
                self._std = np.ones_like(self.mean)
            else:
                std = np.sqrt(self.m2 / (self.count - 1))
                self._std = np.where(std > self.MIN_STD, std, 1.0)
        return self._std

    def standardize(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std

    def to_state(self) -> dict[str, object]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2, "frozen": self.frozen}

    @classmethod
    def from_state(cls, state: dict[str, object]) -> "FeatureStats":
        mean = np.asarray(state["mean"], dtype=np.float64)
        out = cls(mean.shape[0])
        out.count = int(state["count"])  # type: ignore[arg-type]
        out.mean = mean.copy()
        out.m2 = np.asarray(state["m2"], dtype=np.float64).copy()
        out.frozen = bool(state["frozen"])
        out._std = None
        return out
