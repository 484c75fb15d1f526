"""The critique's two outputs: ``report.json`` (every figure, for scripts and CI) and ``report.html``
(one self-contained page a person reads).

The page needs nothing but itself: styles inline, plots embedded as PNG data URIs, no scripts, no
fonts or files fetched — it opens from a mail attachment or an air-gapped machine alike. It starts
with what is worrying (every ``bad`` and ``warn`` finding, lens by lens), then gives each lens its
section: what was measured and how, the findings, every number with the sentence that explains it,
tables and pictures. Skipped lenses say what to provide.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from lmlab.config import write_json_atomic, write_text_atomic
from lmlab.critique.core import Section

_BADGE = {"bad": "worrying", "warn": "worth a look", "good": "good", "info": "note"}

_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:980px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:20px;margin:0 0 6px}h3{font-size:15px;margin:18px 0 6px}
.sub{color:#5b6475;margin:0 0 18px}
section{background:#fff;border:1px solid #e2e5ea;border-radius:8px;padding:18px 22px;margin:18px 0}
.method{color:#3b4352}.skip{color:#5b6475;font-style:italic}
.finding{border-left:4px solid #999;padding:6px 10px;margin:6px 0;border-radius:3px;background:#fafbfc}
.finding.bad{border-color:#c62828;background:#fdecea}.finding.warn{border-color:#ef8f00;background:#fff5e5}
.finding.good{border-color:#2e7d32;background:#edf7ee}.finding.info{border-color:#5c7cfa;background:#eef2ff}
.badge{font-size:12px;font-weight:600;text-transform:uppercase;letter-spacing:.03em;margin-right:8px}
.bad .badge{color:#c62828}.warn .badge{color:#b86e00}.good .badge{color:#2e7d32}.info .badge{color:#3b5bdb}
table{border-collapse:collapse;margin:6px 0 4px;font-size:13.5px;width:100%}
th,td{border-bottom:1px solid #e8eaee;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.metric td:first-child{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;white-space:nowrap}
figure{margin:14px 0}figure img{max-width:100%;border:1px solid #eceef2;border-radius:4px}
figcaption{color:#4a5263;font-size:13.5px;margin-top:4px}.caption{color:#4a5263;font-size:13.5px}
nav a{margin-right:12px}code{font-size:13px}
"""


def format_value(value: Any) -> str:
    """A number as a person reads it: integers with separators, floats to 4 significant digits."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:,.4g}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _flatten(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar metrics as (dotted name, value); nested dicts are walked (a confidence interval — a dict with
    ``low`` and ``high`` — is one row, "low – high"), lists are left to tables."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and {"low", "high"} <= value.keys():
            rows.append((name, f"{format_value(value['low'])} – {format_value(value['high'])}"))
        elif isinstance(value, dict):
            rows += _flatten(value, name + ".")
        elif isinstance(value, (int, float, str, bool)) or value is None:
            rows.append((name, value))
    return rows


def _explanation(explain: dict[str, str], name: str) -> str:
    """The sentence for a metric: its own, else its nearest named parent's (``ci.accuracy`` → ``ci``)."""
    while name:
        if name in explain:
            return explain[name]
        name = name.rpartition(".")[0]
    return ""


def _section_html(section: Section) -> str:
    e = html.escape
    parts = [f'<section id="{e(section.lens)}"><h2>{e(section.title)}</h2>']
    if section.method:
        parts.append(f'<p class="method">{e(section.method)}</p>')
    if section.skipped is not None:
        parts.append(f'<p class="skip">Skipped: {e(section.skipped)}</p></section>')
        return "".join(parts)
    for f in section.findings:
        parts.append(f'<div class="finding {f.level}"><span class="badge">{_BADGE[f.level]}</span>{e(f.text)}</div>')
    for fig in section.figures:
        parts.append(
            f'<figure><img src="{fig.data_uri()}" alt="{e(fig.title)}">'
            f"<figcaption><b>{e(fig.title)}.</b> {e(fig.caption)}</figcaption></figure>"
        )
    for table in section.tables:
        head = "".join(f"<th>{e(str(c))}</th>" for c in table.columns)
        body = "".join(
            "<tr>"
            + "".join(
                f'<td class="num">{e(format_value(c))}</td>'
                if isinstance(c, (int, float)) and not isinstance(c, bool)
                else f"<td>{e(str(c))}</td>"
                for c in row
            )
            + "</tr>"
            for row in table.rows
        )
        caption = f'<p class="caption">{e(table.caption)}</p>' if table.caption else ""
        parts.append(f"<h3>{e(table.title)}</h3><table><tr>{head}</tr>{body}</table>{caption}")
    rows = _flatten(section.metrics)
    if rows:
        body = "".join(
            f'<tr><td>{e(name)}</td><td class="num">{e(format_value(value))}</td>'
            f"<td>{e(_explanation(section.explain, name))}</td></tr>"
            for name, value in rows
        )
        parts.append(
            '<h3>Every number</h3><table class="metric">'
            f"<tr><th>metric</th><th>value</th><th>what it means</th></tr>{body}</table>"
        )
    parts.append(f'<p class="caption">This lens took {section.seconds:.1f} s.</p></section>')
    return "".join(parts)


