"""Decision latency for gateways, while the exporter ingests, and what ``auth_request`` adds at nginx.

1. **Decision latency.** ``monitaur-exporter run`` as a subprocess, tailing a log that a
   writer process appends ``--rate`` events/s to (``--clients`` clients of the demo's digits-like
   model, a tenth of them repeating their inputs, so flags open and the decision table
   changes all along), with the decision endpoint in ``block`` mode. A client process
   sends decision requests at ``--qps`` over 4 kept-alive connections, for random known
   and unknown clients, and times each (send to last byte): p50, p99, p99.9, max, first
   while the exporter is idle, then while it ingests. The achieved ingestion rate is read
   from ``monitaur_events_total``, and the file lag at the end. Fewer clients make larger
   per-client batches, which the exporter ingests faster: with the default 20, it keeps up
   with 10k events/s on a 2-core VM; with ``--clients 1000`` it runs at its ceiling, below.
2. **Overhead through nginx** (``--nginx``): Debian's nginx in front of the model service
   of the gateway test (tests/gateway.py, the documented config), ``POST /predict`` with
   ``auth_request`` against ``/direct/predict`` without, interleaved on one kept-alive
   connection, ``--requests`` each: with the decision cached (``reaction.cache_seconds``
   5: nginx asks once per client and 5 s) and uncached (0: nginx asks every time).

    python3 bench/decision_latency.py [--rate 10000] [--clients 20] [--seconds 20] [--qps 500] [--nginx] [--requests 2000]

Targets (issue 13): decision p99 < 5 ms while ingesting 10k events/s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conftest, tests.gateway: the gateway test's harness

from exporter.demo import DigitsLike, _line  # noqa: E402
from tests.conftest import ExporterProcess, free_port, sample, wait_for  # noqa: E402


def make_lines(n: int, clients: int) -> list[str]:
    """``n`` events of ``clients`` clients of the demo's digits-like model; a tenth of the clients
    re-send three inputs (the repetition detector flags them, so the decision table changes)."""
    world = DigitsLike(0)
    rng = np.random.default_rng(1)
    x = world.sample(rng, n)
    p = world.predict(x)
    who = rng.integers(0, clients, n)
    repeat = who % 10 == 0
    x[repeat] = x[who[repeat] % 3]
    p[repeat] = p[who[repeat] % 3]
    t0 = time.time()
    return [_line(t0 + i / 10_000, f"client-{c:04d}", xi, pi) + "\n" for i, (c, xi, pi) in enumerate(zip(who, x, p))]


def write_events(path: str, rate: int, seconds: float, clients: int, start: Any, ready: Any) -> None:
    """The writer process: ``rate`` events/s appended to ``path`` in 20 slices a second, for ``seconds``
    (lines made beforehand, so that writing costs little CPU)."""
    lines = make_lines(int(rate * seconds) + rate, clients)
    ready.set()
    slice_n = max(1, rate // 20)
    start.wait()
    t0 = time.monotonic()
    k = 0
    with open(path, "a", encoding="utf-8") as fh:
        while (now := time.monotonic() - t0) < seconds and k < len(lines):
            due = min(len(lines), (int(now * 20) + 1) * slice_n)
            fh.writelines(lines[k:due])
            fh.flush()
            k = due
            time.sleep(max(0.0, (int(now * 20) + 1) / 20 - (time.monotonic() - t0)))


def request_bytes(client: str) -> bytes:
    return f"GET /decide HTTP/1.1\r\nHost: monitaur\r\nX-Monitaur-Client: {client}\r\n\r\n".encode()


def ask(port: int, qps: float, seconds: float, clients: int, out: Any, start: Any) -> None:
    """The client process: decision requests at ``qps`` over 4 kept-alive connections, half for clients of the
    written events and half for unknown ones; latencies (s) to ``out``."""
    rng = np.random.default_rng(2)
    requests = [request_bytes(f"client-{rng.integers(0, 2 * clients):04d}") for _ in range(1000)]
    lat: list[float] = []
    statuses: dict[str, int] = {}
    start.wait()
    # Connected only now: the endpoint closes a connection whose first request takes longer
    # than reaction.listen.header_timeout_seconds, and the writer may take that long to start.
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    for c in conns:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        conn = conns[i % 4]
        sent = time.perf_counter()
        conn.sendall(requests[i % 1000])
        got = b""
        while not got.endswith(b"\r\n\r\n"):
            chunk = conn.recv(4096)
            if not chunk:
                raise ConnectionError(f"the decision endpoint closed a connection after {i} requests")
            got += chunk
        lat.append(time.perf_counter() - sent)
        code = got[9:12].decode()
        statuses[code] = statuses.get(code, 0) + 1
        i += 1
        time.sleep(max(0.0, t0 + i / qps - time.monotonic()))
    out.put((lat, statuses))


def percentiles(lat: list[float]) -> dict[str, float]:
    a = np.sort(np.asarray(lat)) * 1000
    return {"n": len(a), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "p99.9_ms": float(np.percentile(a, 99.9)), "max_ms": float(a[-1])}


def measure_decisions(port: int, qps: float, seconds: float, clients: int, writer: tuple[str, int] | None,
                      events: Callable[[], float] = lambda: 0.0) -> tuple[dict[str, float], dict[str, int], float]:
    """Decision latencies while the writer (if any) appends events; also the events ingested meanwhile."""
    ctx = mp.get_context("spawn")
    start, ready, out = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=ask, args=(port, qps, seconds, clients, out, start))]
    if writer is not None:
        procs.append(ctx.Process(target=write_events, args=(writer[0], writer[1], seconds, clients, start, ready)))
    else:
        ready.set()
    for p in procs:
        p.start()
    ready.wait(300)  # the writer makes its lines first
    time.sleep(0.5)
    before = events()
    start.set()
    lat, statuses = out.get(timeout=seconds + 120)
    ingested = events() - before
    for p in procs:
        p.join(timeout=seconds + 60)
    return percentiles(lat), statuses, ingested


def decision_bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    logs = workdir / "logs"
    logs.mkdir()
    log = logs / "events.jsonl"
    log.touch()
    port = free_port()
    exporter = ExporterProcess(workdir, {
        "files": {"paths": [str(logs / "*.jsonl")], "mode": "poll"},
        "state": {"dir": str(workdir / "state")},
        "reaction": {"enabled": True, "mode": "block", "listen": {"port": port}},
        "log_level": "warning",
    }).start()
    try:
        idle, _, _ = measure_decisions(port, args.qps, min(args.seconds, 10), args.clients, None)
        busy, statuses, events = measure_decisions(port, args.qps, args.seconds, args.clients, (str(log), args.rate),
                                                   lambda: sample(exporter.metrics(), "monitaur_events_total", model="digits") or 0.0)
        m = exporter.metrics()
        lag = (sample(m, "monitaur_file_size_bytes", path=str(log)) or 0) - (sample(m, "monitaur_file_offset_bytes", path=str(log)) or 0)
        flagged = sum(1 for (name, _), v in m.items() if name == "monitaur_client_suspicious" and v == 1)
        table = sample(m, "monitaur_decision_table_clients")
    finally:
        exporter.stop()
    return {"idle": idle, "ingesting": busy, "statuses": statuses, "events_ingested": events,
            "ingest_rate": events / max(args.seconds, 1e-9), "offered_rate": args.rate, "file_lag_bytes_at_end": lag, "flagged_clients": flagged, "table_clients": table}


def nginx_bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import http.client

    from tests.gateway import ModelService, Nginx

    body = json.dumps({"input": DigitsLike(0).sample(np.random.default_rng(0), 1)[0].tolist()})
    out: dict[str, Any] = {}
    for cache in (5, 0):
        run = workdir / f"nginx-cache-{cache}"
        run.mkdir()
        port = free_port()
        exporter = ExporterProcess(run, {"files": {"paths": []}, "state": {"dir": None}, "log_level": "warning",
                                         "reaction": {"enabled": True, "mode": "block", "cache_seconds": cache, "listen": {"port": port}}}).start()
        model = ModelService(run / "model.jsonl").start()
        nginx = Nginx(model.port, port, {"bench-key": "bench-client"}).start()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", nginx.port)
            lat: dict[str, list[float]] = {"/predict": [], "/direct/predict": []}
            for i in range(args.requests * 2 + 200):
                path = "/predict" if i % 2 == 0 else "/direct/predict"
                t = time.perf_counter()
                conn.request("POST", path, body=body, headers={"X-Api-Key": "bench-key", "Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                assert r.status == 200, (path, r.status)
                if i >= 200:  # warm-up left out
                    lat[path].append(time.perf_counter() - t)
            out[f"cache_{cache}s"] = {"with_auth_request": percentiles(lat["/predict"]), "without": percentiles(lat["/direct/predict"])}
        finally:
            nginx.stop()
            model.stop()
            exporter.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=10_000, help="events/s the writer appends")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=20,
                    help="clients of the written events (the exporter ingests fewer events/s from more clients: smaller batches)")
    ap.add_argument("--qps", type=float, default=500.0, help="decision requests per second")
    ap.add_argument("--nginx", action="store_true", help="also measure the overhead of auth_request through nginx")
    ap.add_argument("--requests", type=int, default=2000, help="requests per path through nginx")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="monitaur-decision-bench-") as tmp:
        for part in ("decisions", "nginx"):
            (Path(tmp) / part).mkdir()
        result: dict[str, Any] = {"decisions": decision_bench(args, Path(tmp) / "decisions")}
        if args.nginx:
            result["nginx"] = nginx_bench(args, Path(tmp) / "nginx")
    d = result["decisions"]
    print(f"decision latency, {d['idle']['n']:,} requests idle and {d['ingesting']['n']:,} while ingesting "
          f"{d['ingest_rate']:,.0f} events/s of {args.clients} clients (offered {args.rate:,}/s; file lag at the end: {d['file_lag_bytes_at_end']:,.0f} bytes; "
          f"{d['flagged_clients']} clients flagged, {d['table_clients']:.0f} in the decision table; answers {d['statuses']})")
    for phase in ("idle", "ingesting"):
        p = d[phase]
        print(f"  {phase:10s} p50 {p['p50_ms']:.2f} ms  p99 {p['p99_ms']:.2f} ms  p99.9 {p['p99.9_ms']:.2f} ms  max {p['max_ms']:.2f} ms")
    for name, r in result.get("nginx", {}).items():
        w, wo = r["with_auth_request"], r["without"]
        print(f"nginx, decision {name.replace('_', ' ')}: with auth_request p50 {w['p50_ms']:.2f} ms p99 {w['p99_ms']:.2f} ms; "
              f"without p50 {wo['p50_ms']:.2f} ms p99 {wo['p99_ms']:.2f} ms; overhead p50 {w['p50_ms'] - wo['p50_ms']:+.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if d["ingesting"]["p99_ms"] < 5.0 else 1


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    raise SystemExit(main())
