"""Blacklight-style fingerprints in one index shared by every client of a model.

Traffic is digits-shaped (64 features 0..16, 10 class prototypes + noise). Query-based
adversarial search is modelled as HopSkipJump-like probing (rounds of tiny Gaussian
probes around a slowly moving point) and SimBA (one coordinate changed per query).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from pydantic import ValidationError

from exporter.detectors.base import Batch, Block, ModelContext
from exporter.detectors.fingerprint import (
    FingerprintDetector,
    FingerprintParams,
    client_key,
    top_hashes,
    window_hashes,
)
from exporter.events import Event
from exporter.detectors.kit import Scaling
from tests.synthetic import judge, WORLD, D, K, hopskipjump, simba


def near_copies(x: np.ndarray, n: int) -> np.ndarray:
    """``n`` copies of ``x``, copy i with feature i moved by 0.001: distinct inputs, same fingerprint."""
    out = np.repeat(x[None, :], n, axis=0)
    out[np.arange(n), np.arange(n)] += 0.001
    return out


def context() -> ModelContext:
    scaling = Scaling.fit(WORLD.sample(np.random.default_rng(99), 3000))
    return ModelContext(name="m", modality="tabular", input_dim=D, num_classes=K, scaling=scaling)


def make_events(x: np.ndarray, client: str = "c", t0: float = 1000.0, dt: float = 1.0) -> list[Event]:
    return [Event(client, "m", t0 + i * dt, "tabular", vector=x[i]) for i in range(len(x))]


def feed(det: FingerprintDetector, states: dict[str, dict], events: list[Event], size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Feed events in order, batching consecutive events of the same client (at most ``size``)."""
    values, flags = [], []
    i = 0
    while i < len(events):
        j = i + 1
        while j < len(events) and j - i < size and events[j].client == events[i].client:
            j += 1
        chunk = events[i:j]
        state = states.setdefault(chunk[0].client, det.init_state())
        out = judge(det, state, Batch(chunk[0].client, "m", chunk))
        values.append(np.full(len(chunk), np.nan) if out is None else out.values)
        flags.append(np.zeros(len(chunk), dtype=bool) if out is None else out.flagged)
        i = j
    return np.concatenate(values), np.concatenate(flags)


# ---------------------------------------------------------------------------
# Hashing
# ---------------------------------------------------------------------------


def test_window_hashes_depend_on_window_content_only() -> None:
    q = np.arange(-3, 9, dtype=np.int64)[None, :]  # 12 values
    h = window_hashes(q, 4, 1)
    assert h.shape == (1, 9) and h.dtype == np.uint64 and (h != 0).all()
    assert len(set(h[0].tolist())) == 9
    # the same content at another position hashes the same
    shifted = np.concatenate([[7, 7], q[0, 2:6], [1]])[None, :]
    assert window_hashes(shifted, 4, 1)[0, 2] == h[0, 2]
    # rows are independent, stride subsamples, the window is clamped to the input
    both = window_hashes(np.concatenate([q, q[:, ::-1]]), 4, 1)
    assert both[0].tolist() == h[0].tolist()
    assert window_hashes(q, 4, 3).tolist() == h[:, ::3].tolist()
    assert window_hashes(q, 50, 1).shape == (1, 1)
    assert top_hashes(np.array([[5, 3, 5, 9, 1]], dtype=np.uint64), 3).tolist() == [[3, 5, 9]]
    assert top_hashes(np.array([[4, 4, 4]], dtype=np.uint64), 3).tolist() == [[0, 0, 4]]


