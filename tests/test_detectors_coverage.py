"""The ``coverage`` detector (Kesarwani et al.'s extraction monitor on SimHash-style cells)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from exporter.detectors.base import Batch, ModelContext, Reference
from exporter.detectors.coverage import CoverageDetector, CoverageParams, hyperplanes
from exporter.events import Event
from exporter.detectors.kit import Scaling
from tests.test_detectors_ood import (
    DIM,
    assert_same_signals,
    benign_reference,
    calibrated_detector,
    context,
    digits,
    events,
    first_flag,
    model_probs,
    permuted,
    run,
    savez_roundtrip,
    uniform_random,
)
from tests.synthetic import judge

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reference() -> tuple[np.ndarray, Scaling]:
    return benign_reference()


def calibrated(reference: tuple[np.ndarray, Scaling], **params: object) -> CoverageDetector:
    return calibrated_detector(CoverageDetector, reference, **params)


def warm_benign(det: CoverageDetector, clients: int = 50, seed: int = 100) -> int:
    """Run ``clients`` iid benign clients of 100 queries; return how many were flagged."""
    flagged = 0
    for c in range(clients):
        x, _ = digits(np.random.default_rng(seed + c), 100)
        flagged += bool(run(det, events(f"b{c}", x))[0].flagged.any())
    return flagged


def test_params_are_validated() -> None:
    p = CoverageParams()
    assert (p.bits, p.tables, p.window, p.min_events, p.threshold, p.min_threshold, p.rare_mass) == (10, 4, 100, 20, 0.75, 0.2, 1e-3)
    assert CoverageDetector.threshold_param == "threshold" and CoverageDetector.name == "coverage"
    with pytest.raises(ValidationError):
        CoverageParams(bits=17)
    with pytest.raises(ValidationError):
        CoverageParams(window=10, min_events=20)
    with pytest.raises(ValidationError):
        CoverageParams(rare_mass=0.0)


def test_cells_are_the_same_in_every_process(reference: tuple[np.ndarray, Scaling]) -> None:
    normals, offsets = hyperplanes(DIM, 10, 1.5, 0, 4)
    assert normals.shape == (DIM, 40) and offsets.shape == (40,)
    code = (
        "import numpy as np\n"
        "from exporter.detectors.coverage import hyperplanes\n"
        "n, o = hyperplanes(64, 10, 1.5, 0, 4)\n"
        "print(repr(float(n.sum())), repr(float(o.sum())), repr(float((n * n).sum())))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert [float(v) for v in out] == [float(normals.sum()), float(offsets.sum()), float((normals * normals).sum())]
    assert not np.array_equal(hyperplanes(DIM, 10, 1.5, 1, 4)[0], normals)  # the seed matters
    x, _ = digits(np.random.default_rng(1), 50)
    a, b = calibrated(reference), calibrated(reference)
    np.testing.assert_array_equal(a.cells(x), b.cells(x))


def test_benign_unflagged_random_and_permuted_flagged(reference: tuple[np.ndarray, Scaling]) -> None:
    det = calibrated(reference)
    assert warm_benign(det) <= 1
    # Class-skewed benign clients stay in the benign cells too.
    for k in range(10):
        x, _ = digits(np.random.default_rng(300 + k), 100, classes=[k])
        assert not run(det, events(f"one-class{k}", x))[0].flagged.any()
    rng = np.random.default_rng(21)
    sig, _ = run(det, events("random", uniform_random(rng, 150)))
    assert first_flag(sig) == 20 and sig.values[-1] > 0.6
    sig, _ = run(det, events("knockoff", permuted(digits(rng, 150)[0])))
    assert sig.flagged[-1] and sig.values[-1] > 0.4


@pytest.mark.parametrize("seed", range(1, 7))
def test_other_hyperplane_draws_work_as_well(reference: tuple[np.ndarray, Scaling], seed: int) -> None:
    """A single partition is a lottery (a far region may share a cell with benign data);
    the majority over 4 partitions is not: every draw separates random from benign."""
    det = calibrated(reference, seed=seed)
    assert warm_benign(det, clients=15) == 0
    sig, _ = run(det, events("random", uniform_random(np.random.default_rng(seed), 60)))
    assert first_flag(sig) == 20 and sig.values[-1] > 0.8


def test_a_colluding_split_is_caught_member_by_member(reference: tuple[np.ndarray, Scaling]) -> None:
    """Five clients split 200 random queries (40 each). Novelty is a property of the
    cell, so each member's novelty share is the attack's share whatever its volume:
    every member is flagged once it has min_events queries."""
    det = calibrated(reference)
    x = uniform_random(np.random.default_rng(22), 200)
    members = [run(det, events(f"sybil{k}", x[40 * k : 40 * (k + 1)]))[0] for k in range(5)]
    assert all(first_flag(sig) == 20 for sig in members)


def test_batching_does_not_change_results(reference: tuple[np.ndarray, Scaling]) -> None:
    rng = np.random.default_rng(24)
    x = np.concatenate([digits(rng, 60)[0], uniform_random(rng, 80), digits(rng, 60)[0]])
    x = np.concatenate([x, x[:40]])  # revisits, also inside batches
    results = []
    for sizes in (1, 32, 240, (7, 1, 50, 2)):
        det = calibrated(reference)
        sig, state = run(det, events("c", x), sizes)
        results.append((sig, state))
    sig0, state0 = results[0]
    assert (~np.isnan(sig0.values)).all() and sig0.flagged.any() and not sig0.flagged.all()
    for sig, state in results[1:]:
        assert_same_signals(sig0, sig)
        for key in state0:
            np.testing.assert_array_equal(state0[key], state[key])


def test_client_state_round_trip(reference: tuple[np.ndarray, Scaling]) -> None:
    det = calibrated(reference)
    assert det.shared_state() is None  # rarity comes from the reference: nothing shared across clients
    x = np.concatenate([digits(np.random.default_rng(25), 30)[0], uniform_random(np.random.default_rng(26), 30)])
    _, state = run(det, events("c", x))
    a, _ = run(det, events("c", x[:20]), state={k: v.copy() for k, v in state.items()})
    b, _ = run(calibrated(reference), events("c", x[:20]), state=savez_roundtrip(state))
    assert_same_signals(a, b)


def test_client_statistics_and_state_size(reference: tuple[np.ndarray, Scaling]) -> None:
    det = calibrated(reference)
    state = det.init_state()
    assert sum(a.nbytes for a in state.values()) == 4 * 1024 // 8 + 3 * 100 + 16
    assert np.isnan(det.class_entropy(state)) and det.coverage(state) == 0.0
    x, y = digits(np.random.default_rng(27), 200, classes=[3])
    _, state = run(det, events("c", x, probs=model_probs(x)), state=state)
    assert sum(a.nbytes for a in state.values()) == 4 * 1024 // 8 + 3 * 100 + 16
    assert det.class_entropy(state) == pytest.approx(0.0)
    x, _ = digits(np.random.default_rng(28), 300)
    _, state = run(det, events("c", x, probs=model_probs(x)), state=state)
    assert det.class_entropy(state) > 0.9
    cov = det.coverage(state)
    _, state = run(det, events("c", uniform_random(np.random.default_rng(29), 200)), state=state)
    assert det.coverage(state) > cov  # random queries open new cells


def test_inputs_without_vectors_are_not_judged(reference: tuple[np.ndarray, Scaling]) -> None:
    det = calibrated(reference)
    assert judge(det, det.init_state(), Batch("c", "m", [Event("c", "m", 0.0, "text", text="hi")])) is None
    assert det.fit(Reference(vectors=None, probs=None, scaling=None)) is None
    with pytest.raises(ValueError):
        CoverageDetector(CoverageParams(bits=8), context(reference[1])).load_reference(
            calibrated(reference).fit(Reference(vectors=reference[0], probs=None, scaling=reference[1]))  # type: ignore[arg-type]
        )
    bare = CoverageDetector(CoverageParams(), ModelContext("m", "tabular", None, None, None))
    assert judge(bare, bare.init_state(), Batch("c", "m", events("c", uniform_random(np.random.default_rng(1), 2)))) is None
    # Without a reference, or with one fitted on too few samples to call a cell rare: nothing is judged.
    early = CoverageDetector(CoverageParams(), context(reference[1]))
    small = reference[0][:400]
    assert early.fit(Reference(vectors=small, probs=None, scaling=Scaling.fit(small))) is None
    state = early.init_state()
    assert judge(early, state, Batch("c", "m", events("c", uniform_random(np.random.default_rng(1), 5)))) is None
    assert not state["visited"].any()
