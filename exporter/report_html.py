"""The forensic report: one self-contained HTML page (inline SVG, CSS and a little JS; no external asset).

:func:`render_report` takes plain data, so that ``replay --html`` and a live server (one
client's page) can both use it:

* ``summary``, a mapping (JSON-like) with
    - ``events``: ``{"accepted": int, "rejected": {reason: int}}`` (optional);
    - ``clients``: ``{client: {"queries", "flagged", "first_flagged_query", "score",
      "detectors": {name: {"flagged", "first_flagged_query", "value"}}}}``, as in the
      replay report (a client may also carry ``"peers": {peer: matches}``);
    - ``models``: ``{model: {"thresholds": {detector: float}, "verdict_inputs": [detector]}}``;
    - ``profile``: ``None`` (uncalibrated) or ``{"source", "target_fpr", "created_at",
      "models": {model: {"clients", "events", "promise": {"fpr", "clients", "how", ...}}}}``;
    - ``groups`` (cross-client groups, any list or mapping of mappings) or else ``peers``
      (``{client: {peer: matches}}``), drawn by :func:`cross_client_section`;
    - ``title`` and ``generated_at`` (Unix seconds), optional;
    - ``facts`` (label -> scalar) and its heading ``facts_title``, optional: shown after the
      summary (a live client's page puts its verdict and reaction state there);
    - ``timelines_note``, optional: said where timelines are, instead of the note on those not drawn;
* ``timelines``: ``{client: [Timeline, ...]}`` (:class:`exporter.timelines.Timeline`,
  one per model), drawn for the flagged clients.

What the page shows is derived values, ids and times only: never a model input. Every
string from the data (client ids and model names are chosen by clients) is escaped for
HTML, with characters that are not printable (controls, lone surrogates, bidi overrides)
shown as ``\\uXXXX``; ids are never used in markup ids, URLs or script. A Content
Security Policy allows only the page's own script and style (by hash) and no fetch at
all, so even markup that got through could neither run script nor load anything.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from exporter import __version__
from exporter.atomic import atomic_write_bytes
from exporter.timelines import Timeline

if TYPE_CHECKING:
    from exporter.profile import Profile
    from exporter.timelines import TimelineRecorder

MAX_ROWS = 5_000  # clients in the table (flagged first, then by risk)
MAX_TIMELINES = 100  # flagged clients whose timelines are drawn (by risk)
MAX_GROUPS = 200  # cross-client groups (or clients with peers) listed
MAX_MEMBERS = 50  # members listed per group
DASH = "\u2013"

# Geometry of a timeline, in SVG user units.
WIDTH, LEFT, RIGHT = 760, 150, 70
RISK_H, STRIP_H, GAP, TOP, AXIS_H = 64, 30, 10, 16, 22

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ccc}h3{font-size:1em;margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top}
td.n,#clients td:nth-child(2),#clients td:nth-child(4),#clients td:nth-child(5){text-align:right;font-variant-numeric:tabular-nums}th[data-type]{cursor:pointer;background:#f3f3f3}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tr.flagged td:first-child{font-weight:bold;color:#b00}.id{font-family:ui-monospace,monospace;word-break:break-all}
.note{color:#555}.kv td:first-child{color:#555}svg.timeline{width:100%;max-width:760px;height:auto;display:block}
svg text{font:11px system-ui,sans-serif;fill:#333}.series{fill:none;stroke:#1f5fa8;stroke-width:1.3}
.risk{stroke:#6a2ca0;stroke-width:1.8}.thr{stroke:#d08000;stroke-dasharray:4 3}.frame{fill:#fafafa;stroke:#ddd}
.alarm{stroke:#c00;stroke-width:1.5}.cross{fill:#c00}text.alarm{fill:#c00;stroke:none}.dim{fill:#999}
"""

