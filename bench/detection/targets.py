"""The benchmark's targets, checked per dataset (seeds pooled) and per calibration size.

From the issue ("A benchmark that is hard to over-fit"):

* benign false alarms <= 1 % with the 95 % Clopper-Pearson upper bound <= 2 % at every
  calibration size from 60 benign clients per model upwards; <= 2 % (upper <= 3 %) at 20;
  checked on each benign family separately, and on the held-out clients of ``--holdout``;
* detection >= 95 % of attacker clients per ordinary attack type, >= 80 % for interleaved,
  slow and Sybil (per group) and for each held-out attack variant, at every size from 20 up;
* median queries to detection <= 200 per attack type; fidelity of the substitute at the
  alarm below PRADA's (when the exporter reports a ``prada`` detector);
* where ``calibrate`` states a promise, the measured rate is within it (each seed).

"training" (training data as events) and "none" (no profile) are reported with no target.
Sweep variants are held to their base attack's target, but informationally: they show
where detection breaks, they are not pass/fail.
"""

from __future__ import annotations

from typing import Any

TARGET_FPR = 0.01  # calibrate's target_fpr in the generated exporter config
TARGET_DETECTION = 0.95
TARGET_DETECTION_HARD = 0.80  # evasive attacks: interleaved, slow, Sybil (per group)
TARGET_DETECTION_HELDOUT = 0.80  # each held-out attack variant
HARD_ATTACKS = ("interleaved", "slow", "sybil")
TARGET_MEDIAN_QUERIES = 200


def calibration_clients(label: str) -> int | None:
    """Benign clients per model of a calibration label ("20" -> 20); None for "training", "none"."""
    return int(label) if label.isdigit() else None


def fa_target(label: str) -> tuple[float, float] | None:
    """(rate, 95 % upper bound) the benign false alarms must stay under, or None (no target)."""
    n = calibration_clients(label)
    if n is None or n < 20:
        return None
    return (0.01, 0.02) if n >= 60 else (0.02, 0.03)


def detection_applies(label: str) -> bool:
    """Detection targets hold at every calibration size from 20 clients per model up."""
    n = calibration_clients(label)
    return n is not None and n >= 20


def detection_target(attack: str) -> float:
    return TARGET_DETECTION_HARD if attack in HARD_ATTACKS else TARGET_DETECTION


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _check(dataset: str, label: str, target: str, value: Any, ok: bool, detail: str = "", informational: bool = False) -> dict[str, Any]:
    return {"dataset": dataset, "calibration": label, "target": target, "value": value, "pass": bool(ok), "detail": detail,
            "informational": informational}


def _fa_checks(dataset: str, label: str, who: str, fa: dict[str, Any], limits: tuple[float, float]) -> list[dict[str, Any]]:
    rate_max, upper_max = limits
    detail = f"{fa['flagged']}/{fa['clients']}"
    return [
        _check(dataset, label, f"{who}: benign FA <= {rate_max:.0%}", fa["rate"], fa["rate"] is not None and fa["rate"] <= rate_max, detail),
        _check(dataset, label, f"{who}: 95% CP upper bound <= {upper_max:.0%}", fa["upper"], fa["upper"] <= upper_max, detail),
    ]


def _worst(entries: dict[str, Any], key: str, need: float, below: bool = True) -> tuple[Any, str, bool]:
    """The worst value among ``entries`` and the ones missing ``need``."""
    values = {a: s[key] for a, s in entries.items()}
    if below:  # the value must be >= need
        failing = {a: v for a, v in values.items() if v is None or v < need}
        worst = min(values.items(), key=lambda kv: -1 if kv[1] is None else kv[1])
    else:  # the value must be <= need
        failing = {a: v for a, v in values.items() if v is None or v > need}
        worst = max(values.items(), key=lambda kv: float("inf") if kv[1] is None else kv[1])
    fmt = (lambda v: _pct(v)) if key.endswith("rate") else (lambda v: "none detected" if v is None else f"{v:.0f}")
    detail = ", ".join(f"{a} {fmt(v)}" for a, v in failing.items()) if failing else f"worst: {worst[0]} {fmt(worst[1])}"
    return worst[1], detail, not failing


