"""The report's self-contained HTML page: tables, and the figures embedded as PNG."""

from __future__ import annotations

import base64
import html
from typing import Any

from . import stats
from .analysis import HeldoutAnalysis, RunAnalysis

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
figure { margin: 1em 0 2em; } figcaption { color: #555; font-size: .9em; }
img { max-width: 100%; }
"""

RUN_FIELDS = (("model", "model"), ("data", "data"), ("subset", "subset"), ("epochs", "epochs"),
              ("batch size", "batch_size"), ("optimizer", "optimizer"), ("lr", "lr"),
              ("weight decay", "weight_decay"), ("schedule", "schedule"), ("augment", "augment"),
              ("width", "width"), ("seed", "seed"))


Section = tuple[str, list[str], list[list[str]]]  # heading, column names, rows of plain text


def render_html(analyses: list[RunAnalysis], figures: list[tuple[str, str, bytes]],
                hardware: dict[str, Any], sections: list[Section] = ()) -> str:
    """The whole report as one HTML document; images are inline data: URIs. `sections`: tables a caller adds
    after the runs' (`auto`'s plan, candidates and deployment)."""
    esc = html.escape
    title = "trainforge report: " + ", ".join(a.label for a in analyses)
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>", "<h2>Runs</h2>"]
    header = ["", *[esc(a.label) for a in analyses]]
    body = [["run directory", *[esc(a.run_dir) for a in analyses]],
            ["evaluated on", *[f"{a.split} set, {int(a.heldout.confusion.sum())} images" for a in analyses]],
            ["accuracy (now)", *[f"{100 * a.heldout.accuracy:.2f}%" for a in analyses]],
            ["expected calibration error", *[f"{a.heldout.ece:.4f}" for a in analyses]],
            ["temperature", *[f"{a.temperature:.4g}" for a in analyses]],
            ["accuracy (at the end of training)",
             *[_pct(a.summary.get("test_acc")) for a in analyses]],
            ["training time", *[_seconds(a.summary.get("train_seconds")) for a in analyses]],
            ["samples / s", *[_number(a.summary.get("samples_per_second")) for a in analyses]],
            ["device, precision", *[esc(f"{a.summary.get('device', '?')}, {a.summary.get('precision', '?')}")
                                    for a in analyses]]]
    for name, field in RUN_FIELDS:
        body.append([name, *[esc(_value(getattr(a.config, field))) for a in analyses]])
    parts.append(_table(header, body))
    parts.append("<h2>Per-class precision and recall (95% Wilson intervals)</h2>")
    parts += [heldout_html(a.heldout, f"{a.label}: {a.split} set") for a in analyses]
    for heading, columns, rows in sections:
        parts.append(f"<h2>{esc(heading)}</h2>")
        parts.append(_table([esc(c) for c in columns], [[esc(str(c)) for c in row] for row in rows]))
    figure_sections = {"curves": "Training curves", "fewshot": "Few-shot episodes", "classes": "Classes",
                "worst": "Worst-classified images"}
    for key, heading in figure_sections.items():
        chosen = [(caption, png) for section, caption, png in figures if section == key]
        if chosen:
            parts.append(f"<h2>{heading}</h2>")
        for caption, png in chosen:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{esc(caption)}\">"
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts.append("<h2>Hardware (the machine that made this report)</h2>")
    parts.append(_table(["", "value"], [[esc(k), esc(str(v))] for k, v in hardware.items()]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def heldout_html(heldout: HeldoutAnalysis, title: str) -> str:
    """The per-class table of a HeldoutAnalysis: precision and recall of each class with their 95% intervals and
    image counts, the expected calibration error, and a warning where classes have too few images to be sure."""
    esc, h = html.escape, heldout
    parts = [f"<h3>{esc(title)}</h3>",
             f"<p>Accuracy {h.accuracy:.4f} on {int(h.confusion.sum())} images; expected calibration error "
             f"{h.ece:.4f} ({stats.ECE_BINS} confidence bins).</p>"]
    if h.uncertain:
        named = ", ".join(h.uncertain[:10]) + (f" and {len(h.uncertain) - 10} more" if len(h.uncertain) > 10 else "")
        parts.append(f"<p><strong>These figures are uncertain:</strong> {len(h.uncertain)} of {len(h.classes)} "
                     f"classes have fewer than {stats.UNCERTAIN_PER_CLASS} held-out images ({esc(named)}); read "
                     f"the intervals, not the point values.</p>")
    rows = [[esc(row["class"]), _with_interval(row, "precision"), _with_interval(row, "recall")]
            for row in h.per_class]
    parts.append(_table(["class", "precision", "recall"], rows))
    return "\n".join(parts)


def _with_interval(row: dict[str, Any], figure: str) -> str:
    """A figure as "0.93 (0.88–0.96), n = 120", its interval in brackets; "– (n = 0)" for a figure of no images."""
    n = row[f"{figure}_n"]
    if row[figure] is None:
        return "&ndash; (n = 0)"
    low, high = row[f"{figure}_interval"]
    return f"{row[figure]:.2f} ({low:.2f}&ndash;{high:.2f}), n = {n}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + f"<th>{row[0]}</th>" + "".join(f"<td>{c}</td>" for c in row[1:]) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _value(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "?"


def _seconds(value: Any) -> str:
    return f"{value:.1f} s" if isinstance(value, (int, float)) else "?"


def _number(value: Any) -> str:
    return f"{value:,.0f}" if isinstance(value, (int, float)) else "?"
