"""The groups API (/api/v1/groups) on a real server: a linked group is listed with its members,
its members' answers name it, and it is blocked and released as one.

The group is made by feeding links into the exporter's own group registry (as
tests/test_groups.py does), so the test pins the API down whatever finds the links; the
members are flagged or not by the test detector ``marked`` (tests.plugins.Marked).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import requests

from exporter.app import App
from exporter.detectors.base import Block
from exporter.detectors.fingerprint import client_key
from exporter.events import Event
from exporter.config import Settings
from tests.test_reaction import ALICE, AUTH, BOB, event, url


@pytest.fixture
def app(tmp_path):
    """tests/test_reaction.py's app, with the opt-in links detector on (its params make the model's groups)."""
    s = Settings(plugins={"marked": "tests.plugins:Marked"}, detectors={"marked": {"latch": True}, "links": {"enabled": True}},
                 fusion={"inputs": ["marked"]}, state={"dir": str(tmp_path / "state")}, listen={"host": "127.0.0.1", "port": 0},
                 files={"paths": [], "mode": "poll"}, api={"tokens": {"alice": ALICE, "bob": BOB}}, reaction={"allowlist": ["vip"]})
    a = App(s)
    a.start()
    yield a
    a.stop()


def link(a: App, child: str, parents: list[str], ts: float) -> None:
    """One query of ``child`` that continued queries of ``parents``, into the exporter's groups of model digits."""
    params = next(d.params for d in a.pipeline.runtimes.get("digits").detectors if d.name == "links")  # group_min_links 3
    block = Block("digits", [Event(child, "digits", ts, "tabular", vector=np.zeros(64))])
    keys = np.zeros((1, 2), dtype=np.uint64)
    keys[0, : len(parents)] = [client_key(p) for p in parents]
    block.prepared["links"] = (np.ones(1, dtype=bool), np.ones(1, dtype=bool), keys)
    with a.pipeline.lock:
        a.pipeline.groups.model("digits", params).observe(block, np.array([True]))


def make_group(a: App) -> str:
    """syb-0 (flagged), syb-1 (not flagged) and vip (allowlisted) linked into one group; its id."""
    a.pipeline.ingest_lines([event("syb-0", True), event("syb-1", False), event("vip", False), event("honest", False)])
    ts = 1.0
    for child, parent in [("syb-0", "syb-1"), ("syb-1", "syb-0")] * 2 + [("vip", "syb-0")] * 3 + [("syb-0", "vip")]:
        link(a, child, [parent], ts)
        ts += 1.0
    ids = a.pipeline.group_ids("syb-0")
    assert len(ids) == 1 and a.pipeline.group_ids("vip") == ids and a.pipeline.group_ids("honest") == []
    return ids[0]


def get(a: App, path: str, **params: str) -> requests.Response:
    return requests.get(url(a, path), params=params, headers=AUTH, timeout=5)


def test_a_group_is_listed_with_its_members_and_their_verdicts(app: App) -> None:
    gid = make_group(app)
    listed = get(app, "/api/v1/groups")
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["total"] == 1 and body["next_cursor"] is None and [g["group"] for g in body["groups"]] == [gid]
    assert {m["client"] for m in body["groups"][0]["members"]} == {"syb-0", "syb-1", "vip"}
    one = get(app, f"/api/v1/groups/{gid}").json()
    assert one["group"] == gid and one["model"] == "digits"
    members = {m["client"]: m for m in one["members"]}
    assert members["syb-0"]["flagged"] and members["syb-0"]["decision"] == "would_block"  # observe mode
    assert not members["syb-1"]["flagged"] and members["syb-1"]["decision"] == "allow"
    assert all(m["links"] >= 1 and 0 < m["strength"] <= 1 for m in one["members"])
    # a member's own answer names its group; an honest client's names none
    assert get(app, "/api/v1/clients/syb-1").json()["group"] == gid
    assert get(app, "/api/v1/clients/honest").json()["group"] is None
    assert get(app, "/api/v1/clients/syb-0").json()["group"] == gid
    # flagged=true lists the groups the exporter flags: this one is (its members' links are all inside it)
    assert one["flagged"]
    flagged = get(app, "/api/v1/groups", flagged="true").json()
    assert [g["group"] for g in flagged["groups"]] == [gid]


def test_bad_group_requests_are_answered_with_a_reason(app: App) -> None:
    gid = make_group(app)
    for path, params, status, reason in [
        ("/api/v1/groups/x1", {}, 400, "invalid_group"),
        ("/api/v1/groups/g0", {}, 400, "invalid_group"),
        ("/api/v1/groups/g999", {}, 404, "unknown_group"),
        ("/api/v1/groups", {"flagged": "yes"}, 400, "bad_query"),
        ("/api/v1/groups", {"limit": "0"}, 400, "bad_query"),
        ("/api/v1/groups", {"cursor": "nope"}, 400, "bad_query"),
        ("/api/v1/groups", {"other": "1"}, 400, "bad_query"),
    ]:
        r = get(app, path, **params)
        assert (r.status_code, r.json()["reason"]) == (status, reason), (path, params, r.text)
    assert get(app, f"/api/v1/groups/{gid}/members").status_code == 404
    assert requests.get(url(app, "/api/v1/groups"), timeout=5).status_code == 401  # tokens are set: reads need one


