"""A client's page on the live exporter, ``GET /clients/{id}``: the forensic report's page for one client.

Built from the client's live state with :func:`exporter.report_html.render_client`: its
queries, risk, sticky verdict, each detector's last value and first flag, its
cross-client peers, the thresholds in effect, the calibration profile's promise, and
its verdict and reaction state (the flag and its evidence, whether the gateway blocks
it, manual blocks and releases with who and why). Timelines are not recorded live
(``replay --html`` draws them), so the page says there is none. A client evicted while
flagged has a page from its flag record. Protected like ``/`` (basic auth).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from exporter.report_html import profile_summary, render_client, when

if TYPE_CHECKING:
    from exporter.api import ClientsAPI
    from exporter.pipeline import Pipeline


def _override(o: dict[str, Any] | None, what: str) -> str | None:
    if o is None:
        return None
    until = ""
    if o["action"] == "block":
        until = " until released" if o.get("until") is None else f" until {when(o['until'])}"
    return f"{what} by {o['who']} at {when(o['at'])}{until}: {o['reason']}"


def models_summary(pipeline: "Pipeline") -> dict[str, dict[str, Any]]:
    """Each model's thresholds in effect and the verdict's inputs, as the report shows them."""
    out: dict[str, dict[str, Any]] = {}
    with pipeline.lock:
        for model, rt in pipeline.runtimes:
            thresholds = {d.name: float(getattr(d.params, type(d).threshold_param)) for d in rt.detectors if type(d).threshold_param}
            out[model] = {"thresholds": thresholds, "verdict_inputs": list(rt.fusion.inputs)}
    return out


def client_page(pipeline: "Pipeline", clients: "ClientsAPI", client_id: str) -> str | None:
    """The page of ``client_id``, or None if the exporter knows nothing of it."""
    answer = clients.client(client_id)
    if answer is None:
        return None
    s = pipeline.view.client(client_id)
    flag = answer["flag"]
    entry: dict[str, Any] = {
        "queries": s.queries if s is not None else None,
        "flagged": s.first_flagged_query is not None if s is not None else answer["flagged"],
        "first_flagged_query": (s.first_flagged_query if s is not None else flag["first_query"] if flag else None),
        "score": s.score if s is not None else None,
        "detectors": {
            name: {"flagged": name in s.first_flagged, "first_flagged_query": s.first_flagged.get(name), "value": value}
            for name, value in sorted(s.scores.items())
        } if s is not None else {},
    }
    peers = {p["client"]: p["matches"] for p in answer["cross_client"]["peers"]}
    over = ", ".join(f"{d['detector']} {d['over_threshold']:.2f}x" if d["over_threshold"] is not None else d["detector"] for d in flag["detectors"]) if flag else None
    block = answer["block"]
    facts = {
        "tracked": "yes" if answer["tracked"] else f"no: evicted ({answer['evicted']['reason']}) at {when(answer['evicted']['at'])}" if answer["evicted"] else "no",
        "flagged now (sticky verdict)": "yes" if answer["flagged"] else "no",
        "model": answer["model"],
        "first flagged": f"{when(flag['first_at'])}, at query {flag['first_query']}" if flag else None,
        "last flagged": f"{when(flag['last_at'])}, at query {flag['last_query']}" if flag else None,
        "flag cleared": f"{flag['cleared']} at {when(flag['cleared_at'])}" if flag and flag["cleared"] else None,
        "over threshold at the flag (value / threshold)": over,
        "linked group": answer["group"],
        "blocked": (f"yes, by {block['source']}" + (f" until {when(block['until'])}" if block["until"] is not None else "")) if block else "no",
        "the gateway's decision now": f"{answer['decision']} (reaction.mode: {clients.reaction.config.mode})",
        "manual block": _override(answer["manual_block"], "blocked"),
        "last release": _override(answer["released"], "released"),
    }
    summary = {
        "title": f"MONITAUR: client {client_id}",
        "clients": {client_id: entry},
        "peers": {client_id: peers} if peers else {},
        "models": models_summary(pipeline),
        "profile": profile_summary(pipeline.runtimes.profile),
        "facts": facts,
        "facts_title": "Verdict and reaction",
        "timelines_note": "Timelines are not recorded by the live exporter: `monitaur-exporter replay --html` draws them from the logs.",
        "generated_at": time.time(),
    }
    return render_client(client_id, summary, {})
