"""Markdown for the benchmark: the overview (also the README table), per-cell tables, the
attack-sweep tables, the held-out lines and the target checklist."""

from __future__ import annotations

from typing import Any

from targets import HARD_ATTACKS, fa_target


def pct(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def num(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f}"


def fid(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def calibration_title(label: str) -> str:
    if label == "none":
        return "no calibration (default thresholds)"
    if label == "training":
        return "training data as events"
    return f"{label} benign clients per model"


def fa_text(fa: dict[str, Any]) -> str:
    """``1.2% (12/1000, upper 2.1%)``."""
    return f"{pct(fa['rate'])} ({fa['flagged']}/{fa['clients']}, upper {pct(fa['upper'])})"


def attack_table(attacks: dict[str, Any], has_prada: bool) -> str:
    """Attack x {detection, queries to detection, fidelity; the same for PRADA}."""
    head = ["attack", "n", "detection", "median q", "p90 q", "fidelity at alarm", "fidelity (all queries)",
            "PRADA detection", "PRADA median q", "PRADA fidelity at alarm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    for attack, s in attacks.items():
        prada = [pct(s.get("prada_detection_rate"), 0), num(s.get("prada_median_queries")), fid(s.get("prada_fidelity_at_alarm"))] if has_prada else ["n/a"] * 3
        lines.append("| " + " | ".join([attack, str(s["entities"]), pct(s["detection_rate"], 0), num(s["median_queries"]), num(s["p90_queries"]),
                                         fid(s["fidelity_at_alarm"]), fid(s["fidelity_all_queries"]), *prada]) + " |")
    return "\n".join(lines)


def false_alarm_lines(fa: dict[str, Any], promises: list[str], has_prada: bool) -> str:
    """The benign false alarms of one cell: per family, held-out, behaviours, detectors, promise."""
    out = [f"Benign false alarms: {fa_text(fa)}" + (f"; PRADA alone {pct(fa.get('prada_rate'))}" if has_prada else "") + "."]
    for fam, entry in fa["by_family"].items():
        by = ", ".join(f"{b} {pct(e['rate'], 0)} ({e['flagged']}/{e['clients']})" for b, e in entry["by_behaviour"].items())
        out.append(f"- family {fam}: {fa_text(entry)}; by behaviour: {by}")
    if "holdout" in fa:
        out.append(f"- held-out clients: {fa_text(fa['holdout'])}; the others: {fa_text(fa['not_holdout'])}")
    if fa["by_detector"]:
        out.append("- benign clients flagged per detector: " + ", ".join(f"{k} {pct(v)}" for k, v in fa["by_detector"].items()))
    out.append("- calibrate's promise: " + ("; ".join(promises) if promises else "none stated"))
    return "\n".join(out)


def _cell_overview(summary: dict[str, Any], has_prada: bool) -> list[str]:
    fa = summary["false_alarms"]
    attacks = {a: s for a, s in summary["attacks"].items() if s["set"] == "default"}
    ordinary = {a: s for a, s in attacks.items() if a not in HARD_ATTACKS}
    hard = {a: s for a, s in attacks.items() if a in HARD_ATTACKS}

    def worst(group: dict[str, Any]) -> str:
        if not group:
            return "–"
        a, s = min(group.items(), key=lambda kv: kv[1]["detection_rate"])
        everyone = all(g["detection_rate"] == s["detection_rate"] for g in group.values())
        return f"{pct(s['detection_rate'], 0)} ({'all' if everyone else a})"

    slowest = "–"
    if attacks:
        a, s = max(attacks.items(), key=lambda kv: float("inf") if kv[1]["median_queries"] is None else kv[1]["median_queries"])
        slowest = f"{num(s['median_queries'])} ({a})"
    below = f"{sum(s['fidelity_at_alarm'] < s['prada_fidelity_at_alarm'] for s in attacks.values())}/{len(attacks)}" if has_prada and attacks else "n/a"
    fams = "; ".join(f"{f}: {pct(e['rate'])} ({e['flagged']}/{e['clients']})" for f, e in fa["by_family"].items())
    uppers = "; ".join(f"{f}: {pct(e['upper'])}" for f, e in fa["by_family"].items())
    return [fams, uppers, worst(ordinary), ", ".join(f"{a} {pct(s['detection_rate'], 0)}" for a, s in hard.items()) or "–", slowest, below]


def overview_table(results: dict[str, dict[str, Any]], promises: dict[str, dict[str, list[str]]], checks: list[dict[str, Any]],
                   has_prada: bool) -> str:
    """One row per (dataset, calibration): the compact table for the docs."""
    head = ["dataset", "calibration", "benign FA (k/n)", "95% upper", "target (rate / upper)", "promised", "ordinary attacks: worst detection",
            "interleaved / slow / Sybil", "slowest median q", "fidelity < PRADA", "targets met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
    for dataset, cells in results.items():
        for label, summary in cells.items():
            limits = fa_target(label)
            target = f"{limits[0]:.0%} / {limits[1]:.0%}" if limits else "–"
            mine = [c for c in checks if c["dataset"] == dataset and c["calibration"] == label and not c["informational"]]
            met = f"{sum(c['pass'] for c in mine)}/{len(mine)}" if mine else "–"
            promised = "; ".join(promises.get(dataset, {}).get(label, [])) or "–"
            cols = _cell_overview(summary, has_prada)
            lines.append("| " + " | ".join([dataset, label, cols[0], cols[1], target, promised, *cols[2:], met]) + " |")
    return "\n".join(lines)


def sweep_table(results: dict[str, Any], set_name: str) -> str:
    """Variants x calibrations: ``detection (median q)``."""
    labels = list(results)
    variants: dict[str, dict[str, Any]] = {}
    for label in labels:
        for a, s in results[label]["attacks"].items():
            if s["set"] == set_name:
                variants.setdefault(a, {})[label] = s
    if not variants:
        return ""
    head = ["variant", "n", *labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    for a, per in variants.items():
        n = next(iter(per.values()))["entities"]
        cells = [f"{pct(per[l]['detection_rate'], 0)} ({num(per[l]['median_queries'])})" if l in per else "–" for l in labels]
        lines.append("| " + " | ".join([a, str(n), *cells]) + " |")
    return "\n".join(lines)


def checklist(checks: list[dict[str, Any]]) -> str:
    """``- [x] digits @ 60: target (value; detail)``, informational items marked as such."""
    lines = []
    for c in checks:
        value = c["value"]
        if value is None:
            shown = "none"
        elif isinstance(value, float) and (c["target"].startswith(("family", "held-out")) or "detection >=" in c["target"]):
            shown = pct(value)  # a rate
        else:
            shown = f"{value:.0f}" if isinstance(value, float) else str(value)
        box = "i" if c["informational"] else ("x" if c["pass"] else " ")
        lines.append(f"- [{box}] {c['dataset']} @ {c['calibration']}: {c['target']} (measured: {shown}; {c['detail']})")
    counted = [c for c in checks if not c["informational"]]
    lines.append(f"\n{sum(c['pass'] for c in counted)}/{len(counted)} targets met" + (" ([i]: informational, not counted)" if len(counted) < len(checks) else "") + ".")
    return "\n".join(lines)
