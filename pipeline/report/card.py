"""OUT/README.md: the dataset card, written from report.json so it never disagrees with the data."""
from __future__ import annotations

from pipeline.io import outdir

TOP_COUNTRIES = 20


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_card(rep: dict) -> str:
    cfg = rep["config"]
    parts = cfg["parts"]
    sample_rows = [[part, *(rep["samples"].get(part, {}).get(s, 0) for s in ("train", "val", "test")),
                    rep["samples"].get(part, {}).get("total", 0), rep["shards"].get(part, 0)] for part in parts]
    countries = sorted(rep["countries"].items(), key=lambda kv: (-kv[1]["total"], kv[0]))[:TOP_COUNTRIES]
    reject_rows = [[stage, reason, n] for stage, reasons in rep["rejected"].items() for reason, n in reasons.items()]
    plots = rep.get("plots") or []
    return "\n\n".join(filter(None, [
        "# MG-Geo corpus",
        "Geolocation training data in the layout of GaGA (arXiv 2412.08907), built by the MG-Geo pipeline. "
        "Parts: **meta** (image + location hierarchy as question-answer turns), **clue** (visual clues an LVLM "
        "wrote knowing the true location), **dialogue** (guess, user correction, revision).",
        "## Layout\n"
        "- `{part}/{split}/{part}-{split}-NNNNNN.tar`: WebDataset shards, members `KEY.jpg` (RGB JPEG, longer side "
        f"<= {cfg['max_side']} px, no metadata; a source JPEG that needed no change keeps its own compressed data, "
        "`image.jpeg_copied` in the json) and `KEY.json` (the record, schema `schemas/record.schema.json`).\n"
        "- `manifest.parquet`: one row per sample. `rejected.parquet`: every input that did not become a sample, "
        "with stage and reason. `report.json`: all counts.\n"
        "- Load: `webdataset.WebDataset('meta/train/meta-train-{000000..000009}.tar').decode('pil')`.",
        "## Samples\n" + _table(["part", "train", "val", "test", "total", "shards"], sample_rows),
        f"Inputs: {rep['inputs_total']}; rejected: {rep['rejected_total']}; every input accounted for: "
        f"{'yes' if rep['conservation_ok'] else '**NO**'}.",
        "## Countries (top %d of %d)\n" % (len(countries), len(rep["countries"]))
        + _table(["country", "train", "val", "test", "total"],
                 [[cc, c.get("train", 0), c.get("val", 0), c.get("test", 0), c["total"]] for cc, c in countries]),
        "## Rejections\n" + (_table(["stage", "reason", "count"], reject_rows) if reject_rows else "None."),
        "## Plots\n" + "\n".join(f"![{p}]({p})" for p in plots) if plots else "",
        "## How it was made\n"
        f"- Labels: reverse_geocoder nearest place (as OSV-5M) for city/admin; country from Natural Earth "
        f"1:10m polygons, {rep['country_disagreements']} samples where the two disagree are flagged "
        "(`location.country_disagreement`).\n"
        f"- Split by geographic clusters (photos within {cfg['split_link_km']} km share a split), ratios "
        f"{cfg['split_ratios']}.\n"
        f"- Exact and near duplicates (perceptual hash, Hamming radius {cfg['dedupe_radius']}) removed.\n"
        f"- Sources: {', '.join(cfg['sources'])}.",
        "## Licence\nThe images keep the licences of their sources; check each source before redistributing.",
    ])) + "\n"


def write_card(config, rep: dict) -> None:
    outdir.write_text(outdir.join(config.out, "README.md"), render_card(rep))
