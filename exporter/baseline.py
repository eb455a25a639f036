"""A model's benign reference learned from live traffic, for models without a calibration profile.

Detectors compare inputs "in standard deviations" and against benign references (the ood
covariance, the coverage cells, the knn distance scale). A calibration profile gives
them, frozen. Without one, the model's :class:`Baseline` learns them from the traffic
itself, in a way that no client can steer and that does not depend on batching:

- **Bounded influence.** Only each client's first ``per_client`` events of the model are
  offered to the baseline, so one client (an attacker sending every feature at 1e14, or
  a flood of queries) contributes at most that many samples: at most 6.25 % of the
  first fit's 256, and less of every later one. Every feature of the sample is then
  winsorized at its ``trim`` and ``1 - trim`` quantiles (8 %) before the scaling and the
  references are fitted, so such a share moves nothing. Many colluding client ids can
  still weigh in; a calibrated profile is the answer where that matters.
- **Deterministic.** Offered events enter a reservoir (Algorithm R driven by a hash of
  the offer's number, :func:`~exporter.detectors.kit.reservoir_slots`), and the
  reference is refitted when the number of offers reaches each of ``steps`` (256, 2,048
  and 16,384: at least 16 clients for the first), then never again. The pipeline ends a block exactly at the event that completes a step
  (:meth:`Baseline.cut`), so every event is judged under the same reference whatever
  the batching: replay, calibration and the live exporter agree.
- **Nothing before the first fit.** Detectors that need a scaling or a reference do not
  judge (NaN) until the first step; the others (repetition, rate, confidence) do.

Memory: the reservoir grows with the offers, to ``capacity * d * 8`` bytes (2 MiB for
4,096 samples of 64 features); it is dropped after the last step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exporter.detectors.kit import reservoir_slots

_SALT = 0x62617365_6C696E65  # "baseline"


@dataclass(frozen=True, slots=True)
class BaselinePlan:
    """How a live baseline learns: refit steps (offers), reservoir size, per-client cap."""

    steps: tuple[int, ...] = (256, 2048, 16384)
    capacity: int = 4096
    per_client: int = 16
    # Each feature is winsorized at these quantiles before anything is fitted. One client
    # gives at most per_client / steps[0] = 6.25 % of the first sample: this trims more.
    trim: float = 0.08


class Baseline:
    """The reservoir of a model's offered inputs, and when the next refit is due."""

    def __init__(self, dim: int, plan: BaselinePlan = BaselinePlan()) -> None:
        self.dim = dim
        self.plan = plan
        self.offered = 0  # events offered so far
        self._samples = np.zeros((0, dim), dtype=np.float64)

    @property
    def done(self) -> bool:
        """Whether every refit step has passed (the reference is final)."""
        return self.offered >= self.plan.steps[-1]

    @property
    def next_step(self) -> int:
        return next(s for s in self.plan.steps if s > self.offered)

    def offers(self, clients: list[str], known: dict[str, int]) -> list[int]:
        """Positions (in ``clients``, one per event) of the events offered: each client's first ``per_client``.

        ``known`` gives each client's events of the model before these; it is updated.
        """
        cap = self.plan.per_client
        out: list[int] = []
        for i, c in enumerate(clients):
            k = known.get(c, 0)
            if k < cap:
                out.append(i)
            known[c] = k + 1
        return out

    def cut(self, offered: list[int]) -> int | None:
        """Where a block must end (exclusive) so that it ends on a refit step, given its offered positions."""
        due = self.next_step - self.offered
        return offered[due - 1] + 1 if len(offered) >= due else None

    def add(self, vectors: np.ndarray) -> bool:
        """Offer the rows of ``vectors`` (n, d); True when a refit step is reached."""
        n = vectors.shape[0]
        if n == 0 or self.done:
            return False
        step = self.next_step
        slots = reservoir_slots(np.arange(self.offered, self.offered + n), self.plan.capacity, _SALT)
        taken = np.flatnonzero(slots >= 0)
        if taken.size:
            # A slot taken twice in one call keeps its last taker, as one at a time would.
            last = taken.size - 1 - np.unique(slots[taken][::-1], return_index=True)[1]
            rows = taken[last]
            need = int(slots[rows].max()) + 1
            if need > self._samples.shape[0]:
                grown = np.zeros((need, self.dim), dtype=np.float64)
                grown[: self._samples.shape[0]] = self._samples
                self._samples = grown
            self._samples[slots[rows]] = vectors[rows]
        self.offered += n
        return self.offered >= step

    def sample(self) -> np.ndarray:
        """The reservoir: a uniform sample of the offered inputs."""
        return self._samples[: min(self.offered, self.plan.capacity)]

    def release(self) -> None:
        """Free the reservoir once the last step has passed."""
        if self.done:
            self._samples = np.zeros((0, self.dim), dtype=np.float64)

    def state(self) -> dict[str, np.ndarray]:
        return {"offered": np.asarray(self.offered, dtype=np.int64), "samples": self.sample().copy()}

    def load(self, state: dict[str, np.ndarray]) -> None:
        samples = np.asarray(state["samples"], dtype=np.float64)
        offered = int(np.asarray(state["offered"]))
        expected = 0 if offered >= self.plan.steps[-1] else min(offered, self.plan.capacity)
        if samples.ndim != 2 or samples.shape != (expected, self.dim) and samples.shape != (min(offered, self.plan.capacity), self.dim):
            raise ValueError("the live baseline does not fit the model's input length")
        self.offered = offered
        self._samples = samples.copy()
