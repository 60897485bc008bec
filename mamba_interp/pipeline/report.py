"""``report.html``: one self-contained page per run (figures embedded as base64 PNG, no external files).

Built only from what is on disk (``manifest.json`` and every ``step_NN_*/result.json``), so it can be rebuilt
at any time with ``mamba-interp report OUT``. A file that cannot be read or shown never stops the report: its step
is shown as ``unreadable`` with the reason. Layout: run header (model, device, seed, versions); a summary (what a
reader must notice: failed steps, a model at chance (step 1's ``chance_warning``), every step's
``metrics["warnings"]``; then the run's findings, one line per completed step from its reading); an index of steps
with status and time; then one section per step: status, the generated reading, figures, feature dashboards
(a step's ``feature_dashboards.json``), and its metrics tables (tables longer than ``COLLAPSE_ROWS`` rows are
collapsed, wide ones scroll inside their section).
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path
from typing import Any

from mamba_interp.pipeline.report_dashboards import dashboards_html
from mamba_interp.utils.io import atomic_write_text

MAX_ROWS = 400  # metric rows per step shown in the table; the rest stay in result.json
MAX_LIST = 12  # list items shown inline
COLLAPSE_ROWS = 20  # longer tables are folded into <details>
FINDING_CHARS = 280  # a finding line: the reading's first sentence, cut at this length
DASHBOARDS_FILE = "feature_dashboards.json"

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px} h2{font-size:1.25em;margin:0 0 8px} h3{font-size:1em;margin:14px 0 6px}
section{background:#fff;border:1px solid #dfe3ea;border-radius:8px;padding:16px 20px;margin:16px 0}
table{border-collapse:collapse;font-size:.86em;width:100%} td,th{padding:3px 8px;border-bottom:1px solid #eef0f4;
text-align:left;vertical-align:top} th{background:#f1f3f7} td.num{font-family:ui-monospace,Menlo,monospace}
.status{display:inline-block;padding:1px 8px;border-radius:10px;font-size:.8em;font-weight:600;color:#fff}
.completed{background:#2e8b57}.failed,.unreadable{background:#c0392b}.skipped{background:#8a8f98}.running,
.interrupted,.pending{background:#d68910}
.reading{background:#f3f7ff;border-left:4px solid #4a78d0;padding:8px 12px;margin:8px 0;line-height:1.45}
img{max-width:100%;border:1px solid #eef0f4;margin:6px 0} pre{white-space:pre-wrap;font-size:.8em;
background:#fbf3f2;padding:8px;border-radius:4px;max-height:320px;overflow:auto}
.meta{color:#5d6778;font-size:.88em} a{color:#2a5db0}
.scroll{overflow-x:auto;max-width:100%} .scroll table{width:auto;min-width:50%}
.notice{background:#fff6e5;border-left:4px solid #d68910;padding:8px 12px;margin:8px 0}
.notice li,.findings li{margin:3px 0;line-height:1.4} .findings{padding-left:20px}
details>summary{cursor:pointer;color:#2a5db0;margin:6px 0}
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.4g}"
    if isinstance(value, list):
        shown = ", ".join(_fmt(v) for v in value[:MAX_LIST])
        if len(value) > MAX_LIST:
            return f"[{shown}, …] ({len(value)})"
        return f"[{shown}]"
    if value is None:
        return "—"
    return str(value)


def flatten(metrics: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts -> ``[("a.b.c", value)]``; lists stay values (shown truncated)."""
    rows: list[tuple[str, Any]] = []
    if isinstance(metrics, dict):
        for k, v in metrics.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                rows.extend(flatten(v, key))
            else:
                rows.append((key, v))
    else:
        rows.append((prefix, metrics))
    return rows


def _is_grid(node: Any) -> bool:
    """A dict of >= 2 dicts sharing the same scalar-valued keys: shown as one table (rows x columns)."""
    if not isinstance(node, dict) or len(node) < 2 or not all(isinstance(v, dict) and v for v in node.values()):
        return False
    keys = [tuple(v) for v in node.values()]
    return len(set(keys)) == 1 and all(not isinstance(x, dict) for v in node.values() for x in v.values())


