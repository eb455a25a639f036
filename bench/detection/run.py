#!/usr/bin/env python3
"""Detection-quality benchmark, built not to be over-fitted (protocol: bench/detection/README.md).

Per dataset and seed:

1. build the world (dataset split, victim model) and simulate ONE evaluation log: at least
   1,000 benign clients of each benign family (A: ``exporter.sim``; B:
   ``bench/detection/family_b.py`` when present), plus the attackers (every type, Sybil
   groups, slow attackers; optionally the attack sweep and the held-out variants, and the
   held-out benign population of ``--holdout``);
2. simulate one calibration population per calibration size (20, 60, 200, 600 benign
   clients per model, each its own random stream; or the victim's training data written as
   events), and run the real CLI as subprocesses, ``--jobs`` at a time:
   ``monitaur-exporter calibrate`` on it, then ``monitaur-exporter replay --profile`` on the
   evaluation log (and once without a profile: "none");
3. score each report against the ground truth: benign false alarms with exact 95 %
   Clopper-Pearson bounds, per family, behaviour, detector and held-out group; per attack
   type: detection, median/p90 queries to detection, fidelity of the substitute at the
   alarm against PRADA's; then check the targets per dataset and calibration size.

    python3 bench/detection/run.py [--seeds 0,1] [--datasets digits,breast_cancer,wine]
        [--calibrations 20,60,200,600,training,none] [--jobs 2] [--eval-family auto|a|b|ab]
        [--calib-family a|b] [--holdout behaviour:NAME|regime:NAME] [--attack-sweep]
        [--heldout-attacks] [--quick] [--readme] [--out results.json]

Needs scikit-learn (the ``bench`` extra) for the datasets and the substitutes.
"""

from __future__ import annotations

import os

# Small matrices: multi-threaded BLAS is many times slower than one thread here. Set
# before numpy is imported, and inherited by the exporter subprocesses.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor, as_completed  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _p in (REPO, HERE):  # run from a checkout without installing; the sibling modules by name
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from exporter.sim import ATTACKS, World, build_world, sklearn_available  # noqa: E402
from populations import (FAMILIES, FULL, HELDOUT_ATTACKS, QUICK, SWEEP, EvalPlan, Holdout, Sizes,  # noqa: E402
                         calibration_traffic, evaluation_traffic, family_b_module, parse_holdout)
from report import attack_table, calibration_title, checklist, false_alarm_lines, overview_table, pct, sweep_table  # noqa: E402
from scoring import Scorer, false_alarm_counts, promise_of, summarize  # noqa: E402
from targets import TARGET_FPR, check_cell, check_promises  # noqa: E402

DATASETS = ("digits", "breast_cancer", "wine", "synthetic")
DEFAULT_CALIBRATIONS = ("20", "60", "200", "600", "training", "none")
QUICK_CALIBRATIONS = ("20", "200")


# -- the real CLI -----------------------------------------------------------------------------
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


def write_config(path: Path, world: World, extra: dict[str, Any] | None) -> None:
    """The exporter config of one run: the model's shape, no state dir, the target FPR."""
    ds = world.dataset
    cfg: dict[str, Any] = {
        "models": {world.model: {"input_dim": ds.dim, "num_classes": ds.num_classes}},
        "state": {"dir": None},
        "files": {"paths": []},
        "log_level": "warning",
        "calibration": {"target_fpr": TARGET_FPR},
    }
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
class Replayed:
    """One calibration of one (dataset, seed): calibrate's summary, the replay report, timings."""

    label: str
    report: dict[str, Any]
    summary: dict[str, Any] | None
    seconds: dict[str, float] = field(default_factory=dict)


