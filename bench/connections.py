"""What many idle or stalled connections cost the exporter's HTTP server, and whether it still answers.

Starts ``monitaur-exporter run`` as a subprocess on a loopback port (no tailing, no state),
then opens ``--connections`` TCP connections to it that send nothing (``--mode idle``) or
only the first line of a request (``--mode partial``, a slowloris). With them open it
reports:

- the exporter's thread count (``Threads:`` of ``/proc/PID/status``), before and after;
- how many of the connections were answered 503 at once (beyond ``listen.max_connections``);
- the latency of a fresh ``GET /healthz`` while they are open;
- how long the server takes to drop the stalled ones (``listen.header_timeout_seconds``);
- what a client that sends a whole body of ``push.max_body_bytes + 1`` bytes reads back.

``--src DIR`` runs the exporter from another source tree, to measure an older version in
the same run (e.g. ``git archive <commit> | tar -x -C /tmp/before``)::

    python3 bench/connections.py [--connections 450] [--mode idle|partial] [--hold 15] [--src DIR] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError("no Threads: line")


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, float]:
    """(status, seconds) of one GET on a fresh connection; status 0 if it failed."""
    start = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
    except OSError:
        status = 0
    return status, time.perf_counter() - start


def oversized_post(port: int, size: int) -> str:
    """What a client that writes a whole body of ``size`` bytes, then reads, gets back."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(f"POST /api/v1/events HTTP/1.1\r\nHost: bench\r\nContent-Length: {size}\r\n\r\n".encode())
            s.sendall(b"x" * size)
            reply = s.recv(65536)
        return reply.split(b"\r\n", 1)[0].decode(errors="replace") + " " + reply.rsplit(b"\r\n\r\n", 1)[-1][:80].decode(errors="replace").strip()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def set_key(config: dict[str, Any], assignment: str) -> None:
    key, _, value = assignment.partition("=")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=450)
    ap.add_argument("--mode", choices=["idle", "partial"], default="idle")
    ap.add_argument("--hold", type=float, default=15.0, help="seconds, after all are open, to wait for the server to drop the stalled connections")
    ap.add_argument("--src", type=Path, default=REPO, help="source tree whose exporter to run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. listen.max_connections=64")
    args = ap.parse_args()

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": port},
            "files": {"paths": [f"{tmp}/none-*.jsonl"], "mode": "poll"},
            "state": {"dir": None},
        }
        for a in args.set:
            set_key(config, a)
        cfg = Path(tmp) / "config.yml"
        cfg.write_text(yaml.safe_dump(config))
        env = {**os.environ, "PYTHONPATH": str(args.src.resolve())}
        proc = subprocess.Popen([sys.executable, "-m", "exporter", "run", "--config", str(cfg)], cwd=tmp, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while get(port, "/healthz", timeout=1)[0] != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the exporter did not start")
                time.sleep(0.2)
            report: dict[str, Any] = {"src": str(args.src), "connections": args.connections, "mode": args.mode, "threads_before": threads(proc.pid)}

            socks: list[socket.socket] = []
            connected_at: list[float] = []
            t0 = time.monotonic()
            for _ in range(args.connections):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                connected_at.append(time.monotonic())
                if args.mode == "partial":
                    s.sendall(b"GET /metrics HTTP/1.1\r\n")
                socks.append(s)
            opened = time.monotonic()
            report["seconds_to_open_all"] = round(opened - t0, 2)
            time.sleep(1.0)
            report["threads_with_connections_open"] = threads(proc.pid)
            status, seconds = get(port, "/healthz")
            report["healthz_while_open"] = {"status": status, "seconds": round(seconds, 3)}

            # Classify each connection: answered 503 at once, dropped by the server after a
            # while (EOF or reset without an answer), or still open at the end of --hold.
            answered_503 = 0
            dropped_after: list[float] = []
            alive = set(range(len(socks)))
            for s in socks:
                s.setblocking(False)
            while alive and time.monotonic() - opened < args.hold:
                for i in list(alive):
                    try:
                        data = socks[i].recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    alive.discard(i)
                    if data.startswith(b"HTTP/1.1 503"):
                        answered_503 += 1
                    else:
                        dropped_after.append(time.monotonic() - connected_at[i])
                time.sleep(0.02)
            report["answered_503"] = answered_503
            if dropped_after:
                report["dropped_without_answer"] = {"count": len(dropped_after), "after_seconds_min": round(min(dropped_after), 1),
                                                    "after_seconds_max": round(max(dropped_after), 1)}
            report["still_open_after_hold"] = {"seconds": args.hold, "count": len(alive)}
            report["threads_after_hold"] = threads(proc.pid)
            for s in socks:
                s.close()

            max_body = int(config.get("push", {}).get("max_body_bytes", 10 * 1024 * 1024))
            report["whole_body_of_max_plus_1_bytes"] = oversized_post(port, max_body + 1)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
