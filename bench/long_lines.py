"""Peak memory of ``replay`` over a compressed log holding one huge line.

The content of a log line comes from clients, and a small compressed file can expand to one
line of hundreds of MiB. ``replay`` and ``calibrate`` must reject it (``line_too_long``)
without holding it whole. Each case writes a gzip log of the example log's 1,440 valid lines
with one event of ``MIB`` MiB (a text input of spaces) in the middle, runs ``python -m exporter replay`` on it in a child
process, and reports the child's peak RSS (``wait4``), beside the same log without the long
line, in the same run.

    python3 bench/long_lines.py [--mib 64,512]
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's exporter first

from exporter.demo import example_log  # noqa: E402


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


def peak_rss(log: Path) -> tuple[float, float, dict]:
    """Run ``replay`` on ``log`` in a child; its peak RSS in MiB, wall seconds and the report's event counts."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "exporter", "replay", "--compact", str(log)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    out = child.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"replay failed with {child.returncode}")
    return usage.ru_maxrss / 1024.0, time.perf_counter() - start, json.loads(out)["events"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", default="64,512", help="sizes of the long line, MiB, comma-separated (default 64,512)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mib in [0] + [int(x) for x in args.mib.split(",") if x]:
            log = Path(tmp) / f"long-{mib}.jsonl.gz"
            write_log(log, mib)
            rss, seconds, events = peak_rss(log)
            rows.append({"line_mib": mib, "log_kib": round(log.stat().st_size / 1024), "peak_rss_mib": round(rss, 1),
                         "seconds": round(seconds, 2), "events": events})
            log.unlink()
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
