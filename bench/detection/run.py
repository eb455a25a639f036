#!/usr/bin/env python3
"""Detection-quality benchmark: how fast MONITAUR flags each attack, and what it cost.

Per dataset and seed (protocol in bench/detection/README.md and DESIGN.md section 7):

1. build the world (dataset split, victim model) and simulate a CALIBRATION population
   of benign clients and a separate EVALUATION population (other benign clients plus
   attackers of every type, Sybil groups, slow attackers), written as JSON lines;
2. run the real CLI as subprocesses: ``monitaur-exporter calibrate`` on the calibration
   log (when available), then ``monitaur-exporter replay --compact`` on the evaluation
   log;
3. score the report against the ground truth: detection rate per attack type, benign
   false-alarm rate, queries to detection, and the fidelity of the substitute the
   attacker could have trained before the alarm; the same for the ``prada`` detector
   alone when it is registered.

    python3 bench/detection/run.py [--seeds 0,1,2] [--datasets digits,breast_cancer,wine]
                                   [--quick] [--out results.json]

Needs scikit-learn (the ``bench`` extra) for the datasets and the substitutes.
"""

from __future__ import annotations

import os

# Small matrices: multi-threaded BLAS is many times slower than one thread here. Set
# before numpy is imported, and inherited by the exporter subprocesses.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing

from exporter.sim import ATTACKS, Population, Traffic, World, build_world, simulate, sklearn_available  # noqa: E402

# -- protocol constants -------------------------------------------------------------------
TARGET_FPR = 0.01
TARGET_DETECTION = 0.95
TARGET_DETECTION_HARD = 0.80  # evasive attacks: interleaved, slow, Sybil (per group)
HARD_ATTACKS = ("interleaved", "slow", "sybil")
TARGET_FALSE_ALARMS = 0.01
TARGET_MEDIAN_QUERIES = 200
SUBSTITUTE_SEED = 0


@dataclass
class Sizes:
    """Population sizes of one benchmark mode."""

    calib_benign: int
    eval_benign: int
    per_attack: int  # attacker clients per ordinary attack type
    sybil_groups: int
    slow: int
    interleaved: int
    benign_queries: int  # median per benign client
    attack_queries: int  # per attacker client, per Sybil group
    window: float  # seconds of benign activity


FULL = Sizes(calib_benign=500, eval_benign=300, per_attack=10, sybil_groups=3, slow=5, interleaved=10,
             benign_queries=100, attack_queries=1000, window=6 * 3600.0)
QUICK = Sizes(calib_benign=240, eval_benign=100, per_attack=2, sybil_groups=1, slow=2, interleaved=2,
              benign_queries=80, attack_queries=300, window=3600.0)


def attack_counts(sizes: Sizes, attacks: Sequence[str]) -> dict[str, int]:
    """Clients (groups for Sybil) per attack type in the evaluation population."""
    special = {"sybil": sizes.sybil_groups, "slow": sizes.slow, "interleaved": sizes.interleaved}
    return {a: special.get(a, sizes.per_attack) for a in attacks}


