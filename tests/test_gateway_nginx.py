"""The reaction with a real gateway: Debian's nginx in front of a model service, asking the
exporter (a real ``monitaur-exporter run`` subprocess) with ``auth_request``.

The model service logs each answered query; the exporter tails that log with its default
detectors, after a history of benign traffic (the demo's) has taught it the model. A
scraper re-sends three inputs; three benign apps send natural ones. Asserted: the scraper
gets 403 through nginx within the decision's cache lifetime plus an ingestion cycle of
being flagged (measured, printed); benign apps keep getting 200; a client-id header sent
by a client is overwritten by nginx, so it chooses nobody's verdict; a release through the
API unblocks; ``observe`` blocks nobody and counts what it would have blocked.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import numpy as np
import pytest
import requests

from exporter.demo import DigitsLike, benign_log
from tests.conftest import REPO, ExporterProcess, free_port, sample, wait_for
from tests.gateway import NGINX, PROTECTED_LOCATION, ModelService, Nginx

TOKEN = "ops-token-0123456789abcdef"
KEYS = {"key-alice": "alice", "key-bob": "bob", "key-carol": "carol", "key-scraper": "scraper"}
CACHE = 2  # reaction.cache_seconds
POLL = 0.2  # files.poll_interval_seconds: one ingestion cycle
HISTORY = 20 * 60  # benign events the exporter reads first


class Stack:
    def __init__(self, tmp_path: Path, mode: str) -> None:
        logs = tmp_path / "logs"
        logs.mkdir()
        (logs / "history.jsonl").write_text("".join(line + "\n" for line in benign_log(seed=7, clients=20)))
        self.model = ModelService(logs / "model.jsonl")
        config = {
            "files": {"paths": [str(logs / "*.jsonl")], "mode": "poll", "poll_interval_seconds": POLL},
            "state": {"dir": str(tmp_path / "state")},
            "api": {"tokens": {"ops": TOKEN}},
            "reaction": {"enabled": True, "mode": mode, "cache_seconds": CACHE, "listen": {"host": "127.0.0.1", "port": free_port()}},
        }
        self.exporter = ExporterProcess(tmp_path, config)
        self.decision_port = config["reaction"]["listen"]["port"]
        self.nginx: Nginx | None = None

    def __enter__(self) -> "Stack":
        self.model.start()
        self.exporter.start()
        wait_for(lambda: sample(self.exporter.metrics(), "monitaur_events_total", model="digits") == HISTORY, timeout=60, what="history read")
        self.nginx = Nginx(self.model.port, self.decision_port, KEYS).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        self.model.stop()
        if self.exporter.proc is not None and self.exporter.proc.poll() is None:
            self.exporter.stop()

    def api(self, path: str) -> dict:
        r = requests.get(self.exporter.url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        r.raise_for_status()
        return r.json()


def inputs(seed: int, scraper: bool) -> Iterator[list[float]]:
    world, rng = DigitsLike(0), np.random.default_rng(seed)
    few = world.sample(rng, 3)
    i = 0
    while True:
        yield (few[i % 3] if scraper else world.sample(rng, 1)[0]).tolist()
        i += 1


def predict(session: requests.Session, url: str, key: str, x: list[float], spoof: str | None = None) -> int:
    headers = {"X-Api-Key": key}
    if spoof is not None:
        headers["X-Monitaur-Client"] = spoof  # a client trying to choose whose verdict it gets
    return session.post(url + "/predict", data=json.dumps({"input": x}), headers=headers, timeout=10).status_code


class Benign(threading.Thread):
    """Three apps, a few queries a second each, until stopped; every status kept."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.statuses: list[tuple[str, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        sessions = {k: requests.Session() for k in ("key-alice", "key-bob", "key-carol")}
        streams = {k: inputs(i, scraper=False) for i, k in enumerate(sessions)}
        while not self.done.wait(0.1):
            for key, s in sessions.items():
                # alice names the scraper in the client header: nginx overwrites it with her own id
                self.statuses.append((key, predict(s, self.url, key, next(streams[key]), spoof="scraper" if key == "key-alice" else None)))


def scrape_until_blocked(url: str, timeout: float = 90.0) -> tuple[list[float], float]:
    """The scraper's allowed queries' send times, and when its first 403 came. It claims to be alice."""
    session, stream = requests.Session(), inputs(99, scraper=True)
    allowed: list[float] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sent = time.time()
        status = predict(session, url, "key-scraper", next(stream), spoof="alice")
        if status == 403:
            return allowed, time.time()
        assert status == 200, status
        allowed.append(sent)
        time.sleep(0.02)
    raise AssertionError(f"the scraper was not blocked within {timeout:g} s ({len(allowed)} queries allowed)")


