"""Groups of linked clients (exporter.groups): ids, merges, splits, expiry, directed evidence, snapshots.

These tests feed the registry links directly (what the links detector leaves in
``block.prepared``), so they pin the bookkeeping down independently of how links are found
(tests/test_links.py does that on simulated traffic).
"""

from __future__ import annotations

import numpy as np
import pytest

from exporter.detectors.base import Block
from exporter.detectors.fingerprint import client_key
from exporter.detectors.links import LinksParams
from exporter.events import Event
from exporter.groups import GroupBook, ModelGroups, group_threshold
from exporter.profile import Profile

PARAMS = LinksParams(group_min_links=2, group_threshold=0.05, ttl_seconds=1000.0)


def bare_book(profile: Profile | None = None) -> GroupBook:
    """A book whose clients sent no queries (its source counts 0): for tests of membership, not scores."""
    return GroupBook(lambda client, model: 0, profile)


class Feed:
    """A model's groups fed one link at a time, with per-client query counts."""

    def __init__(self, params: LinksParams = PARAMS) -> None:
        self.queries: dict[str, int] = {}
        self.book = GroupBook(queries=lambda c, m: self.queries.get(c, 0))
        self.groups = self.book.model("m", params)

    def link(self, child: str, parents: list[str], ts: float, flagged: bool = True, queries: int = 0) -> None:
        """One event of ``child`` that continued queries of ``parents`` (after ``queries`` more of its own)."""
        self.queries[child] = self.queries.get(child, 0) + queries + 1
        n = queries + 1  # one block: the child's unlinked queries, then the linked one (every query is a row, as in the pipeline)
        block = Block("m", [Event(child, "m", ts, "tabular", vector=np.zeros(2)) for _ in range(n)])
        keys = np.zeros((n, 2), dtype=np.uint64)
        keys[-1, : len(parents)] = [client_key(p) for p in parents]
        linked = np.zeros(n, dtype=bool)
        linked[-1] = True
        block.prepared["links"] = (np.ones(n, dtype=bool), linked, keys)
        self.groups.observe(block, np.full(n, flagged))

    def members(self) -> dict[str, set[str]]:
        return {gid: {self.groups.clients[k].name for k in g.joined} for gid, g in self.groups.groups.items()}


def test_two_flagged_clients_linked_often_enough_form_a_group_with_a_stable_id() -> None:
    f = Feed()
    f.link("a", ["b"], 1.0)
    assert f.members() == {}  # b is not flagged (it never linked itself), one link is not enough anyway
    f.link("b", ["a"], 2.0)
    assert f.members() == {"g1": {"a", "b"}}
    f.link("c", ["a", "b"], 3.0)
    assert f.members() == {"g1": {"a", "b"}}  # one link to each: not yet
    f.link("c", ["a"], 4.0)
    assert f.members() == {"g1": {"a", "b"}}  # two links with a, but c made both: a link only *to* a client never joins it
    f.link("a", ["c"], 4.5)
    assert f.members() == {"g1": {"a", "b", "c"}}  # each made one: c joins, the id stays
    s = f.groups.summary("g1")
    assert {m.client for m in s.members} == {"a", "b", "c"} and s.links == 6 and s.created == 2.0
    assert all(m.links >= 1 and 0 < m.strength <= 1 for m in s.members)


def test_a_merge_keeps_the_older_id_and_ids_are_never_reused() -> None:
    f = Feed()
    f.link("a", ["b"], 1.0)
    f.link("b", ["a"], 2.0)  # g1 = {a, b}
    f.link("x", ["y"], 3.0)
    f.link("y", ["x"], 4.0)  # g2 = {x, y}
    assert set(f.members()) == {"g1", "g2"}
    f.link("x", ["a"], 5.0)
    f.link("a", ["x"], 6.0)
    assert f.members() == {"g1": {"a", "b", "x", "y"}}
    f.link("p", ["q"], 7.0)
    f.link("q", ["p"], 8.0)
    assert "g3" in f.members() and "g2" not in f.members()


