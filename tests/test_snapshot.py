"""exporter.snapshot: nested state to bytes and back, without pickle; the pipeline's checkpoint locking."""

from __future__ import annotations

import io
import json
import threading
import time
from typing import Any

import numpy as np
import pytest

from exporter.config import Settings
from exporter.detectors.fingerprint import client_key
from exporter.pipeline import Pipeline
from exporter.snapshot import dump, pack, unpack
from tests.test_pipeline import lines


def sample_state() -> dict:
    grid = np.arange(12, dtype=np.float64).reshape(3, 4)
    return {
        "version": 1,
        "name": "m",
        "none": None,
        "scalar": np.int64(7),
        "arrays": [
            np.array(True),
            np.zeros(0, dtype=np.float32),
            np.array([1, -2, 3], dtype=np.int8),
            np.array([2**64 - 1, 0], dtype=np.uint64),
            grid.T,  # not contiguous
            grid[:, 1],
            np.full((2, 2), np.nan),
        ],
        "nested": {"a": {"b": np.array([0.5, 1.5], dtype=np.float32)}, "k": [1, 2.5, "x"]},
    }


def assert_same(a: object, b: object) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
        assert b.flags.writeable  # restored state is updated in place later
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.generic):
        assert b == a.item() and type(b) is type(a.item())
    else:
        assert a == b


def test_round_trip_keeps_structure_dtypes_and_values() -> None:
    state = sample_state()
    restored = unpack(pack(state))
    assert_same(state, restored)
    assert all(a.flags.owndata for a in restored["arrays"])  # not views keeping the whole archive alive


def legacy_archive(meta: object, *arrays: np.ndarray) -> bytes:
    """An archive of the earlier layout: the JSON structure, and one member ``a<i>`` per array."""
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **{f"a{i}": a for i, a in enumerate(arrays)})
    return buf.getvalue()


def test_snapshots_of_the_earlier_layout_are_still_read() -> None:
    grid = np.arange(6, dtype=np.float32).reshape(2, 3)
    restored = unpack(legacy_archive({"version": 1, "m": {"x": {"__ndarray__": 0}, "k": [1, 2.5, "x"]}, "y": {"__ndarray__": 1}}, grid, np.array(True)))
    assert restored["version"] == 1 and restored["m"]["k"] == [1, 2.5, "x"]
    assert_same(grid, restored["m"]["x"])
    assert restored["y"].dtype == np.bool_ and bool(restored["y"])


def forged(meta: object, blob: bytes = b"\0" * 16) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), __blob__=np.frombuffer(blob, dtype=np.uint8))
    return buf.getvalue()


@pytest.mark.parametrize(
    "descriptor",
    [
        ["|O", [1], 0],  # objects: never
        ["<U4", [1], 0],
        ["<f8", [3], 0],  # beyond the blob
        ["<f8", [1], 12],
        ["<f8", [-1], 0],
        ["<f8", [1], -8],
        ["not a dtype", [1], 0],
        ["<f8", "x", 0],
        ["<f8", [1]],
    ],
)
def test_tampered_descriptors_are_refused(descriptor: list) -> None:
    with pytest.raises(ValueError):
        unpack(forged({"x": {"__ndarray__": descriptor}}))


@pytest.mark.parametrize("data", [b"", b"not a zip", legacy_archive({"x": {"__ndarray__": 0}}, np.zeros(2))[:50], pack({"x": np.zeros(4)})[:-30]])
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        unpack(data)


def test_arrays_of_objects_or_text_are_not_packed() -> None:
    for bad in (np.array([object()]), np.array(["text"])):
        with pytest.raises(TypeError):
            pack({"x": bad})


