"""Scoring a replay report against the ground truth: per attacker entity, per benign client,
and their aggregates (detection, queries to detection, fidelity at the alarm, false alarms
with exact Clopper-Pearson bounds)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from exporter.binomial import clopper_pearson
from exporter.sim import Traffic, World

SUBSTITUTE_SEED = 0
CONFIDENCE = 0.95  # false-alarm rates are reported with the upper end of the two-sided 95 % interval


class Fidelity:
    """Agreement with the victim on the test split of a substitute trained on a query prefix.

    The substitute is a scikit-learn logistic regression (standardized inputs, fixed seed)
    trained on the queries with the victim's arg-max answers as labels: what the attacker
    holds after those queries. With one class seen, it predicts that class. Results are
    cached per (entity, prefix length), so calibrations that alarm at the same query share them.
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


def false_alarm_counts(flags: list[bool]) -> dict[str, Any]:
    """``{"clients", "flagged", "rate", "lower", "upper"}``: k of n with the two-sided 95 % Clopper-Pearson interval."""
    n, k = len(flags), int(sum(flags))
    lo, hi = clopper_pearson(k, n, CONFIDENCE)
    return {"clients": n, "flagged": k, "rate": k / n if n else None, "lower": lo, "upper": hi}


class Scorer:
    """Scores the replays of one evaluation log (one dataset and seed), one calibration at a time.

    What does not depend on the report (the truth, each client's event indexes, the
    victim's labels, the substitutes' cache) is computed once.
    """

    def __init__(self, dataset: str, seed: int, world: World, traffic: Traffic, holdout: Any = None) -> None:
        self.dataset, self.seed, self.traffic = dataset, seed, traffic
        self.truth = traffic.ground_truth()["clients"]
        self.holdout = holdout
        order = np.argsort(traffic.client, kind="stable")
        bounds = np.searchsorted(traffic.client[order], np.arange(len(traffic.clients) + 1))
        self.events_of = {name: order[bounds[i]:bounds[i + 1]] for i, name in enumerate(traffic.clients)}
        self.labels = traffic.P.argmax(axis=1)
        self.fidelity = Fidelity(world)
        self.entities: dict[str, list[str]] = {}
        for name, info in self.truth.items():
            if info["kind"] == "attack":
                self.entities.setdefault(info["group"] or name, []).append(name)

    def score(self, report: dict[str, Any], calibration: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
        """Per attacker entity (client, or Sybil group) and per benign client: what happened."""
        clients = report["clients"]
        mismatched = [c for c, v in self.truth.items() if clients.get(c, {}).get("queries") != v["queries"]]
        if mismatched:  # query indexes would not line up with the simulated events
            raise RuntimeError(f"the replay counted other query totals than simulated for {len(mismatched)} clients, e.g. {mismatched[:3]}")
        has_prada = "prada" in next(iter(clients.values()), {}).get("detectors", {})
        base = {"dataset": self.dataset, "seed": self.seed, "calibration": calibration}
        return self._attackers(clients, base, has_prada), self._benign(clients, base, has_prada), has_prada

    def _attackers(self, clients: dict[str, Any], base: dict[str, Any], has_prada: bool) -> list[dict[str, Any]]:
        fid, tr = self.fidelity, self.traffic
        rows = []
        for entity, members in self.entities.items():
            info = self.truth[members[0]]
            member_events = {m: self.events_of[m] for m in members}
            idx = np.sort(np.concatenate(list(member_events.values())))
            X, y = tr.X[idx], self.labels[idx]
            row: dict[str, Any] = {**base, "attack": info["type"], "base": info.get("base", info["type"]),
                                   "set": info.get("set", "default"), "entity": entity, "members": len(members),
                                   "queries": int(idx.size), "fidelity_all": fid(entity, X, y, idx.size)}
            for prefix, det in (("", None), ("prada_", "prada")):
                if det is not None and not has_prada:
                    continue
                alarm = first_alarm(clients, member_events, det)
                if alarm is None:
                    row.update({f"{prefix}detected": False, f"{prefix}queries_to_detection": None,
                                f"{prefix}fidelity_at_alarm": row["fidelity_all"]})
                else:
                    n = int(np.searchsorted(idx, alarm, side="right"))  # the entity's queries up to and including the alarm
                    row.update({f"{prefix}detected": True, f"{prefix}queries_to_detection": n,
                                f"{prefix}fidelity_at_alarm": fid(entity, X, y, n)})
            rows.append(row)
        return rows

    def _benign(self, clients: dict[str, Any], base: dict[str, Any], has_prada: bool) -> list[dict[str, Any]]:
        rows = []
        for name, info in self.truth.items():
            if info["kind"] != "benign":
                continue
            entry = clients.get(name, {})
            det = entry.get("detectors", {})
            rows.append({**base, "client": name, "family": info.get("family", "a"), "behaviour": info["type"],
                         "holdout": bool(self.holdout is not None and self.holdout.is_held_out(info)),
                         "queries": info["queries"], "flagged": bool(entry.get("flagged")),
                         "detectors_fired": sorted(d for d, v in det.items() if v.get("flagged")),
                         "prada_flagged": bool((det.get("prada") or {}).get("flagged")) if has_prada else None})
        return rows


def first_alarm(clients: dict[str, Any], member_events: dict[str, np.ndarray], detector: str | None) -> int | None:
    """Global event index of an entity's first alarm: the fused verdict, or one detector's."""
    best: int | None = None
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


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize_attacks(attackers: list[dict[str, Any]], has_prada: bool) -> dict[str, dict[str, Any]]:
    """Per attack type (or variant): detection, queries to detection, fidelity at the alarm."""
    out: dict[str, dict[str, Any]] = {}
    for attack in dict.fromkeys(r["attack"] for r in attackers):
        rows = [r for r in attackers if r["attack"] == attack]
        s: dict[str, Any] = {"entities": len(rows), "set": rows[0]["set"], "base": rows[0]["base"]}
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
        out[attack] = s
    return out


def summarize_false_alarms(benign: list[dict[str, Any]], has_prada: bool) -> dict[str, Any]:
    """Benign clients flagged: all, per family (with behaviours), held-out ones, per detector."""
    fa = false_alarm_counts([b["flagged"] for b in benign])
    if has_prada and benign:
        fa["prada_rate"] = float(np.mean([b["prada_flagged"] for b in benign]))
    fa["by_family"] = {}
    for fam in sorted({b["family"] for b in benign}):
        rows = [b for b in benign if b["family"] == fam]
        entry = false_alarm_counts([b["flagged"] for b in rows])
        entry["by_behaviour"] = {beh: false_alarm_counts([b["flagged"] for b in rows if b["behaviour"] == beh])
                                 for beh in dict.fromkeys(b["behaviour"] for b in rows)}
        fa["by_family"][fam] = entry
    held = [b for b in benign if b["holdout"]]
    if held:
        fa["holdout"] = false_alarm_counts([b["flagged"] for b in held])
        fa["not_holdout"] = false_alarm_counts([b["flagged"] for b in benign if not b["holdout"]])
    fired: dict[str, int] = {}
    for b in benign:
        for d in b["detectors_fired"]:
            fired[d] = fired.get(d, 0) + 1
    fa["by_detector"] = {d: n / len(benign) for d, n in sorted(fired.items())} if benign else {}
    return fa


def summarize(attackers: list[dict[str, Any]], benign: list[dict[str, Any]], has_prada: bool) -> dict[str, Any]:
    """Aggregate the rows of one (dataset, calibration), seeds pooled."""
    return {"attacks": summarize_attacks(attackers, has_prada), "false_alarms": summarize_false_alarms(benign, has_prada)}


def promise_of(summary: dict[str, Any] | None, model: str) -> dict[str, Any] | None:
    """The false-alarm rate ``calibrate`` promises for ``model``, if its JSON summary states one
    (``models.<model>.promise``: ``{"fpr", "upper", "how"}``); None otherwise."""
    if not isinstance(summary, dict):
        return None
    entry = (summary.get("models") or {}).get(model) or {}
    promise = entry.get("promise")
    return promise if isinstance(promise, dict) and ("fpr" in promise or "upper" in promise) else None


# -- groups (bench/detection/groups.py) ----------------------------------------------------------
NAMED_SHARE = 0.8  # a true group is "named" by a reported group holding at least this share of its members


def _ever_flagged(group: dict[str, Any]) -> bool:
    """Whether a reported group was flagged at any time of the replay (not only at its end)."""
    return bool(group["flagged"]) or group.get("first_flagged") is not None


def score_groups(traffic: Traffic, report: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per true attacker group (Sybil), whether and when the report named it; and the benign side.

    A true group of ``n`` members is *named* when one reported group holds at least
    ``ceil(0.8 n)`` of them; it is named at the event time at which the last of those
    members joined (``joined`` in the report), and ``queries_at_naming`` is the members'
    median number of queries sent by then. ``purity`` is the share of that reported
    group's members that belong to the true group. ``members_flagged``: members the client
    verdict flagged on their own evidence, named or not. ``params``: what the generator
    drew for the group, if it says. Benign side: the benign clients that
    are members of any reported group, per family and behaviour, and the reported groups
    whose members are all benign (and whether any of those is flagged).
    """
    truth = traffic.ground_truth()["clients"]
    groups = report.get("groups") or {}
    verdicts = report.get("clients") or {}
    member_of = {c: gid for gid, g in groups.items() for c in g["members"]}
    order = np.argsort(traffic.client, kind="stable")
    bounds = np.searchsorted(traffic.client[order], np.arange(len(traffic.clients) + 1))
    ts_of = {name: traffic.ts[order[bounds[i]:bounds[i + 1]]] for i, name in enumerate(traffic.clients)}
    true_groups: dict[str, list[str]] = {}
    for c, info in truth.items():
        if info["kind"] == "attack" and info.get("group"):
            true_groups.setdefault(info["group"], []).append(c)
    rows = []
    for gname, members in sorted(true_groups.items()):
        info = truth[members[0]]
        need = math.ceil(NAMED_SHARE * len(members))
        counts: dict[str, int] = {}
        for c in members:
            if c in member_of:
                counts[member_of[c]] = counts.get(member_of[c], 0) + 1
        best = max(counts, key=lambda g: counts[g]) if counts else None
        row: dict[str, Any] = {"group": gname, "strategy": info.get("strategy", info["type"]), "set": info.get("set"), "params": info.get("params"), "size": len(members),
                               "reported": best, "members_found": counts.get(best, 0) if best else 0, "named": False,
                               "members_flagged": sum(bool(verdicts.get(c, {}).get("flagged")) for c in members),
                               "flagged": False, "queries_at_naming": None, "purity": None}
        if best is not None:
            g = groups[best]
            row["purity"] = counts[best] / len(g["members"])
            row["flagged"] = _ever_flagged(g)
            if counts[best] >= need:
                joined = sorted(g["members"][c]["joined"] for c in members if c in g["members"])
                at = joined[need - 1]
                row["named"] = True
                row["named_at"] = at
                row["queries_at_naming"] = float(np.median([np.searchsorted(ts_of[c], at, side="right") for c in members]))
                if g.get("first_flagged") is not None:
                    row["queries_at_flag"] = float(np.median([np.searchsorted(ts_of[c], g["first_flagged"], side="right") for c in members]))
        rows.append(row)
    benign = [c for c, info in truth.items() if info["kind"] == "benign"]
    linked = [c for c in benign if c in member_of]
    benign_only = [gid for gid, g in groups.items() if all(truth.get(c, {}).get("kind") == "benign" for c in g["members"])]
    by_type: dict[str, list[int]] = {}
    for c in benign:
        key = f"{truth[c].get('family', 'a')}:{truth[c]['type']}"
        by_type.setdefault(key, [0, 0])
        by_type[key][0] += 1
        by_type[key][1] += int(c in member_of)
    side = {"benign": len(benign), "linked": len(linked), "linked_clients": sorted(linked),
            "benign_only_groups": len(benign_only), "benign_only_flagged": sum(_ever_flagged(groups[g]) for g in benign_only),
            "by_behaviour": {k: {"clients": n, "linked": m} for k, (n, m) in sorted(by_type.items()) if m},
            "groups_reported": len(groups), "groups_flagged": sum(_ever_flagged(g) for g in groups.values())}
    return rows, side
