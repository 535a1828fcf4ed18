"""report.json: what the build made and lost, computed from its own outputs.

Counts come from the manifest, the ledger and two small count files the job wrote, not from
runner metrics (some runners cannot report those); Beam metrics add per-stage timing when the
runner has them. `conservation` is the promise that every input ended in exactly one place.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline import outdir
from pipeline.agreement import label_agreement


def read_parquet(path: str):
    with FileSystems.open(path) as stream:
        return pq.read_table(stream)


def _rows(path: str) -> list[dict]:
    return read_parquet(path).to_pylist() if FileSystems.exists(path) else []


def conservation(parts, inputs: dict, presence: list, ledger: list[dict], manifest: list[dict]) -> dict:
    """Per source and part, three equations that fail if any record was lost:
    inputs = whole-record rejections + records at the writer (with or without this part's sample);
    records with a sample = samples in shards + write-stage rejections;
    records without one = part-only rejections (clue/dialogue failures) + not selected (>= 0)."""
    removed = Counter(r["source"] for r in ledger if not r["part"])
    rejected_in = Counter((r["source"], r["part"], r["stage"] == "write") for r in ledger if r["part"])
    samples = Counter((r["source"], r["part"]) for r in manifest)
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
    out = config.out
    manifest = _rows(outdir.join(out, "manifest.parquet"))
    ledger = _rows(outdir.join(out, "rejected.parquet"))
    inputs = dict(outdir.read_counts(out, outdir.INPUTS_FILE))
    presence = [(tuple(k), v) for k, v in outdir.read_counts(out, outdir.PRESENCE_FILE)]
    by_part_split = defaultdict(Counter)
    countries = defaultdict(Counter)
    continents = Counter()
    shards = defaultdict(set)
    for row in manifest:
        by_part_split[row["part"]][row["split"]] += 1
        shards[row["part"]].add((row["split"], row["shard"]))
        if row["part"] == config.parts[0]:
            countries[row["country_code"]][row["split"]] += 1
            continents[row["continent"]] += 1
    rejections = defaultdict(Counter)
    for row in ledger:
        rejections[row["stage"]][row["reason"]] += 1
    cons = conservation(config.parts, inputs, presence, ledger, manifest)
    first = [r for r in manifest if r["part"] == config.parts[0]]
    return {
        "config": {"sources": list(config.sources), "parts": list(config.parts), "max_side": config.max_side,
                   "split_ratios": list(config.split_ratios), "split_link_km": config.split_link_km,
                   "dedupe_radius": config.dedupe_radius, "max_place_km": config.max_place_km,
                   "shard_max_samples": config.limits.max_samples, "shard_max_bytes": config.limits.max_bytes},
        "inputs": inputs,
        "inputs_total": sum(inputs.values()),
        "samples": {part: dict(sorted(c.items())) | {"total": sum(c.values())} for part, c in sorted(by_part_split.items())},
        "shards": {part: len(s) for part, s in sorted(shards.items())},
        "rejected_total": len(ledger),
        "rejected": {stage: dict(sorted(c.items())) for stage, c in sorted(rejections.items())},
        "countries": {cc: dict(sorted(c.items())) | {"total": sum(c.values())} for cc, c in sorted(countries.items())},
        "continents": dict(sorted(continents.items())),
        "country_disagreements": sum(1 for r in first if r["country_disagreement"]),
        "conservation": cons,
        "conservation_ok": all(v["ok"] for v in cons.values()),
        "label_agreement": label_agreement(first),
        "stages": metrics,
    }
