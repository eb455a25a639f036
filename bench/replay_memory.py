"""Peak memory of ``replay``: per event of the log, and with one huge line.

``replay`` reads every event of its logs before it judges them in event-time order, so its
memory grows with the log. Each ``--events`` case writes ``bench/throughput.py``'s traffic
(64 features, 10 classes, 500 clients) of that many events. Two per-event figures: the slope
of the peak between the smallest and the largest case (it includes the per-client state
filling up: 500 clients' windows), and the decoded events alone, as ``replay`` holds them
until the end (``tracemalloc`` over ``read_events`` of the largest log, in this process).

The content of a log line comes from clients, and a small compressed file can expand to one
line of hundreds of MiB: ``replay`` and ``calibrate`` must reject it (``line_too_long``)
without holding it whole. Each ``--mib`` case writes a gzip log of the example log's 1,440
valid lines with one event of that many MiB (a text input of spaces) in the middle; the
case ``0`` is the same log without it.

Every case runs ``python -m exporter replay`` in a child process; reported is the child's
peak RSS (``VmHWM``, Linux).

    python3 bench/replay_memory.py [--events 25000,100000] [--mib 64,512]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from io import StringIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's exporter first

from exporter.config import Settings  # noqa: E402
from exporter.demo import example_log  # noqa: E402
from exporter.pipeline import Pipeline  # noqa: E402
from exporter.replay import Progress, read_events  # noqa: E402
from throughput import make_log  # noqa: E402


def write_log(path: Path, mib: int) -> None:
    """The example log's lines, with one line of ``mib`` MiB in the middle (none for 0)."""
    lines = [line.encode() + b"\n" for line in example_log(seed=0)]
    half = len(lines) // 2
    with gzip.open(path, "wb", compresslevel=6) as fh:
        fh.writelines(lines[:half])
        if mib:
            fh.write(b'{"client": "huge", "input": "')
            block = b" " * (1 << 20)
            for _ in range(mib):
                fh.write(block)
            fh.write(b'"}\n')
        fh.writelines(lines[half:])


# The child reports its own peak (VmHWM) as it exits: wait4's ru_maxrss would also count the
# memory this process had when it forked the child, before the exec.
_CHILD = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: sys.stderr.write('VmHWM ' + open('/proc/self/status').read().split('VmHWM:')[1].split()[0] + '\\n'))\n"
    "sys.argv = ['monitaur-exporter', 'replay', '--compact', sys.argv[1]]\n"
    "runpy.run_module('exporter', run_name='__main__')\n"
)


def peak_rss(log: Path) -> tuple[float, float, dict]:
    """Run ``replay`` on ``log`` in a child; its peak RSS in MiB, wall seconds and the report's event counts."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", _CHILD, str(log)], cwd=REPO, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if run.returncode != 0:
        raise SystemExit(f"replay failed with {run.returncode}: {run.stderr[-2000:]!r}")
    peak_kib = int(run.stderr.decode().rsplit("VmHWM ", 1)[1].split()[0])
    return peak_kib / 1024.0, time.perf_counter() - start, json.loads(run.stdout)["events"]


def decoded_bytes(log: Path) -> int:
    """Bytes that the decoded events of ``log`` take, as ``replay`` reads and keeps them."""
    pipeline = Pipeline(Settings(state={"dir": None}, files={"paths": []}), event_time=True)
    tracemalloc.start()
    try:
        events = read_events([log], pipeline, 1 << 20, Progress(StringIO(), False), Counter())
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del events
    return held


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", default="25000,100000", help="log lengths, comma-separated (default 25000,100000)")
    ap.add_argument("--mib", default="64,512", help="sizes of the long line, MiB, comma-separated (default 64,512)")
    args = ap.parse_args()
    out: dict = {"by_events": [], "long_line": []}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = sorted(int(x) for x in args.events.split(",") if x)
        for n in sizes:
            log = Path(tmp) / f"events-{n}.jsonl"
            make_log(log, n, 500)
            rss, seconds, events = peak_rss(log)
            out["by_events"].append({"events": n, "peak_rss_mib": round(rss, 1), "seconds": round(seconds, 2), "accepted": events["accepted"]})
            if n == sizes[-1]:
                out["decoded_event_bytes"] = round(decoded_bytes(log) / n)
            log.unlink()
        rows = out["by_events"]
        if len(rows) >= 2 and rows[-1]["events"] > rows[0]["events"]:
            slope = (rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]) * 1024.0 / (rows[-1]["events"] - rows[0]["events"])
            out["peak_kib_per_event"] = round(slope, 2)
        for mib in [0] + [int(x) for x in args.mib.split(",") if x]:
            log = Path(tmp) / f"long-{mib}.jsonl.gz"
            write_log(log, mib)
            rss, seconds, events = peak_rss(log)
            out["long_line"].append({"line_mib": mib, "log_kib": round(log.stat().st_size / 1024), "peak_rss_mib": round(rss, 1),
                                     "seconds": round(seconds, 2), "events": events})
            log.unlink()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