SCRIPT = """
(function () {
  "use strict";
  var table = document.getElementById("clients");
  if (table) {
    var heads = table.tHead.rows[0].cells;
    var sortBy = function (col) {
      var head = heads[col];
      var dir = head.getAttribute("aria-sort") === "ascending" ? -1 : 1;
      for (var i = 0; i < heads.length; i++) heads[i].removeAttribute("aria-sort");
      head.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      var numeric = head.getAttribute("data-type") === "num";
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var key = function (row) {
        var cell = row.cells[col];
        return numeric ? parseFloat(cell.textContent.replace(/,/g, "")) : cell.textContent;
      };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (numeric) {
          if (isNaN(x)) x = -Infinity;
          if (isNaN(y)) y = -Infinity;
          return dir * (x - y);
        }
        return dir * (x < y ? -1 : x > y ? 1 : 0);
      });
      var frag = document.createDocumentFragment();
      rows.forEach(function (r) { frag.appendChild(r); });
      body.appendChild(frag);
    };
    Array.prototype.forEach.call(heads, function (h, i) {
      h.addEventListener("click", function () { sortBy(i); });
    });
  }
  // A check the browser test reads: timelines with drawn series, table rows, time to layout.
  var drawn = 0;
  document.querySelectorAll("svg.timeline").forEach(function (svg) {
    var ok = Array.prototype.some.call(svg.querySelectorAll("path.series"), function (p) {
      return p.getTotalLength() > 0;
    });
    if (ok) drawn++;
  });
  var height = document.body.offsetHeight;  // forces style and layout
  var check = document.getElementById("render-check");
  check.setAttribute("data-timelines", String(drawn));
  check.setAttribute("data-rows", String(table ? table.tBodies[0].rows.length : 0));
  check.setAttribute("data-layout-ms", String(Math.round(performance.now())));
  check.setAttribute("data-height", String(height));
  check.textContent = "rendered: " + drawn + " timelines";
})();
"""


# -- escaping -------------------------------------------------------------------------------
def text(value: Any) -> str:
    """``value`` as HTML text (also safe in a quoted attribute): escaped, non-printables as ``\\uXXXX``."""
    s = value if isinstance(value, str) else str(value)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in s)
    return html.escape(s, quote=True)


def _num(value: Any, digits: int = 3) -> str:
    """An integer with thousands separators, a finite float with ``digits`` decimals, or an en dash."""
    if isinstance(value, bool):
        return "\u2013"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)) and math.isfinite(value):
        return f"{float(value):.{digits}f}"
    return "\u2013"


def when(ts: Any) -> str:
    """Unix seconds as UTC date and time."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(ts))) + "Z"
    except (TypeError, ValueError, OverflowError, OSError):
        return "\u2013"


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


# -- sections -------------------------------------------------------------------------------
def _flagged(clients: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Flagged clients, by risk (highest first), then id."""
    return sorted((c for c, v in clients.items() if v.get("flagged")), key=lambda c: (-_float(clients[c].get("score")), c))