def test_a_merge_after_a_split_keeps_the_older_id() -> None:
    """A part split off by expiry takes a new id, though its members joined earlier than those of
    another group: when the two merge, the id issued first (which may have paged) survives. It
    did not while merges kept the earlier ``created``, and the part's was its earliest member's."""
    f = Feed()  # group_min_links 2, ttl 1000
    for x, y, t in (("a", "b", 0.0), ("c", "b", 100.0), ("d", "c", 100.0), ("x", "y", 700.0)):
        f.link(x, [y], t)
        f.link(y, [x], t)
    for t in (900.0, 1050.0):  # every edge but b-c stays alive
        for x, y in (("a", "b"), ("c", "d"), ("x", "y")):
            f.link(x, [y], t)
            f.link(y, [x], t)
    f.groups.expire(1150.0)
    assert f.members() == {"g1": {"a", "b"}, "g2": {"x", "y"}, "g3": {"c", "d"}}
    assert f.groups.groups["g3"].created == 100.0 < f.groups.groups["g2"].created  # its members' own times
    f.link("c", ["x"], 1200.0)
    f.link("x", ["c"], 1200.0)
    assert f.members() == {"g1": {"a", "b"}, "g2": {"c", "d", "x", "y"}}


def test_a_flagged_part_split_off_by_the_sweep_has_a_first_flagged_time() -> None:
    """The sweep and reads re-split groups without an event time; a part they leave flagged takes
    the time of the latest link between its members as ``first_flagged``, never none."""
    f = Feed()  # group_min_links 2, threshold 0.05, ttl 1000
    for x, y in (("a", "b"), ("b", "c"), ("c", "d")):
        f.link(x, [y], 0.0)
        f.link(y, [x], 0.0)
    for t in (600.0, 900.0):  # b-c ages out
        for x, y in (("a", "b"), ("c", "d")):
            f.link(x, [y], t)
            f.link(y, [x], t)
    assert f.members() == {"g1": {"a", "b", "c", "d"}} and f.groups.groups["g1"].first_flagged == 0.0
    f.book.expire(1001.0)
    by_id = {s.group: s for s in f.book.summaries()}
    assert {g: {m.client for m in s.members} for g, s in by_id.items()} == {"g1": {"a", "b"}, "g2": {"c", "d"}}
    assert by_id["g2"].flagged and by_id["g2"].first_flagged == 900.0
    assert by_id["g1"].first_flagged == 0.0  # the id keeps its own


def test_group_totals_read_zero_when_a_model_has_no_group() -> None:
    """``monitaur_groups{model}`` and ``monitaur_groups_flagged{model}`` read 0 for a model whose
    groups are kept while it has none (before the first, after the last dissolves), as labelled
    totals do, instead of leaving the exposition."""
    from prometheus_client import CollectorRegistry, generate_latest

    from exporter.groups import GroupCollector

    f = Feed()
    registry = CollectorRegistry()
    registry.register(GroupCollector(lambda: f.book.summaries(), lambda m: (PARAMS.max_group_series, PARAMS.max_member_series), f.book.models))
    assert 'monitaur_groups{model="m"} 0.0' in generate_latest(registry).decode()  # kept, no group formed yet
    f.link("a", ["b"], 0.0)
    f.link("b", ["a"], 0.0)
    text = generate_latest(registry).decode()
    assert 'monitaur_groups{model="m"} 1.0' in text and 'monitaur_groups_flagged{model="m"} 1.0' in text
    f.groups.expire(2000.0)
    text = generate_latest(registry).decode()
    assert 'monitaur_groups{model="m"} 0.0' in text and 'monitaur_groups_flagged{model="m"} 0.0' in text
    assert "monitaur_group_suspicious{" not in text