class CountingLock:
    """The pipeline's lock, counting how many clients each hold copied."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.lock, self.pipeline, self.holds = pipeline.lock, pipeline, 0

    def __enter__(self) -> None:
        self.lock.acquire()
        self.holds += 1

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_the_snapshot_copies_clients_a_chunk_per_hold_of_the_lock() -> None:
    p = Pipeline(Settings())
    for i in range(450):
        p.ingest_lines(lines(f"c{i}", 2, seed=i % 7))
    p.lock = counting = CountingLock(p)  # type: ignore[assignment]
    data = pack(p.snapshot_copy())
    p.lock = counting.lock
    assert counting.holds == 1 + 3  # the models, then 450 clients 200 at a time
    q = Pipeline(Settings())
    assert q.restore(data) == 450
    assert [c.client_id for c in q.store.values()] == [c.client_id for c in p.store.values()]  # LRU order kept


def test_a_snapshot_taken_while_events_arrive_restores() -> None:
    p = Pipeline(Settings(state={"max_clients": 300, "dir": None}))
    for i in range(300):
        p.ingest_lines(lines(f"c{i}", 2, seed=i % 5))
    stop = threading.Event()

    def ingest() -> None:
        i = 300
        while not stop.is_set():  # new clients evict old ones while the snapshot runs
            p.ingest_lines(lines(f"c{i}", 1, seed=i % 5))
            i += 1

    t = threading.Thread(target=ingest)
    t.start()
    try:
        snaps = [pack(p.snapshot_copy()) for _ in range(5)]
    finally:
        stop.set()
        t.join()
    for data in snaps:
        q = Pipeline(Settings(state={"max_clients": 300, "dir": None}))
        assert 0 < q.restore(data) <= 300


def test_a_checkpoint_streamed_to_a_file_restores_like_the_bytes(tmp_path) -> None:
    from exporter.atomic import atomic_write

    p = Pipeline(Settings())
    for i in range(30):
        p.ingest_lines(lines(f"c{i}", 3, seed=i % 4))
    path = tmp_path / "state.npz"
    atomic_write(path, lambda fh: dump(p.snapshot_copy(), fh))
    from_file, from_bytes = Pipeline(Settings()), Pipeline(Settings())
    with open(path, "rb") as fh:
        assert from_file.restore(fh) == 30
    assert from_bytes.restore(pack(p.snapshot_copy())) == 30
    for c in p.store.values():
        a, b = from_file.store[c.client_id], from_bytes.store[c.client_id]
        assert (a.total, a.scores, a.flags) == (b.total, b.scores, b.flags) == (c.total, c.scores, c.flags)
        for model, per in c.detector_state.items():
            for name, state in per.items():
                for key, value in state.items():
                    np.testing.assert_array_equal(a.detector_state[model][name][key], value)


def test_a_failed_streamed_write_leaves_the_previous_checkpoint(tmp_path) -> None:
    from exporter.atomic import atomic_write

    path = tmp_path / "state.npz"
    path.write_bytes(b"previous")

    def half(fh) -> None:
        fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, half)
    assert path.read_bytes() == b"previous" and [f.name for f in tmp_path.iterdir()] == ["state.npz"]


def _thirty_clients_with_links() -> tuple[Settings, dict[str, Any]]:
    """Settings with the links detector on, and the snapshot of a pipeline that judged 30 clients under them."""
    settings = Settings(detectors={"links": {"enabled": True}}, state={"dir": None})
    p = Pipeline(settings)
    for i in range(30):
        p.ingest_lines(lines(f"c{i}", 20, seed=i % 4))
    return settings, p.snapshot_copy()


def test_a_shared_index_or_groups_that_do_not_hold_together_are_dropped_and_the_rest_restores(caplog: pytest.LogCaptureFixture) -> None:
    """A snapshot whose links index names queries it never held, and whose groups put one client
    in two groups, restores every client: those parts start empty, each with a warning (before,
    the first failed the whole restore half-way, the second broke every later read of the groups)."""
    import logging

    settings, doc = _thirty_clients_with_links()
    shared = doc["models"]["digits"]["shared"]["links"]["state"]
    shared["slots"] = np.array(shared["slots"], copy=True)
    shared["slots"][0] = 10**12
    doc["groups"]["models"]["digits"] = _two_members(groups=2)
    q = Pipeline(settings)
    with caplog.at_level(logging.WARNING):
        assert q.restore(pack(doc)) == 30
    assert "dropped 1 shared detector index(es) that do not hold together" in caplog.text
    assert "the saved groups of 1 model(s) do not hold together" in caplog.text
    assert q.group_summaries() == [] and q.group_ids("c1") == []
    q.ingest_lines(lines("c99", 5, seed=1))  # the links detector works on, from an empty index
    assert value_of(q, "monitaur_detector_errors_total", detector="links") == 0.0


def _two_members(groups: int = 1) -> dict[str, Any]:
    """A model's saved groups: clients c1 and c2, linked, in group g1 (and in g2 as well when ``groups`` is 2)."""
    k1, k2 = client_key("c1"), client_key("c2")
    member = {"key": k1, "name": "c1", "flagged_at": 1.0, "own": [0.5, 0.75, 1.0], "peers": [[k2, 3, 1.0, 2, 1]]}
    group = {"gid": "g1", "number": 1, "created": 1.0, "joined": [[k1, 1.0], [k2, 1.0]], "links": 3, "score": 0.5, "max_score": 0.5,
             "flagged": True, "first_flagged": 1.0}
    return {"clients": [member, {**member, "key": k2, "name": "c2", "peers": [[k1, 3, 1.0, 1, 2]]}],
            "groups": [{**group, "gid": f"g{n}", "number": n} for n in range(1, groups + 1)], "maxima": []}