# -- one run: simulate, calibrate, replay ---------------------------------------------------
def exporter_cmd(*args: str) -> list[str]:
    """The real CLI, as the installed package would run it (``monitaur-exporter ...``)."""
    return [sys.executable, "-m", "exporter", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def calibrate_available() -> bool:
    """Whether this exporter has the ``calibrate`` subcommand."""
    run = subprocess.run(exporter_cmd("calibrate", "--help"), capture_output=True, text=True, env=_env(), cwd=REPO)
    return run.returncode == 0


def write_config(path: Path, world: World, calibrating: bool, extra: dict[str, Any] | None) -> None:
    """The exporter config of one run: the model's shape, no state dir, the target FPR."""
    ds = world.dataset
    cfg: dict[str, Any] = {
        "models": {world.model: {"input_dim": ds.dim, "num_classes": ds.num_classes}},
        "state": {"dir": None},
        "files": {"paths": []},
        "log_level": "warning",
    }
    if calibrating:
        cfg["calibration"] = {"target_fpr": TARGET_FPR}
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed with exit code {proc.returncode}:\n$ {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return proc


@dataclass
class RunResult:
    """One (dataset, seed): the traffic, the replay report and timings."""

    dataset: str
    seed: int
    world: World
    traffic: Traffic
    report: dict[str, Any]
    calibration: dict[str, Any] | None
    seconds: dict[str, float] = field(default_factory=dict)


def run_one(dataset: str, seed: int, sizes: Sizes, attacks: Sequence[str], workdir: Path, calibrating: bool,
            extra: dict[str, Any] | None, log: Any) -> RunResult:
    """Simulate, calibrate and replay one (dataset, seed)."""
    secs: dict[str, float] = {}
    t = time.perf_counter()
    world = build_world(dataset, seed)
    calib = simulate(world, Population(benign=sizes.calib_benign, benign_queries=sizes.benign_queries, window=sizes.window,
                                       benign_prefix="cal", stream="calibration"), seed)
    ev = simulate(world, Population(benign=sizes.eval_benign, benign_queries=sizes.benign_queries, window=sizes.window,
                                    attacks=attack_counts(sizes, attacks), attack_queries=sizes.attack_queries,
                                    benign_prefix="app", stream="evaluation"), seed)
    run_dir = workdir / f"{dataset}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    calib_log, eval_log, cfg, profile = (run_dir / n for n in ("calibration.jsonl", "evaluation.jsonl", "config.yml", "profile.bin"))
    calib.write(calib_log, append=False)
    ev.write(eval_log, append=False)
    (run_dir / "ground_truth.json").write_text(json.dumps(ev.ground_truth(dataset=dataset, seed=seed)))
    write_config(cfg, world, calibrating, extra)
    secs["simulate"] = time.perf_counter() - t
    log(f"  {dataset} seed {seed}: {len(calib):,} calibration and {len(ev):,} evaluation events ({secs['simulate']:.1f}s)")

    summary = None
    replay_args = ["replay", "--config", str(cfg), "--compact"]
    if calibrating:
        t = time.perf_counter()
        proc = _run(exporter_cmd("calibrate", "--config", str(cfg), "--out", str(profile), str(calib_log)), "calibrate")
        secs["calibrate"] = time.perf_counter() - t
        try:
            summary = json.loads(proc.stdout)
        except ValueError:
            summary = {"stdout": proc.stdout[-2000:]}
        replay_args += ["--profile", str(profile)]
        log(f"  calibrated in {secs['calibrate']:.1f}s")
    t = time.perf_counter()
    proc = _run(exporter_cmd(*replay_args, str(eval_log)), "replay")
    secs["replay"] = time.perf_counter() - t
    report = json.loads(proc.stdout)
    log(f"  replayed in {secs['replay']:.1f}s")
    rejected = report.get("events", {}).get("rejected") or {}
    if rejected:
        log(f"  WARNING: the exporter rejected simulated events: {rejected}")
    return RunResult(dataset, seed, world, ev, report, summary, secs)


# -- scoring ---------------------------------------------------------------------------------
class Fidelity:
    """Agreement with the victim on the test split of a substitute trained on a query prefix.

    The substitute is a scikit-learn logistic regression (standardized inputs, fixed seed)
    trained on the queries with the victim's arg-max answers as labels: what the attacker
    holds after those queries. With one class seen, it predicts that class.
    """

    def __init__(self, world: World) -> None:
        ds = world.dataset
        self.X_test = ds.X_test
        self.y_victim = world.victim.predict(ds.round(ds.X_test))
        self._cache: dict[tuple[str, int], float] = {}

    def __call__(self, key: str, X: np.ndarray, labels: np.ndarray, n: int) -> float:
        n = int(min(n, len(X)))
        if (key, n) in self._cache:
            return self._cache[(key, n)]
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if n == 0:
            value = float(np.mean(self.y_victim == np.bincount(self.y_victim).argmax()))  # a guess of the majority class
        elif np.unique(labels[:n]).size < 2:
            value = float(np.mean(self.y_victim == labels[0]))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=SUBSTITUTE_SEED))
                model.fit(X[:n], labels[:n])
            value = float(np.mean(model.predict(self.X_test) == self.y_victim))
        self._cache[(key, n)] = value
        return value


def _first_alarm(report: dict[str, Any], member_events: dict[str, np.ndarray], detector: str | None) -> int | None:
    """Global event index of an entity's first alarm: the fused verdict, or one detector's."""
    best: int | None = None
    clients = report["clients"]
    for member, idx in member_events.items():
        entry = clients.get(member)
        if entry is None:
            continue
        if detector is None:
            q = entry.get("first_flagged_query")
        else:
            q = (entry.get("detectors", {}).get(detector) or {}).get("first_flagged_query")
        if q is None or q < 1 or q > len(idx):
            continue
        g = int(idx[q - 1])
        best = g if best is None else min(best, g)
    return best


