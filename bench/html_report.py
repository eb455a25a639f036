"""Size and render time of the forensic report (``replay --html``) on a large replay, and at its bounds.

1. Simulates ``--events`` events (default 100,000) of about ``--clients`` clients: benign
   behaviours plus attackers of every ordinary type and two Sybil groups
   (``monitaur-exporter simulate``), so that the page has flagged clients to draw.
2. Replays them without and with the timeline recorder (the cost of ``--html``; best of
   ``--repeat``), renders and writes the page.
3. Loads the page in headless Chromium (bench/chromium.py) ``--loads`` times and reports
   the median of: the page's own time from navigation start to the end of its script
   after a forced layout (``data-layout-ms``, written by the page), and the wall time of
   the whole headless run, browser start included, next to the same for an empty page.
4. The bound: a page rendered from synthetic data at the renderer's limits (``MAX_ROWS``
   flagged clients in the table, ``MAX_TIMELINES`` full timelines of every detector), its
   size and Chromium time.

    python3 bench/html_report.py [--events 100000] [--clients 1000] [--repeat 2] [--loads 3] [--keep DIR]

Targets (issue 13): page < 5 MB and < 3 s to render.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's exporter first, also where the venv installed another
from exporter.tuning import tune_process  # noqa: E402

tune_process()  # as the CLI does (exporter.tuning), before numpy loads

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from chromium import check_attributes, render  # noqa: E402  (bench/ is sys.path[0])
from exporter.config import load_settings  # noqa: E402
from exporter.replay import replay  # noqa: E402
from exporter.report_html import MAX_ROWS, MAX_TIMELINES, render_report, write_replay_html  # noqa: E402
from exporter.timelines import PER_CLIENT, Timeline, TimelineRecorder  # noqa: E402

ATTACKS = "uniform:4,linesearch:4,jbda:4,knockoff:4,activethief:4,hopskipjump:4,simba:4,sybil:2"
TARGET_BYTES = 5_000_000
TARGET_SECONDS = 3.0


def simulate(path: Path, events: int, clients: int, seed: int) -> None:
    """Traffic of about ``clients`` clients (benign ones are fewer than asked when some get no events)."""
    benign = int(clients * 1.05)  # some benign clients get no event at this size (1,050 asked: ~955 with events)
    cmd = [sys.executable, "-m", "exporter", "simulate", "--benign", str(benign), "--queries-per-client", "90", "--attacks", ATTACKS,
           "--attack-queries", "400", "--events", str(events), "--seed", str(seed), "--out", str(path), "--quiet"]  # fmt: skip
    subprocess.run(cmd, check=True)


def load(page: Path, loads: int, shot: Path | None = None) -> dict[str, float | int]:
    """Median in-page layout time and headless wall time over ``loads`` loads; checks no console message."""
    layout, wall = [], []
    check: dict[str, str] = {}
    for i in range(loads):
        got = render(page, shot if i == 0 else None, size=(1200, 2000))
        if got.returncode != 0 or got.console:
            raise SystemExit(f"chromium failed on {page}: rc {got.returncode}, console {got.console[:3]}")
        check = check_attributes(got.dom)
        if "data-layout-ms" in check:
            layout.append(float(check["data-layout-ms"]) / 1000)
        wall.append(got.seconds)
    out: dict[str, float | int] = {"wall_s": round(statistics.median(wall), 3)}
    if layout:
        out["layout_s"] = round(statistics.median(layout), 3)
        out["timelines_drawn"] = int(check["data-timelines"])
        out["table_rows"] = int(check["data-rows"])
    return out


def bound_page(path: Path, detectors: int = 9) -> int:
    """A page at the renderer's limits: every table row flagged, every timeline full; return its size."""
    rng = np.random.default_rng(0)
    names = tuple(f"detector_{j}" for j in range(detectors))
    clients = {
        f"client-{i:05d}-{'x' * 40}": {
            "queries": 100_000, "flagged": True, "first_flagged_query": 20_000, "score": float(rng.random()),
            "detectors": {n: {"flagged": True, "first_flagged_query": 20_000, "value": 0.9} for n in names},
        }
        for i in range(MAX_ROWS)
    }  # fmt: skip
    q = np.unique(np.r_[np.linspace(1, 100_000, PER_CLIENT).astype(np.int64), 20_000, 100_000])
    walk = lambda: np.clip(np.cumsum(rng.normal(0, 0.05, q.size)) + 0.5, 0, 1).astype(np.float32)  # noqa: E731
    timelines = {
        c: [Timeline("model", names, q, 1.7e9 + q.astype(float), walk(), np.stack([walk() for _ in names], axis=1), 20_000, {n: 20_000 for n in names})]
        for c in list(clients)[:MAX_TIMELINES]
    }
    summary = {"clients": clients, "events": {"accepted": 10**7, "rejected": {}}, "models": {"model": {"thresholds": dict.fromkeys(names, 0.5), "verdict_inputs": list(names)}}}
    data = render_report(summary, timelines).encode()
    path.write_bytes(data)
    return len(data)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2, help="best of N replays, each with and without the recorder")
    ap.add_argument("--loads", type=int, default=3, help="Chromium loads per page (median)")
    ap.add_argument("--keep", metavar="DIR", help="keep the log, pages and screenshots here")
    args = ap.parse_args()
    settings = load_settings(None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        log = work / "traffic.jsonl"
        simulate(log, args.events, args.clients, args.seed)
        plain, recorded = [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            replay(settings, [str(log)], progress=False)
            plain.append(time.perf_counter() - start)
            rec = TimelineRecorder()
            start = time.perf_counter()
            report = replay(settings, [str(log)], progress=False, observer=rec, at_end=rec.finish)
            recorded.append(time.perf_counter() - start)
        page = work / "report.html"
        start = time.perf_counter()
        size = write_replay_html(page, report, rec, None)
        write_s = time.perf_counter() - start
        empty = work / "empty.html"
        empty.write_text("<!doctype html><title>empty</title>")
        bound = work / "bound.html"
        bound_size = bound_page(bound)
        result = {
            "events": args.events,
            "clients": len(report["clients"]),
            "flagged_clients": sum(1 for v in report["clients"].values() if v["flagged"]),
            "replay_s": round(min(plain), 3),
            "replay_with_recorder_s": round(min(recorded), 3),
            "recorder_points": rec.points,
            "render_and_write_s": round(write_s, 3),
            "page_bytes": size,
            "chromium": load(page, args.loads, work / "report.png" if args.keep else None),
            "empty_page_chromium": load(empty, args.loads),
            "bound_page_bytes": bound_size,
            "bound_page_chromium": load(bound, args.loads, work / "bound.png" if args.keep else None),
        }
    worst = max(result["chromium"]["layout_s"], result["bound_page_chromium"]["layout_s"])
    result["targets_met"] = max(size, bound_size) < TARGET_BYTES and worst < TARGET_SECONDS
    print(json.dumps(result, indent=2))
    return 0 if result["targets_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