@pytest.fixture
def _nginx_installed() -> None:
    if not Path(NGINX).exists():
        pytest.fail("nginx is not installed (Debian package 'nginx'); .ci/run installs it")


@pytest.mark.usefixtures("_nginx_installed")
def test_block_mode_blocks_the_scraper_at_the_gateway_and_a_release_unblocks(tmp_path: Path) -> None:
    with Stack(tmp_path, "block") as stack:
        assert stack.nginx is not None
        url = stack.nginx.url
        assert requests.post(url + "/predict", data="{}", timeout=5).status_code == 401  # no API key: nginx's own refusal
        benign = Benign(url)
        benign.start()
        allowed, first_403 = scrape_until_blocked(url)
        scraper = stack.api("/api/v1/clients/scraper")
        flag = scraper["flag"]
        assert scraper["flagged"] and scraper["decision"] == "block" and flag["detectors"]
        # The flagging query was the scraper's flag["first_query"]-th, all allowed until then.
        from_flag = first_403 - flag["first_at"]
        from_query = first_403 - allowed[flag["first_query"] - 1]
        print(f"\nflag -> 403 at nginx: {from_flag:.2f} s; flagging query sent -> 403: {from_query:.2f} s "
              f"(bound: cache {CACHE} s + ingestion cycle {POLL} s; flagged by {[d['detector'] for d in flag['detectors']]} "
              f"at query {flag['first_query']})")
        assert from_flag <= CACHE + 1.0
        assert from_query <= CACHE + POLL + 1.5
        session = requests.Session()
        stream = inputs(99, scraper=True)
        assert all(predict(session, url, "key-scraper", next(stream), spoof=c) == 403 for c in ("alice", "bob", ""))
        time.sleep(1.0)
        benign.done.set()
        benign.join()
        assert benign.statuses and {s for _, s in benign.statuses} == {200}, benign.statuses[-5:]
        assert any(k == "key-alice" for k, _ in benign.statuses)  # alice claimed to be the scraper, and got 200
        flagged = stack.api("/api/v1/clients?flagged=true")
        assert [c["client"] for c in flagged["clients"]] == ["scraper"]  # no benign app, and alice was not framed
        log = (tmp_path / "logs" / "model.jsonl").read_text().splitlines()
        assert {json.loads(line)["client"] for line in log} == {"alice", "bob", "carol", "scraper"}

        # a release through the API unblocks (within the cache lifetime)
        r = requests.post(stack.exporter.url + "/api/v1/clients/" + quote("scraper", safe="") + "/release",
                          json={"reason": "test: false alarm"}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        assert r.status_code == 200 and r.json()["override"]["who"] == "ops"
        released = time.monotonic()
        wait_for(lambda: predict(session, url, "key-scraper", next(stream)) == 200, timeout=CACHE + 5, interval=0.2, what="scraper unblocked")
        print(f"release -> 200 at nginx: {time.monotonic() - released:.2f} s")
        assert time.monotonic() - released <= CACHE + 1.5
        m = stack.exporter.metrics()
        assert sample(m, "monitaur_decisions_total", decision="block") >= 1 and sample(m, "monitaur_decisions_total", decision="allow") >= 1
        assert sample(m, "monitaur_overrides_total", action="release") == 1
        assert "auth request unexpected status" not in stack.nginx.errors()
        assert "Traceback" not in stack.exporter.log_text()


@pytest.mark.usefixtures("_nginx_installed")
def test_observe_mode_blocks_nobody_and_counts_what_it_would_have_blocked(tmp_path: Path) -> None:
    with Stack(tmp_path, "observe") as stack:
        assert stack.nginx is not None
        url = stack.nginx.url
        session, stream = requests.Session(), inputs(99, scraper=True)
        statuses = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            statuses.append(predict(session, url, "key-scraper", next(stream)))
            m = stack.exporter.metrics()
            if (sample(m, "monitaur_decisions_total", decision="would_block") or 0) >= 3:
                break
            time.sleep(0.05)
        assert set(statuses) == {200}
        scraper = stack.api("/api/v1/clients/scraper")
        assert scraper["flagged"] and scraper["blocked"] and scraper["decision"] == "would_block"
        m = stack.exporter.metrics()
        assert sample(m, "monitaur_decisions_total", decision="would_block") >= 3 and sample(m, "monitaur_decisions_total", decision="block") == 0


def test_the_documented_snippet_is_the_tested_one() -> None:
    doc = re.sub(r"\s+", " ", (REPO / "docs" / "reaction.md").read_text(encoding="utf-8"))
    for line in PROTECTED_LOCATION.strip().splitlines():
        directive = re.sub(r"\s+", " ", line.split("#")[0]).strip()
        if directive:
            assert directive in doc, directive
