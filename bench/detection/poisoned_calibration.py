"""Does a Sybil split inside the calibration log blind group detection?

Calibrates ``links`` twice, on ``--clients`` honest clients alone and on the same clients
plus one JbDA split over ``--size`` keys (seeds of its own), then replays another split of
the same size among 40 honest clients with each profile. Printed per calibration:
``links``' threshold, the group threshold, the clients and groups calibration found over
``calibration_ceiling`` (left out as attacks), and whether the second split's group was flagged, with how
many of its members ``links`` flagged and how many honest clients it holds. Needs scikit-learn (the ``bench`` extra).

    python3 bench/detection/poisoned_calibration.py [--dataset breast_cancer] [--clients 200] [--size 10] [--ceiling C]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's exporter first

from exporter.calibrate import calibrate  # noqa: E402
from exporter.config import Settings  # noqa: E402
from exporter.replay import replay  # noqa: E402
from tests.sybil import _merge, benign_only, sybil_split  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="breast_cancer")
    ap.add_argument("--clients", type=int, default=200, help="honest calibration clients (default 200)")
    ap.add_argument("--size", type=int, default=10, help="keys of each split (default 10)")
    ap.add_argument("--ceiling", type=float, default=None, help="links' calibration_ceiling (default: the parameter's default)")
    args = ap.parse_args()
    logging.getLogger("monitaur").setLevel(logging.ERROR)  # the warnings are in the summary printed below
    settings = Settings(state={"dir": None}, files={"paths": []}, calibration={"target_fpr": 0.01}, detectors={"links": {"enabled": True, **({"calibration_ceiling": args.ceiling} if args.ceiling else {})}})
    honest = benign_only(args.dataset, clients=args.clients)
    inside, _ = sybil_split(args.dataset, size=args.size, per_member=300, benign=0, seed=1)
    later, members = sybil_split(args.dataset, size=args.size, per_member=300, benign=40, seed=0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        honest.write(d / "honest.jsonl", append=False)
        _merge([honest, inside]).write(d / "with-split.jsonl", append=False)
        later.write(d / "later.jsonl", append=False)
        for name in ("honest", "with-split"):
            profile, summary = calibrate(settings, [str(d / f"{name}.jsonl")], progress=False)
            model = summary["models"][args.dataset]
            report = replay(settings, [str(d / "later.jsonl")], progress=False, profile=profile)
            groups = [report["clients"][c]["group"] for c in members]
            best = max(set(groups) - {None}, key=groups.count, default=None)
            out[name] = {
                "links_threshold": model["thresholds"].get("links"),
                "group_threshold": model["groups"]["threshold"],
                "attacks_inside": {k: v for k, v in model.get("attacks_inside", {}).items() if k != "clients"},
                "left_out_groups": model["groups"].get("left_out_groups", 0),
                "later_split": {
                    "in_one_group": groups.count(best) if best else 0,
                    "group_score": report["groups"][best]["score"] if best else None,
                    "group_flagged": bool(best and report["groups"][best]["flagged"]),
                    "honest_in_its_group": len(report["groups"][best]["members"]) - groups.count(best) if best else 0,
                    "members_flagged_by_links": sum(bool(report["clients"][c]["detectors"]["links"]["flagged"]) for c in members),
                },
            }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