def test_window_hash_known_value() -> None:
    """Pins the hash function: a change here changes every fingerprint in saved indexes."""
    h = window_hashes(np.array([[0, 1, 2, 3]], dtype=np.int64), 4, 1)
    acc = sum(v * pow(0x100000001B3, j, 1 << 64) for j, v in enumerate([0, 1, 2, 3])) % (1 << 64)
    z = (acc ^ 0x626C61636B6C6974 ^ 4) & ((1 << 64) - 1)
    z = (z + 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    z ^= z >> 31
    assert int(h[0, 0]) == z | 1
    assert client_key("alice") == client_key("alice") != client_key("bob")


# ---------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------


def test_adversarial_search_from_one_client_is_flagged_within_dozens_of_queries() -> None:
    for seed, attack in enumerate((hopskipjump, simba)):
        det = FingerprintDetector(FingerprintParams(), context())
        states: dict[str, dict] = {}
        values, flags = feed(det, states, make_events(attack(np.random.default_rng(seed), 150), client="eve"))
        assert flags.any(), attack.__name__
        assert int(np.argmax(flags)) < 40
        assert values[-1] > 0.5
        assert int(states["eve"]["cross"]) == 0
        assert det.peer_matches("eve") == (0, {})


def test_a_search_split_over_ten_sybils_flags_every_member_and_names_peers() -> None:
    # Each member sends only 40 queries, a quarter of which match on this draw: a threshold
    # of 0.25 (calibration sets it per model; the default is 0.3) flags every member.
    det = FingerprintDetector(FingerprintParams(threshold=0.25), context())
    members = [f"sybil-{i}" for i in range(10)]
    x = hopskipjump(np.random.default_rng(1), 400)
    events = [Event(members[i % 10], "m", 1000.0 + i, "tabular", vector=x[i]) for i in range(len(x))]
    states: dict[str, dict] = {}
    _, flags = feed(det, states, events)
    for name in members:
        member_flags = flags[[i for i, e in enumerate(events) if e.client == name]]
        assert member_flags.any(), name  # each member saw only 40 queries of the search
        total, peers = det.peer_matches(name)
        assert total >= 10
        assert len(peers) == 5 and set(peers) <= set(members) - {name}
        assert int(states[name]["cross"]) == total


def test_benign_clients_are_not_flagged_even_when_sending_the_same_popular_inputs() -> None:
    det = FingerprintDetector(FingerprintParams(), context())
    rng = np.random.default_rng(3)
    popular = WORLD.sample(rng, 10)  # e.g. an app's example inputs, sent by everyone
    events: list[Event] = []
    for c in range(20):
        own = WORLD.sample(rng, 50)
        mixed = np.concatenate([own[:25], popular, own[25:], popular])
        events += make_events(mixed, client=f"app-{c}", t0=1000.0 + c)
    rng.shuffle(events)  # clients interleaved
    events.sort(key=lambda e: e.ts)
    states: dict[str, dict] = {}
    _, flags = feed(det, states, events)
    assert not flags.any()
    assert sum(int(s["matched"]) for s in states.values()) == 0
    assert all(det.peer_matches(f"app-{c}") == (0, {}) for c in range(20))


def test_ttl_expires_old_queries() -> None:
    det = FingerprintDetector(FingerprintParams(ttl_seconds=100.0, min_events=1), context())
    x = near_copies(WORLD.sample(np.random.default_rng(2), 1)[0], 4)
    states: dict[str, dict] = {}
    feed(det, states, make_events(x[:1], client="a", t0=0.0))
    feed(det, states, make_events(x[1:2], client="b", t0=50.0))  # a's query is 50 s old: it matches
    assert int(states["b"]["matched"]) == 1 and det.peer_matches("b") == (1, {"a": 1})
    feed(det, states, make_events(x[2:3], client="c", t0=120.0))  # a's is past the TTL, b's is not
    assert int(states["c"]["matched"]) == 1 and det.peer_matches("c") == (1, {"b": 1})
    assert det.index_size() == 2  # a's query left the index at c's batch
    feed(det, states, make_events(x[3:], client="d", t0=400.0))
    assert int(states["d"]["matched"]) == 0 and det.index_size() == 1


def test_the_size_cap_evicts_the_oldest_queries() -> None:
    rng = np.random.default_rng(4)
    x = near_copies(WORLD.sample(rng, 1)[0], 2)
    filler = WORLD.sample(rng, 40)
    for between, expect in ((15, 1), (16, 0)):
        det = FingerprintDetector(FingerprintParams(max_queries=16, min_events=1), context())
        states: dict[str, dict] = {}
        feed(det, states, make_events(x[:1], client="a"))
        feed(det, states, make_events(filler[:between], client="f", t0=2000.0))
        feed(det, states, make_events(x[1:], client="b", t0=3000.0))
        assert int(states["b"]["matched"]) == expect, between
        assert det.index_size() == min(16, between + 2)


def test_shared_state_round_trips_through_savez() -> None:
    det = FingerprintDetector(FingerprintParams(), context())
    x = hopskipjump(np.random.default_rng(6), 60)
    states: dict[str, dict] = {}
    feed(det, states, make_events(x[:30], client="s1"))
    feed(det, states, make_events(x[30:40], client="s2", t0=2000.0))
    before = det.peer_matches("s2")
    assert before[0] > 0
    shared = det.shared_state()
    assert shared is not None and all(isinstance(v, np.ndarray) for v in shared.values())
    buf = io.BytesIO()
    np.savez(buf, **shared)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        restored = {k: npz[k] for k in npz.files}
    fresh = FingerprintDetector(FingerprintParams(), context())
    fresh.load_shared_state(restored)
    assert fresh.index_size() == 40 and fresh.peer_matches("s2") == before
    # matching goes on identically in the restored index and the original
    tail = make_events(x[40:], client="s3", t0=3000.0)
    s_a: dict[str, dict] = {}
    s_b: dict[str, dict] = {}
    va, fa = feed(det, s_a, tail)
    vb, fb = feed(fresh, s_b, tail)
    np.testing.assert_array_equal(va, vb)
    assert int(s_b["s3"]["cross"]) == int(s_a["s3"]["cross"]) > 0
    assert fresh.peer_matches("s3") == det.peer_matches("s3")
    assert "s2" in fresh.peer_matches("s3")[1] and set(fresh.peer_matches("s3")[1]) <= {"s1", "s2"}
    with pytest.raises(ValueError):
        FingerprintDetector(FingerprintParams(top_k=8), context()).load_shared_state(restored)


def test_the_head_table_grows_with_the_index_and_its_rebuild_answers_like_the_incremental_one() -> None:
    det = FingerprintDetector(FingerprintParams(), context())
    rng = np.random.default_rng(12)
    feed(det, {}, make_events(WORLD.sample(rng, 1), client="g"))
    # one query: a small ring and table, not a full index's 32 MiB
    assert det._alloc == FingerprintDetector._INITIAL_ROWS
    assert det._head.nbytes + det._hashes.nbytes + det._prev.nbytes < 256 * 1024
    x = np.concatenate([WORLD.sample(rng, 1500), hopskipjump(rng, 1000)])
    bits = []
    for part in np.array_split(x, 10):
        feed(det, {}, make_events(part, client="g"), size=300)  # the ring grows 256 -> ... -> 4096 rows
        bits.append(det._bits)
    assert det._alloc == 4096
    assert 1 << det._bits >= 2 * det._alloc * 20  # at least two buckets per entry
    assert bits[-1] > bits[0] and all(b - a in (0, FingerprintDetector._GROWTH_BITS) for a, b in zip(bits, bits[1:]))
    live = det._hashes[: det._next].ravel()
    live = live[live != 0]
    incremental = det._find(live)
    det._relink()
    rebuilt = det._find(live)
    np.testing.assert_array_equal(incremental[1], rebuilt[1])
    assert (rebuilt[1] >= 0).mean() > 0.9  # most held hashes head their bucket (others share one)


def test_results_do_not_depend_on_the_batching_while_the_index_grows() -> None:
    rng = np.random.default_rng(13)
    x = np.concatenate([hopskipjump(rng, 700), WORLD.sample(rng, 700), simba(rng, 700)])
    events = [Event(f"c{i % 3}", "m", 1000.0 + i, "tabular", vector=x[i]) for i in range(len(x))]
    results = []
    for size in (1, 7, 500):
        det = FingerprintDetector(FingerprintParams(), context())
        block_values = []
        for start in range(0, len(events), size):
            block = Block("m", events[start : start + size])
            det.prepare(block)
            block_values.append(block.prepared["fingerprint"][0])
        results.append((np.concatenate(block_values), det._bits, det.shared_state()))
    ref = results[0]
    assert ref[1] > FingerprintDetector._MIN_BITS and np.nansum(ref[0]) > 0
    for values, bits, shared in results[1:]:
        np.testing.assert_array_equal(values, ref[0])
        assert bits == ref[1]
        for key in ("ids", "hashes", "ts", "digest", "client"):  # the index (the LRU of names follows the blocks)
            np.testing.assert_array_equal(shared[key], ref[2][key])


def test_forget_client_drops_its_evidence() -> None:
    det = FingerprintDetector(FingerprintParams(), context())
    x = hopskipjump(np.random.default_rng(7), 40)
    states: dict[str, dict] = {}
    feed(det, states, make_events(x[:20], client="a"))
    feed(det, states, make_events(x[20:], client="b", t0=2000.0))
    assert det.peer_matches("b")[0] > 0
    det.forget_client("b")
    assert det.peer_matches("b") == (0, {})
    assert det.index_size() == 40  # its queries stay: they are evidence about others


def test_batching_does_not_change_the_result() -> None:
    rng = np.random.default_rng(8)
    x = np.concatenate([hopskipjump(rng, 80), WORLD.sample(rng, 80), simba(rng, 80)])
    own = make_events(x, client="x")
    other = make_events(hopskipjump(np.random.default_rng(8), 50), client="y", t0=500.0)
    results = []
    for size in (1, 5, 32, 300):
        det = FingerprintDetector(FingerprintParams(max_queries=100), context())
        states: dict[str, dict] = {}
        feed(det, states, other)
        values, flags = feed(det, states, own, size=size)
        results.append((values, flags, {k: v.copy() for k, v in states["x"].items()}, det.peer_matches("x"), det.shared_state()))
    ref = results[0]
    assert ref[1].any() and not ref[1].all()
    for values, flags, state, peers, shared in results[1:]:
        np.testing.assert_array_equal(values, ref[0])
        np.testing.assert_array_equal(flags, ref[1])
        for key in state:
            np.testing.assert_array_equal(state[key], ref[2][key])
        assert peers == ref[3]
        for key in shared:
            np.testing.assert_array_equal(shared[key], ref[4][key], err_msg=key)


def test_encoded_images_are_fingerprinted_by_quantized_pixels() -> None:
    det = FingerprintDetector(FingerprintParams(), ModelContext(name="m", modality="image", input_dim=None, num_classes=10))
    rng = np.random.default_rng(9)
    base = rng.integers(0, 256, (32, 32, 3))
    search = [np.clip(base + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8) for _ in range(30)]
    natural = [rng.integers(0, 256, (32, 32, 3)).astype(np.uint8) for _ in range(30)]
    states: dict[str, dict] = {}
    _, flags = feed(det, states, [Event("eve", "m", float(i), "image", image=img) for i, img in enumerate(search)])
    assert flags.any()
    _, flags = feed(det, states, [Event("bob", "m", 100.0 + i, "image", image=img) for i, img in enumerate(natural)])
    assert not flags.any() and int(states["bob"]["matched"]) == 0
    assert judge(det, det.init_state(), Batch("t", "m", [Event("t", "m", 0.0, "text", text="hi")])) is None


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError):
        FingerprintParams(top_k=10, match_threshold=11)
    with pytest.raises(ValidationError):
        FingerprintParams(window=5, min_events=6)
    with pytest.raises(ValidationError):
        FingerprintParams(quantum=0)
    assert FingerprintDetector.threshold_param == "threshold" and FingerprintDetector.name == "fingerprint"