def test_framing_an_honest_client_links_only_the_attacker() -> None:
    """An attacker whose queries continue an honest client's (copies, steps away from them) makes
    links *from* itself; the honest client never links itself, is never flagged, never joins.
    Not even when chance links of its own to someone else make it a possible member: every link
    of its edges with the attackers is theirs (it joined their group before that rule)."""
    f = Feed()
    for t in range(20):
        f.link("mallory", ["honest", "mallory-2"], float(t))
        f.link("mallory-2", ["honest", "mallory"], float(t) + 0.5)
    assert f.groups.clients[client_key("honest")].flagged_at is None
    groups = f.members()
    assert all("honest" not in members for members in groups.values())
    assert groups == {"g1": {"mallory", "mallory-2"}}
    assert f.book.of("honest") == [] and f.book.of("mallory") == ["g1"]
    f.link("honest", ["bystander"], 30.0, flagged=False)
    f.link("honest", ["bystander"], 31.0, flagged=False)
    assert f.groups.clients[client_key("honest")].flagged_at is not None  # group_min_links (2) chance links of its own
    assert f.members() == {"g1": {"mallory", "mallory-2"}} and f.book.of("honest") == []


def test_a_client_joins_on_links_of_its_own_queries_only() -> None:
    f = Feed()
    f.link("a", ["b"], 0.0, flagged=False)
    f.link("b", ["a"], 0.5, flagged=False)
    assert f.members() == {}  # unflagged, one link of its own each
    f.link("a", ["b"], 1.0, flagged=False)
    f.link("b", ["a"], 1.5, flagged=False)
    assert f.members() == {"g1": {"a", "b"}}  # group_min_links (2) links of their own


def test_the_group_verdict_follows_its_own_score_and_threshold() -> None:
    f = Feed()
    f.link("a", ["b"], 1.0, queries=100)
    f.link("b", ["a"], 2.0, queries=100)  # 2 links over 202 queries: 0.0099
    g = f.groups.groups["g1"]
    assert not g.flagged and g.first_flagged is None
    for t in range(10):
        f.link("a", ["b"], 3.0 + t)  # 12 links over 212 queries: 0.057 >= 0.05
    assert g.flagged and g.first_flagged is not None and g.score >= 0.05
    f.link("a", [], 100.0, queries=1000)  # the members keep querying without links: the score falls
    assert not g.flagged and g.first_flagged is not None


def test_expiry_splits_and_dissolves_groups_and_the_earliest_member_keeps_the_id() -> None:
    f = Feed()
    f.link("a", ["b"], 0.0)
    f.link("b", ["a"], 1.0)
    f.link("c", ["b"], 900.0)
    f.link("b", ["c"], 901.0)  # g1 = {a, b, c}: a-b old, b-c recent
    assert f.members() == {"g1": {"a", "b", "c"}}
    f.groups.expire(1500.0)  # ttl 1000: a's edge and flag are gone
    assert f.members() == {"g1": {"b", "c"}}
    f.groups.expire(2500.0)
    assert f.members() == {} and len(f.groups.maxima) == 1  # dissolved; its maximum kept for calibration


def test_evicted_clients_leave_their_group() -> None:
    f = Feed()
    f.link("a", ["b"], 1.0)
    f.link("b", ["a"], 2.0)
    f.link("c", ["a"], 3.0)
    f.link("a", ["c"], 4.0)
    f.book.forget("c")
    assert f.members() == {"g1": {"a", "b"}}


def test_group_state_survives_a_snapshot_round_trip() -> None:
    from exporter.snapshot import pack, unpack

    f = Feed()
    f.link("a", ["b"], 1.0)
    f.link("b", ["a"], 2.0)
    restored = bare_book()
    restored.load(unpack(pack(f.book.state())), lambda model: PARAMS)
    assert {gid: {restored.by_model["m"].clients[k].name for k in g.joined} for gid, g in restored.by_model["m"].groups.items()} == f.members()
    restored.by_model["m"]._refresh(None)
    f2 = Feed()
    f2.book = restored
    f2.groups = restored.by_model["m"]
    f2.link("x", ["y"], 3.0)
    f2.link("y", ["x"], 4.0)
    assert set(f2.members()) == {"g1", "g2"}  # the id sequence continues after a restart