def _float(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0


def _over(entry: Mapping[str, Any]) -> list[str]:
    """The detectors that flagged a client at some point."""
    return [n for n, d in (entry.get("detectors") or {}).items() if isinstance(d, Mapping) and d.get("flagged")]


def summary_section(summary: Mapping[str, Any], anchors: Mapping[str, str], max_listed: int = MAX_TIMELINES) -> str:
    """Accepted and rejected events, clients and the flagged ones (the first ``max_listed`` by
    risk, linked to their timelines)."""
    clients = summary.get("clients") or {}
    events = summary.get("events") or {}
    rejected = events.get("rejected") or {}
    flagged = _flagged(clients)
    out = ["<h2>Summary</h2><table class=kv>"]
    if events:
        out.append(f"<tr><td>events accepted</td><td class=n>{_num(events.get('accepted'))}</td></tr>")
        out.append(f"<tr><td>events rejected</td><td class=n>{_num(sum(int(v) for v in rejected.values()))}</td></tr>")
    out.append(f"<tr><td>clients</td><td class=n>{_num(len(clients))}</td></tr>")
    out.append(f"<tr><td>flagged clients</td><td class=n>{_num(len(flagged))}</td></tr></table>")
    if rejected:
        out.append("<h3>Rejected events by reason</h3><table><tr><th>reason</th><th>events</th></tr>")
        out += [f"<tr><td>{text(r)}</td><td class=n>{_num(n)}</td></tr>" for r, n in sorted(rejected.items())]
        out.append("</table>")
    if flagged:
        out.append("<h3>Flagged clients</h3><ul id=flagged-list>")
        for c in flagged[:max_listed]:
            entry = clients[c]
            name = f"<a href='#{anchors[c]}' class=id>{text(c)}</a>" if c in anchors else f"<span class=id>{text(c)}</span>"
            out.append(
                f"<li>{name}: risk {_num(entry.get('score'))}, first flagged at query {_num(entry.get('first_flagged_query'))}"
                f" of {_num(entry.get('queries'))} by {text(', '.join(_over(entry)) or 'the verdict')}</li>"
            )
        out.append("</ul>")
        if len(flagged) > max_listed:
            out.append(f"<p class=note>{len(flagged) - max_listed:,} more flagged clients, in the table below.</p>")
    return "".join(out)


def facts_section(summary: Mapping[str, Any]) -> str:
    """``summary["facts"]`` (label -> scalar), if any, as a table: a live client's verdict and reaction state."""
    facts = summary.get("facts") or {}
    if not facts:
        return ""
    rows = "".join(f"<tr><td>{text(k)}</td><td>{text(_fmt(v)) if v is not None else DASH}</td></tr>" for k, v in facts.items() if _scalar(v))
    return f"<h2>{text(summary.get('facts_title') or 'Verdict')}</h2><table class=kv id=facts>{rows}</table>"


def profile_section(summary: Mapping[str, Any]) -> str:
    """The calibration profile used (or its absence), the target false-alarm rate, and the thresholds in effect."""
    profile = summary.get("profile")
    out = ["<h2>Profile and false-alarm rate</h2>"]
    if not profile:
        out.append(
            "<p>No calibration profile: the detectors ran with their documented default thresholds and learned "
            "their references from the traffic itself. <strong>No false-alarm rate is promised.</strong></p>"
        )
    else:
        out.append("<table class=kv>")
        if profile.get("source"):
            out.append(f"<tr><td>profile</td><td class=id>{text(profile['source'])}</td></tr>")
        out.append(f"<tr><td>target false-alarm rate (per client)</td><td class=n>{_num(profile.get('target_fpr'), 4)}</td></tr>")
        if profile.get("created_at") is not None:
            out.append(f"<tr><td>calibrated</td><td>{when(profile['created_at'])}</td></tr>")
        out.append("</table>")
        models = profile.get("models") or {}
        if models:
            out.append("<table><tr><th>model</th><th>calibration clients</th><th>events</th><th>promised false-alarm rate</th><th>how</th></tr>")
            for name, mp in sorted(models.items()):
                promise = mp.get("promise") or {}
                out.append(
                    f"<tr><td class=id>{text(name)}</td><td class=n>{_num(mp.get('clients'))}</td><td class=n>{_num(mp.get('events'))}</td>"
                    f"<td class=n>{_num(promise.get('fpr'), 4)}</td><td>{text(promise.get('how', ''))}</td></tr>"
                )
            out.append("</table>")
    models = summary.get("models") or {}
    if models:
        out.append("<h3>Thresholds in effect</h3><table><tr><th>model</th><th>detector</th><th>threshold</th><th>in the verdict</th></tr>")
        for name, m in sorted(models.items()):
            inputs = set(m.get("verdict_inputs") or ())
            for det, thr in (m.get("thresholds") or {}).items():
                note = "" if _float(thr) <= 1.0 else " (above 1: never flags)"
                out.append(
                    f"<tr><td class=id>{text(name)}</td><td>{text(det)}</td><td class=n>{_num(thr)}{note}</td>"
                    f"<td>{'yes' if det in inputs else 'no'}</td></tr>"
                )
        out.append("</table>")
    return "".join(out)


def cross_client_section(summary: Mapping[str, Any], max_groups: int = MAX_GROUPS) -> str:
    """Cross-client links: the report's ``groups`` if it has them, else fingerprint peers.

    ``groups`` may be a list of mappings or a mapping of group id to mapping; a group's
    members are its ``members`` or ``clients`` (a list, or a mapping of member to value),
    and its other scalar fields are shown beside them. Peers come from ``summary["peers"]``
    or from each client's ``"peers"``.
    """
    out = ["<h2>Cross-client groups (Sybil)</h2>"]
    groups = summary.get("groups")
    if groups:
        items = list(groups.items()) if isinstance(groups, Mapping) else [(g.get("id", i + 1) if isinstance(g, Mapping) else i + 1, g) for i, g in enumerate(groups)]
        out.append("<table id=groups><tr><th>group</th><th>members</th><th>details</th></tr>")
        for gid, g in items[:max_groups]:
            g = g if isinstance(g, Mapping) else {"members": g}
            members = g.get("members", g.get("clients", ()))
            names = list(members) if isinstance(members, (Mapping, list, tuple, set, frozenset)) else [members]
            names = sorted(names, key=str) if isinstance(members, (set, frozenset)) else names
            shown = ", ".join(f"<span class=id>{text(m)}</span>" for m in names[:MAX_MEMBERS])
            more = f" and {len(names) - MAX_MEMBERS} more" if len(names) > MAX_MEMBERS else ""
            details = "; ".join(f"{text(k)}: {text(_fmt(v))}" for k, v in g.items() if k not in ("members", "clients", "id") and _scalar(v))
            out.append(f"<tr><td class=id>{text(gid)}</td><td>{len(names)}: {shown}{more}</td><td>{details}</td></tr>")
        out.append("</table>")
        if len(items) > max_groups:
            out.append(f"<p class=note>{len(items) - max_groups} more groups not listed.</p>")
        return "".join(out)
    peers = summary.get("peers") or {c: v["peers"] for c, v in (summary.get("clients") or {}).items() if isinstance(v, Mapping) and v.get("peers")}
    if not peers:
        out.append("<p class=note>No cross-client links in this report.</p>")
        return "".join(out)
    out.append(
        "<p class=note>This report has no groups; these are the clients whose queries matched other clients' "
        "queries (fingerprint peers, heaviest first; counts are upper bounds).</p>"
    )
    out.append("<table id=peers><tr><th>client</th><th>peers (matched queries)</th></tr>")
    for client in sorted(peers)[:max_groups]:
        pairs = sorted((peers[client] or {}).items(), key=lambda kv: -_float(kv[1]))
        cells = ", ".join(f"<span class=id>{text(p)}</span> ({_num(n)})" for p, n in pairs[: MAX_MEMBERS])
        out.append(f"<tr><td class=id>{text(client)}</td><td>{cells}</td></tr>")
    out.append("</table>")
    if len(peers) > max_groups:
        out.append(f"<p class=note>{len(peers) - max_groups} more clients with peers not listed.</p>")
    return "".join(out)


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _fmt(v: Any) -> str:
    return _num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def clients_table(summary: Mapping[str, Any], anchors: Mapping[str, str], max_rows: int = MAX_ROWS) -> str:
    """The sortable table of clients (click a column head; numbers sort by value): flagged first, then by risk."""
    clients = summary.get("clients") or {}
    order = sorted(clients, key=lambda c: (not clients[c].get("flagged"), -_float(clients[c].get("score")), c))
    out = [
        "<h2>Clients</h2><p class=note>Click a column head to sort.</p><table id=clients><thead><tr>"
        "<th data-type=text>client</th><th data-type=num>queries</th><th data-type=text>flagged</th>"
        "<th data-type=num>first flagged at query</th><th data-type=num>risk</th><th data-type=text>detectors over threshold</th>"
        "</tr></thead><tbody>"
    ]
    for c in order[:max_rows]:
        e = clients[c]
        flagged = bool(e.get("flagged"))
        name = f"<a href='#{anchors[c]}'>{text(c)}</a>" if c in anchors else text(c)
        out.append(
            f"<tr{' class=flagged' if flagged else ''}><td class=id>{name}</td><td>{_num(e.get('queries'))}</td>"
            f"<td>{'yes' if flagged else 'no'}</td><td>{_num(e.get('first_flagged_query'))}</td><td>{_num(e.get('score'))}</td>"
            f"<td>{text(', '.join(_over(e)))}</td></tr>"
        )
    out.append("</tbody></table>")
    if len(order) > max_rows:
        out.append(f"<p class=note>{len(order) - max_rows:,} more clients not listed (none of them flagged).</p>")
    return "".join(out)


# -- timelines ------------------------------------------------------------------------------
def _path(xs: np.ndarray, ys: np.ndarray) -> str:
    """A compact SVG path through the points, broken where ``ys`` is NaN.

    Integer coordinates, relative moves with implicit repetition (``M150 46l2 1 2-3``),
    and the inner points of horizontal runs left out: a flat series costs a few bytes.
    """
    ok = ~np.isnan(ys)
    if not ok.any():
        return ""
    xi = np.rint(xs).astype(np.int64)
    yi = np.rint(np.where(ok, ys, 0.0)).astype(np.int64)
    parts: list[str] = []
    for seg in np.split(np.arange(xi.size), np.flatnonzero(np.diff(ok.astype(np.int8)) != 0) + 1):
        if not ok[seg[0]]:
            continue
        x, y = xi[seg], yi[seg]
        keep = np.ones(x.size, dtype=bool)
        keep[1:-1] = (y[1:-1] != y[:-2]) | (y[1:-1] != y[2:])
        x, y = x[keep], y[keep]
        moves = " ".join(f"{dx} {dy}" for dx, dy in zip(np.diff(x).tolist(), np.diff(y).tolist()))
        parts.append(f"M{x[0]} {y[0]}" + (f"l{moves}" if moves else "h0"))
    return "".join(parts).replace(" -", "-")


def timeline_svg(tl: Timeline, thresholds: Mapping[str, float], verdict_inputs: Iterable[str] = (), queries: int | None = None) -> str:
    """One model's timeline of a client: the risk, then one strip per detector that judged
    anything, each with its threshold (dashed), its first flag (a dot), and the alarm (the
    first fused flag) as a red line across all strips."""
    n = tl.query.size
    if n == 0:
        return "<p class='note'>No points recorded.</p>"
    inputs = set(verdict_inputs)
    last = int(max(int(tl.query[-1]), queries or 0))
    span = max(last - 1, 1)
    plot_w = WIDTH - LEFT - RIGHT

    def x(q: np.ndarray | float) -> Any:
        return LEFT + (np.asarray(q, dtype=np.float64) - 1.0) / span * plot_w

    xs = x(tl.query)
    shown = [j for j, _ in enumerate(tl.detectors) if j < tl.values.shape[1] and not np.isnan(tl.values[:, j]).all()]
    height = TOP + RISK_H + len(shown) * (STRIP_H + GAP) + GAP + AXIS_H
    out = [f"<svg class='timeline' viewBox='0 0 {WIDTH} {height}' role='img' xmlns='http://www.w3.org/2000/svg'>"]

    def strip(top: int, h: int, label: str, ys: np.ndarray, thr: float | None, cls: str, first: int | None, title: str) -> None:
        vals = np.clip(ys.astype(np.float64), 0.0, 1.0)
        out.append(f"<rect class='frame' x='{LEFT}' y='{top}' width='{plot_w}' height='{h}'><title>{title}</title></rect>")
        out.append(f"<text x='{LEFT - 6}' y='{top + h // 2 + 4}' text-anchor='end'>{label}</text>")
        if thr is not None:
            if thr <= 1.0:
                ty = round(top + (1.0 - thr) * h)
                out.append(f"<line class='thr' x1='{LEFT}' x2='{LEFT + plot_w}' y1='{ty}' y2='{ty}'/>")
                out.append(f"<text x='{LEFT + plot_w + 4}' y='{ty + 4}'>{thr:.2f}</text>")
            else:
                out.append(f"<text class='dim' x='{LEFT + plot_w + 4}' y='{top + h // 2 + 4}'>&gt;1</text>")
        d = _path(xs, top + (1.0 - vals) * h)
        if d:
            out.append(f"<path class='series {cls}' d='{d}'/>")
        if first is not None:
            at = np.flatnonzero(tl.query == first)
            if at.size and not np.isnan(vals[at[0]]):
                cx, cy = float(x(first)), top + (1.0 - vals[at[0]]) * h
                out.append(f"<circle class='cross' cx='{cx:.0f}' cy='{cy:.0f}' r='3.5'><title>first over threshold at query {first:,}</title></circle>")

    strip(TOP, RISK_H, "risk", tl.risk, 0.5, "risk", tl.alarm, "fused risk: 0.5 = the strongest detector at its threshold")
    top = TOP + RISK_H + GAP
    for j in shown:
        name = tl.detectors[j]
        label = text(name) + ("" if not inputs or name in inputs else "*")
        strip(top, STRIP_H, label, tl.values[:, j], thresholds.get(name), "", tl.crossings.get(name), text(name))
        top += STRIP_H + GAP
    axis = top + 14
    out.append(f"<text x='{LEFT}' y='{axis}'>query 1</text><text x='{LEFT + plot_w}' y='{axis}' text-anchor='end'>query {last:,}</text>")
    if tl.alarm is not None:
        ax = float(x(tl.alarm))
        at = np.flatnonzero(tl.query == tl.alarm)
        moment = f", {when(tl.ts[at[0]])}" if at.size else ""
        out.append(f"<line class='alarm' x1='{ax:.0f}' x2='{ax:.0f}' y1='{TOP}' y2='{top - GAP}'/>")
        anchor = "end" if ax > LEFT + plot_w * 0.6 else "start"
        out.append(f"<text class='alarm' x='{ax:.0f}' y='{TOP - 4}' text-anchor='{anchor}'>alarm at query {tl.alarm:,}{moment}</text>")
    out.append("</svg>")
    return "".join(out)


def timelines_section(summary: Mapping[str, Any], timelines: Mapping[str, Sequence[Timeline]], anchors: Mapping[str, str]) -> str:
    """The timelines of the flagged clients that have anchors (at most ``MAX_TIMELINES``, by risk)."""
    clients = summary.get("clients") or {}
    models = summary.get("models") or {}
    flagged = _flagged(clients)
    out = [
        "<h2>Timelines of flagged clients</h2><p class=note>Per model: the fused risk and each detector's value after each "
        "query (downsampled; the first flags are exact). Dashed: the threshold. Dot: the first query over it. Red line: "
        "the alarm (first flag of the verdict). * : a detector outside the verdict (exported and alerted on by itself).</p>"
    ]
    if not flagged:
        out.append("<p class=note>No client was flagged.</p>")
    for c in flagged:
        if c not in anchors:
            continue
        e = clients[c]
        out.append(f"<section id={anchors[c]} class=client><h3>client <span class=id>{text(c)}</span></h3>")
        out.append(
            f"<p>{_num(e.get('queries'))} queries; first flagged at query {_num(e.get('first_flagged_query'))}; "
            f"risk now {_num(e.get('score'))}; detectors over threshold: {text(', '.join(_over(e)) or 'none')}</p>"
        )
        series = timelines.get(c) or []
        if not series:
            out.append("<p class=note>No timeline recorded for this client.</p>")
        for tl in series:
            m = models.get(tl.model) or {}
            out.append(f"<p class=note>model <span class=id>{text(tl.model)}</span></p>")
            out.append(timeline_svg(tl, m.get("thresholds") or {}, m.get("verdict_inputs") or (), e.get("queries")))
        out.append("</section>")
    hidden = len(flagged) - sum(1 for c in flagged if c in anchors)
    if summary.get("timelines_note"):
        out.append(f"<p class=note id=timelines-note>{text(summary['timelines_note'])}</p>")
    elif hidden > 0:
        out.append(f"<p class=note>{hidden:,} more flagged clients: timelines not drawn (page bound); they are in the table.</p>")
    return "".join(out)


# -- the page -------------------------------------------------------------------------------
def render_report(
    summary: Mapping[str, Any],
    timelines: Mapping[str, Sequence[Timeline]],
    max_rows: int = MAX_ROWS,
    max_timelines: int = MAX_TIMELINES,
) -> str:
    """The whole page, as text (see the module docstring for what ``summary`` and ``timelines`` hold)."""
    clients = summary.get("clients") or {}
    drawn = [c for c in _flagged(clients) if timelines.get(c)][:max_timelines]
    anchors = {c: f"t{i}" for i, c in enumerate(drawn)}
    title = summary.get("title") or "MONITAUR forensic report"
    generated = summary.get("generated_at", time.time())
    csp = f"default-src 'none'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(CSS)}; base-uri 'none'; form-action 'none'"
    return "".join(
        [
            "<!doctype html><html lang=en><head><meta charset=utf-8>",
            f"<meta http-equiv=Content-Security-Policy content=\"{csp}\">",
            "<meta name=viewport content='width=device-width, initial-scale=1'>",
            f"<title>{text(title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{text(title)}</h1>",
            f"<p class=note>Generated {when(generated)} by monitaur-exporter {text(__version__)}. "
            "Derived values, client ids and times only: no model input is shown.</p>",
            summary_section(summary, anchors, max_timelines),
            facts_section(summary),
            profile_section(summary),
            timelines_section(summary, timelines, anchors),
            cross_client_section(summary),
            clients_table(summary, anchors, max_rows),
            "<p id=render-check hidden></p>",
            f"<script>{SCRIPT}</script></body></html>",
        ]
    )


def render_client(client_id: str, summary: Mapping[str, Any], timelines: Mapping[str, Sequence[Timeline]]) -> str:
    """One client's page (for a live server's ``/clients/{id}``): the same page, restricted to that client."""
    one = dict(summary)
    clients = summary.get("clients") or {}
    one["clients"] = {client_id: clients[client_id]} if client_id in clients else {}
    peers = summary.get("peers")
    if peers is not None:
        one["peers"] = {client_id: peers[client_id]} if client_id in peers else {}
    one.setdefault("title", f"MONITAUR: client {client_id}")
    return render_report(one, {client_id: timelines.get(client_id, [])})


# -- from a replay --------------------------------------------------------------------------
def profile_summary(profile: "Profile | None", source: str | None = None) -> dict[str, Any] | None:
    """What the page shows of a calibration profile (plain data)."""
    if profile is None:
        return None
    return {
        "source": source,
        "target_fpr": profile.target_fpr,
        "created_at": profile.created_at,
        "models": {name: {"clients": mp.clients, "events": mp.events, "promise": dict(mp.promise)} for name, mp in profile.models.items()},
    }


def replay_summary(report: Mapping[str, Any], recorder: "TimelineRecorder", profile: "Profile | None", source: str | None = None) -> dict[str, Any]:
    """The page's summary for a replay: its report, the models' thresholds and the flagged clients' peers."""
    summary = dict(report)
    summary["models"] = recorder.models
    summary["profile"] = profile_summary(profile, source)
    if not summary.get("groups") and recorder.peers:  # peers where no group was found
        summary["peers"] = recorder.peers
    return summary


def write_replay_html(
    path: str | Path, report: Mapping[str, Any], recorder: "TimelineRecorder", profile: "Profile | None", source: str | None = None
) -> int:
    """Render a replay's page and write it atomically to ``path``; return its size in bytes."""
    summary = replay_summary(report, recorder, profile, source)
    flagged = _flagged(summary.get("clients") or {})[:MAX_TIMELINES]
    data = render_report(summary, recorder.timelines(flagged)).encode("utf-8")
    atomic_write_bytes(Path(path), data)
    return len(data)
