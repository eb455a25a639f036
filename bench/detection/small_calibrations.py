"""What does calibration on a few honest clients leave out as an attack inside the log?

Cuts the honest clients of a log into disjoint sets of ``--clients`` (drawn in a seeded
random order), calibrates on each set alone, and prints per set the clients calibration
put over ``links``' ``calibration_ceiling`` (left out as an attack split inside the log),
``links``' threshold and the group threshold. On honest traffic every set should leave out
nobody: each client left out is a false warning. ``--prefix`` picks the clients (by the
start of their ids) from a log that also holds attackers.

    python3 bench/detection/groups.py --datasets wine --seeds 0 --strategies even --workdir DIR
    python3 bench/detection/small_calibrations.py DIR/wine-0/evaluation.jsonl --config DIR/wine-0/config.yml --prefix bapp- --clients 20 --sets 25
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's exporter first
from exporter.calibrate import calibrate  # noqa: E402
from exporter.config import load_settings  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--config", required=True, help="the exporter config the log was calibrated with (links enabled)")
    ap.add_argument("--prefix", default="", help="only clients whose ids start with this")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--sets", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    settings = load_settings(args.config)
    lines: dict[str, list[bytes]] = defaultdict(list)
    with open(args.log, "rb") as fh:
        for line in fh:
            client = orjson.loads(line)["client"]
            if client.startswith(args.prefix):
                lines[client].append(line)
    order = sorted(lines)
    np.random.default_rng(args.seed).shuffle(order)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(min(args.sets, len(order) // args.clients)):
            path = Path(tmp) / f"set-{k}.jsonl"
            with path.open("wb") as fh:
                for client in order[k * args.clients : (k + 1) * args.clients]:
                    fh.writelines(lines[client])
            _, summary = calibrate(settings, [str(path)], io.StringIO(), False)
            for model, m in summary["models"].items():
                found = m.get("attacks_inside") or {}
                rows.append({"set": k, "model": model, "clients": m["clients"], "left_out": found.get("clients", []),
                             "links_threshold": m["thresholds"].get("links"), "group_threshold": (m.get("groups") or {}).get("threshold")})
                print(json.dumps(rows[-1]), flush=True)
    left = sum(len(r["left_out"]) for r in rows)
    print(f"{len(rows)} calibrations of {args.clients} clients: {left} client(s) left out in {sum(bool(r['left_out']) for r in rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
