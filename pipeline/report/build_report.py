"""report.json: what the build made and lost, computed from its own outputs.

Counts come from the manifest, the ledger and two small count files the job wrote, not from
runner metrics (some runners cannot report those); Beam metrics add per-stage timing when the
runner has them. `conservation` is the promise that every input ended in exactly one place.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.core.ledger import read_rows as ledger_rows
from pipeline.io import outdir
from pipeline.report.agreement import label_agreement


def read_parquet(path: str, columns=None):
    with FileSystems.open(path) as stream:
        return pq.read_table(stream, columns=columns)


def read_columns(path: str, columns: list[str], schema) -> pa.Table:
    """Only the columns asked for (a manifest has a row per sample: millions at GaGA's scale, so
    nothing here turns every row into a Python dict); an empty table if the file is missing."""
    if FileSystems.exists(path):
        return read_parquet(path, columns)
    return pa.table({name: pa.array([], schema.field(name).type) for name in columns})


def count_by(table: pa.Table, columns: list[str]) -> Counter:
    """Counter of the value tuples of `columns`, counted by pyarrow."""
    counts = table.select(columns).group_by(columns).aggregate([([], "count_all")])
    return Counter({tuple(row[c] for c in columns): row["count_all"] for row in counts.to_pylist()})


def conservation(parts, inputs: dict, presence: list, ledger: list[dict], samples: Counter) -> dict:
    """Per source and part, three equations that fail if any record was lost:
    inputs = whole-record rejections + records at the writer (with or without this part's sample);
    records with a sample = samples in shards + write-stage rejections;
    records without one = part-only rejections (clue/dialogue failures) + not selected (>= 0).
    `samples`: manifest rows counted by (source, part)."""
    removed = Counter(r["source"] for r in ledger if not r["part"])
    rejected_in = Counter((r["source"], r["part"], r["stage"] == "write") for r in ledger if r["part"])
    reached = Counter()
    for (source, part, has_sample), count in presence:
        reached[(source, part, has_sample)] += count
    out = {}
    for source in sorted(set(inputs) | set(removed)):
        per_part = {}
        for part in parts:
            with_sample, without = reached[(source, part, True)], reached[(source, part, False)]
            write_rejects = rejected_in[(source, part, True)]
            not_selected = without - rejected_in[(source, part, False)]
            per_part[part] = {
                "samples": samples[(source, part)], "rejected_part_only": rejected_in[(source, part, False)] + write_rejects,
                "not_selected": not_selected,
                "ok": (inputs.get(source, 0) == removed[source] + with_sample + without
                       and with_sample == samples[(source, part)] + write_rejects and not_selected >= 0),
            }
        out[source] = {"inputs": inputs.get(source, 0), "rejected": removed[source], "parts": per_part,
                       "ok": all(p["ok"] for p in per_part.values())}
    return out


def build_report(config, metrics: dict) -> dict:
    from pipeline.report.agreement import LEVELS
    from pipeline.io.manifest import MANIFEST_SCHEMA

    out = config.out
    first_part = config.parts[0]
    labels = [lv.manifest for lv in LEVELS]
    manifest = read_columns(outdir.join(out, "manifest.parquet"), [
        "part", "split", "shard", "source", "key", "continent", "country_code", "nearest_country_code",
        "admin1", "admin2", "city", "country_disagreement", *labels], MANIFEST_SCHEMA)
    ledger = ledger_rows(out)
    inputs = dict(outdir.read_counts(out, outdir.INPUTS_FILE))
    presence = [(tuple(k), v) for k, v in outdir.read_counts(out, outdir.PRESENCE_FILE)]
    by_part_split = defaultdict(Counter)
    for (part, split), n in count_by(manifest, ["part", "split"]).items():
        by_part_split[part][split] += n
    shards = Counter(part for part, _split, _shard in count_by(manifest, ["part", "split", "shard"]))
    first = manifest.filter(pc.equal(manifest["part"], first_part))
    countries = defaultdict(Counter)
    for (cc, split), n in count_by(first, ["country_code", "split"]).items():
        countries[cc][split] += n
    continents = count_by(first, ["continent"])
    rejections = defaultdict(Counter)
    for row in ledger:
        rejections[row["stage"]][row["reason"]] += 1
    benchmarks = getattr(config, "benchmarks", None)
    cons = conservation(config.parts, inputs, presence, ledger, count_by(manifest, ["source", "part"]))
    # Only rows that carry a source's own labels (OSV-5M's) are compared: others need no dicts.
    has_label = None
    for name in labels:
        valid = pc.is_valid(first[name])
        has_label = valid if has_label is None else pc.or_(has_label, valid)
    labelled = first.filter(has_label).to_pylist() if first.num_rows else []
    return {
        "config": {"sources": list(config.sources), "parts": list(config.parts), "max_side": config.max_side,
                   "copy_jpeg": config.copy_jpeg,
                   "split_ratios": list(config.split_ratios), "split_link_km": config.split_link_km,
                   "dedupe_radius": config.dedupe_radius, "max_place_km": config.max_place_km,
                   "shard_max_samples": config.limits.max_samples, "shard_max_bytes": config.limits.max_bytes,
                   "shard_min_count": config.limits.min_shards},
        "inputs": inputs,
        "inputs_total": sum(inputs.values()),
        "samples": {part: dict(sorted(c.items())) | {"total": sum(c.values())} for part, c in sorted(by_part_split.items())},
        "shards": dict(sorted(shards.items())),
        "rejected_total": len(ledger),
        "rejected": {stage: dict(sorted(c.items())) for stage, c in sorted(rejections.items())},
        "countries": {cc: dict(sorted(c.items())) | {"total": sum(c.values())} for cc, c in sorted(countries.items())},
        "continents": {continent: n for (continent,), n in sorted(continents.items())},
        "country_disagreements": pc.sum(first["country_disagreement"]).as_py() or 0,
        "conservation": cons,
        "conservation_ok": all(v["ok"] for v in cons.values()),
        "label_agreement": label_agreement(labelled),
        # --exclude: inputs dropped as copies of a benchmark image (pipeline.stages.exclude).
        "benchmark_overlap": {"excluded_inputs": rejections.get("exclude", Counter())["benchmark_overlap"],
                              **(benchmarks.summary() if benchmarks is not None else
                                 {"benchmark_images": 0, "unreadable_benchmark_images": 0})},
        "meta_structures": _tallies(metrics.get("meta", {})),
        "stages": metrics,
    }


def _tallies(counters: dict) -> dict:
    """A stage's "tally.<label>" counters (Stage.tally: the Meta part's turn structures) as
    {label: {"samples": n, "share": fraction}}, most frequent first."""
    counts = {name[len("tally."):]: int(n) for name, n in counters.items() if name.startswith("tally.")}
    total = sum(counts.values()) or 1
    return {label: {"samples": n, "share": round(n / total, 4)}
            for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}
