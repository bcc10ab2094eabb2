"""The benchmark report: ``report.md``, a self-contained ``report.html`` (inline SVG plots) and ``results.json``."""

from __future__ import annotations

import html
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

COLOURS = {"lowbit": "#d62728", "llmcompressor": "#1f77b4", "autoround": "#2ca02c", "hqq": "#9467bd", "fp": "#000000"}


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def zeroshot_mean(cell: dict) -> float | None:
    scores = cell.get("zeroshot") or {}
    values = [metrics["acc"] for metrics in scores.values() if "acc" in metrics]
    return sum(values) / len(values) if values else None


def _by_model(cells: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for cell in cells:
        grouped[cell["key"].split(" | ")[0]].append(cell)
    return grouped


def comparisons(cells: list[dict]) -> list[str]:
    """Sentences stating, per model and scheme, where lowbit's best is ahead of or behind the best peer."""
    lines = []
    for model, group in _by_model(cells).items():
        schemes = sorted({c["scheme"] for c in group if c.get("scheme")})
        for scheme in schemes:
            ok = [c for c in group if c.get("scheme") == scheme and c.get("status") == "ok"]
            ours = [c for c in ok if c.get("tool") == "lowbit"]
            peers = [c for c in ok if c.get("tool") != "lowbit"]
            if not ours or not peers:
                continue
            best_ours = min(ours, key=lambda c: c["perplexity"])
            best_peer = min(peers, key=lambda c: c["perplexity"])
            delta = best_ours["perplexity"] - best_peer["perplexity"]
            verdict = "ahead of" if delta < 0 else "behind"
            where = ""
            if best_peer.get("device") and best_ours.get("device") and best_peer["device"] != best_ours["device"]:
                where = f", run on {best_peer.get('device_name') or best_peer['device']}"
            line = (f"{model} {scheme}: lowbit ({best_ours['method']}) is {verdict} the best peer "
                    f"({best_peer['method']}{where}) in perplexity: {best_ours['perplexity']:.2f} vs {best_peer['perplexity']:.2f} "
                    f"({delta:+.2f}, {100 * delta / best_peer['perplexity']:+.1f}%)")
            zo, zp = zeroshot_mean(best_ours), zeroshot_mean(best_peer)
            if zo is not None and zp is not None:
                line += f"; mean zero-shot accuracy {zo:.4f} vs {zp:.4f} ({zo - zp:+.4f})"
            lines.append(line)
    return lines


def markdown(cells: list[dict]) -> str:
    out = ["# lowbit benchmark", ""]
    for model, group in _by_model(cells).items():
        out += [f"## {model}", ""]
        fp = next((c for c in group if c.get("tool") == "fp"), None)
        if fp:
            out.append(f"Full precision: perplexity {_fmt(fp.get('perplexity'))}, mean zero-shot acc {_fmt(zeroshot_mean(fp), 4)}")
            out.append("")
        devices = Counter(f"{c['device']} ({c['device_name']})" if c.get("device_name") else c["device"]
                          for c in group if c.get("device"))
        if devices:
            out += ["Measured on " + ", ".join(f"{name}: {count} cells" for name, count in devices.items())
                    + " (seconds compare only within one device)", ""]
        mixed = len(devices) > 1  # then every row says where it was quantized and evaluated
        out += ["| scheme | method | tool | status | ppl | KL | top-1 | zero-shot acc | bits/weight | seconds |"
                + (" device |" if mixed else ""), "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if mixed else "")]
        for cell in sorted((c for c in group if c.get("tool") != "fp"), key=lambda c: (c.get("scheme", ""), c.get("method", ""))):
            status = cell.get("status")
            reason = " ".join((cell.get("reason") or "").replace("|", "/").split())  # one line, no table breaks
            note = "" if status == "ok" else f" ({reason[:120]})"
            out.append(f"| {cell.get('scheme')} | {cell.get('method')} | {cell.get('tool', '')} | {status}{note} | "
                       f"{_fmt(cell.get('perplexity'))} | {_fmt(cell.get('kl_divergence'), 4)} | {_fmt(cell.get('top1_agreement'), 3)} | "
                       f"{_fmt(zeroshot_mean(cell), 4)} | {_fmt(cell.get('bits_per_weight'), 3)} | {_fmt(cell.get('seconds'), 0)} |"
                       + (f" {cell.get('device_name') or cell.get('device') or '-'} |" if mixed else ""))
        tasks = sorted({t for c in group for t in (c.get("zeroshot") or {})})
        if tasks:
            out += ["", "Zero-shot (acc; acc_norm where the task has it; LAMBADA ppl):", "",
                    "| scheme | method | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
            for cell in sorted(group, key=lambda c: (c.get("scheme", ""), c.get("method", ""))):
                scores = cell.get("zeroshot") or {}
                if not scores:
                    continue
                row = []
                for task in tasks:
                    m = scores.get(task, {})
                    parts = [_fmt(m.get("acc"), 3)] + ([_fmt(m["acc_norm"], 3)] if "acc_norm" in m else []) + (
                        [f"ppl {_fmt(m['ppl'])}"] if "ppl" in m else [])
                    row.append(" / ".join(parts))
                out.append(f"| {cell.get('scheme', 'fp')} | {cell.get('method', 'fp')} | " + " | ".join(row) + " |")
        out.append("")
    out += ["## Where lowbit stands", ""] + [f"- {line}" for line in comparisons(cells)] + [""]
    # one entry per tool and environment: a peer run in two places (its venv on the CPU, the GPU image) shows both
    seen: dict[str, list[tuple[str, dict]]] = {}
    for c in cells:
        if c.get("versions"):
            label = c.get("device_name") or c.get("device") or "device not recorded"
            entries = seen.setdefault(c.get("tool"), [])
            if all(v != c["versions"] for _, v in entries):
                entries.append((label, c["versions"]))
    versions: dict[str, dict] = {}
    for tool, entries in seen.items():
        for n, (label, found) in enumerate(entries):
            key = tool if len(entries) == 1 else f"{tool} ({label})"
            versions[key if key not in versions else f"{key} #{n + 1}"] = found
    if versions:
        out += ["## Tool versions", "", "```", json.dumps(versions, indent=2), "```", ""]
    return "\n".join(out)


def scatter_svg(group: list[dict], width: int = 560, height: int = 360) -> str:
    """Perplexity (log scale) against bits per weight, one point per cell, with the Pareto front."""
    points = [(c["bits_per_weight"], c["perplexity"], c) for c in group
              if c.get("status") == "ok" and c.get("bits_per_weight") and c.get("perplexity") and c.get("tool") != "fp"]
    if not points:
        return "<p>no data</p>"
    xs = [p[0] for p in points]
    ys = [math.log10(p[1]) for p in points]
    x0, x1 = min(xs) - 0.2, max(xs) + 0.2
    y0, y1 = min(ys) - 0.05, max(ys) + 0.05
    pad = 50

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y):
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">bits per weight</text>',
             f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">perplexity (log)</text>']
    for tick in sorted(set(round(x, 1) for x in xs)):
        parts.append(f'<text x="{sx(tick):.1f}" y="{height - pad + 14}" text-anchor="middle">{tick:g}</text>')
    for value in sorted({round(10**y, 1) for y in (y0 + 0.05, (y0 + y1) / 2, y1 - 0.05)}):
        parts.append(f'<text x="{pad - 4}" y="{sy(math.log10(value)):.1f}" text-anchor="end">{value:g}</text>')
    front, best = [], float("inf")
    for x, y, _ in sorted(points, key=lambda p: (p[0], p[1])):
        if y < best:
            front.append((x, y))
            best = y
    parts.append('<polyline fill="none" stroke="#999" stroke-dasharray="4 3" points="'
                 + " ".join(f"{sx(x):.1f},{sy(math.log10(y)):.1f}" for x, y in front) + '"/>')
    for x, y, cell in points:
        colour = COLOURS.get(cell.get("tool"), "#555")
        label = html.escape(f"{cell['method']} {cell['scheme']}: ppl {y:.2f}, {x:.3f} bpw")
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(math.log10(y)):.1f}" r="5" fill="{colour}"><title>{label}</title></circle>')
    for i, (tool, colour) in enumerate(COLOURS.items()):
        parts.append(f'<circle cx="{width - 110}" cy="{pad + 14 * i}" r="4" fill="{colour}"/>'
                     f'<text x="{width - 100}" y="{pad + 4 + 14 * i}">{tool}</text>')
    parts.append("</svg>")
    return "".join(parts)


def heatmap_svg(cell: dict, size: int = 16) -> str:
    """log10 relative output error per decoder layer (rows) and linear (columns)."""
    layers = [entry for entry in cell.get("layers", []) if entry.get("output_error")]
    if not layers:
        return "<p>no per-layer errors recorded</p>"
    columns = sorted({entry["name"].rsplit(".", 1)[-1] for entry in layers})
    rows = sorted({entry["layer"] for entry in layers})
    values = {(entry["layer"], entry["name"].rsplit(".", 1)[-1]): math.log10(entry["output_error"]) for entry in layers}
    low, high = min(values.values()), max(values.values())
    left, top = 90, 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + size * len(columns) + 120}" '
             f'height="{top + size * len(rows) + 70}" font-size="10">']
    for j, column in enumerate(columns):
        parts.append(f'<text x="{left + j * size + size / 2}" y="{top + size * len(rows) + 12}" '
                     f'transform="rotate(60 {left + j * size + size / 2} {top + size * len(rows) + 12})">{column}</text>')
    for i, row in enumerate(rows):
        parts.append(f'<text x="{left - 4}" y="{top + i * size + size - 4}" text-anchor="end">layer {row}</text>')
        for j, column in enumerate(columns):
            value = values.get((row, column))
            if value is None:
                continue
            t = 0.0 if high == low else (value - low) / (high - low)
            colour = f"rgb({int(255 * t)},{int(80 + 100 * (1 - t))},{int(255 * (1 - t))})"
            parts.append(f'<rect x="{left + j * size}" y="{top + i * size}" width="{size}" height="{size}" fill="{colour}">'
                         f'<title>layer {row} {column}: {10**value:.3g}</title></rect>')
    parts.append(f'<text x="{left + size * len(columns) + 10}" y="{top + 10}">blue {10**low:.2g}</text>')
    parts.append(f'<text x="{left + size * len(columns) + 10}" y="{top + 24}">red {10**high:.2g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def markdown_to_html_tables(text: str) -> str:
    """A small converter for the report's own markdown (headings, tables, bullet lists, code blocks)."""
    out, in_table, in_code = [], False, False
    for line in text.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-"}:
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out)


def write_report(cells: list[dict], output: Path, heatmap: str | None = None) -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    text = markdown(cells)
    (output / "report.md").write_text(text)
    (output / "results.json").write_text(json.dumps(cells, indent=2, default=str))
    body = [markdown_to_html_tables(text)]
    for model, group in _by_model(cells).items():
        body.append(f"<h2>{html.escape(model)}: perplexity vs bits per weight (dashed: Pareto front)</h2>")
        body.append(scatter_svg(group))
    chosen = next((c for c in cells if c["key"] == heatmap), None) if heatmap else None
    chosen = chosen or next((c for c in cells if c.get("layers")), None)
    if chosen:
        body.append(f"<h2>Per-layer relative output error: {html.escape(chosen['key'])}</h2>")
        body.append(heatmap_svg(chosen))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>lowbit benchmark</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#f3f3f3}</style></head><body>"
            + "\n".join(body) + "</body></html>")
    (output / "report.html").write_text(page)
    return {"markdown": output / "report.md", "html": output / "report.html", "json": output / "results.json"}
