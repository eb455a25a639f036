"""The rotation-and-restart drill: exact per-client counts across renames, copytruncates and restarts.

A writer thread appends events of ``--clients`` clients to ``logs/app.jsonl`` at ``--rate``
lines/s and rotates the file as logrotate and logging libraries do:

- rename (every ``--rename-every`` s), alternating ``app.jsonl.1`` (an existing ``.1``
  moves on to a dated name first) and a dated name ``app.jsonl-20261205-<n>``, out of the
  tailed glob ``*.jsonl``; after each rename it writes ``--late`` more lines to the renamed
  file (a writer that has not reopened yet) before it opens the new one;
- copytruncate (every ``--copytruncate-every`` s): copy to a dated name, then truncate.
  The writer pauses meanwhile, so no line falls into copytruncate's own race.

Meanwhile ``monitaur-exporter run`` (a real subprocess) is stopped ``--sigterm`` times
with SIGTERM and ``--sigkill`` times with SIGKILL, evenly spread and interleaved, stays
down ``--down`` s each time (renames go on while it is down), and is started again. A
scraper reads /metrics every 0.5 s while it is up.

At the end the writer stops, the exporter catches up and stops cleanly, and the
per-client totals in its final state snapshot are compared with what was written:
``lost`` and ``duplicated`` lines, per client and summed. Expected: 0 and 0 with SIGTERM
only; after SIGKILLs, 0 lost and duplicates only if a kill falls between the state and
the offsets writes of a checkpoint (at most one checkpoint interval of lines per kill).
It also checks the counters as Prometheus reads them: ``monitaur_file_lines_total``
never decreases within a process, ``monitaur_file_rotations_total`` is there (at 0)
from the first scrape, and the per-client ``monitaur_client_queries_total``, summed as
``increase()`` does (a drop is a reset to 0), is not inflated by a restart: at most the
lines written plus the lines read twice after kills.

    python3 bench/rotation_drill.py [--seconds 150] [--rate 6000] [--sigterm 20] [--sigkill 10] [--json OUT]
    python3 bench/rotation_drill.py --quick      # the short version the test suite runs (~25 s)

Exit status 0 when every target holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
DATE = "20261205"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_lines(clients: int, per_client: int, seed: int) -> list[list[bytes]]:
    """A pool of valid events per client (8 features, 3 class probabilities), each without its opening brace.

    The writer puts ``{"seq": n,`` in front: every line is unique, as a log's lines are
    (timestamps, request ids), so two files never start with the same bytes.
    """
    rng = random.Random(seed)
    pools = []
    for c in range(clients):
        pool = []
        for _ in range(per_client):
            x = [round(rng.uniform(0, 16), 3) for _ in range(8)]
            w = [rng.random() + 0.05 for _ in range(3)]
            p = [round(v / sum(w), 6) for v in w]
            p[-1] = round(1.0 - sum(p[:-1]), 6)
            pool.append(json.dumps({"client": f"c{c:02d}", "model": "m", "input": x, "output": p}).encode()[1:] + b"\n")  # without its "{"
        pools.append(pool)
    return pools


class Writer(threading.Thread):
    """Appends lines at a steady rate and rotates the log; counts what it wrote per client."""

    def __init__(self, logs: Path, args: argparse.Namespace, down: threading.Event) -> None:
        super().__init__(name="drill-writer", daemon=True)
        self.log = logs / "app.jsonl"
        self.args = args
        self.pools = client_lines(args.clients, 64, args.seed)
        self.counts: Counter[str] = Counter()
        self.renames = self.renames_while_down = self.copytruncates = 0
        self.written = 0
        self.down = down  # set while the exporter is stopped
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None
        self._n = 0

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the drill
            self.error = exc

    def _write(self, fh: Any, n: int) -> None:
        chunk = []
        clients = self.args.clients
        for i in range(self._n, self._n + n):
            c = i % clients
            chunk.append(b'{"seq":%d,' % i + self.pools[c][(i // clients) % len(self.pools[c])])
            self.counts[f"c{c:02d}"] += 1
        self._n += n
        os.write(fh, b"".join(chunk))
        self.written += n

    def _open(self) -> int:
        return os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _run(self) -> None:
        args = self.args
        fd = self._open()
        start = time.monotonic()
        next_rename = start + args.rename_every
        next_copy = start + args.copytruncate_every
        k = 0
        while not self.stop_flag.is_set():
            now = time.monotonic()
            due = int((now - start) * args.rate) - self.written
            if due > 0:
                self._write(fd, due)
            if now >= next_rename:
                k += 1
                old = fd
                if k % 2:  # numbered, logrotate's default
                    one = self.log.with_name(self.log.name + ".1")
                    if one.exists():
                        os.rename(one, self.log.with_name(f"{self.log.name}-{DATE}-{k:06d}"))
                    os.rename(self.log, one)
                else:  # dateext
                    os.rename(self.log, self.log.with_name(f"{self.log.name}-{DATE}-{k:06d}"))
                self._write(old, args.late)  # the writer has not reopened yet
                fd = self._open()
                os.close(old)
                self.renames += 1
                self.renames_while_down += self.down.is_set()
                next_rename += args.rename_every
            elif now >= next_copy:
                k += 1
                shutil.copyfile(self.log, self.log.with_name(f"{self.log.name}-{DATE}-{k:06d}"))
                os.ftruncate(fd, 0)  # O_APPEND: the next write lands at the new end
                self.copytruncates += 1
                next_copy += args.copytruncate_every
            time.sleep(0.005)
        os.close(fd)


class Exporter:
    """``monitaur-exporter run`` as a subprocess, started and stopped again and again."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config = workdir / "config.yml"
        self.config.write_text(
            json.dumps(
                {
                    "listen": {"host": "127.0.0.1", "port": self.port},
                    "files": {"paths": [str(workdir / "logs" / "*.jsonl")], "mode": args.mode, "poll_interval_seconds": args.poll_interval},
                    "state": {"dir": str(workdir / "state"), "checkpoint_interval_seconds": args.checkpoint_interval},
                    "metrics": {"max_client_series": args.clients + 10},
                    "push": {"enabled": False},
                    "log_level": "info",
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_path = workdir / "exporter.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "exporter", "run", "--config", str(self.config)], cwd=self.workdir, env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("exporter did not become healthy")

    def stop(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=120)
        self.proc = None
        return code

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        try:
            with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


class Scraper(threading.Thread):
    """Scrapes while the exporter is up; keeps each process's series in order."""

    def __init__(self, exporter: Exporter) -> None:
        super().__init__(name="drill-scraper", daemon=True)
        self.exporter = exporter
        self.scrapes: list[tuple[int, dict]] = []  # (process number, samples)
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()

    def scrape_now(self) -> None:
        with self.lock:
            if self.exporter.proc is None:
                return
            m = self.exporter.scrape()
            if m is not None:
                self.scrapes.append((self.exporter.starts, m))

    def run(self) -> None:
        while not self.stop_flag.wait(0.5):
            self.scrape_now()


def series(m: dict, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in m.items() if n == name}


def check_counters(scrapes: list[tuple[int, dict]]) -> dict[str, Any]:
    """What Prometheus would make of the scrapes: drops within a process, rotations at 0, increase() per client."""
    drops = 0
    rotations_missing = 0
    increase: Counter[str] = Counter()
    last_client: dict[str, float] = {}
    last_lines: dict[tuple, float] = {}
    first_of_process: set[int] = set()
    for proc, m in scrapes:
        lines = series(m, "monitaur_file_lines_total")
        if proc not in first_of_process:
            first_of_process.add(proc)
            last_lines = {}
            rotations = series(m, "monitaur_file_rotations_total")
            rotations_missing += sum(1 for labels in lines if labels not in rotations)
        for labels, v in lines.items():
            if v < last_lines.get(labels, 0.0):
                drops += 1
            last_lines[labels] = v
        for labels, v in series(m, "monitaur_client_queries_total").items():
            client = dict(labels)["client"]
            if client == "__other__":
                continue
            before = last_client.get(client)
            increase[client] += v if before is None or v < before else v - before  # a drop is a reset to 0
            last_client[client] = v
    return {"file_lines_drops": drops, "rotations_series_missing": rotations_missing, "client_increase": dict(increase)}


def final_totals(state_file: Path) -> dict[str, int]:
    from exporter.snapshot import unpack

    with open(state_file, "rb") as fh:
        doc = unpack(fh)
    return {c["id"]: int(c["total"]) for c in doc["clients"]}


def wait_caught_up(exporter: Exporter, quiet: float, timeout: float = 600) -> None:
    """Until no file has unread bytes and the events counter has not moved for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        m = exporter.scrape() or {}
        lag = sum(series(m, "monitaur_file_size_bytes").values()) - sum(series(m, "monitaur_file_offset_bytes").values())
        events = sum(series(m, "monitaur_events_total").values())
        if lag > 0 or events != last:
            last, since = events, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.2)
    raise RuntimeError("the exporter did not catch up")


def drill(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="monitaur-drill-"))
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    exporter = Exporter(workdir, args)
    down = threading.Event()
    writer = Writer(logs, args, down)
    scraper = Scraper(exporter)
    total = args.sigterm + args.sigkill
    kill_at = {int((j + 0.5) * total / args.sigkill) for j in range(args.sigkill)}  # spread among the SIGTERMs
    restarts = ["SIGKILL" if i in kill_at else "SIGTERM" for i in range(total)]
    exit_codes: list[int] = []
    started = time.monotonic()
    exporter.start()
    writer.start()
    scraper.start()
    try:
        for i, sig in enumerate(restarts):
            at = started + args.seconds * (i + 1) / (len(restarts) + 1)
            time.sleep(max(0.0, at - time.monotonic()))
            scraper.scrape_now()
            with scraper.lock:
                code = exporter.stop(signal.SIGKILL if sig == "SIGKILL" else signal.SIGTERM)
                down.set()
            exit_codes.append(code)
            time.sleep(args.down)
            exporter.start()
            down.clear()
        time.sleep(max(0.0, started + args.seconds - time.monotonic()))
        writer.stop_flag.set()
        writer.join()
        writing = time.monotonic() - started
        wait_caught_up(exporter, quiet=max(1.0, 3 * args.poll_interval))
        scraper.scrape_now()
        scraper.stop_flag.set()
        scraper.join()
        with scraper.lock:
            exit_codes.append(exporter.stop(signal.SIGTERM))
    finally:
        writer.stop_flag.set()
        if exporter.proc is not None:
            exporter.proc.kill()
            exporter.proc.wait()
    if writer.error is not None:
        raise writer.error
    totals = final_totals(workdir / "state" / "state.npz")
    expected = dict(writer.counts)
    per_client = {c: [n, totals.get(c, 0)] for c, n in sorted(expected.items())}
    lost = sum(max(0, n - got) for n, got in per_client.values())
    duplicated = sum(max(0, got - n) for n, got in per_client.values())
    counters = check_counters(scraper.scrapes)
    increase = counters.pop("client_increase")
    n_kill = restarts.count("SIGKILL")
    reread_bound = int(n_kill * args.rate * (args.checkpoint_interval + args.down + 2))  # lines a kill can make a new process read again
    dup_bound = int(n_kill * args.rate * args.checkpoint_interval)
    result = {
        "command": " ".join([Path(sys.executable).name, "bench/rotation_drill.py"] + sys.argv[1:]),
        "seconds_writing": round(writing, 1),
        "lines": writer.written,
        "lines_per_second": round(writer.written / writing),
        "clients": args.clients,
        "renames": writer.renames,
        "renames_while_down": writer.renames_while_down,
        "late_lines_per_rename": args.late,
        "copytruncates": writer.copytruncates,
        "sigterm": restarts.count("SIGTERM"),
        "sigkill": n_kill,
        "sigterm_exit_codes_nonzero": sum(1 for s, c in zip(restarts + ["SIGTERM"], exit_codes) if s == "SIGTERM" and c != 0),
        "lost": lost,
        "duplicated": duplicated,
        "duplicated_bound": dup_bound,
        "client_counter_increase": int(sum(increase.values())),
        "client_counter_increase_bound": writer.written + reread_bound,
        **counters,
        "per_client": per_client,
        "workdir": str(workdir),
    }
    result["ok"] = (
        lost == 0
        and duplicated <= dup_bound
        and result["sigterm_exit_codes_nonzero"] == 0
        and counters["file_lines_drops"] == 0
        and counters["rotations_series_missing"] == 0
        and result["client_counter_increase"] <= result["client_counter_increase_bound"]
    )
    if result["ok"] and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        result["workdir"] = None
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=150.0, help="how long the writer writes")
    ap.add_argument("--rate", type=float, default=6000.0, help="lines per second")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rename-every", type=float, default=0.5)
    ap.add_argument("--copytruncate-every", type=float, default=4.0)
    ap.add_argument("--late", type=int, default=3, help="lines written to a file after it was renamed")
    ap.add_argument("--sigterm", type=int, default=20)
    ap.add_argument("--sigkill", type=int, default=10)
    ap.add_argument("--down", type=float, default=1.5, help="seconds the exporter stays down at each restart")
    ap.add_argument("--checkpoint-interval", type=float, default=2.0)
    ap.add_argument("--poll-interval", type=float, default=1.0)
    ap.add_argument("--mode", choices=["notify", "poll"], default="notify")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the short version: 12 s, 3 SIGTERM and 2 SIGKILL restarts")
    ap.add_argument("--workdir", help="keep the logs, state and exporter log here (default: a temporary directory, removed if all is well)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory even if all is well")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.sigterm, args.sigkill, args.rename_every, args.copytruncate_every = 12.0, 3, 2, 0.2, 1.5
        args.down, args.rate = 0.8, 5000.0
    result = drill(args)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(json.dumps({k: v for k, v in result.items() if k != "per_client"}, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
