"""Cost of hostile image lines: wall time of one ingest, and the memory it takes and keeps.

Each case runs in a fresh child process: a default pipeline first ingests one small
image (so that the model's detectors exist), then the case's line is ingested once.
Reported per case:

  ingest_s        wall time of ``Pipeline.ingest_lines([line])`` (the pipeline lock is held throughout)
  peak_rss_mb     the child's peak RSS minus its RSS before the line
  kept_rss_mb     its RSS after the line (and a GC) minus its RSS before it
  line_kb         the length of the line
  result          accepted, or the rejection reason

    python3 bench/hostile_images.py [--cases zeros4096,max_zeros,max_noise,...]

Run against another checkout with ``PYTHONPATH=/path/to/checkout python3 bench/hostile_images.py``
(the script imports only ``Settings`` and ``Pipeline``, which every version has).
"""

from __future__ import annotations

import os

# The command line's process settings, from the checkout being measured (exporter.tuning,
# before numpy loads); a checkout older than that module pinned only the BLAS threads.
try:
    from exporter.tuning import tune_process
except ImportError:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
else:
    tune_process()

import argparse  # noqa: E402
import base64  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

# "max" cases are sized to the default pixel limit of the checkout that runs them
# (limits.max_image_pixels; 4096 x 4096 before that key existed).
CASES = {
    "zeros4096": "a 4096 x 4096 PNG of zeros (about 50 KB): the image bomb of the issue",
    "zeros2048": "a 2048 x 2048 PNG of zeros",
    "max_zeros": "a square PNG of zeros at the default pixel limit",
    "max_noise": "a PNG of random pixels, as large as fits the default line limit (1 MiB)",
    "png_text_bomb": "an 8 x 8 PNG with 200 zTXt chunks of 1 MB of zeros each (a 275 KB line)",
    "jpeg_scan_bomb": "a progressive 1024 x 1024 JPEG of zeros with one 12-byte scan repeated to fill 700 KB",
    "small": "a 224 x 224 PNG of random pixels: an ordinary request",
}


def _max_pixels() -> int:
    from exporter.config import Settings

    limits = getattr(Settings(), "limits", None)
    return 4096 * 4096 if limits is None else int(limits.max_image_pixels)


def _png(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _png_text_bomb() -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = base64.b64decode(_png(np.zeros((8, 8, 3), dtype=np.uint8)))
    text = zlib.compress(b"\0" * (2**20 - 100), 9)
    bomb = b"".join(chunk(b"zTXt", b"k%d\0\0" % i + text) for i in range(200))
    return base64.b64encode(png[:33] + bomb + png[33:]).decode()  # after the signature and IHDR


def _jpeg_scan_bomb() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((1024, 1024), dtype=np.uint8)).save(buf, format="JPEG", progressive=True, quality=50)
    data = buf.getvalue()
    scans = [data[m.start() : data.index(b"\xff", m.start() + 2)] for m in re.finditer(b"\xff\xda", data)]
    smallest = min(scans, key=len)  # an AC scan of end-of-band runs: 12 bytes
    return base64.b64encode(data[:-2] + smallest * (700_000 // len(smallest)) + b"\xff\xd9").decode()


def _b64(case: str) -> str:
    if case == "png_text_bomb":
        return _png_text_bomb()
    if case == "jpeg_scan_bomb":
        return _jpeg_scan_bomb()
    return _png(_image(case))


def _image(case: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if case == "zeros4096":
        return np.zeros((4096, 4096, 3), dtype=np.uint8)
    if case == "zeros2048":
        return np.zeros((2048, 2048, 3), dtype=np.uint8)
    if case == "max_zeros":
        side = int(_max_pixels() ** 0.5)
        return np.zeros((side, side, 3), dtype=np.uint8)
    if case == "max_noise":
        side = 470  # 470 x 470 x 3 random bytes: a base64 line just under 1 MiB
        return rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    if case == "small":
        return rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    raise SystemExit(f"unknown case {case!r}")


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as fh:
        for row in fh:
            if row.startswith(field + ":"):
                return int(row.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> None:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def child(case: str) -> dict:
    from exporter.config import Settings
    from exporter.pipeline import Pipeline

    pipeline = Pipeline(Settings(state={"dir": None}))
    warm = json.dumps({"client": "warmup", "model": "img", "ts": 1.7e9, "input": {"image_b64": _png(_image("small"))}})
    pipeline.ingest_lines([warm.encode()])
    line = json.dumps({"client": "attacker", "model": "img", "ts": 1.7e9 + 1, "input": {"image_b64": _b64(case)}}).encode()
    gc.collect()
    before = _status_mb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    result = pipeline.ingest_lines([line])
    elapsed = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    gc.collect()
    return {
        "case": case,
        "ingest_s": round(elapsed, 4),
        "peak_rss_mb": round(peak - before, 1),
        "kept_rss_mb": round(_status_mb("VmRSS") - before, 1),
        "line_kb": round(len(line) / 1024, 1),
        "result": "accepted" if result.accepted else ",".join(result.rejected),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    for case in args.cases.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", case], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            print(json.dumps({"case": case, "error": out.stderr.strip().splitlines()[-1:]}))
        else:
            print(out.stdout.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
