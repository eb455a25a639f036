"""Eviction cannot be forced: a flood of fresh client ids pushes out unflagged clients, never flagged ones."""

from __future__ import annotations

from exporter.state import EVICTION_REASONS, ClientStore
from exporter.verdict import FlagRecord

FLAG = FlagRecord(0.0, 0.0, 1, 1, "digits")
from tests.test_pipeline import Clock, lines, make, value


def test_a_flood_of_fresh_ids_does_not_evict_flagged_clients() -> None:
    clock = Clock()
    p = make(clock, state={"max_clients": 20, "dir": None})
    for reason in EVICTION_REASONS:  # every reason exists from the start, at 0
        assert value(p, "monitaur_client_evictions_total", reason=reason) == 0
    p.ingest_lines(lines("bad-1", 3) + lines("bad-2", 3) + lines("good-0", 3))  # "always" flags the bad-* clients
    assert p.store["bad-1"].suspicious and p.store["bad-2"].suspicious
    for i in range(2000):  # one event per fresh id, in batches as a flood arrives
        clock.t += 0.001
        if i % 50 == 0:
            p.ingest_lines([line for j in range(50) for line in lines(f"sybil-{i + j}", 1, seed=j)])
    assert "bad-1" in p.store and "bad-2" in p.store and len(p.store) == 20
    assert p.store["bad-1"].total == 3 and p.store["bad-1"].first_flagged_query == 1  # their flags kept
    assert value(p, "monitaur_client_suspicious", client="bad-1") == 1
    assert value(p, "monitaur_client_evictions_total", reason="lru") == 2000 + 1 - 18
    assert value(p, "monitaur_client_evictions_total", reason="lru_flagged") == 0


def test_a_flagged_client_is_evicted_only_when_every_client_is_flagged() -> None:
    p = make(state={"max_clients": 3, "dir": None})
    p.ingest_lines(lines("bad-1", 1) + lines("good-1", 1) + lines("bad-2", 1))
    p.ingest_lines(lines("bad-3", 1))  # good-1 goes, though the least recently seen is bad-1
    assert set(c.client_id for c in p.store.values()) == {"bad-1", "bad-2", "bad-3"}
    assert value(p, "monitaur_client_evictions_total", reason="lru") == 1
    p.ingest_lines(lines("bad-2", 1) + lines("bad-4", 1))  # all flagged: the least recently seen, bad-1
    assert [c.client_id for c in p.store.values()] == ["bad-3", "bad-2", "bad-4"]
    assert value(p, "monitaur_client_evictions_total", reason="lru_flagged") == 1


def test_flagged_clients_still_leave_by_ttl() -> None:
    clock = Clock()
    p = make(clock, state={"max_clients": 10, "idle_ttl_seconds": 60, "dir": None})
    p.ingest_lines(lines("bad-1", 2) + lines("good-1", 2))
    clock.t += 61
    p.ingest_lines(lines("good-2", 1))
    assert [c.client_id for c in p.store.values()] == ["good-2"]
    assert value(p, "monitaur_client_evictions_total", reason="ttl") == 2


def test_a_verdict_changed_after_touch_files_the_client_before_the_next_eviction() -> None:
    evicted: list[tuple[str, str]] = []
    store = ClientStore(3, 1e9, lambda c, reason: evicted.append((c.client_id, reason)))
    for i, cid in enumerate(["a", "b", "c"]):
        store.touch(cid, float(i))
    store["a"].flag = FLAG  # flagged outside its batch (a is not the client touched last):
    store.refile("a")  # whoever changes it files it again
    store.touch("c", 3.0)
    store["c"].flag = FLAG  # c's batch flags it, after touch: filed at the store's next operation
    store.touch("d", 4.0)
    assert evicted == [("b", "lru")]  # not a, the least recently seen, nor c
    store.touch("c", 5.0)
    store["c"].flag = None  # c's flag is cleared: c is unflagged, and the most recent
    store.touch("e", 6.0)
    assert evicted == [("b", "lru"), ("d", "lru")]
    assert [c.client_id for c in store.values()] == ["c", "e", "a"]


def test_restore_keeps_each_order() -> None:
    p = make(state={"max_clients": 5, "dir": None})
    p.ingest_lines(lines("good-1", 1) + lines("bad-1", 1) + lines("good-2", 1) + lines("bad-2", 1))
    from exporter.snapshot import pack

    q = make(state={"max_clients": 5, "dir": None})
    q.restore(pack(p.snapshot_copy()))
    assert [c.client_id for c in q.store.values()] == ["good-1", "good-2", "bad-1", "bad-2"]
    q.ingest_lines(lines("new-1", 1) + lines("new-2", 1))
    assert "good-1" not in q.store and "bad-1" in q.store