def test_a_snapshot_taken_while_a_re_split_waits_restores_every_group() -> None:
    """A group that lost members re-splits at a block's end at most once per TTL / SCANS_PER_TTL,
    so between blocks it can hold one member. The snapshot settles first: saved as it stood, the
    group failed the restore's checks, and every group of the model was lost."""
    from exporter.snapshot import pack, unpack

    f = Feed()
    for x, y in (("a", "b"), ("b", "c"), ("p", "q")):
        f.link(x, [y], 1.0)
        f.link(y, [x], 1.0)
    assert f.members() == {"g1": {"a", "b", "c"}, "g2": {"p", "q"}}
    f.book.forget("c")
    f.link("x", ["y"], 2.0)  # the block's end re-splits g1, which then waits
    f.book.forget("b")
    f.link("x", ["y"], 3.0)
    assert f.members()["g1"] == {"a"}  # due, not yet re-split
    restored = bare_book()
    restored.load(unpack(pack(f.book.state())), lambda model: PARAMS)
    assert {gid: {restored.by_model["m"].clients[k].name for k in g.joined} for gid, g in restored.by_model["m"].groups.items()} == {"g2": {"p", "q"}}
    assert f.members() == {"g2": {"p", "q"}}


def test_tracked_clients_are_bounded() -> None:
    f = Feed(LinksParams(group_min_links=2, max_tracked_clients=5))
    for i in range(50):
        f.link(f"c{i}", [f"p{i}"], float(i))
    assert len(f.groups.clients) <= 5


def test_group_threshold_sits_above_every_benign_group_of_a_small_calibration() -> None:
    assert group_threshold([], 0.03, 0.01)[0] == 0.03
    tau, how = group_threshold([0.004, 0.011], 0.03, 0.01)
    assert 0.011 < tau and tau >= 0.015 and "2 group(s)" in how
    tau, _ = group_threshold([0.2] + [0.001] * 400, 0.03, 0.01)
    assert tau < 0.2  # enough groups: the 1 % quantile, not the one outlier
    tau, how = group_threshold([0.3, 1.0], 0.03, 0.01)
    assert tau == 1.0 and "capped at 1" in how  # just above 1 no group could ever be flagged


def test_model_groups_use_the_profiles_group_threshold_only_for_the_same_parameters() -> None:
    from exporter.profile import ModelProfile, params_digest

    mp = ModelProfile("tabular", 2, 2, None, params={"links": params_digest(PARAMS, "threshold")}, groups={"threshold": 0.2})
    book = bare_book(Profile(0.01, {"m": mp}))
    assert book.model("m", PARAMS).threshold == 0.2
    other = bare_book(Profile(0.01, {"m": mp}))
    assert other.model("m", LinksParams(group_min_links=5)).threshold == LinksParams().group_threshold
    assert isinstance(book.by_model["m"], ModelGroups)


def test_a_client_id_that_starts_with_a_hash_is_listed_as_sent() -> None:
    """A peer first seen only by key (not in the block) is named when it sends a query of its own,
    whatever its id looks like: a real id such as ``#b`` must not be taken for a placeholder."""
    f = Feed()
    f.link("a", ["#b"], 1.0)  # "#b" is only a's peer here: known by key
    f.link("#b", ["a"], 2.0)
    assert f.members() == {"g1": {"a", "#b"}}
    assert {m.client for m in f.groups.summary("g1").members} == {"a", "#b"}


def _links_between(mg: ModelGroups, a: int, b: int) -> int:
    """The links between two clients: the larger total of the two views of their edge (0 without one)."""
    return max(e.links if e is not None else 0 for e in (mg.clients[a].peers.get(b), mg.clients[b].peers.get(a)))


