"""Reaction: block states and the decision table, overrides (who, why, kept across restarts),
the clients API and a live client's page, against a real server on a loopback port.

The test detector ``marked`` (tests.plugins.Marked) flags exactly the events whose first
feature is 16, so each test decides when a client is flagged.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from urllib.parse import quote

import bcrypt
import pytest
import requests
import yaml

from exporter.app import App
from exporter.config import Settings
from exporter.detectors import enabled_detectors
from exporter.metrics import Metrics
from exporter.overrides import BLOCK, FILE, RELEASE, OverrideError, Overrides
from exporter.pipeline import Pipeline
from exporter.reaction import Reaction
from exporter.snapshot import pack
from tests.conftest import parse_metrics, sample
from tests.plugins import marked_event as event
from tests.plugins import marked_settings
from tests.test_pipeline import Clock

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789ab"
AUTH = {"Authorization": f"Bearer {ALICE}"}


def settings(tmp_path: Path, **kw: object) -> Settings:
    kw.setdefault("state", {"dir": str(tmp_path / "state")})
    return marked_settings(latch=True, **kw)


def pipeline(s: Settings, clock: Clock) -> Pipeline:
    return Pipeline(s, Metrics(enabled_detectors(s)), clock=clock)


# -- block states and the table ------------------------------------------------------------
def test_blocked_means_flagged_and_not_released_or_blocked_by_hand(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    s = settings(tmp_path, verdict={"hold_seconds": 100}, state={"dir": str(tmp_path / "state"), "idle_ttl_seconds": 5},
                 reaction={"block_seconds": 60, "allowlist": ["vip"]})
    p = pipeline(s, clock)
    r = Reaction(s, p)
    r.start()
    p.ingest_lines([event("mallory", True), event("eve", True), event("alice", False)])
    version, table = r.table()
    assert table == {"mallory": math.inf, "eve": math.inf}
    assert r.table(version) == (version, None)  # nothing changed: nothing rebuilt
    # evicted while flagged: still blocked, until its hold ends (last flag + hold_seconds)
    clock.t = 1010.0
    p.ingest_lines([event("bob", False), event("carol", False)])  # mallory, eve and alice idle past the TTL: evicted
    assert "mallory" not in p.store and "eve" not in p.store
    _, table = r.table(version)
    assert table["mallory"] == pytest.approx(1100.0)
    st = r.block_state("mallory", False, p.view.recently_flagged_one("mallory"))
    assert st.blocked and st.source == "verdict" and st.until == pytest.approx(1100.0)
    # by hand, for block_seconds; the later end wins when both hold
    records, saved = r.block(["carol"], "alice", "abusive volume")
    assert saved and records[0].until == 1070.0
    _, table = r.table()
    assert table["carol"] == 1070.0
    with pytest.raises(OverrideError) as info:
        r.block(["vip"], "alice", "no")
    assert info.value.reason == "allowlisted"
    clock.t = 1071.0
    assert not r.block_state("carol", False, None).blocked  # the manual block ended
    # a release clears the flag (detector state restarted) and any manual block
    r.block(["eve"], "alice", "and by hand")
    records, _ = r.release(["eve", "mallory", "nobody"], "bob", "false alarm")
    assert [x.client for x in records] == ["eve", "mallory"]  # nobody had nothing to release
    _, table = r.table()
    assert "eve" not in table and "mallory" not in table
    assert p.metrics.registry.get_sample_value("monitaur_overrides_total", {"action": "release"}) == 2
    assert p.metrics.registry.get_sample_value("monitaur_overrides_total", {"action": "block"}) == 2


def test_too_many_manual_blocks_are_refused(tmp_path: Path) -> None:
    s = settings(tmp_path, reaction={"max_manual_blocks": 2, "block_seconds": None})
    r = Reaction(s, pipeline(s, Clock(0.0)))
    r.block(["a", "b"], "alice", "x")
    r.block(["a"], "alice", "again: replaces, takes no new place")
    with pytest.raises(OverrideError) as info:
        r.block(["c"], "alice", "x")
    assert info.value.reason == "too_many_blocks"
    assert r.overrides.block_of("a", 1e12).until is None  # until released


def test_overrides_are_kept_across_restarts_and_a_lost_release_is_applied_again(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    s = settings(tmp_path)
    p1 = pipeline(s, clock)
    r1 = Reaction(s, p1)
    r1.start()
    p1.ingest_lines([event("mallory", True), event("eve", True)])
    snapshot = pack(p1.snapshot_copy())  # the last checkpoint before a crash...
    clock.t = 1005.0
    r1.release(["mallory"], "alice", "false alarm")  # ...answered after it
    r1.block(["carol"], "bob", "manual")
    assert json.loads((tmp_path / "state" / FILE).read_text())["blocks"][0]["client"] == "carol"

    p2 = pipeline(s, clock)
    p2.restore(snapshot)
    assert p2.store["mallory"].suspicious and p2.store["eve"].suspicious
    r2 = Reaction(s, p2)
    r2.start()
    assert not p2.store["mallory"].suspicious and p2.store["mallory"].released.who == "alice"
    assert p2.store["eve"].suspicious  # not released, not touched
    assert r2.overrides.block_of("carol", clock()).who == "bob"
    assert r2.overrides.last("mallory", "release").reason == "false alarm"
    # a flag opened after the release (another first time) is not released again by a restart
    clock.t = 1010.0
    p2.ingest_lines([event("mallory", True)])
    p3 = pipeline(s, clock)
    p3.restore(pack(p2.snapshot_copy()))
    Reaction(s, p3).start()
    assert p3.store["mallory"].suspicious


def test_an_unreadable_overrides_file_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = settings(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / FILE).write_text("{not json")
    r = Reaction(s, pipeline(s, Clock(0.0)))
    r.start()
    assert r.overrides.blocks(0.0) == {} and not (tmp_path / "state" / FILE).exists()
    assert list((tmp_path / "state").glob(f"{FILE}.corrupt-*")) and "cannot read overrides" in caplog.text


def test_the_latest_override_of_a_client_is_the_logs_even_as_old_records_drop_out(tmp_path: Path) -> None:
    o = Overrides(tmp_path / FILE, max_blocks=10, log_limit=3)
    o.block(["a"], "alice", "first", 1.0, None)
    o.release([("a", None)], "bob", "false alarm", 2.0)
    o.block(["a"], "alice", "again", 3.0, None)
    assert o.last("a", BLOCK).reason == "again" and o.last("a", RELEASE).reason == "false alarm"
    o.block(["b"], "alice", "b", 4.0, None)
    o.block(["c"], "alice", "c", 5.0, None)  # the log keeps 3: a's first block and its release have dropped out
    assert o.last("a", RELEASE) is None and o.last("a", BLOCK).reason == "again"
    o.block(["d"], "alice", "d", 6.0, None)
    assert o.last("a", BLOCK) is None and o.last("d", BLOCK).reason == "d"
    again = Overrides(tmp_path / FILE, max_blocks=10, log_limit=3)
    again.load()  # the same answers from the saved log
    assert again.last("a", BLOCK) is None and again.last("b", BLOCK).reason == "b" and again.last("nobody", BLOCK) is None


# -- the clients API over HTTP ---------------------------------------------------------------
@pytest.fixture
def app(tmp_path: Path):
    s = settings(tmp_path, listen={"host": "127.0.0.1", "port": 0}, files={"paths": [], "mode": "poll"},
                 api={"tokens": {"alice": ALICE, "bob": BOB}}, reaction={"allowlist": ["vip"]})
    a = App(s)
    a.start()
    yield a
    a.stop()


def url(app: App, path: str) -> str:
    host, port = app.address
    return f"http://{host}:{port}{path}"


@pytest.mark.parametrize("framing, status, reason", [
    (b"", 411, "length_required"),
    (b"Transfer-Encoding: chunked\r\n", 411, "length_required"),
    (b"Content-Length: -1\r\n", 400, "bad_content_length"),
    (b"Content-Length: 1\r\nContent-Length: 2\r\n", 400, "bad_content_length"),
    (b"Content-Length: 16385\r\n", 413, "body_too_large"),  # api.MAX_BODY + 1: refused before it is read
])
def test_an_override_body_without_a_usable_length_is_refused_with_a_reason(app: App, framing: bytes, status: int, reason: str) -> None:
    import socket

    with socket.create_connection(app.address, timeout=5) as s:
        s.sendall(b"POST /api/v1/clients/mallory/block HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE.encode() + b"\r\n" + framing + b"\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
    assert json.loads(body)["reason"] == reason


def test_reads_need_a_token_once_tokens_are_set(app: App) -> None:
    for headers in ({}, {"Authorization": "Bearer nope-nope-nope-nope"}, {"Authorization": f"Basic {ALICE}"}):
        r = requests.get(url(app, "/api/v1/clients?flagged=true"), headers=headers, timeout=5)
        assert r.status_code == 401 and r.json()["reason"] == "unauthorized" and r.headers["WWW-Authenticate"].startswith("Bearer")
    r = requests.post(url(app, "/api/v1/clients/x/release"), json={"reason": "x"}, timeout=5)
    assert r.status_code == 401


def test_flagged_clients_page_by_page(app: App) -> None:
    app.pipeline.ingest_lines([event(f"bad-{i}", True) for i in range(5)] + [event("alice", False)])
    seen, cursor, pages = [], None, 0
    while True:
        r = requests.get(url(app, "/api/v1/clients"), params={"flagged": "true", "limit": 2, **({"cursor": cursor} if cursor else {})}, headers=AUTH, timeout=5)
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["total"] == 5 and len(page["clients"]) <= 2
        seen += [c["client"] for c in page["clients"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"bad-{i}" for i in range(5)] and pages == 3
    first = requests.get(url(app, "/api/v1/clients?flagged=true&limit=1"), headers=AUTH, timeout=5).json()["clients"][0]
    assert first["flagged"] and first["blocked"] and first["decision"] == "would_block"  # observe mode by default
    assert first["model"] == "digits" and first["group"] is None and first["flag"]["first_query"] == 1
    assert first["flag"]["detectors"] == [{"detector": "marked", "over_threshold": pytest.approx(2.0)}]
    assert first["block"] == {"source": "verdict", "until": None}
    for query, reason in [("", "filter_required"), ("flagged=yes", "bad_query"), ("flagged=true&limit=0", "bad_query"),
                          ("flagged=true&limit=1001", "bad_query"), ("flagged=true&cursor=%%%", "bad_query"), ("flagged=true&x=1", "bad_query")]:
        r = requests.get(url(app, f"/api/v1/clients?{query}"), headers=AUTH, timeout=5)
        assert r.status_code == 400 and r.json()["reason"] == reason, (query, r.text)


def test_one_client_by_its_percent_encoded_id(app: App) -> None:
    odd = "team/ä b?#%"
    app.pipeline.ingest_lines([event(odd, True)])
    r = requests.get(url(app, "/api/v1/clients/" + quote(odd, safe="")), headers=AUTH, timeout=5)
    assert r.status_code == 200 and r.json()["client"] == odd and r.json()["flagged"]
    assert requests.get(url(app, "/api/v1/clients/nobody"), headers=AUTH, timeout=5).json()["reason"] == "unknown_client"
    for bad in ("a%0Ab", "%ff", "%E2%80%AEx"):  # a newline, not UTF-8, a bidi override
        r = requests.get(url(app, "/api/v1/clients/" + bad), headers=AUTH, timeout=5)
        assert r.status_code == 400 and r.json()["reason"] == "invalid_client", bad
    assert requests.get(url(app, "/api/v1/clients/a/b"), headers=AUTH, timeout=5).status_code == 404


def test_release_and_block_are_logged_with_who_and_why(app: App, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    app.pipeline.ingest_lines([event("mallory", True)])
    release = lambda client, body, headers=AUTH: requests.post(url(app, f"/api/v1/clients/{client}/release"), data=body, headers=headers, timeout=5)  # noqa: E731
    assert release("mallory", "{}").json()["reason"] == "reason_required"
    assert release("mallory", "nope").json()["reason"] == "malformed_json"
    assert release("mallory", json.dumps({"reason": "x" * 501})).json()["reason"] == "reason_too_long"
    r = release("mallory", json.dumps({"reason": "false alarm\nclient bob flagged"}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["override"]["who"] == "alice" and body["saved"] and not body["client"]["flagged"] and not body["client"]["blocked"]
    assert body["client"]["released"]["reason"] == "false alarm\nclient bob flagged"
    assert app.pipeline.store["mallory"].detector_state == {}  # restarted: not re-flagged by the same history
    assert "released by alice: false alarm\\nclient bob flagged" in caplog.text  # escaped: no forged log line
    assert release("mallory", json.dumps({"reason": "again"})).json()["reason"] == "not_blocked"

    block = requests.post(url(app, "/api/v1/clients/alice-app/block"), json={"reason": "abuse"}, headers={"Authorization": f"Bearer {BOB}"}, timeout=5)
    assert block.status_code == 200 and block.json()["client"]["manual_block"]["who"] == "bob"
    assert block.json()["client"]["block"]["source"] == "manual" and block.json()["client"]["blocked"]
    listed = requests.get(url(app, "/api/v1/clients?blocked=true"), headers=AUTH, timeout=5).json()
    assert [c["client"] for c in listed["clients"]] == ["alice-app"]
    assert requests.post(url(app, "/api/v1/clients/vip/block"), json={"reason": "x"}, headers=AUTH, timeout=5).json()["reason"] == "allowlisted"
    m = parse_metrics(requests.get(url(app, "/metrics"), timeout=5).text)
    assert sample(m, "monitaur_overrides_total", action="release") == 1 and sample(m, "monitaur_overrides_total", action="block") == 1
    assert sample(m, "monitaur_decisions_total", decision="block") == 0  # every value exists, even without the endpoint


def test_without_tokens_reads_are_open_on_loopback_but_overrides_need_a_named_token(tmp_path: Path) -> None:
    a = App(settings(tmp_path, listen={"port": 0}, files={"paths": []}))
    a.start()
    try:
        a.pipeline.ingest_lines([event("mallory", True)])
        assert requests.get(url(a, "/api/v1/clients/mallory"), timeout=5).json()["flagged"]
        r = requests.post(url(a, "/api/v1/clients/mallory/release"), json={"reason": "x"}, timeout=5)
        assert r.status_code == 403 and r.json()["reason"] == "named_token_required"
    finally:
        a.stop()


def test_the_api_is_off_beyond_loopback_without_tokens_unless_asked_for() -> None:
    from exporter.config import api_enabled

    assert api_enabled(Settings())
    assert not api_enabled(Settings(listen={"host": "0.0.0.0"}, push={"tokens": ["t"]}))
    assert api_enabled(Settings(listen={"host": "0.0.0.0"}, push={"tokens": ["t"]}, api={"tokens": {"ops": ALICE}}))
    with pytest.raises(ValueError, match="named tokens are required"):
        Settings(listen={"host": "0.0.0.0"}, push={"tokens": ["t"]}, api={"enabled": True})
    with pytest.raises(ValueError, match="each token must name one operator"):
        Settings(api={"tokens": {"a": ALICE, "b": ALICE}})


def test_a_live_client_page_behind_basic_auth(tmp_path: Path) -> None:
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump({"basic_auth_users": {"ops": bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()}}))
    a = App(settings(tmp_path, listen={"port": 0, "web_config_file": str(web)}, files={"paths": []}, api={"tokens": {"alice": ALICE}}))
    a.start()
    try:
        odd = "app <b>&"
        a.pipeline.ingest_lines([event(odd, True), event(odd, False)])
        page = url(a, "/clients/" + quote(odd, safe=""))
        assert requests.get(page, timeout=5).status_code == 401
        r = requests.get(page, auth=("ops", "pw"), timeout=5)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
        assert "app &lt;b&gt;&amp;" in r.text and "<b>&" not in r.text
        assert "Verdict and reaction" in r.text and "Timelines are not recorded by the live exporter" in r.text and "would_block" in r.text
        assert requests.get(url(a, "/clients/nobody"), auth=("ops", "pw"), timeout=5).status_code == 404
        landing = requests.get(url(a, "/"), auth=("ops", "pw"), timeout=5).text
        assert f'href="/clients/{quote(odd, safe="")}"' in landing
        # the API keeps its bearer tokens under basic auth
        assert requests.get(url(a, "/api/v1/clients/" + quote(odd, safe="")), headers=AUTH, timeout=5).status_code == 200
    finally:
        a.stop()