def split_tables(metrics: Any, prefix: str = "") -> tuple[list[tuple[str, Any]], list[tuple[str, dict]]]:
    """Scalar rows ``[("a.b", value)]`` and grids ``[("a.c", {row: {col: value}})]`` (see :func:`_is_grid`)."""
    rows: list[tuple[str, Any]] = []
    grids: list[tuple[str, dict]] = []
    if isinstance(metrics, dict):
        for k, v in metrics.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if _is_grid(v):
                grids.append((key, v))
            elif isinstance(v, dict) and v:
                r, g = split_tables(v, key)
                rows += r
                grids += g
            else:
                rows.append((key, v))
    else:
        rows.append((prefix, metrics))
    return rows, grids


def _table(head: list[str], rows: list[list[str]], title: str = "") -> str:
    """A table (cells already escaped) that scrolls sideways inside its section and folds when long."""
    header = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(rows_) + "</tr>" for rows_ in rows)
    table = f'<div class="scroll"><table><tr>{header}</tr>{body}</table></div>'
    heading = f"<h3>{title}</h3>" if title else ""
    if len(rows) > COLLAPSE_ROWS:
        label = html.escape(re.sub("<[^>]+>", "", title) or "table")
        return f"{heading}<details><summary>{len(rows)} rows of {label} (click to show)</summary>{table}</details>"
    return heading + table


def first_sentence(text: str, limit: int = FINDING_CHARS) -> str:
    """The first sentence of a reading (a split after ., ! or ? followed by a capital or a digit), shortened."""
    text = " ".join(str(text).split())
    head = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9(])", text, maxsplit=1)[0]
    return head if len(head) <= limit else head[: limit - 1].rstrip() + "…"


def _notices(index: list[dict], by_folder: dict[str, dict]) -> list[str]:
    """What a reader must notice, in step order: failed steps, a model at chance, the steps' own warnings."""
    out = []
    for entry in index:
        res = by_folder.get(str(entry.get("folder", "")), {})
        label = f'step {entry.get("step")} ({entry.get("name")})'
        if (entry.get("status") or res.get("status")) == "failed":
            out.append(f"{label} failed: {entry.get('reason') or (res.get('error') or {}).get('message', '')}")
        metrics = res.get("metrics") if isinstance(res.get("metrics"), dict) else {}
        if isinstance(metrics.get("chance_warning"), str) and metrics["chance_warning"]:
            out.append(f"{label}: {metrics['chance_warning']}")
        warnings = metrics.get("warnings")
        if isinstance(warnings, list):
            out += [f"{label}: {w}" for w in warnings if isinstance(w, str) and w]
    return out


def _summary(index: list[dict], by_folder: dict[str, dict]) -> str:
    """The page's first section: notices, then one finding per completed step."""
    e = html.escape
    index = [entry for entry in index if isinstance(entry, dict)]
    parts = ['<section id="summary"><h2>Summary</h2>']
    notices = _notices(index, by_folder)
    if notices:
        parts.append('<div class="notice"><b>Notice</b><ul>' + "".join(f"<li>{e(n)}</li>" for n in notices)
                     + "</ul></div>")
    findings = []
    for entry in index:
        res = by_folder.get(str(entry.get("folder", "")), {})
        if res.get("status") == "completed" and res.get("reading"):
            findings.append(f'<li><a href="#step-{entry.get("step")}">Step {entry.get("step")} '
                            f'{e(str(entry.get("name")))}</a>: {e(first_sentence(res["reading"]))}</li>')
    if findings:
        parts.append('<h3>Findings</h3><ul class="findings">' + "".join(findings) + "</ul>")
    else:
        parts.append('<p class="meta">No step has completed yet.</p>')
    parts.append("</section>")
    return "\n".join(parts)


def _dashboards(folder: Path) -> str:
    """The feature dashboards a step wrote (``feature_dashboards.json``), or a note why they cannot be shown."""
    path = folder / DASHBOARDS_FILE
    try:
        cards = json.loads(path.read_text(encoding="utf-8"))
        body = dashboards_html(cards) if cards else '<p class="meta">no latent was selected</p>'
    except Exception as exc:  # a broken file costs its dashboards, never the report
        body = f'<p class="meta">{DASHBOARDS_FILE} could not be shown ({html.escape(type(exc).__name__)})</p>'
    return f'<h3 id="dashboards-{html.escape(folder.name)}">feature dashboards</h3>{body}'