def test_a_group_is_blocked_and_released_as_one(app: App, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    gid = make_group(app)
    post = lambda action, body, token=ALICE: requests.post(url(app, f"/api/v1/groups/{gid}/{action}"), data=body,  # noqa: E731
                                                          headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert post("block", "{}").json()["reason"] == "reason_required"
    assert post("block", "nope").json()["reason"] == "malformed_json"
    r = post("block", json.dumps({"reason": "one attacker, three keys"}), BOB)
    assert r.status_code == 200, r.text
    body = r.json()
    assert {o["client"] for o in body["overrides"]} == {"syb-0", "syb-1"} and body["skipped_allowlisted"] == ["vip"]
    assert all(o["who"] == "bob" and o["group"] == gid and o["action"] == "block" for o in body["overrides"])
    assert get(app, "/api/v1/clients/syb-1").json()["block"]["source"] == "manual"
    assert not get(app, "/api/v1/clients/vip").json()["blocked"]
    listed = get(app, "/api/v1/clients", blocked="true").json()
    assert {c["client"] for c in listed["clients"]} == {"syb-0", "syb-1"}
    assert "client syb-1 blocked by bob" in caplog.text

    r = post("release", json.dumps({"reason": "a partner's load test"}))
    assert r.status_code == 200, r.text
    assert {o["client"] for o in r.json()["overrides"]} == {"syb-0", "syb-1"}
    assert get(app, "/api/v1/clients", blocked="true").json()["clients"] == []
    assert not get(app, "/api/v1/clients/syb-0").json()["flagged"]
    # released members leave the group (their links are history): it dissolves, and a second release has nothing to act on
    assert app.pipeline.group_ids("syb-0") == [] and get(app, f"/api/v1/groups/{gid}").json()["reason"] == "unknown_group"


def test_groups_are_restored_after_a_restart_only_under_the_links_parameters_they_were_made_with(app: App, caplog: pytest.LogCaptureFixture) -> None:
    gid = make_group(app)
    app.checkpoint()
    same = App(app.settings)
    same.restore()
    assert same.pipeline.group_ids("syb-0") == [gid] and same.pipeline.group_ids("vip") == [gid]
    other = App(app.settings.model_copy(update={"detectors": {**app.settings.detectors, "links": {"enabled": True, "group_min_links": 5}}}))
    with caplog.at_level(logging.WARNING, logger="monitaur.persist"):
        other.restore()
    assert other.pipeline.group_ids("syb-0") == []  # made where 3 links joined two clients: not under 5
    assert "dropped the groups of 1 model(s)" in caplog.text


def test_a_block_or_release_that_names_the_members_it_read_acts_only_if_they_are_still_the_groups(app: App) -> None:
    """A group gains members between a read and a POST: a release meant for the keys the
    operator saw would clear the flag of a key that joined since, on its own evidence. With
    "members" (as read), such a POST does nothing and answers 409 group_changed with the
    members now; without it, it acts on the members now."""
    gid = make_group(app)
    seen = [m["client"] for m in get(app, f"/api/v1/groups/{gid}").json()["members"]]
    post = lambda action, body: requests.post(url(app, f"/api/v1/groups/{gid}/{action}"), data=json.dumps(body),  # noqa: E731
                                              headers={"Authorization": f"Bearer {ALICE}"}, timeout=5)
    app.pipeline.ingest_lines([event("late", True)])  # flagged on its own evidence, then joins
    for child, parent in [("late", "syb-0")] * 3 + [("syb-0", "late")]:
        link(app, child, [parent], 20.0)
    assert app.pipeline.group_ids("late") == [gid]
    for body, reason in [({"reason": "r", "members": "syb-0"}, "invalid_members"), ({"reason": "r", "members": []}, "invalid_members"),
                         ({"reason": "r", "members": None}, "invalid_members"),
                         ({"reason": "r", "members": ["syb-0", 7]}, "invalid_members")]:
        r = post("release", body)
        assert (r.status_code, r.json()["reason"]) == (400, reason), r.text
    r = post("release", {"reason": "the keys I looked at", "members": seen})
    assert (r.status_code, r.json()["reason"]) == (409, "group_changed"), r.text
    assert set(r.json()["members"]) == {*seen, "late"}
    assert get(app, "/api/v1/clients/late").json()["flagged"]  # nothing was done
    r = post("block", {"reason": "all four", "members": sorted({*seen, "late"}, reverse=True)})  # any order
    assert r.status_code == 200, r.text
    assert {o["client"] for o in r.json()["overrides"]} == {"syb-0", "syb-1", "late"}


def test_a_group_id_is_not_issued_again_after_a_crash(app: App) -> None:
    """Override records and alerts name group ids at once; the snapshot saves the sequence only
    at each checkpoint. After a crash (no checkpoint since the group formed), a new group
    must not get the id of one an operator already acted on."""
    gid = make_group(app)
    r = requests.post(url(app, f"/api/v1/groups/{gid}/block"), data=json.dumps({"reason": "three keys"}),
                      headers={"Authorization": f"Bearer {ALICE}"}, timeout=5)
    assert r.status_code == 200, r.text
    crashed = App(app.settings)  # the same state dir, no snapshot written
    crashed.restore()
    crashed.pipeline.ingest_lines([event("x1", True), event("x2", True)])
    for child, parent in [("x1", "x2"), ("x2", "x1")] * 3:
        link(crashed, child, [parent], 50.0)
    ids = crashed.pipeline.group_ids("x1")
    assert len(ids) == 1 and ids[0] != gid
