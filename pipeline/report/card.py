"""OUT/README.md: the dataset card, written from report.json so it never disagrees with the data."""
from __future__ import annotations

from pipeline.io import outdir

TOP_COUNTRIES = 20
SPLITS = ("train", "val", "test")


def count_shards(out: str, parts) -> dict:
    """{part: {split: number of shards}} as they lie in OUT (numbered from 000000, contiguous)."""
    from apache_beam.io.filesystems import FileSystems

    counts = {}
    for part in parts:
        for split in SPLITS:
            pattern = outdir.join(out, part, split, f"{part}-{split}-*.tar")
            n = len(FileSystems.match([pattern])[0].metadata_list)
            if n:
                counts.setdefault(part, {})[split] = n
    return counts


def _shard_glob(part: str, split: str) -> str:
    return f"{part}/{split}/{part}-{split}-*.tar"


def _brace(part: str, split: str, n: int) -> str:
    """The shards of one part and split as webdataset names them: a brace range, or the one name."""
    names = f"{0:06d}" if n == 1 else f"{{{0:06d}..{n - 1:06d}}}"
    return f"{part}/{split}/{part}-{split}-{names}.tar"


def front_matter(shards: dict) -> str:
    """The card's YAML header: a `configs:` block per part whose data_files match exactly the
    part's tars, so `datasets.load_dataset(OUT)` loads samples and not the `_stats.json` files."""
    lines = ["---", "configs:"]
    for i, (part, splits) in enumerate(shards.items()):
        lines += [f"- config_name: {part}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: \"{_shard_glob(part, split)}\"" for split in splits]
        if i == 0:
            lines.append("  default: true")
    return "\n".join(lines + ["---"]) if shards else ""


def _load_lines(shards: dict) -> str:
    first = next(((part, split, n) for part, splits in shards.items() for split, n in splits.items()), None)
    if first is None:
        return "- Load: no shard was written (every input is in `rejected.parquet`)."
    part, split, n = first
    return ("- Load with webdataset:\n\n```python\nimport webdataset\n"
            f"dataset = webdataset.WebDataset(\"{_brace(part, split, n)}\", shardshuffle=False).decode(\"pil\")\n"
            "```\n\n"
            "  Shards of every part and split: "
            + ", ".join(f"`{_brace(p, s, k)}`" for p, splits in shards.items() for s, k in splits.items())
            + ".\n- Load with Hugging Face datasets: `datasets.load_dataset(\"OUT\", \"" + part
            + "\")` (the `configs:` block above names each part's tars).")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_card(rep: dict, shards: dict | None = None) -> str:
    """The card's markdown; `shards` ({part: {split: count}}, count_shards) names the real files."""
    shards = shards or {}
    cfg = rep["config"]
    parts = cfg["parts"]
    sample_rows = [[part, *(rep["samples"].get(part, {}).get(s, 0) for s in ("train", "val", "test")),
                    rep["samples"].get(part, {}).get("total", 0), rep["shards"].get(part, 0)] for part in parts]
    countries = sorted(rep["countries"].items(), key=lambda kv: (-kv[1]["total"], kv[0]))[:TOP_COUNTRIES]
    reject_rows = [[stage, reason, n] for stage, reasons in rep["rejected"].items() for reason, n in reasons.items()]
    plots = rep.get("plots") or []
    return "\n\n".join(filter(None, [
        front_matter(shards),
        "# MG-Geo corpus",
        "Geolocation training data in the layout of GaGA (arXiv 2412.08907), built by the MG-Geo pipeline. "
        "Parts: **meta** (image + location hierarchy as question-answer turns), **clue** (visual clues an LVLM "
        "wrote knowing the true location), **dialogue** (guess, user correction, revision).",
        "## Layout\n"
        "- `{part}/{split}/{part}-{split}-NNNNNN.tar`: WebDataset shards, members `KEY.jpg` (RGB JPEG, longer side "
        f"<= {cfg['max_side']} px, no metadata; a source JPEG that needed no change keeps its own compressed data, "
        "`image.jpeg_copied` in the json) and `KEY.json` (the record, schema `schemas/record.schema.json`).\n"
        "- `manifest.parquet`: one row per sample. `rejected.parquet`: every input that did not become a sample, "
        "with stage and reason. `report.json`: all counts.\n" + _load_lines(shards),
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
    outdir.write_text(outdir.join(config.out, "README.md"),
                      render_card(rep, count_shards(config.out, rep["config"]["parts"])))