def _components(mg: ModelGroups) -> set[frozenset[int]]:
    """The groups a recount from scratch makes: components of 2 or more eligible clients joined by
    edges of at least group_min_links links (in either client's view: after a space-saving
    replacement their totals differ), each of the two clients having made one of them (in its
    own view, or the other's)."""
    eligible = [k for k, c in mg.clients.items() if c.flagged_at is not None]
    parent = {k: k for k in eligible}

    def root(k: int) -> int:
        while parent[k] != k:
            k = parent[k]
        return k

    for a in eligible:
        for b in eligible:
            ea, eb = mg.clients[a].peers.get(b), mg.clients[b].peers.get(a)
            links = _links_between(mg, a, b)
            made_a = (ea is not None and ea.made > 0) or (eb is not None and eb.got > 0)
            made_b = (eb is not None and eb.made > 0) or (ea is not None and ea.got > 0)
            if a < b and links >= mg.params.group_min_links and made_a and made_b:
                parent[root(a)] = root(b)
    parts: dict[int, set[int]] = {}
    for k in eligible:
        parts.setdefault(root(k), set()).add(k)
    return {frozenset(p) for p in parts.values() if len(p) >= 2}


@pytest.mark.parametrize("max_peers", [64, 3])
def test_the_kept_counts_equal_a_recount_from_scratch_through_joins_merges_expiry_and_eviction(max_peers: int) -> None:
    """Joins and merges add only the links that cross, a cursor counts the members' queries, and
    leaving members re-split their group once: checked against recounts from scratch after every
    step of a random feed. With 64 peers no edge is ever displaced; with 3, space-saving
    replacements drop edges all the time, and a group that lost one is re-split."""
    rng = np.random.default_rng(7)
    params = LinksParams(group_min_links=2, group_threshold=0.05, ttl_seconds=400.0, max_peers=max_peers, max_tracked_clients=40)
    f = Feed(params)
    names = [f"c{i}" for i in range(30)]
    for step in range(600):
        t = float(step)
        child = names[int(rng.integers(len(names)))]
        parents = [names[int(i)] for i in rng.choice(len(names), size=int(rng.integers(1, 3)), replace=False)]
        f.link(child, parents, t, flagged=bool(rng.random() < 0.3), queries=int(rng.integers(0, 3)))
        if step % 97 == 0:
            f.book.forget(names[int(rng.integers(len(names)))])
        if step % 53 == 0:
            f.groups.expire(t)
        f.book.summaries()  # a read settles the groups that lost members
        mg = f.groups
        assert {frozenset(g.joined) for g in mg.groups.values()} == _components(mg)
        for g in mg.groups.values():
            keys = list(g.joined)
            assert g.links == sum(_links_between(mg, a, b) for i, a in enumerate(keys) for b in keys[i + 1 :])
            assert g.queries == sum(f.queries.get(mg.clients[k].name, 0) for k in keys)
            assert sum(m.links for m in mg.summary(g.gid).members) == 2 * g.links  # every edge, from both ends
            assert all(mg.member_of[k] == g.gid for k in keys)
    assert len(f.groups.groups) >= 1  # the feed did make groups


def test_saved_groups_that_do_not_hold_together_are_dropped_and_the_rest_restores(caplog) -> None:
    """A member in two groups (or any record that does not hold together) drops that model's groups,
    with a warning, instead of failing the restore or breaking every later read of the groups."""
    import logging

    f = Feed()
    f.link("a", ["b"], 1.0)
    f.link("b", ["a"], 2.0)
    state = f.book.state()
    good = {"next": state["next"], "models": {"m": state["models"]["m"], "n": state["models"]["m"]}}
    overlapping = dict(state["models"]["m"])
    g = dict(overlapping["groups"][0])
    overlapping["groups"] = [g, {**g, "gid": "g7", "number": 7}]
    for broken in (overlapping, {**overlapping, "groups": [{**g, "joined": [[g["joined"][0][0], 1.0]]}]},
                   {**overlapping, "clients": [{**c, "peers": [[1, "x", 1.0]]} for c in overlapping["clients"]]},
                   {**overlapping, "groups": [{**g, "score": float("nan")}]}):
        book = bare_book()
        with caplog.at_level(logging.WARNING, logger="monitaur.groups"):
            book.load({**good, "models": {"m": broken, "n": good["models"]["n"]}}, lambda model: PARAMS)
        assert "do not hold together" in caplog.text
        caplog.clear()
        assert book.by_model["m"].groups == {} and book.of("a") == ["g1"]  # model n's copy restored
        assert [s.group for s in book.summaries()] == ["g1"]
    book = bare_book()
    book.load({**good, "next": 1}, lambda model: PARAMS)
    f2 = Feed()
    f2.book, f2.groups = book, book.by_model["m"]
    f2.link("x", ["y"], 3.0)
    f2.link("y", ["x"], 4.0)
    assert "g1" not in {gid for gid, g in f2.groups.groups.items() if f2.groups.clients[next(iter(g.joined))].name == "x"}


