"""First flag -> page: how long after the exporter flags a client its page reaches Slack and e-mail, at the real timings.

The whole stack runs on 127.0.0.1 as in tests/test_stack_e2e.py (tests/stack.py: the
exporter, Debian's Prometheus and Alertmanager, a Slack sink and an SMTP sink), but with
the repository's OWN timings (``REAL``): 15 s scrapes and rule evaluations, the rules'
``for:`` and ``keep_firing_for:``, Alertmanager's ``group_wait``/``group_interval``.
Events are pushed over HTTP in real time:

- synthetic (default): ``--benign`` benign clients query all along (so that the live
  baseline learns the model); after ``--warmup`` s, ``--attackers`` attackers start at
  random moments spread over ``--window`` s, each sending 60 queries at 2 queries/s, in
  turn a repeat flood, a boundary prober and a perturbation search (the three attacks of
  ``exporter.demo``). Starting at random moments puts their flags at every phase of the
  scrape and evaluation cycles, which is what spreads the latency.
- ``--log FILE``: the events of a JSON-lines log (e.g. ``monitaur-exporter simulate
  --out FILE``, the detection benchmark's traffic), sent at their own pace divided by
  ``--speedup``, their timestamps kept (so detection sees what replay sees).

Then it waits ``--tail`` s for the last pages, and reads, per client the exporter flagged,
its first flag time (the exporter's ``monitaur_client_flagged_timestamp_seconds``, its
wall clock) and the arrival time of the first page naming it in each sink.

Targets (issue 11): every flagged client paged in both sinks; median first flag -> page
<= 90 s, p99 <= 180 s. Exit status 0 when they hold.

    python3 bench/page_latency.py [--attackers 40] [--window 300] [--json OUT]     # ~11 minutes
    python3 bench/page_latency.py --log sim.jsonl --speedup 1000                   # a simulated day in minutes

Needs the test extra (requests, aiosmtpd) and the Debian packages prometheus and
prometheus-alertmanager.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.stack: the harness of the stack test

from exporter.demo import CLASSES, DIM, DigitsLike  # noqa: E402
from tests.stack import ALERTMANAGER, PROMETHEUS, REAL, Stack, flags_of, notifications, page_latencies  # noqa: E402

TOKEN = "bench-push-token"
PUSH = "/api/v1/events"
ATTACK_QUERIES = 60
ATTACK_RATE = 2.0  # queries per second of an attacker
BENIGN_RATE = 0.5  # ... of a benign client
KINDS = ("repeat", "boundary", "search")


def synthetic(benign: int, attackers: int, warmup: float, window: float, duration: float, seed: int) -> list[tuple[float, str, np.ndarray]]:
    """(offset in seconds, client, input) of the whole run, in time order."""
    rng = np.random.default_rng(seed)
    world = DigitsLike(0)
    rows: list[tuple[float, str, np.ndarray]] = []
    for c in range(benign):
        n = rng.poisson(BENIGN_RATE * duration)
        rows += [(t, f"app-{c:02d}", x) for t, x in zip(np.sort(rng.uniform(0, duration, n)), world.sample(rng, n))]
    for a in range(attackers):
        kind = KINDS[a % len(KINDS)]
        start = warmup + rng.uniform(0, window)
        times = start + np.arange(ATTACK_QUERIES) / ATTACK_RATE
        if kind == "repeat":
            few = world.sample(rng, 3)
            xs = few[np.arange(ATTACK_QUERIES) % 3]
        elif kind == "boundary":
            i, j = rng.integers(0, CLASSES, (2, ATTACK_QUERIES))
            xs = np.clip(np.rint((world.prototypes[i] + world.prototypes[j]) / 2 + rng.normal(0, 0.3, (ATTACK_QUERIES, DIM))), 0, 16)
        else:
            base = world.sample(rng, 1)[0]
            xs = np.clip(base + rng.normal(0, 0.05, (ATTACK_QUERIES, DIM)).cumsum(axis=0) * 0.1, 0, 16)
        rows += [(t, f"atk-{kind}-{a:02d}", x) for t, x in zip(times, xs)]
    rows.sort(key=lambda r: r[0])
    return rows


def synthetic_lines(rows: list[tuple[float, str, np.ndarray]]) -> list[tuple[float, Any]]:
    """(offset, event without ts) pairs; the ts is stamped when the event is sent."""
    world = DigitsLike(0)
    probs = world.predict(np.stack([r[2] for r in rows]))
    return [(t, {"client": c, "model": "digits", "input": [float(v) for v in x], "output": [round(float(v), 5) for v in p]})
            for (t, c, x), p in zip(rows, probs)]


def log_lines(path: Path, speedup: float) -> list[tuple[float, Any]]:
    """(offset, event) of a JSON-lines log: its pace divided by ``speedup``, its timestamps kept."""
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    events.sort(key=lambda e: e["ts"])
    t0 = events[0]["ts"]
    return [((e["ts"] - t0) / speedup, e) for e in events]


def feed(url: str, schedule: list[tuple[float, Any]], start: float, stamp: bool, stop: threading.Event) -> None:
    """Push each event when its offset comes (a batch every 0.25 s at most)."""
    i = 0
    session = requests.Session()
    while i < len(schedule) and not stop.is_set():
        now = time.time() - start
        batch = []
        while i < len(schedule) and schedule[i][0] <= now:
            event = dict(schedule[i][1])
            if stamp:
                event["ts"] = round(time.time(), 3)
            batch.append(json.dumps(event))
            i += 1
        if batch:
            r = session.post(url + PUSH, data="\n".join(batch).encode(), headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
            r.raise_for_status()
        time.sleep(0.25 if i >= len(schedule) or schedule[i][0] > now + 0.25 else 0.0)


def summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "min": None, "median": None, "p90": None, "p99": None, "max": None}
    q = lambda p: float(np.percentile(values, p))  # noqa: E731
    return {"n": len(values), "min": round(min(values), 1), "median": round(statistics.median(values), 1),
            "p90": round(q(90), 1), "p99": round(q(99), 1), "max": round(max(values), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attackers", type=int, default=40)
    ap.add_argument("--benign", type=int, default=20)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds of benign traffic before the first attacker")
    ap.add_argument("--window", type=float, default=300.0, help="attackers start at random moments of this many seconds")
    ap.add_argument("--tail", type=float, default=240.0, help="seconds to wait for pages after the traffic ends")
    ap.add_argument("--log", type=Path, help="feed this JSON-lines log instead of the synthetic traffic")
    ap.add_argument("--speedup", type=float, default=1.0, help="--log: send its events this many times faster than they were logged")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the report here too")
    args = ap.parse_args()
    if PROMETHEUS is None or ALERTMANAGER is None:
        print("needs the prometheus and alertmanager binaries (Debian packages prometheus, prometheus-alertmanager)", file=sys.stderr)
        return 2

    if args.log is not None:
        schedule, stamp = log_lines(args.log, args.speedup), False
    else:
        duration = args.warmup + args.window + ATTACK_QUERIES / ATTACK_RATE + 30
        schedule, stamp = synthetic_lines(synthetic(args.benign, args.attackers, args.warmup, args.window, duration, args.seed)), True
    clients = {e["client"] for _, e in schedule}
    config = {"push": {"tokens": [TOKEN]}, "state": {"max_clients": max(1000, 2 * len(clients))},
              "metrics": {"max_client_series": max(500, len(clients))}, "log_level": "info"}
    with tempfile.TemporaryDirectory(prefix="page-latency-") as tmp:
        stack = Stack(Path(tmp) / "stack", config, REAL)
        try:
            stack.start()
            print(f"stack up (REAL timings); feeding {len(schedule)} events of {len(clients)} clients over {schedule[-1][0]:.0f} s", file=sys.stderr)
            stop = threading.Event()
            start = time.time()
            feeder = threading.Thread(target=feed, args=(stack.exporter.url, schedule, start, stamp, stop), daemon=True)
            feeder.start()
            feeder.join()
            print(f"traffic sent; waiting {args.tail:.0f} s for the last pages", file=sys.stderr)
            time.sleep(args.tail)
            flags = flags_of(stack)
            received = notifications(stack)
        finally:
            stack.stop()
    latencies = page_latencies(flags, received)
    lost = sorted(c for c, sinks in latencies.items() if None in sinks.values())
    by_sink = {sink: summary([v[sink] for v in latencies.values() if v[sink] is not None]) for sink in ("slack", "email")}
    report = {
        "timings": "REAL (prometheus/prometheus.yml, alert_rules/, alertmanager/alertmanager.yml as committed)",
        "traffic": str(args.log) if args.log else f"synthetic: {args.benign} benign, {args.attackers} attackers over {args.window:.0f} s",
        "clients": len(clients),
        "flagged": len(flags),
        "flagged_benign": sorted(c for c in flags if c.startswith("app-")),
        "attackers_not_flagged": sorted(c for c in clients if c.startswith("atk-") and c not in flags),
        "paged": {sink: sum(1 for v in latencies.values() if v[sink] is not None) for sink in ("slack", "email")},
        "lost": lost,
        "pages": {sink: sum(1 for n in received if n.sink == sink and n.page_clients) for sink in ("slack", "email")},
        "first_flag_to_page_seconds": by_sink,
        "per_client": {c: {s: None if t is None else round(t, 1) for s, t in v.items()} for c, v in sorted(latencies.items())},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    ok = bool(flags) and not lost and all(
        s["median"] is not None and s["median"] <= 90 and s["p99"] is not None and s["p99"] <= 180 for s in by_sink.values()
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