def render_html(report: dict[str, Any], sections: list[Section]) -> str:
    """The report page: a header, the worrying findings first, then one section per lens."""
    e = html.escape
    model = report["model"]
    worrying = [(s, f) for s in sections for f in s.findings if f.level in ("bad", "warn")]
    ran = [s for s in sections if s.skipped is None]
    summary = (
        "".join(
            f'<div class="finding {f.level}"><span class="badge">{_BADGE[f.level]}</span>'
            f'<a href="#{e(s.lens)}">{e(s.title)}</a>: {e(f.text)}</div>'
            for s, f in worrying
        )
        or '<div class="finding good"><span class="badge">good</span>'
        "No lens found anything worrying at its stated thresholds.</div>"
    )
    nav = "".join(f'<a href="#{e(s.lens)}">{e(s.title)}</a>' for s in sections)
    skipped = [s for s in sections if s.skipped is not None]
    header = (
        f"<h1>Critique of {e(model['name'])}" + (f" ({e(model['task'])})" if model.get("task") else "") + "</h1>"
        f'<p class="sub">{e(model["arch"])} · {model["parameters"]:,} parameters · '
        f"checkpoint <code>{e(report['checkpoint'])}</code>"
        f" · {e(report['created'])} · lmlab {e(report['lmlab_version'])}</p>"
        f"<p>{len(ran)} of {len(sections)} lenses ran"
        + (f" ({len(skipped)} skipped for want of data: see each)" if skipped else "")
        + (
            f"; {sum(f.level == 'bad' for _, f in worrying)} worrying and "
            f"{sum(f.level == 'warn' for _, f in worrying)} worth-a-look findings.</p>"
        )
    )
    body = "".join(_section_html(s) for s in sections)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>lmlab critique: {e(model['name'])}</title><style>{_CSS}</style></head><body><main>"
        f"{header}<nav>{nav}</nav><section><h2>What to look at first</h2>{summary}</section>{body}"
        "</main></body></html>\n"
    )


def write_report(out: str | Path, report: dict[str, Any], sections: list[Section]) -> tuple[Path, Path]:
    """Write report.json and report.html into ``out`` (each atomically); return their paths."""
    out = Path(out)
    json_path, html_path = out / "report.json", out / "report.html"
    write_json_atomic(json_path, to_json_safe(report))
    write_text_atomic(html_path, render_html(report, sections))
    return json_path, html_path


def summary(report: dict[str, Any]) -> str:
    """A line per lens of a :func:`~lmlab.critique.critique` report: why it was skipped, or its first two
    worrying findings (``nothing worrying`` when none): what ``lmlab critique`` prints."""
    lines = []
    for name, lens in report["lenses"].items():
        if "skipped" in lens:
            lines.append(f"{name:>12}: skipped — {lens['skipped']}")
            continue
        worst = [f for f in lens["findings"] if f["level"] in ("bad", "warn")]
        text = "; ".join(f"{f['level']}: {f['text']}" for f in worst[:2]) if worst else "nothing worrying"
        lines.append(f"{name:>12}: {text}")
    return "\n".join(lines)


def to_json_safe(value: Any) -> Any:
    """NaN/inf become None so that report.json is strict JSON (a browser's JSON.parse reads it)."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    return value