def test_blocks_check_expiry_at_most_64_times_per_ttl_and_the_sweep_every_time() -> None:
    """A check visits every tracked client; once edges age out one after another, every block
    would find one due. Blocks check at most SCANS_PER_TTL times per TTL (an edge can outlive
    the TTL by a 64th of it), the periodic sweep always."""
    from exporter.groups import SCANS_PER_TTL

    f = Feed()  # ttl 1000 s: blocks check every 1000 / 64 = 15.6 s of event time
    f.link("a", ["b"], 0.0)
    f.link("b", ["a"], 0.0)
    assert f.members() == {"g1": {"a", "b"}}
    f.link("x", ["y"], 999.0)  # a check, with nothing expired yet; the next is due at 999 + 15.6
    f.link("x", ["y"], 1001.0)
    f.link("x", ["y"], 999.0 + 1000.0 / SCANS_PER_TTL - 0.5)
    assert f.members() == {"g1": {"a", "b"}}  # past the TTL, not yet checked
    f.link("x", ["y"], 999.0 + 1000.0 / SCANS_PER_TTL + 0.5)
    assert f.members() == {}  # checked: a's and b's edges and flags expired, the group dissolved
    g = Feed()
    g.link("a", ["b"], 0.0)
    g.link("b", ["a"], 0.0)
    g.groups.expire(1000.5)  # the sweep checks whatever the blocks did
    assert g.members() == {}


def test_a_block_re_splits_a_group_at_most_once_per_64th_of_the_ttl_and_a_read_always_does() -> None:
    """A re-split walks the whole group. New client ids can evict one member per block (the
    least recently linked go first), so a block's end re-splits a group at most once per
    TTL / SCANS_PER_TTL of event time; a read (the API, /metrics) re-splits whatever is due."""
    from exporter.groups import SCANS_PER_TTL

    f = Feed()  # ttl 1000 s: a group re-splits at a block's end at most every 15.6 s
    chain = ["a", "b", "c", "d", "e", "f"]
    for t, (x, y) in enumerate(zip(chain, chain[1:])):
        f.link(x, [y], float(t))
        f.link(y, [x], float(t))
    assert f.members() == {"g1": set(chain)}
    f.book.forget("e")
    f.link("x", ["y"], 10.0)  # a block's end: the first re-split is due at once (f is left alone: dissolved)
    assert f.members() == {"g1": {"a", "b", "c", "d"}}
    f.book.forget("b")
    f.link("x", ["y"], 10.0 + 1000.0 / SCANS_PER_TTL - 0.5)
    assert f.members() == {"g1": {"a", "c", "d"}}  # b left at once; the split that leaves a alone waits
    f.link("x", ["y"], 10.0 + 1000.0 / SCANS_PER_TTL + 0.5)
    assert f.members() == {"g1": {"c", "d"}}  # now due: c and d keep the id, a alone is no group
    f.book.forget("d")
    f.link("x", ["y"], 30.0)
    assert f.members() == {"g1": {"c"}}  # waits again ...
    assert [s.group for s in f.book.summaries()] == [] and f.members() == {}  # ... but never for a read