def calibrate_and_replay(label: str, cfg: Path, calib_log: Path | None, eval_log: Path, run_dir: Path) -> Replayed:
    """``calibrate`` (unless ``label`` is "none"), then ``replay`` of the evaluation log: one job."""
    secs: dict[str, float] = {}
    summary = None
    args = ["replay", "--config", str(cfg), "--compact"]
    if calib_log is not None:
        profile = run_dir / f"profile-{label}.bin"
        t = time.perf_counter()
        proc = _run(exporter_cmd("calibrate", "--config", str(cfg), "--out", str(profile), str(calib_log)), f"calibrate ({label})")
        secs["calibrate"] = time.perf_counter() - t
        try:
            summary = json.loads(proc.stdout)
        except ValueError:
            summary = {"stdout": proc.stdout[-2000:]}
        args += ["--profile", str(profile)]
    t = time.perf_counter()
    proc = _run(exporter_cmd(*args, str(eval_log)), f"replay ({label})")
    secs["replay"] = time.perf_counter() - t
    return Replayed(label, json.loads(proc.stdout), summary, secs)


# -- one dataset and seed -------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything a run needs besides the dataset and seed."""

    sizes: Sizes
    calibrations: list[str]
    calib_family: str
    eval: EvalPlan
    extra: dict[str, Any] | None
    jobs: int


@dataclass
class Rows:
    """Scored rows and run records, accumulated over datasets and seeds."""

    attackers: list[dict[str, Any]] = field(default_factory=list)
    benign: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    has_prada: bool = True


def run_dataset_seed(dataset: str, seed: int, plan: Plan, workdir: Path, rows: Rows, log: Callable[[str], None]) -> None:
    """Simulate the logs of one (dataset, seed), calibrate and replay each size, score them into ``rows``."""
    wall = time.perf_counter()
    t = time.perf_counter()
    world = build_world(dataset, seed)
    ev = evaluation_traffic(world, seed, plan.eval)
    run_dir = workdir / f"{dataset}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    eval_log, cfg = run_dir / "evaluation.jsonl", run_dir / "config.yml"
    ev.write(eval_log, append=False)
    (run_dir / "ground_truth.json").write_text(json.dumps(ev.ground_truth(dataset=dataset, seed=seed)))
    write_config(cfg, world, plan.extra)
    timing: dict[str, Any] = {"dataset": dataset, "seed": seed, "eval_events": len(ev), "simulate_eval": time.perf_counter() - t}
    benign_n = sum(1 for v in ev.truth.values() if v["kind"] == "benign")
    log(f"  {dataset} seed {seed}: evaluation log of {len(ev):,} events, {benign_n:,} benign clients ({timing['simulate_eval']:.1f}s)")

    t = time.perf_counter()
    calib_logs: dict[str, Path | None] = {}
    for label in plan.calibrations:
        if label == "none":
            calib_logs[label] = None
            continue
        tr = calibration_traffic(world, seed, label, plan.calib_family, plan.sizes, plan.eval.holdout)
        calib_logs[label] = run_dir / f"calibration-{label}.jsonl"
        tr.write(calib_logs[label], append=False)
        timing[f"events_{label}"] = len(tr)
    timing["simulate_calibration"] = time.perf_counter() - t
    log("  calibration logs: " + ", ".join(f"{l} ({timing.get(f'events_{l}', 0):,} events)" for l in plan.calibrations if l != "none")
        + f" ({timing['simulate_calibration']:.1f}s)")

    scorer = Scorer(dataset, seed, world, ev, plan.eval.holdout)
    with ThreadPoolExecutor(max_workers=plan.jobs) as pool:
        futures = [pool.submit(calibrate_and_replay, label, cfg, calib_logs[label], eval_log, run_dir) for label in plan.calibrations]
        for fut in as_completed(futures):
            res = fut.result()
            rejected = res.report.get("events", {}).get("rejected") or {}
            if rejected:
                log(f"  WARNING: the exporter rejected simulated events: {rejected}")
            t = time.perf_counter()
            attackers, benign, has_prada = scorer.score(res.report, res.label)
            res.seconds["score"] = time.perf_counter() - t
            rows.has_prada = rows.has_prada and has_prada
            rows.attackers += attackers
            rows.benign += benign
            mine = [b for b in benign if b["family"] == plan.calib_family]
            promise = promise_of(res.summary, world.model)
            detectors = sorted(next(iter(res.report["clients"].values()), {}).get("detectors", {}))
            rows.runs.append({"dataset": dataset, "seed": seed, "calibration": res.label, "detectors": detectors,
                              "seconds": {k: round(v, 2) for k, v in res.seconds.items()}, "calibration_summary": res.summary,
                              "promise": promise, "measured_calib_family": false_alarm_counts([b["flagged"] for b in mine])})
            timing.update({f"{k}_{res.label}": v for k, v in res.seconds.items()})
            fa = false_alarm_counts([b["flagged"] for b in benign])
            log(f"  {res.label:>8}: " + " ".join(f"{k} {v:.1f}s" for k, v in res.seconds.items())
                + f"; benign FA {pct(fa['rate'])} ({fa['flagged']}/{fa['clients']})")
    timing["wall"] = time.perf_counter() - wall
    rows.timings.append({k: (round(v, 2) if isinstance(v, float) else v) for k, v in timing.items()})
    log(f"  {dataset} seed {seed} done in {timing['wall']:.0f}s")