def score_run(res: RunResult) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """Per attacker entity (client, or Sybil group) and per benign client: what happened."""
    tr, report = res.traffic, res.report
    truth = tr.ground_truth()["clients"]
    mismatched = [c for c, v in truth.items() if report["clients"].get(c, {}).get("queries") != v["queries"]]
    if mismatched:  # query indexes would not line up with the simulated events
        raise RuntimeError(f"the replay counted other query totals than simulated for {len(mismatched)} clients, e.g. {mismatched[:3]}")
    detectors = next(iter(report["clients"].values()), {}).get("detectors", {})
    has_prada = "prada" in detectors
    labels = tr.P.argmax(axis=1)
    fid = Fidelity(res.world)
    events_of = {name: np.flatnonzero(tr.client == i) for i, name in enumerate(tr.clients)}

    entities: dict[str, list[str]] = {}
    for name, info in truth.items():
        if info["kind"] == "attack":
            entities.setdefault(info["group"] or name, []).append(name)
    attackers: list[dict[str, Any]] = []
    for entity, members in entities.items():
        kind = truth[members[0]]["type"]
        member_events = {m: events_of[m] for m in members}
        idx = np.sort(np.concatenate(list(member_events.values())))
        X, y = tr.X[idx], labels[idx]
        row: dict[str, Any] = {"dataset": res.dataset, "seed": res.seed, "attack": kind, "entity": entity,
                               "members": len(members), "queries": int(idx.size),
                               "fidelity_all": fid(entity, X, y, idx.size)}
        for prefix, det in (("", None), ("prada_", "prada")):
            if det is not None and not has_prada:
                continue
            alarm = _first_alarm(report, member_events, det)
            if alarm is None:
                row.update({f"{prefix}detected": False, f"{prefix}queries_to_detection": None,
                            f"{prefix}fidelity_at_alarm": row["fidelity_all"]})
            else:
                n = int(np.searchsorted(idx, alarm, side="right"))  # the entity's queries up to and including the alarm
                row.update({f"{prefix}detected": True, f"{prefix}queries_to_detection": n,
                            f"{prefix}fidelity_at_alarm": fid(entity, X, y, n)})
        attackers.append(row)

    benign: list[dict[str, Any]] = []
    for name, info in truth.items():
        if info["kind"] != "benign":
            continue
        entry = report["clients"].get(name, {})
        det = entry.get("detectors", {})
        fired = sorted(d for d, v in det.items() if v.get("flagged"))
        benign.append({"dataset": res.dataset, "seed": res.seed, "client": name, "behaviour": info["type"],
                       "queries": info["queries"], "flagged": bool(entry.get("flagged")), "detectors_fired": fired,
                       "prada_flagged": bool((det.get("prada") or {}).get("flagged")) if has_prada else None})
    return attackers, benign, has_prada


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(attackers: list[dict[str, Any]], benign: list[dict[str, Any]], has_prada: bool) -> dict[str, Any]:
    """Aggregate entities over seeds (and datasets): per attack type, plus false alarms."""
    out: dict[str, Any] = {"attacks": {}, "false_alarms": {}}
    for attack in dict.fromkeys(r["attack"] for r in attackers):
        rows = [r for r in attackers if r["attack"] == attack]
        s: dict[str, Any] = {"entities": len(rows)}
        for prefix in ("", "prada_") if has_prada else ("",):
            q = [r[f"{prefix}queries_to_detection"] for r in rows if r[f"{prefix}detected"]]
            s[f"{prefix}detection_rate"] = float(np.mean([r[f"{prefix}detected"] for r in rows]))
            s[f"{prefix}median_queries"] = _pct(q, 50)
            s[f"{prefix}p90_queries"] = _pct(q, 90)
            s[f"{prefix}fidelity_at_alarm"] = float(np.mean([r[f"{prefix}fidelity_at_alarm"] for r in rows]))
            det = [r[f"{prefix}fidelity_at_alarm"] for r in rows if r[f"{prefix}detected"]]
            s[f"{prefix}fidelity_at_alarm_detected_only"] = float(np.mean(det)) if det else None
        s["fidelity_all_queries"] = float(np.mean([r["fidelity_all"] for r in rows]))
        s["queries_per_entity"] = float(np.mean([r["queries"] for r in rows]))
        out["attacks"][attack] = s
    fa: dict[str, Any] = {"clients": len(benign), "rate": float(np.mean([b["flagged"] for b in benign])) if benign else None}
    if has_prada and benign:
        fa["prada_rate"] = float(np.mean([b["prada_flagged"] for b in benign]))
    fa["by_behaviour"] = {
        beh: float(np.mean([b["flagged"] for b in benign if b["behaviour"] == beh]))
        for beh in dict.fromkeys(b["behaviour"] for b in benign)
    }
    fired: dict[str, int] = {}
    for b in benign:
        for d in b["detectors_fired"]:
            fired[d] = fired.get(d, 0) + 1
    fa["by_detector"] = {d: n / len(benign) for d, n in sorted(fired.items())} if benign else {}
    out["false_alarms"] = fa
    return out