def test_restored_groups_are_scored_over_their_members_restored_queries() -> None:
    """After a restart a group's score is its links over its members' queries, as before it. The
    restored groups count the restored clients' queries: they used to count none until the
    model's next block, so that every restored group scored 1 and was flagged, on reads and
    sweeps alike."""
    settings, doc = _thirty_clients_with_links()
    now = time.time()
    saved = _two_members()
    for c in saved["clients"]:
        c.update(flagged_at=now, own=[now] * 3, peers=[[*c["peers"][0][:2], now, *c["peers"][0][3:]]])
    g = saved["groups"][0]
    g.update(created=now, joined=[[k, now] for k, _ in g["joined"]], score=0.075, max_score=0.075, first_flagged=now)
    doc["groups"]["models"]["digits"] = saved
    q = Pipeline(settings)
    assert q.restore(pack(doc)) == 30
    for _ in range(2):
        [s] = q.group_summaries()
        assert s.score == pytest.approx(3 / 40) and {m.client: m.queries for m in s.members} == {"c1": 20, "c2": 20}
        q.expire()  # the periodic sweep scores them the same way


def _edited(model: dict[str, Any], edit: str) -> Any:
    """The saved groups of one model, broken in one way a hand-edited or corrupted snapshot could be."""
    first, second = model["clients"]
    if edit == "not a record":
        return []
    if edit == "null":
        return None
    if edit == "a name that is not its key's":
        return {**model, "clients": [{**first, "name": "c3"}, second]}
    if edit == "one client twice":
        return {**model, "clients": [first, second, {**first, "peers": []}]}  # which of the two is it?
    if edit == "a member without a name":  # not in the group yet: the next link would make it one
        return {**model, "clients": [{**first, "name": None}, second], "groups": []}
    if edit == "own links that are not times":
        return {**model, "clients": [{**first, "own": ["x"]}, second]}
    if edit == "an edge's two clients made more links than it has":
        return {**model, "clients": [{**first, "peers": [[second["key"], 3, 1.0, 3, 1]]}, second]}
    assert edit == "a group number past 18 digits"
    n = 10**18 + 1
    return {**model, "groups": [{**model["groups"][0], "gid": f"g{n}", "number": n}]}


@pytest.mark.parametrize("edit", ["not a record", "null", "a name that is not its key's", "one client twice", "a member without a name",
                                  "own links that are not times", "an edge's two clients made more links than it has",
                                  "a group number past 18 digits"])
