"""The runbook, served by the exporter at ``GET /runbook``: where every alert's link leads by default.

The runbook is ``exporter/runbook.md``, shipped inside the package so that the exporter
can serve it wherever it runs (the container image has no docs/ directory). It is
rendered to HTML by the small subset of Markdown it uses: headings (each with the
anchor GitHub would give it, which the alerts' ``runbook_url`` names: the alert name in
lower case), paragraphs, bullet and numbered lists, tables, fenced code, inline code,
bold and links. Every piece of text is HTML-escaped; the document is ours, not a client's.
"""

from __future__ import annotations

import html
import re
from functools import lru_cache
from importlib import resources

_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*|\[([^\]]+)\]\(([^)\s]+)\)")


def source() -> str:
    """The runbook's Markdown text."""
    return resources.files("exporter").joinpath("runbook.md").read_text(encoding="utf-8")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _inline(text: str) -> str:
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        code, bold, label, url = m.groups()
        if code is not None:
            out.append(f"<code>{html.escape(code)}</code>")
        elif bold is not None:
            out.append(f"<b>{html.escape(bold)}</b>")
        else:
            safe = url if url.startswith(("#", "http://", "https://")) else "#"
            out.append(f'<a href="{html.escape(safe)}">{html.escape(label)}</a>')
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def to_html(markdown: str, title: str = "MONITAUR runbook") -> str:
    """The runbook's Markdown subset as one self-contained HTML page."""
    body: list[str] = []
    para: list[str] = []
    lines = markdown.splitlines()
    i = 0

    def flush() -> None:
        if para:
            body.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if m := re.match(r"^(#{1,4}) +(.*?) *$", line):
            flush()
            level, text = len(m.group(1)), m.group(2)
            body.append(f'<h{level} id="{anchor(text)}">{_inline(text)}</h{level}>')
        elif stripped.startswith("```"):
            flush()
            block = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                block.append(lines[i])
                i += 1
            body.append(f"<pre><code>{html.escape(chr(10).join(block))}</code></pre>")
        elif stripped.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            i -= 1
            head, *rest = rows or [[]]
            body.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest) + "</table>")
        elif m := re.match(r"^( *)(- |\d+\. )(.*)$", line):
            flush()
            tag = "ol" if m.group(2)[0].isdigit() else "ul"
            items: list[str] = []
            while i < len(lines) and lines[i].strip():
                item = re.match(r"^ *(?:- |\d+\. )(.*)$", lines[i])
                if item and len(lines[i]) - len(lines[i].lstrip()) <= len(m.group(1)):
                    items.append(item.group(1))
                elif items:
                    items[-1] += " " + lines[i].strip()
                i += 1
            body.append(f"<{tag}>" + "".join(f"<li>{_inline(t)}</li>" for t in items) + f"</{tag}>")
            continue
        elif not stripped or stripped == "---":
            flush()
            if stripped == "---":
                body.append("<hr>")
        else:
            para.append(stripped)
        i += 1
    flush()
    style = ("body{font-family:sans-serif;max-width:60em;margin:auto;padding:1em;line-height:1.45}"
             "code,pre{background:#f4f4f4}pre{padding:.5em;overflow-x:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}h2{border-top:1px solid #ddd;padding-top:.5em}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


@lru_cache(maxsize=1)
def page() -> bytes:
    """The rendered runbook (built once per process)."""
    return to_html(source()).encode("utf-8")