def check_targets(summary: dict[str, Any], has_prada: bool) -> list[dict[str, Any]]:
    """The benchmark's targets, each with the measured value and a pass/fail."""
    checks: list[dict[str, Any]] = []
    for attack, s in summary["attacks"].items():
        need = TARGET_DETECTION_HARD if attack in HARD_ATTACKS else TARGET_DETECTION
        checks.append({"target": f"{attack}: detection rate >= {need:.0%}", "value": s["detection_rate"], "pass": s["detection_rate"] >= need})
        med = s["median_queries"]
        checks.append({"target": f"{attack}: median queries to detection <= {TARGET_MEDIAN_QUERIES}", "value": med,
                       "pass": med is not None and med <= TARGET_MEDIAN_QUERIES})
        if has_prada:
            checks.append({"target": f"{attack}: fidelity at alarm < PRADA's", "value": [s["fidelity_at_alarm"], s["prada_fidelity_at_alarm"]],
                           "pass": s["fidelity_at_alarm"] < s["prada_fidelity_at_alarm"]})
    rate = summary["false_alarms"]["rate"]
    checks.append({"target": f"benign false-alarm rate <= {TARGET_FALSE_ALARMS:.0%}", "value": rate, "pass": rate is not None and rate <= TARGET_FALSE_ALARMS})
    return checks