def test_a_restored_index_fingerprints_like_the_original() -> None:
    ctx = context()
    det = FingerprintDetector(FingerprintParams(min_events=1), ctx)
    x = near_copies(WORLD.sample(np.random.default_rng(12), 1)[0], 2)
    states: dict[str, dict] = {}
    feed(det, states, make_events(x[:1], client="a"))
    feed(det, states, make_events(x[1:], client="b", t0=2000.0))
    assert int(states["b"]["matched"]) == 1
    shared = det.shared_state()
    assert shared is not None
    fresh = FingerprintDetector(FingerprintParams(min_events=1), ctx)
    fresh.load_shared_state(shared)
    feed(fresh, {}, make_events(x[:1] + 0.002, client="c", t0=3000.0))
    assert fresh.peer_matches("c")[0] == 1  # the restored index matches as the original would


def test_vectors_are_not_judged_before_the_model_has_a_scaling() -> None:
    det = FingerprintDetector(FingerprintParams(min_events=1), ModelContext(name="m", modality="tabular", input_dim=D, num_classes=K))
    x = near_copies(WORLD.sample(np.random.default_rng(12), 1)[0], 3)
    values, _ = feed(det, {}, make_events(x))
    assert np.isnan(values).all() and det.index_size() == 0

def test_a_block_that_fails_halfway_leaves_the_index_evidence_and_names_as_they_were() -> None:
    rng = np.random.default_rng(14)
    x = np.concatenate([hopskipjump(rng, 1500), WORLD.sample(rng, 1300)])
    events = [Event(f"c{i % 4}", "m", 1000.0 + i, "tabular", vector=x[i]) for i in range(len(x))]
    a = FingerprintDetector(FingerprintParams(), context())
    b = FingerprintDetector(FingerprintParams(), context())
    for det in (a, b):
        det.prepare(Block("m", events[:300]))
    assert a.peer_matches("c1")[0] > 0
    shared, head, refs = a.shared_state(), a._head.copy(), a._index_refs()[:4]
    evidence = {c: a.peer_matches(c) for c in ("c0", "c1", "c2", "c3")}
    calls = 0
    insert = a._match_and_insert

    def failing(*args):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 3:  # two chunks are in the index, and it grew twice (its table rebuilt once)
            raise MemoryError
        return insert(*args)

    a._match_and_insert = failing  # type: ignore[method-assign]
    block = Block("m", events[300:2800])
    with pytest.raises(MemoryError):
        a.prepare(block)
    assert calls == 3 and a._alloc == refs[0]
    del a._match_and_insert
    assert a._index_refs()[:4] == refs
    np.testing.assert_array_equal(a._head, head)
    after = a.shared_state()
    for key in shared:
        np.testing.assert_array_equal(after[key], shared[key])
    assert {c: a.peer_matches(c) for c in evidence} == evidence
    # and the index goes on as if the failed block had never come
    results = []
    for det in (a, b):
        again = Block("m", events[300:2800])
        det.prepare(again)
        results.append(again.prepared["fingerprint"][0])
    np.testing.assert_array_equal(results[0], results[1])
    assert np.nansum(results[0]) > 0
    for key, value in b.shared_state().items():
        np.testing.assert_array_equal(a.shared_state()[key], value)
    assert a._bits == b._bits and np.array_equal(a._head, b._head)
