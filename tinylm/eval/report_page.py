"""The run report as a page: one self-contained HTML file, and the same in markdown.

The HTML needs nothing outside itself (no scripts, no fonts, no links to fetch): its styles are inline
and each stage's loss curves are an SVG figure drawn here, training loss as a line and validation loss
as points on it, on axes with round-numbered ticks. The browser draws its text, so Chinese run names
and samples show as they are. The markdown holds the same tables and links each stage's loss.png
(drawn by the trainer), relative to where the report is written.
"""

from __future__ import annotations

import math
import os
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tinylm.eval.report import Report, Stage, Table

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.wide { white-space: pre-wrap; max-width: 38em; }
figure { margin: 0.5em 0; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 13px; }
svg text { font: 12px system-ui, sans-serif; fill: #333; }
"""
TRAIN_COLOUR, VAL_COLOUR = "#1f77b4", "#ff7f0e"


# -- HTML -----------------------------------------------------------------------------------------


def render_html(report: Report) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(report.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(report.title)}</h1>",
        f"<p>Run directory: <code>{escape(str(report.run_dir))}</code></p>",
        "<h2>Overview</h2>",
        *(html_table(table) for table in report.tables),
    ]
    for stage in report.stages:
        parts += [f"<h2>Stage {escape(stage.name)}: {escape(stage.kind)}</h2>", html_figure(stage)]
        parts += [html_table(table) for table in stage.tables]
        parts.append(f"<details><summary>config.yaml</summary><pre>{escape(stage.config_text)}</pre></details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def html_table(table: Table) -> str:
    if not table.rows:
        return ""
    cell = '<td class="wide">' if table.wide else "<td>"
    header = "".join(f"<th>{escape(c)}</th>" for c in table.columns) if any(table.columns) else ""
    rows = "".join("<tr>" + "".join(f"{cell}{escape(str(v))}</td>" for v in row) + "</tr>" for row in table.rows)
    return f"<h3>{escape(table.title)}</h3><table>" + (f"<tr>{header}</tr>" if header else "") + f"{rows}</table>"


def html_figure(stage: Stage) -> str:
    if stage.curve("reward"):  # reinforcement learning: its loss says little, its reward and accuracy say it all
        held = stage.curve("heldout/accuracy") or stage.curve("val_reward")
        labels = ("training reward", "held-out accuracy" if stage.curve("heldout/accuracy") else "held-out reward")
        svg = loss_svg(stage.curve("reward"), held, f"{stage.name}: reward", labels, "reward / accuracy")
    else:
        svg = loss_svg(stage.curve("loss"), stage.curve("val_loss"), f"{stage.name}: loss")
    return f"<figure>{svg}</figure>" if svg else "<p>No losses logged yet.</p>"


# -- the loss curves as SVG -----------------------------------------------------------------------

WIDTH, HEIGHT = 720, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 28, 44  # the plot's margins: tick labels, the legend, the title, the axis title


def loss_svg(
    train: list[tuple[float, float]],
    val: list[tuple[float, float]],
    title: str,
    labels: tuple[str, str] = ("training loss", "validation loss"),
    axis: str = "loss",
) -> str:
    """Training loss (a line) and validation loss (points joined by a line) against step, as SVG (or
    any two such curves, named by ``labels``, on an ``axis``)."""
    points = train + val
    if not points:
        return ""
    last = max(max(p[0] for p in points), 1)  # steps run from 0 to the last one logged, ticks inside
    xs = [tick for tick in nice_ticks(0, last) if tick <= last]
    ys = nice_ticks(min(p[1] for p in points), max(p[1] for p in points))

    def x(step: float) -> float:
        return LEFT + step / last * (WIDTH - LEFT - RIGHT)

    def y(loss: float) -> float:
        return HEIGHT - BOTTOM - (loss - ys[0]) / (ys[-1] - ys[0]) * (HEIGHT - TOP - BOTTOM)

    right, bottom = WIDTH - RIGHT, HEIGHT - BOTTOM
    parts = [
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
        f'<text x="{LEFT}" y="{TOP - 10}" style="font-weight:600">{escape(title)}</text>',
    ]
    for tick in ys:
        parts.append(f'<line x1="{LEFT}" x2="{right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick_label(tick, ys)}</text>')
    for tick in xs:
        parts.append(f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{TOP}" y2="{bottom}" stroke="#f0f0f0"/>')
        parts.append(f'<text x="{x(tick):.1f}" y="{bottom + 16}" text-anchor="middle">{tick_label(tick, xs)}</text>')
    parts += [
        f'<rect x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}" fill="none" stroke="#999"/>',
        f'<text x="{(LEFT + right) / 2}" y="{HEIGHT - 6}" text-anchor="middle">step</text>',
        f'<text transform="translate(14 {(TOP + bottom) / 2}) rotate(-90)" text-anchor="middle">{escape(axis)}</text>',
    ]
    if train:
        parts.append(polyline(train, x, y, TRAIN_COLOUR, 1.5))
    if val:
        parts.append(polyline(val, x, y, VAL_COLOUR, 1.5))
        parts += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3" fill="{VAL_COLOUR}"/>' for s, v in val]
    legend = [(labels[0], TRAIN_COLOUR, train), (labels[1], VAL_COLOUR, val)]
    for row, (label, colour, _) in enumerate(item for item in legend if item[2]):
        top = TOP + 12 + 20 * row
        parts.append(
            f'<line x1="{right + 12}" x2="{right + 36}" y1="{top}" y2="{top}" stroke="{colour}" stroke-width="3"/>'
        )
        parts.append(f'<text x="{right + 42}" y="{top + 4}">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def polyline(points, x, y, colour: str, width: float) -> str:
    coordinates = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    return f'<polyline points="{coordinates}" fill="none" stroke="{colour}" stroke-width="{width}"/>'


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round-numbered ticks (steps of 1, 2 or 5 times a power of ten) from at or below ``low`` to at or
    above ``high``, about ``count`` of them."""
    if high <= low:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / (count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first, last = math.floor(low / step), math.ceil(high / step)
    return [i * step for i in range(first, last + 1)]


def tick_label(value: float, ticks: list[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:,.{decimals}f}"


# -- markdown -------------------------------------------------------------------------------------


def render_markdown(report: Report, out_dir: Path) -> str:
    """The same report in markdown; ``out_dir``: where it is written (its figure links are relative)."""
    lines = [f"# {report.title}", "", f"Run directory: `{report.run_dir}`", "", "## Overview", ""]
    lines += [text for table in report.tables for text in markdown_table(table)]
    for stage in report.stages:
        lines += [f"## Stage {stage.name}: {stage.kind}", ""]
        for image, what in (("loss.png", "loss curves"), ("rewards.png", "reward and held-out accuracy")):
            if (stage.path / image).is_file():
                link = Path(os.path.relpath(stage.path / image, out_dir)).as_posix()
                lines += [f"![{what} of {stage.name}]({link})", ""]
        lines += [text for table in stage.tables for text in markdown_table(table)]
        lines += [
            "<details><summary>config.yaml</summary>",
            "",
            "```yaml",
            stage.config_text.rstrip(),
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


def markdown_table(table: Table) -> list[str]:
    if not table.rows:
        return []
    columns = [c or " " for c in table.columns]
    lines = [f"### {table.title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(markdown_cell(v) for v in row) + " |" for row in table.rows]
    return [*lines, ""]


def markdown_cell(value) -> str:
    """Text as one table cell: tags shown, not obeyed; ``|`` escaped; line breaks as <br>."""
    return escape(str(value), quote=False).replace("|", "\\|").replace("\n", "<br>")