def _img(path: Path) -> str:
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as exc:
        return f'<p class="meta">{html.escape(path.name)} could not be read ({html.escape(type(exc).__name__)})</p>'
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the JSON object in ``path``, None) or (None, why it cannot be read)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"{path.name} could not be read ({type(exc).__name__}: {detail})"
    if not isinstance(data, dict):
        return None, f"{path.name} holds a {type(data).__name__}, not a JSON object"
    return data, None


def _unreadable(folder: Path, why: str) -> dict[str, Any]:
    """A stand-in result for a step whose ``result.json`` cannot be read or shown."""
    number = folder.name.split("_")[1] if folder.name.count("_") >= 2 else "?"
    return {"step": int(number) if number.isdigit() else number, "name": folder.name.split("_", 2)[-1],
            "status": "unreadable", "error": {"type": "unreadable result", "message": why}}


def _step_section(folder: Path, result: dict[str, Any]) -> str:
    e = html.escape
    n, name, status = result.get("step"), result.get("name", folder.name), result.get("status", "unknown")
    out = [f'<section id="step-{n}"><h2>Step {n}: {e(str(result.get("title") or name))} '
           f'<span class="status {e(status)}">{e(status)}</span></h2>']
    dur = result.get("duration_s")
    meta = [f"folder <code>{e(folder.name)}</code>"]
    if dur is not None:
        meta.append(f"{dur:.1f} s")
    if result.get("device"):
        meta.append(f"device {e(str(result['device']))}, batch {result.get('batch_size')}")
    out.append(f'<p class="meta">{" · ".join(meta)}</p>')
    for fb in result.get("fallbacks") or []:
        out.append(f'<p class="meta">out-of-memory fallback: {e(fb.get("action", ""))} → batch '
                   f'{fb.get("batch_size")} on {e(str(fb.get("device")))}</p>')
    if result.get("reason"):
        out.append(f'<p class="reading">Skipped: {e(result["reason"])}</p>')
    if result.get("error"):
        err = result["error"]
        what = "Not shown" if status == "unreadable" else f'Failed with {e(str(err.get("type", "error")))}'
        out.append(f'<p class="reading">{what}: {e(str(err.get("message", "")))}</p>')
        if err.get("traceback"):
            out.append(f"<details><summary>traceback</summary><pre>{e(err['traceback'])}</pre></details>")
    if result.get("reading"):
        out.append(f'<div class="reading">{e(result["reading"])}</div>')
    for art in result.get("artifacts") or []:
        p = folder / art
        if p.suffix.lower() == ".png":  # a listed figure that cannot be read is said to be missing
            out.append(f"<h3>{e(p.stem.replace('_', ' '))}</h3>{_img(p)}")
    if DASHBOARDS_FILE in (result.get("artifacts") or []):
        out.append(_dashboards(folder))
    rows, grids = split_tables(result.get("metrics") or {})
    if rows:
        cells = [[f"<td>{e(key)}</td>", f'<td class="num">{e(_fmt(value))}</td>'] for key, value in rows[:MAX_ROWS]]
        out.append(_table(["metric", "value"], cells, "metrics"))
        if len(rows) > MAX_ROWS:
            out.append(f'<p class="meta">{len(rows) - MAX_ROWS} more rows in result.json</p>')
    for key, grid in grids:
        cols = list(next(iter(grid.values())))
        cells = [[f"<td>{e(str(name))}</td>"] + [f'<td class="num">{e(_fmt(row[c]))}</td>' for c in cols]
                 for name, row in grid.items()]
        out.append(_table([""] + [e(str(c)) for c in cols], cells, e(key)))
    others = [a for a in (result.get("artifacts") or []) if not a.lower().endswith(".png")]
    if others:
        out.append(f'<p class="meta">files: {", ".join(e(a) for a in others)}</p>')
    out.append("</section>")
    return "\n".join(out)


