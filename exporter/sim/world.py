"""The simulated service: a dataset split by role, the victim model behind the API, and
the global pool of "popular" inputs that many benign clients send identically."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exporter.sim.datasets import Dataset, load
from exporter.sim.victim import Victim

POPULAR_POOL = 40  # inputs in the global popular pool (a demo image, a sample record, ...)


@dataclass
class World:
    """Everything a simulated client can observe or query."""

    dataset: Dataset
    victim: Victim
    popular: np.ndarray  # (POPULAR_POOL, d) natural inputs shared across clients
    model: str  # model name written to each event
    seed: int

    def answer(self, X: np.ndarray) -> np.ndarray:
        """What the API answers: the victim's probabilities on the inputs *as logged* (rounded)."""
        return self.victim.predict_proba(self.dataset.round(X))


_CACHE: dict[tuple[str, int], tuple[Dataset, Victim]] = {}
_CACHE_SIZE = 8


def build_world(name: str, seed: int = 0, model: str | None = None) -> World:
    """Load ``name``, train the victim and draw the popular pool, all from ``seed``.

    The (dataset, victim) pair is deterministic in (name, seed) and read-only once built,
    so it is cached per process: a second simulation of the same world skips training.
    """
    key = (name, seed)
    if key not in _CACHE:
        ds = load(name, seed)
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (ds, Victim(ds, seed))
    ds, victim = _CACHE[key]
    popular, _ = ds.natural(np.random.default_rng([seed, 13]), POPULAR_POOL)
    return World(ds, victim, popular, model or name, seed)
