"""A seeded traffic simulator for MONITAUR: benign clients and attackers querying a victim.

numpy only at runtime; the scikit-learn datasets (digits, breast_cancer, wine) need the
optional ``bench`` extra, the ``synthetic`` dataset does not.

>>> from exporter.sim import Population, build_world, simulate
>>> world = build_world("synthetic", seed=0)
>>> traffic = simulate(world, Population(benign=5, attacks={"jbda": 1}, attack_queries=200), seed=0)
>>> traffic.write("logs/sim.jsonl")  # doctest: +SKIP
"""

from exporter.sim.attacks import ATTACKS, run_attack
from exporter.sim.benign import BEHAVIOURS, DEFAULT_MIX
from exporter.sim.datasets import NAMES as DATASETS
from exporter.sim.datasets import Dataset, DatasetUnavailable, default_dataset, load, sklearn_available
from exporter.sim.traffic import Population, Traffic, simulate
from exporter.sim.world import World, build_world

__all__ = [
    "ATTACKS", "BEHAVIOURS", "DATASETS", "DEFAULT_MIX", "Dataset", "DatasetUnavailable", "Population", "Traffic", "World",
    "build_world", "default_dataset", "load", "run_attack", "simulate", "sklearn_available",
]