def build_report(out_dir: str | Path) -> str:
    """The HTML text of the report for the run in ``out_dir``."""
    out = Path(out_dir)
    e = html.escape
    manifest: dict[str, Any] = {}
    problems: list[str] = []
    mpath = out / "manifest.json"
    if mpath.exists():
        manifest, why = _read_json(mpath)
        manifest = manifest or {}
        if why:
            problems.append(why)
    results: list[tuple[Path, dict[str, Any]]] = []
    for folder in sorted(out.glob("step_*")):
        rp = folder / "result.json"
        if folder.is_dir() and os.path.lexists(rp):
            data, why = _read_json(rp)
            results.append((folder, data if data is not None else _unreadable(folder, str(why))))
    by_folder = {f.name: r for f, r in results}
    model = manifest.get("model", {})
    title = f"mamba_interp report: {model.get('name', out.name)}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{CSS}</style></head><body><main>", f"<h1>{e(title)}</h1>"]
    parts += [f'<p class="reading">{e(p)}</p>' for p in problems]
    if manifest:
        versions = manifest.get("versions", {})
        git = manifest.get("git") or {}
        facts = [
            f"run status <b>{e(str(manifest.get('status')))}</b>",
            f"updated {e(str(manifest.get('updated_at')))}",
            f"model {e(str(model.get('spec')))} ({e(str(model.get('arch')))}, {model.get('n_layer')} layers, "
            f"fingerprint {e(str(model.get('fingerprint')))})",
            f"device {e(str(manifest.get('device', {}).get('name')))}",
            f"dtype {e(str(manifest.get('dtype')))}",
            f"seed {manifest.get('seed')}",
            f"layers {e(str(manifest.get('layers')))}",
        ]
        libs = [f"{name} {e(str(versions.get(name)))}" for name in ("torch", "transformers", "python")]
        if git:
            libs.append(f"git {e(str(git.get('revision'))[:12])}" + (" (dirty)" if git.get("dirty") else ""))
        parts.append(f'<p class="meta">{" · ".join(facts)}<br>{" · ".join(libs)}</p>')
    # index: the manifest's steps (planned in this run), else whatever is on disk
    index = manifest.get("steps") or [
        {"step": r.get("step"), "name": r.get("name"), "status": r.get("status"), "duration_s": r.get("duration_s"),
         "folder": f.name} for f, r in results
    ]
    try:
        parts.append(_summary(index, by_folder))
    except Exception as exc:  # a manifest or result with fields of the wrong kind: the sections still show
        parts.append(f'<p class="reading">The summary could not be built ({e(type(exc).__name__)}: {e(str(exc))})</p>')
    parts.append("<section><h2>Steps</h2><table><tr><th>#</th><th>step</th><th>status</th><th>time</th>"
                 "<th>note</th></tr>")
    for entry in index:
        if not isinstance(entry, dict):
            continue
        folder = entry.get("folder", "")
        res = by_folder.get(folder, {})
        status = entry.get("status") or res.get("status", "")
        if res.get("status") == "unreadable":
            status = "unreadable"
        dur = entry.get("duration_s")
        dur = dur if isinstance(dur, (int, float)) else None
        note = "resumed" if entry.get("resumed") else (entry.get("reason") or "")
        parts.append(
            f'<tr><td>{entry.get("step")}</td><td><a href="#step-{entry.get("step")}">{e(str(entry.get("name")))}'
            f'</a></td><td><span class="status {e(str(status))}">{e(str(status))}</span></td>'
            f'<td class="num">{"" if dur is None else f"{dur:.1f} s"}</td><td>{e(str(note))}</td></tr>'
        )
    parts.append("</table></section>")
    listed = {entry.get("folder") for entry in index if isinstance(entry, dict)}
    for folder, result in results:
        if folder.name in listed:  # a folder left by an earlier run with other steps is not this run's result
            try:
                parts.append(_step_section(folder, result))
            except Exception as exc:  # a result.json with fields of the wrong kind: say so, show the others
                why = f"result.json could not be shown ({type(exc).__name__}: {exc})"
                parts.append(_step_section(folder, _unreadable(folder, why)))
    if manifest:
        cfg = json.dumps(manifest.get("config", {}), indent=2)
        parts.append(f"<section><h2>Configuration</h2><pre>{e(cfg)}</pre></section>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def write_report(out_dir: str | Path) -> Path:
    """Write ``out_dir/report.html`` atomically and return its path."""
    target = Path(out_dir) / "report.html"
    atomic_write_text(target, build_report(out_dir))
    return target