def check_cell(dataset: str, label: str, summary: dict[str, Any], has_prada: bool) -> list[dict[str, Any]]:
    """Every target of one (dataset, calibration) cell, seeds pooled."""
    checks: list[dict[str, Any]] = []
    fa = summary["false_alarms"]
    limits = fa_target(label)
    if limits is not None:
        for fam, entry in fa["by_family"].items():
            checks += _fa_checks(dataset, label, f"family {fam}", entry, limits)
        if "holdout" in fa:
            checks += _fa_checks(dataset, label, "held-out clients", fa["holdout"], limits)
    if not detection_applies(label):
        return checks
    attacks = summary["attacks"]
    default = {a: s for a, s in attacks.items() if s["set"] == "default"}
    ordinary = {a: s for a, s in default.items() if a not in HARD_ATTACKS}
    hard = {a: s for a, s in default.items() if a in HARD_ATTACKS}
    for group, need, name in ((ordinary, TARGET_DETECTION, "ordinary attacks"), (hard, TARGET_DETECTION_HARD, "interleaved/slow/Sybil")):
        if group:
            value, detail, ok = _worst(group, "detection_rate", need)
            checks.append(_check(dataset, label, f"{name}: detection >= {need:.0%} each", value, ok, detail))
    if default:
        value, detail, ok = _worst(default, "median_queries", TARGET_MEDIAN_QUERIES, below=False)
        checks.append(_check(dataset, label, f"median queries to detection <= {TARGET_MEDIAN_QUERIES} per attack type", value, ok, detail))
        if has_prada:
            worse = {a: (s["fidelity_at_alarm"], s["prada_fidelity_at_alarm"]) for a, s in default.items()
                     if not s["fidelity_at_alarm"] < s["prada_fidelity_at_alarm"]}
            detail = ", ".join(f"{a} {v[0]:.2f} vs {v[1]:.2f}" for a, v in worse.items()) or "all below"
            checks.append(_check(dataset, label, "fidelity at alarm < PRADA's per attack type", len(default) - len(worse), not worse, detail))
    held = {a: s for a, s in attacks.items() if s["set"] == "heldout"}
    if held:
        value, detail, ok = _worst(held, "detection_rate", TARGET_DETECTION_HELDOUT)
        checks.append(_check(dataset, label, f"held-out attack variants: detection >= {TARGET_DETECTION_HELDOUT:.0%} each", value, ok, detail))
    sweep = {a: s for a, s in attacks.items() if s["set"] == "sweep"}
    if sweep:
        missing = {a: s["detection_rate"] for a, s in sweep.items() if s["detection_rate"] < detection_target(s["base"])}
        detail = ", ".join(f"{a} {_pct(v)}" for a, v in missing.items()) or "all at target"
        checks.append(_check(dataset, label, "sweep variants at their base attack's detection target", len(sweep) - len(missing),
                             not missing, detail, informational=True))
    return checks


def check_promises(dataset: str, label: str, per_seed: list[tuple[int, dict[str, Any] | None, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Measured FA (the calibration family's clients) within what ``calibrate`` promised, per seed.

    ``per_seed``: (seed, promise or None, measured false-alarm counts). The bound checked is
    the promise's ``upper`` when it gives one, else its ``fpr``. No promise: no check.
    """
    stated = [(s, p, m) for s, p, m in per_seed if p is not None]
    if not stated:
        return []
    fails, parts = [], []
    for seed, promise, measured in stated:
        bound = promise.get("upper", promise.get("fpr"))
        ok = measured["rate"] is not None and bound is not None and measured["rate"] <= bound
        parts.append(f"seed {seed}: {_pct(measured['rate'])} vs {_pct(bound)}")
        if not ok:
            fails.append(seed)
    return [_check(dataset, label, "measured FA <= calibrate's promise (each seed)", len(stated) - len(fails), not fails, "; ".join(parts))]