# -- presentation -----------------------------------------------------------------------------
def _fmt_rate(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _fmt_q(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f}"


def _fmt_f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def markdown_table(summary: dict[str, Any], has_prada: bool) -> str:
    """Attack x {detection, false alarms, queries to detection, fidelity; the same for PRADA}."""
    head = ["attack", "n", "detection", "FA rate", "median q", "p90 q", "fidelity at alarm", "fidelity (all queries)",
            "PRADA detection", "PRADA median q", "PRADA fidelity at alarm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    fa = summary["false_alarms"]["rate"]
    for attack, s in summary["attacks"].items():
        prada = [_fmt_rate(s.get("prada_detection_rate")), _fmt_q(s.get("prada_median_queries")), _fmt_f(s.get("prada_fidelity_at_alarm"))] if has_prada else ["n/a"] * 3
        lines.append("| " + " | ".join([
            attack, str(s["entities"]), _fmt_rate(s["detection_rate"]), _fmt_rate(fa), _fmt_q(s["median_queries"]), _fmt_q(s["p90_queries"]),
            _fmt_f(s["fidelity_at_alarm"]), _fmt_f(s["fidelity_all_queries"]), *prada,
        ]) + " |")
    f = summary["false_alarms"]
    extra = f"Benign false alarms: {_fmt_rate(f['rate'])} of {f['clients']} clients"
    if has_prada:
        extra += f" (PRADA alone: {_fmt_rate(f.get('prada_rate'))})"
    by = ", ".join(f"{k} {_fmt_rate(v)}" for k, v in f["by_behaviour"].items())
    extra += f"; by behaviour: {by}."
    if f["by_detector"]:
        extra += " Benign clients flagged per detector: " + ", ".join(f"{k} {_fmt_rate(v)}" for k, v in f["by_detector"].items()) + "."
    return "\n".join(lines) + "\n\n" + extra


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--datasets", default="digits,breast_cancer,wine", help="comma-separated datasets (default digits,breast_cancer,wine)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attack types (default: all)")
    p.add_argument("--quick", action="store_true", help="digits, seed 0, small populations (well under a minute)")
    p.add_argument("--calibrate", choices=("auto", "yes", "no"), default="auto",
                   help="run `calibrate` and replay with the profile (auto: when the subcommand exists)")
    p.add_argument("--extra-config", metavar="YAML", help="merged into the generated exporter config (e.g. detector parameters)")
    p.add_argument("--out", metavar="FILE", help="write the JSON results here")
    p.add_argument("--workdir", metavar="DIR", help="keep logs, configs and profiles here (default: a temporary directory)")
    p.add_argument("--quiet", action="store_true", help="only the tables")
    args = p.parse_args(argv)
    if args.quick:
        if "--seeds" not in (argv if argv is not None else sys.argv[1:]):
            args.seeds = "0"
        if "--datasets" not in (argv if argv is not None else sys.argv[1:]):
            args.datasets = "digits"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not sklearn_available():
        print("bench/detection: scikit-learn is required (pip install 'monitaur-exporter[bench]')", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"bench/detection: --seeds must be integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    bad = [d for d in datasets if d not in ("digits", "breast_cancer", "wine", "synthetic")] + [a for a in attacks if a not in ATTACKS]
    if bad or not seeds or not datasets or not attacks:
        print(f"bench/detection: unknown or missing datasets/attacks: {', '.join(bad) or '(empty list)'}", file=sys.stderr)
        return 2
    extra = yaml.safe_load(Path(args.extra_config).read_text()) if args.extra_config else None
    sizes = QUICK if args.quick else FULL
    calibrating = {"yes": True, "no": False}.get(args.calibrate)
    if calibrating is None:
        calibrating = calibrate_available()
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"bench/detection: {'quick' if args.quick else 'full'} mode, datasets {', '.join(datasets)}, seeds {seeds}, "
        f"calibration {'on' if calibrating else 'off (replay without a profile)'}")

    started = time.perf_counter()
    all_attackers: list[dict[str, Any]] = []
    all_benign: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    has_prada = True
    with tempfile.TemporaryDirectory(prefix="monitaur-bench-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        for dataset in datasets:
            for seed in seeds:
                res = run_one(dataset, seed, sizes, attacks, workdir, calibrating, extra, log)
                t = time.perf_counter()
                attackers, benign, prada_here = score_run(res)
                res.seconds["score"] = time.perf_counter() - t
                has_prada = has_prada and prada_here
                all_attackers += attackers
                all_benign += benign
                detectors = sorted(next(iter(res.report["clients"].values()), {}).get("detectors", {}))
                runs.append({"dataset": dataset, "seed": seed, "events": len(res.traffic), "detectors": detectors,
                             "seconds": {k: round(v, 2) for k, v in res.seconds.items()}, "calibration": res.calibration})
    by_dataset = {d: summarize([r for r in all_attackers if r["dataset"] == d], [b for b in all_benign if b["dataset"] == d], has_prada) for d in datasets}
    overall = summarize(all_attackers, all_benign, has_prada)
    targets = check_targets(overall, has_prada)
    elapsed = time.perf_counter() - started

    for d in datasets:
        print(f"\n### {d} (seeds {', '.join(map(str, seeds))})\n")
        print(markdown_table(by_dataset[d], has_prada))
    if len(datasets) > 1:
        print("\n### all datasets\n")
        print(markdown_table(overall, has_prada))
    if not has_prada:
        print("\nPRADA columns: n/a (no `prada` detector in this exporter's reports).")
    print("\n### targets\n")
    for c in targets:
        print(f"- [{'x' if c['pass'] else ' '}] {c['target']} (measured: {c['value'] if not isinstance(c['value'], float) else round(c['value'], 3)})")
    print(f"\n{sum(c['pass'] for c in targets)}/{len(targets)} targets met; {elapsed:.0f}s in all.")

    results = {
        "mode": "quick" if args.quick else "full",
        "sizes": asdict(sizes),
        "datasets": datasets,
        "seeds": seeds,
        "attacks": attacks,
        "calibrated": calibrating,
        "target_fpr": TARGET_FPR,
        "has_prada": has_prada,
        "seconds": round(elapsed, 2),
        "runs": runs,
        "summary": overall,
        "by_dataset": by_dataset,
        "targets": targets,
        "entities": all_attackers,
        "benign": all_benign,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    return 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return None if math.isnan(obj) else float(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