def test_chance_links_of_an_honest_client_weeks_apart_never_make_it_a_possible_member() -> None:
    """Attackers that step away from an honest client's queries every six hours keep its record
    alive (links *to* it), for three weeks. The honest client makes one chance link of its own on
    days 0, 10 and 20: never ``group_min_links`` within one TTL (a day), so it never becomes a
    possible member, and never joins the attackers' group (it did when its own links were
    counted for as long as its record lived)."""
    day = 86400.0
    f = Feed(LinksParams(group_min_links=3, ttl_seconds=day))
    for h in range(0, 21 * 24, 6):
        t = h * 3600.0
        f.link("mallory", ["honest", "mallory-2"], t)
        f.link("mallory-2", ["honest", "mallory"], t + 1)
        if h % 24 == 0 and h // 24 in (0, 10, 20):
            f.link("honest", [f"bystander-{h // 24}"], t + 2, flagged=False, queries=500)
        f.groups.expire(t + 3)
    assert f.groups.clients[client_key("honest")].flagged_at is None
    assert f.members() == {"g1": {"mallory", "mallory-2"}}
    # three chance links within a day do make it a possible member (the rule, not a blanket refusal)
    g = Feed(LinksParams(group_min_links=3, ttl_seconds=day))
    for i in range(3):
        g.link("honest", ["bystander"], 1000.0 * i, flagged=False)
    assert g.groups.clients[client_key("honest")].flagged_at is not None


def test_pairs_of_keys_with_high_scores_do_not_push_a_larger_flagged_group_out_of_the_series() -> None:
    """The group series are cut at ``max_group_series`` per model. A flagged Sybil group of ten
    keys has a score of a few hundredths; a pair of keys that link only each other reaches 1 with
    six queries. Fifty such pairs, with room for fifty groups, pushed the ten out of /metrics (and
    its alert with it) when the cut ranked by score; ranked by members first, it stays."""
    from prometheus_client import CollectorRegistry, generate_latest

    from exporter.groups import GroupCollector

    params = LinksParams(group_min_links=3, group_threshold=0.02)
    f = Feed(params)
    real = [f"real-{i}" for i in range(10)]
    t = 0.0
    for _ in range(2):
        for i, c in enumerate(real):
            for peer in (real[(i + 1) % 10], real[(i - 1) % 10]):
                t += 1.0
                f.link(c, [peer], t, queries=30)
    (gid,) = f.book.of("real-0")
    assert f.groups.groups[gid].flagged and f.groups.groups[gid].score < 0.1
    for d in range(params.max_group_series):
        a, b = f"decoy-{d}-a", f"decoy-{d}-b"
        for _ in range(3):
            t += 1.0
            f.link(a, [b], t)
            t += 1.0
            f.link(b, [a], t)
    registry = CollectorRegistry()
    registry.register(GroupCollector(lambda: f.book.summaries(),
                                     lambda m: (params.max_group_series, params.max_member_series), f.book.models))
    text = generate_latest(registry).decode()
    assert 'monitaur_groups{model="m"} 51.0' in text
    assert f'monitaur_group_suspicious{{group="{gid}",model="m"}} 1.0' in text
    assert text.count("monitaur_group_suspicious{") == params.max_group_series
    assert sum(f'client="real-{i}"' in text for i in range(10)) == 10


