"""How long one hostile line holds the pipeline lock: every kind of tests/hostile_corpus.py,
plus the heaviest lines the exporter accepts.

A pipeline with the default detectors (and the corpus's models) first ingests valid
traffic of 50 clients, then each line alone, ``--repeat`` times; reported per kind is
the best time of ``Pipeline.ingest_lines([line])``, which holds ``Pipeline.lock``
throughout. Output: the slowest kinds, then a summary (kinds, median, max).

    python3 bench/hostile_lines.py [--repeat 3] [--top 10]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's exporter first, also where the venv installed another
from exporter.tuning import tune_process  # noqa: E402

tune_process()  # as the CLI does (exporter.tuning), before numpy loads

import argparse  # noqa: E402
import base64  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from exporter.config import Settings  # noqa: E402
from exporter.demo import DigitsLike, _line  # noqa: E402
from exporter.pipeline import Pipeline  # noqa: E402
from tests.hostile_corpus import SETTINGS, corpus  # noqa: E402


def heavy_accepted() -> list[tuple[str, bytes]]:
    """Lines that are accepted and cost the most: the largest image, text and vector a line may hold."""
    rng = np.random.default_rng(0)
    side = int(Settings().limits.max_image_pixels ** 0.5)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    zeros = base64.b64encode(buf.getvalue()).decode()
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (470, 470, 3), dtype=np.uint8)).save(buf, format="PNG")
    noise = base64.b64encode(buf.getvalue()).decode()
    words = " ".join(f"w{i}" for i in rng.integers(0, 10_000, 120_000))
    return [
        (f"accepted: a {side} x {side} PNG of zeros (the pixel limit)", json.dumps({"client": "big", "model": "img", "input": {"image_b64": zeros}}).encode()),
        ("accepted: a 470 x 470 PNG of noise (the line limit)", json.dumps({"client": "big", "model": "img", "input": {"image_b64": noise}}).encode()),
        (f"accepted: a text of {len(words) // 1024} KB", json.dumps({"client": "big", "model": "txt", "input": words}).encode()),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    logging.getLogger("monitaur").setLevel(logging.ERROR)  # each rejection would log a warning
    pipeline = Pipeline(Settings(**SETTINGS, state={"dir": None}))
    world = DigitsLike(0)
    rng = np.random.default_rng(0)
    x = world.sample(rng, 2000)
    p = world.predict(x)
    pipeline.ingest_lines([_line(1.7e9 + i, f"client-{i % 50}", xi, pi).encode() for i, (xi, pi) in enumerate(zip(x, p))])
    cases = [(h.kind, h.line) for h in corpus()] + heavy_accepted()
    times = []
    for kind, line in cases:
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            pipeline.ingest_lines([line])
            best = min(best, time.perf_counter() - start)
        times.append((best, kind, len(line)))
    times.sort(reverse=True)
    for best, kind, size in times[: args.top]:
        print(f"{best * 1e3:8.2f} ms  {size / 1024:7.1f} KB  {kind}")
    values = [t for t, _, _ in times]
    print(json.dumps({"kinds": len(values), "median_ms": round(statistics.median(values) * 1e3, 3), "max_ms": round(max(values) * 1e3, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
