"""The evaluation's outputs: metrics.json (everything), metrics.md (the tables people read) and
error_cdf.png (share of samples whose error is below d, log-km axis, one curve per run/stage).

Matplotlib is driven through its object API on an Agg canvas, never pyplot: no display is needed
and no global figure state leaks between calls.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.evaluate.metrics import MAX_ERROR_KM, THRESHOLDS_KM, threshold_key

METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"
CDF_PNG = "error_cdf.png"
# (metrics key, column title, kind): "pct" fractions shown as percentages, "num" plain numbers.
COLUMNS = ([("country_accuracy", "Country", "pct"), ("region_accuracy", "Region", "pct"),
            ("city_accuracy", "City", "pct")]
           + [(threshold_key(km), f"<{km:g} km", "pct") for km in THRESHOLDS_KM]
           + [("geoscore", "GeoScore", "num"), ("median_km", "Median km", "num")])
CDF_FLOOR_KM = 0.1  # log axis: errors below this (exact hits included) are drawn at the floor


def _cell(value: Optional[float], kind: str, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    sign = "+" if signed and value > 0 else ""
    if kind == "pct":
        return f"{sign}{100 * value:.1f}"
    return f"{sign}{value:,.1f}"


def _counts(summary: dict) -> str:
    return (f"{summary['samples']} samples: {summary['answered']} answered, "
            f"{summary['unparseable']} unparseable, {summary['missing']} missing")


def markdown_single(report: dict) -> str:
    m = report["metrics"]
    lines = ["# Geolocation evaluation", "", _inputs_line(report), "",
             "| Metric | Value |", "|---|---:|"]
    lines += [f"| {title}{' (%)' if kind == 'pct' else ''} | {_cell(m[key], kind)} |" for key, title, kind in COLUMNS]
    lines += ["", _counts(m) + "."]
    if m["unparseable_reasons"]:
        lines.append("Unparseable: " + ", ".join(f"{k} {v}" for k, v in m["unparseable_reasons"].items()) + ".")
    lines += ["", "Accuracies in %; distance thresholds are strict (error < threshold). Missing and "
              "unparseable answers count as wrong, GeoScore 0, and as the maximum error in the median."]
    return "\n".join(lines) + "\n"


def markdown_interactive(report: dict) -> str:
    head = "| Mode | Stage | n | " + " | ".join(t for _, t, _ in COLUMNS) + " | Unparseable |"
    rule = "|---|---|---:|" + "---:|" * (len(COLUMNS) + 1)
    lines = ["# Interactive (dialogue) evaluation", "", _inputs_line(report), "",
             "## Accuracy by stage", "", head, rule]
    groups = [("all", report)] + sorted(report["by_mode"].items())
    for mode, group in groups:
        for stage, m in group["stages"].items():
            cells = " | ".join(_cell(m[key], kind) for key, _, kind in COLUMNS)
            lines.append(f"| {mode} | {stage.replace('_', ' ')} | {m['samples']} | {cells} | {m['unparseable']} |")
    lines += ["", "## Gain after corrections", "",
              "Change from the first guess on the same dialogues (percentage points; median km: negative is better).",
              "", head.replace(" Unparseable |", "").replace("| Stage |", "| After |"), rule[:-5]]
    for mode, group in groups:
        for stage, gain in group["gains"].items():
            cells = " | ".join(_cell(gain.get(key), kind, signed=True) for key, _, kind in COLUMNS)
            lines.append(f"| {mode} | {stage.replace('_', ' ')} | {gain['samples']} | {cells} |")
    lines += ["", "Accuracies in %; distance thresholds are strict. Missing and unparseable answers count "
              "as wrong. Mode: the dialogue's correction mode (samples that state none are labelled by "
              "the turns fed; `mixed` = turns of several modes)."]
    return "\n".join(lines) + "\n"


def _inputs_line(report: dict) -> str:
    inputs = report.get("inputs", {})
    return "Inputs: " + ", ".join(f"{k} `{v}`" for k, v in inputs.items() if v not in (None, "")) + "."


def plot_error_cdf(path: Path, curves: dict[str, list[Optional[float]]], title: str) -> None:
    """One step curve per label: fraction of *all* samples (unanswered included, they never
    arrive) whose error is below d, on a log km axis with the reporting thresholds marked."""
    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, distances in curves.items():
        n = len(distances)
        answered = np.sort(np.array([d for d in distances if d is not None], dtype=np.float64))
        if not n:
            continue
        xs = np.concatenate([[CDF_FLOOR_KM], np.maximum(answered, CDF_FLOOR_KM), [MAX_ERROR_KM]])
        ys = np.concatenate([[0.0], np.arange(1, len(answered) + 1) / n, [len(answered) / n]])
        ax.step(xs, ys, where="post", label=f"{label.replace('_', ' ')} (n={n})")
    for km in THRESHOLDS_KM:
        ax.axvline(km, color="0.75", linestyle=":", linewidth=1)
        ax.text(km, 1.01, f"{km:g}", ha="center", va="bottom", fontsize=8, color="0.4")
    ax.set_xscale("log")
    ax.set_xlim(CDF_FLOOR_KM, MAX_ERROR_KM)
    ax.set_ylim(0, 1)
    ax.set_xlabel("error distance (km, log scale)")
    ax.set_ylabel("fraction of samples with error < d")
    ax.set_title(title, pad=14)
    ax.grid(True, which="major", alpha=0.3)
    if curves:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_report(out_dir: str | Path, report: dict, curves: dict[str, list[Optional[float]]]) -> dict[str, Path]:
    """metrics.json, metrics.md and error_cdf.png in out_dir (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / METRICS_JSON, "markdown": out / METRICS_MD, "cdf": out / CDF_PNG}
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                             encoding="utf-8")
    interactive = report.get("kind") == "interactive"
    text = markdown_interactive(report) if interactive else markdown_single(report)
    paths["markdown"].write_text(text, encoding="utf-8")
    title = "Error distance CDF" + (" by dialogue stage" if interactive else "")
    plot_error_cdf(paths["cdf"], curves, title)
    return paths