def test_a_group_held_together_by_an_edge_that_space_saving_drops_is_re_split() -> None:
    """An edge pushed out of both clients' peers (space-saving) no longer joins them: their
    group is re-split, as when an edge expires. Otherwise a client could stay in a group with
    no edge to it for as long as it stays a possible member: an attacker who once linked both
    ways with an honest client could keep it in its group by filling both tables."""
    f = Feed(LinksParams(group_min_links=2, group_threshold=0.05, ttl_seconds=1000.0, max_peers=2))
    f.link("m", ["h"], 0.0)
    f.link("h", ["m"], 1.0)
    assert f.members() == {"g1": {"m", "h"}}
    for t in (2.0, 3.0, 4.0):
        f.link("m", ["s1"], t)  # m's table: s1 (3 links) outweighs h (2)
    f.link("m", ["s2"], 5.0)  # takes h's place in m's table
    for s, t in (("s3", 6.0), ("s3", 7.0), ("s3", 8.0), ("s4", 9.0)):
        f.link(s, ["h"], t)  # and h's table is filled by others' links to it
    m, h = f.groups.clients[client_key("m")], f.groups.clients[client_key("h")]
    assert client_key("h") not in m.peers and client_key("m") not in h.peers
    f.book.summaries()
    assert f.members() == {}  # a read re-splits the group: m and h have no edge left
    assert f.book.of("h") == []


def test_a_client_that_becomes_a_possible_member_joins_through_an_edge_only_its_peer_still_holds() -> None:
    """When a client becomes a possible member, its strong edges count from then on, in either
    view: its own view of an edge can have been pushed out of its table while its peer's holds it."""
    f = Feed(LinksParams(group_min_links=3, group_threshold=0.05, ttl_seconds=1000.0, max_peers=2))
    for t in (0.0, 1.0, 2.0):
        f.link("b", ["a"], float(t))  # b: a possible member, 3 links with a
    f.link("a", ["b"], 3.0, flagged=False)  # a made one of them, but is no possible member yet
    t = 4.0
    for s in ("s1", "s2"):
        for _ in range(5):
            f.link(s, ["a"], t)  # others' links to a push b out of a's table
            t += 1.0
    assert client_key("b") not in f.groups.clients[client_key("a")].peers
    f.link("a", ["z"], t)  # a is a possible member now
    assert f.members() == {"g1": {"a", "b"}}


def test_a_late_event_does_not_bring_an_edges_expiry_forward() -> None:
    """Blocks come in arrival order, and an event can be stamped before ones already seen (a
    second log source lagging): an edge and a flag expire one TTL after their latest link."""
    f = Feed()  # ttl 1000 s
    f.link("a", ["b"], 0.0)
    f.link("b", ["a"], 1.0)
    f.link("a", ["b"], 900.0)
    f.link("b", ["a"], 900.0)
    f.link("a", ["b"], 2.0)  # late
    f.groups.expire(1100.0)
    assert f.members() == {"g1": {"a", "b"}}
    f.groups.expire(1901.0)
    assert f.members() == {}


def test_a_re_split_due_when_the_snapshot_was_taken_happens_after_the_restore() -> None:
    """A member evicted just before a snapshot leaves its group in two parts. Snapshots settle
    first now; one written before that saved the group whole, and the restored book re-splits
    it, instead of keeping one group joined through the member that is gone."""
    from exporter.snapshot import pack, unpack

    f = Feed()
    chain = ["a", "b", "c", "d", "e"]
    for t, (x, y) in enumerate(zip(chain, chain[1:])):
        f.link(x, [y], float(t))
        f.link(y, [x], float(t))
    assert f.members() == {"g1": set(chain)}
    saved = f.book.state()
    f.book.forget("c")
    gone = client_key("c")  # the earlier snapshot: c and its edges gone, its group not yet re-split
    model = saved["models"]["m"]
    model["clients"] = [{**c, "peers": [e for e in c["peers"] if e[0] != gone]} for c in model["clients"] if c["key"] != gone]
    model["groups"][0]["joined"] = [j for j in model["groups"][0]["joined"] if j[0] != gone]
    restored = bare_book()
    restored.load(unpack(pack(saved)), lambda model: PARAMS)
    g = Feed()
    g.book, g.groups = restored, restored.by_model["m"]
    assert g.members() == {"g1": {"a", "b", "d", "e"}}  # as saved, until the first settle
    restored.summaries()
    f.book.summaries()
    assert g.members() == f.members() and sorted(map(sorted, g.members().values())) == [["a", "b"], ["d", "e"]]