# -- aggregation and output --------------------------------------------------------------------------
def aggregate(rows: Rows, datasets: list[str], calibrations: list[str], calib_family: str) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Per dataset and calibration, seeds pooled: the summaries, the promises shown, the target checks."""
    results: dict[str, dict[str, Any]] = {}
    promises: dict[str, dict[str, list[str]]] = {}
    checks: list[dict[str, Any]] = []
    for d in datasets:
        results[d], promises[d] = {}, {}
        for label in calibrations:
            att = [r for r in rows.attackers if r["dataset"] == d and r["calibration"] == label]
            ben = [b for b in rows.benign if b["dataset"] == d and b["calibration"] == label]
            results[d][label] = summarize(att, ben, rows.has_prada)
            runs = sorted((r for r in rows.runs if r["dataset"] == d and r["calibration"] == label), key=lambda r: r["seed"])
            per_seed = [(r["seed"], r["promise"], r["measured_calib_family"]) for r in runs]
            promises[d][label] = [f"seed {s}: {pct(p.get('fpr'))} (upper {pct(p.get('upper'))})" for s, p, _ in per_seed if p]
            checks += check_cell(d, label, results[d][label], rows.has_prada)
            checks += check_promises(d, label, per_seed)
    return results, promises, checks


def markdown_report(meta: dict[str, Any], results: dict[str, Any], promises: dict[str, Any], checks: list[dict[str, Any]],
                    has_prada: bool) -> str:
    seeds = ", ".join(map(str, meta["seeds"]))
    out = [f"## Detection benchmark\n\n`{meta['command']}`\n",
           f"Benign families: calibration {meta['calib_family']}, evaluation {', '.join(meta['eval_families'])}; "
           f"{meta['sizes']['eval_benign']:,} benign evaluation clients per family per seed; seeds {seeds}."]
    if meta["holdout"]:
        out.append(f"Held out: `{meta['holdout']['spec']}`: {meta['holdout']['describe']}.")
    if not has_prada:
        out.append("PRADA columns: n/a (no `prada` detector in this exporter's reports).")
    out.append("\n### Overview (seeds pooled)\n")
    out.append(overview_table(results, promises, checks, has_prada))
    for d, cells in results.items():
        for label, summary in cells.items():
            out.append(f"\n### {d}: {calibration_title(label)} (seeds {seeds})\n")
            out.append(false_alarm_lines(summary["false_alarms"], promises[d][label], has_prada) + "\n")
            default = {a: s for a, s in summary["attacks"].items() if s["set"] == "default"}
            if default:
                out.append(attack_table(default, has_prada))
        for set_name, title in (("sweep", "attack sweep"), ("heldout", "HELD-OUT attack variants")):
            table = sweep_table(cells, set_name)
            if table:
                out.append(f"\n### {d}: {title}, detection (median queries) per calibration\n")
                out.append(table)
    out.append("\n### Targets (per dataset, seeds pooled)\n")
    out.append(checklist(checks))
    return "\n".join(out)


def readme_block(meta: dict[str, Any], results: dict[str, Any], promises: dict[str, Any], checks: list[dict[str, Any]], has_prada: bool) -> str:
    counted = [c for c in checks if not c["informational"]]
    return "\n".join([
        "### README table", "",
        f"Measured with `{meta['command']}` ({meta['seconds'] / 60:.0f} min on this machine); benign FA is k/n of "
        f"{meta['sizes']['eval_benign']:,} evaluation clients per family and seed, with the upper end of the two-sided 95% "
        "Clopper-Pearson interval.", "",
        overview_table(results, promises, checks, has_prada), "",
        f"{sum(c['pass'] for c in counted)}/{len(counted)} targets met.",
    ])


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# -- command line -------------------------------------------------------------------------------------
def _given(flag: str, argv: Sequence[str]) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--datasets", default="digits,breast_cancer,wine", help="comma-separated datasets (default digits,breast_cancer,wine)")
    p.add_argument("--calibrations", default=",".join(DEFAULT_CALIBRATIONS),
                   help="benign clients per model of each calibration population, 'training' (the victim's training data as events) "
                        "and 'none' (no profile) (default %(default)s)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attack types (default: all)")
    p.add_argument("--calib-family", choices=sorted(FAMILIES), default="a", help="benign family of the calibration populations (default a)")
    p.add_argument("--eval-family", choices=("auto", "a", "b", "ab"), default="auto",
                   help="benign families in the evaluation log (auto: ab when bench/detection/family_b.py is present, else a)")
    p.add_argument("--holdout", metavar="KIND:NAME", help="behaviour:<name> or regime:<session_length|rate|popular_share>: "
                   "calibrate without it, evaluate with it (family a)")
    p.add_argument("--attack-sweep", action="store_true", help="add the attack variants of the sweep to the evaluation log")
    p.add_argument("--heldout-attacks", action="store_true", help="add the HELD-OUT attack variants (reported apart)")
    p.add_argument("--eval-benign", type=int, metavar="N", help="benign evaluation clients per family (default 1,000)")
    p.add_argument("--jobs", type=int, default=2, help="calibrate+replay subprocesses at a time (default 2)")
    p.add_argument("--quick", action="store_true", help="digits, seed 0, calibrations 20 and 200, small attacks (CI; well under 90 s)")
    p.add_argument("--extra-config", metavar="YAML", help="merged into the generated exporter config (e.g. detector parameters)")
    p.add_argument("--readme", action="store_true", help="also print the compact table for the docs, with the command line")
    p.add_argument("--out", metavar="FILE", help="write the JSON results here")
    p.add_argument("--workdir", metavar="DIR", help="keep logs, configs and profiles here (default: a temporary directory)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        if not _given("--seeds", argv):
            args.seeds = "0"
        if not _given("--datasets", argv):
            args.datasets = "digits"
        if not _given("--calibrations", argv):
            args.calibrations = ",".join(QUICK_CALIBRATIONS)
        if not _given("--eval-family", argv):
            args.eval_family = "a"
    return args


def _resolve(args: argparse.Namespace) -> tuple[list[int], list[str], list[str], list[str], list[str], Holdout | None]:
    """Validated seeds, datasets, calibrations, attacks, evaluation families and holdout (ValueError on a bad one)."""
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be integers, got {args.seeds!r}") from None
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    calibrations = [c.strip() for c in args.calibrations.split(",") if c.strip()]
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()] if args.attacks.strip().lower() != "none" else []
    bad = [d for d in datasets if d not in DATASETS] + [a for a in attacks if a not in ATTACKS]
    bad += [c for c in calibrations if not (c.isdigit() and int(c) > 0) and c not in ("training", "none")]
    if bad or not seeds or not datasets or not calibrations:
        raise ValueError(f"unknown or missing seeds/datasets/calibrations/attacks: {', '.join(bad) or '(empty list)'}")
    b_here = family_b_module() is not None
    families = {"auto": ["a", "b"] if b_here else ["a"], "a": ["a"], "b": ["b"], "ab": ["a", "b"]}[args.eval_family]
    if ("b" in families or args.calib_family == "b") and not b_here:
        raise ValueError("benign family b needs bench/detection/family_b.py, which is not in this checkout")
    holdout = parse_holdout(args.holdout) if args.holdout else None
    if holdout is not None and args.calib_family != "a":
        raise ValueError("--holdout changes family a's calibration populations: use --calib-family a")
    if args.jobs < 1:
        raise ValueError("--jobs must be >= 1")
    if args.eval_benign is not None and args.eval_benign < 0:
        raise ValueError("--eval-benign must be >= 0")
    return seeds, datasets, calibrations, attacks, families, holdout


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not sklearn_available():
        print("bench/detection: scikit-learn is required (pip install 'monitaur-exporter[bench]')", file=sys.stderr)
        return 2
    try:
        seeds, datasets, calibrations, attacks, families, holdout = _resolve(args)
    except ValueError as exc:
        print(f"bench/detection: {exc}", file=sys.stderr)
        return 2
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.eval_family == "auto" and "b" not in families:
        log("bench/detection: benign family b skipped: bench/detection/family_b.py is not in this checkout")
    if any(c != "none" for c in calibrations) and not calibrate_available():
        log("bench/detection: this exporter has no `calibrate` subcommand: only the 'none' calibration is run")
        calibrations = [c for c in calibrations if c == "none"] or ["none"]
    sizes = QUICK if args.quick else FULL
    if args.eval_benign is not None:
        sizes = replace(sizes, eval_benign=args.eval_benign)
    extra = yaml.safe_load(Path(args.extra_config).read_text()) if args.extra_config else None
    plan = Plan(sizes, calibrations, args.calib_family,
                EvalPlan(sizes, attacks, families, holdout, args.attack_sweep, args.heldout_attacks), extra, args.jobs)
    command = "python3 bench/detection/run.py" + ("" if not args.argv else " " + shlex.join(args.argv))
    log(f"bench/detection: {'quick' if args.quick else 'full'} mode, datasets {', '.join(datasets)}, seeds {seeds}, "
        f"calibrations {', '.join(calibrations)}, families calib {args.calib_family} / eval {'+'.join(families)}, {args.jobs} jobs")

    started = time.perf_counter()
    rows = Rows()
    with tempfile.TemporaryDirectory(prefix="monitaur-bench-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        for dataset in datasets:
            for seed in seeds:
                run_dataset_seed(dataset, seed, plan, workdir, rows, log)
    results, promises, checks = aggregate(rows, datasets, calibrations, args.calib_family)
    elapsed = time.perf_counter() - started
    meta = {"command": command, "mode": "quick" if args.quick else "full", "datasets": datasets, "seeds": seeds,
            "calibrations": calibrations, "sizes": asdict(sizes), "calib_family": args.calib_family, "eval_families": families,
            "holdout": {"spec": holdout.spec, "describe": holdout.describe} if holdout else None, "seconds": round(elapsed, 1)}
    print(markdown_report(meta, results, promises, checks, rows.has_prada))
    print(f"\n{elapsed:.0f}s in all; per dataset and seed: " + "; ".join(f"{t['dataset']}/{t['seed']} {t['wall']:.0f}s" for t in rows.timings) + ".")
    if args.readme:
        print("\n" + readme_block(meta, results, promises, checks, rows.has_prada))
    if args.out:
        out = {**meta, "attacks": attacks, "attack_sweep": [v.name for v in SWEEP] if args.attack_sweep else [],
               "heldout_attacks": [v.name for v in HELDOUT_ATTACKS] if args.heldout_attacks else [],
               "target_fpr": TARGET_FPR, "has_prada": rows.has_prada, "timings": rows.timings, "runs": rows.runs,
               "results": results, "targets": checks, "entities": rows.attackers,
               "benign_flagged": [b for b in rows.benign if b["flagged"]]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, default=_json_default) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
