"""Traffic with a Sybil group, for the tests (and the stack test): a JbDA split over N keys plus honest clients.

    from tests.sybil import sybil_split
    traffic, members = sybil_split("breast_cancer", size=10)
    traffic.write(path)              # JSON lines in the event contract, time-ordered
    calibration = benign_only("breast_cancer")   # benign traffic of another stream, for `calibrate`

Needs scikit-learn (the ``bench`` extra) for the datasets.
"""

from __future__ import annotations

from exporter.sim import Population, Traffic, build_world, simulate
from exporter.sim.sybil import SybilPlan, simulate_sybil

WINDOW = 3600.0


def sybil_split(dataset: str = "breast_cancer", size: int = 10, per_member: int = 300, strategy: str = "even", benign: int = 40,
                seed: int = 0, member_rate: float = 0.1, start: float | None = None) -> tuple[Traffic, list[str]]:
    """One Sybil group (``strategy`` over ``size`` keys, ``per_member`` queries each, seeds of its own) among
    ``benign`` honest clients of the default mix, over one hour; returns the merged traffic and the members' ids
    (``syb-<strategy>-<size>-0-<j>``)."""
    from exporter.sim.traffic import DEFAULT_START

    world = build_world(dataset, seed)
    group = simulate_sybil(world, SybilPlan(strategy, size, per_member, member_rate), seed, 0, window=WINDOW,
                           start=DEFAULT_START if start is None else start)
    parts = [group]
    if benign:
        parts.append(simulate(world, Population(benign=benign, window=WINDOW, benign_prefix="app", stream="tests-sybil"), seed))
    return _merge(parts), list(group.clients)


def benign_only(dataset: str = "breast_cancer", clients: int = 80, seed: int = 0, mix: dict[str, float] | None = None,
                stream: str = "tests-calibration", prefix: str = "cal") -> Traffic:
    """Honest clients only (another stream than :func:`sybil_split`'s): calibration data, or the no-link cases."""
    pop = Population(benign=clients, window=WINDOW, benign_prefix=prefix, stream=stream)
    if mix is not None:
        pop.mix = dict(mix)
    return simulate(build_world(dataset, seed), pop, seed)


def _merge(parts: list[Traffic]) -> Traffic:
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "bench" / "detection")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    from populations import merge

    return merge(*parts)