def test_a_models_saved_groups_that_do_not_hold_together_restore_no_groups_for_it(caplog: pytest.LogCaptureFixture, edit: str) -> None:
    """Records a checkpoint could hold after a hand edit or corruption: each drops that model's
    groups with a warning, and the clients restore. Before, the first two failed the restore
    half-way (clients in the store, verdicts not restored); a name that is not its key's left
    a released client listed in its group; of two records of one client, the later was kept
    silently; an unnamed client that could join made every scrape fail at its next link; a
    4,000-digit group number gave every new group such an id, which no label bound and no
    groups API route accepts."""
    import logging

    from prometheus_client import generate_latest

    settings, doc = _thirty_clients_with_links()
    good = _two_members()
    doc["groups"]["models"]["digits"] = good
    q = Pipeline(settings)
    assert q.restore(pack(doc)) == 30 and q.group_ids("c1") == ["g1"]  # the unbroken record restores
    doc["groups"]["models"]["digits"] = _edited(good, edit)
    q = Pipeline(settings)
    with caplog.at_level(logging.WARNING):
        assert q.restore(pack(doc)) == 30
    assert "the saved groups of 1 model(s) do not hold together" in caplog.text
    assert q.group_summaries() == [] and q.group_ids("c1") == []
    q.ingest_lines(lines("c1", 5, seed=1))
    assert b"monitaur_events_total" in generate_latest(q.metrics.registry)
    assert q.groups.state()["next"] < 10**18  # the ids of new groups stay within 18 digits


@pytest.mark.parametrize("saved", [{"next": "x", "models": {}}, {"next": None, "models": {}}, {"next": 10**19, "models": {}},
                                   {"next": 2, "models": []}, {"next": 2, "models": None}])
def test_saved_groups_that_are_not_a_mapping_of_models_restore_none_and_the_clients_restore(caplog: pytest.LogCaptureFixture,
                                                                                           saved: dict[str, Any]) -> None:
    """The groups part of a snapshot is read after the clients are in the store: whatever its
    shape, it never fails the restore (before, these raised half-way through it)."""
    import logging

    settings, doc = _thirty_clients_with_links()
    doc["groups"] = saved
    q = Pipeline(settings)
    with caplog.at_level(logging.WARNING):
        assert q.restore(pack(doc)) == 30
    assert "the saved groups are not readable; every model starts without groups" in caplog.text
    assert q.group_summaries() == []


def value_of(p: Pipeline, name: str, **labels: str) -> float | None:
    return p.metrics.registry.get_sample_value(name, labels)


def test_a_malformed_client_record_fails_the_restore_before_anything_is_loaded() -> None:
    """The caller of a failed restore logs that it starts empty: so it must be empty. Every client
    record is read before anything is loaded (before, the clients before the bad one stayed)."""
    p = Pipeline(Settings(detectors={"links": {"enabled": True}}, state={"dir": None}))
    for i in range(30):
        p.ingest_lines(lines(f"c{i}", 20, seed=i % 4))
    doc = p.snapshot_copy()
    doc["clients"][-1]["total"] = "many"
    q = Pipeline(Settings(detectors={"links": {"enabled": True}}, state={"dir": None}))
    with pytest.raises(ValueError):
        q.restore(pack(doc))
    assert len(q.store) == 0 and q.runtimes.get("digits") is None


def test_a_snapshot_from_before_own_link_times_and_who_made_the_links_restores_its_groups() -> None:
    """Snapshots before own links were kept as times saved a count, and edges without who made
    their links: the groups restore, the clients without own-link times (their flags keep them
    members for their TTL), each edge as made by both of its clients."""
    settings, doc = _thirty_clients_with_links()
    old = _two_members()
    old["clients"] = [{**c, "own": 3, "peers": [e[:3] for e in c["peers"]]} for c in old["clients"]]
    doc["groups"]["models"]["digits"] = old
    q = Pipeline(settings)
    assert q.restore(pack(doc)) == 30 and q.group_ids("c1") == ["g1"]
    restored = q.groups.state()["models"]["digits"]["clients"]
    assert all(c["own"] == [] for c in restored)
    assert all(e[3:] == [1, 1] for c in restored for e in c["peers"])  # made by both: the group stands at its next re-split
