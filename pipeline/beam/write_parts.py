"""The Beam side of the writer: records -> shards per (part, split), manifest rows, ledger rows.

Shard numbers are contiguous per (part, split) and deterministic: records are hashed into buckets
(the bucket count comes from the counted size of each part/split), each bucket is sorted by key
and cut into shards, and a small global index of all (part, split, bucket, chunk) numbers them in
order. Only that index (one row per shard) goes through a single worker.
"""
from __future__ import annotations

import hashlib
import logging
import time

import apache_beam as beam
import fastjsonschema
import jsonschema
from apache_beam.metrics import Metrics

from pipeline.io import manifest, shards
from pipeline.beam.wrapper import METRIC_PREFIX, plan_side_input, stage_work
from pipeline.core.data_files import load_json
from pipeline.core.record import Record, Reject
from pipeline.core.ledger import Rejection
from pipeline.io.stash import StashReader, stash

log = logging.getLogger(__name__)
RECORD_SCHEMA = "schemas/record.schema.json"

STAGE = "write"  # metrics namespace mg_geo.write, as for every stage


def _bucket(key: str, n: int) -> int:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") % n


def _samples(record: Record, parts, out: str):
    """((part, split), (key, planned size, stash file)) per sample of a record: all the writer's
    group-by carries. Thin Records (~1.5 KB each once the local runner has decoded them) made it
    the largest thing the runner held after the records were stashed (bench/bench_memory.py)."""
    present = record.parts_present()
    if not present:
        return
    thin = stash(record, out)  # a no-op for a thin copy; whole records (a library caller's) go now
    slot = (record.key, shards.planned_size(record), thin.stash_ref)
    for part in parts:
        if part in present:
            yield (part, record.split), slot


class _WriteGroups(beam.DoFn):
    REJECTED = "rejected"
    STATS = "stats"

    def __init__(self, out: str, limits: shards.ShardLimits, fail_after):
        self.out, self.limits, self.fail_after = out, limits, fail_after

    def setup(self):
        self.checker = SampleChecker(load_json(RECORD_SCHEMA))
        self.n_samples = Metrics.counter(METRIC_PREFIX + STAGE, "samples")
        self.n_shards = Metrics.counter(METRIC_PREFIX + STAGE, "shards")
        self.n_rejected = Metrics.counter(METRIC_PREFIX + STAGE, "rejected")
        self.n_in = Metrics.counter(METRIC_PREFIX + STAGE, "in")
        self.micros = Metrics.counter(METRIC_PREFIX + STAGE, "micros")  # like every stage: work time

    def process(self, element, numbering):
        start = time.perf_counter()
        with StashReader() as reader:
            outputs = list(self._write(element, numbering, reader))  # time our work, not the consumers'
        self.micros.inc(int((time.perf_counter() - start) * 1e6))
        yield from outputs

    def _write(self, element, numbering, reader: StashReader):
        (part, split, bucket), slots = element
        stash_refs = {key: ref for key, _, ref in slots}
        self.n_in.inc(len(stash_refs))
        chunks = shards.plan_chunks([(key, size) for key, size, _ in slots], self.limits)
        for i, keys in enumerate(chunks):
            path = shards.shard_path(self.out, part, split, numbering[(part, split, bucket, i)])
            rows, rejections = [], []
            samples = self._samples(reader, stash_refs, split, keys, part, rows, rejections)
            stats = shards.write_samples(self.out, path, samples, part, self.fail_after)
            for rejection in rejections:
                # Our own defect, not the input's: still one ledger row, never a lost record.
                self.n_rejected.inc()
                yield beam.pvalue.TaggedOutput(self.REJECTED, rejection)
            if stats is None:
                continue  # every sample of the chunk was refused: no shard, no manifest piece
            self.n_shards.inc()
            self.n_samples.inc(stats["samples"])
            yield beam.pvalue.TaggedOutput(self.STATS, stats)
            for row in rows:
                row["shard"] = stats["shard"]
            yield manifest.write_piece(self.out, stats["shard"], rows)  # rows stay out of shuffles

    def _samples(self, reader: StashReader, stash_refs: dict, split: str, keys: list[str], part: str,
                 rows: list, rejections: list):
        """(key, jpg, json) of each sample as the shard writer asks for it: one whole record out of
        its stash at a time, checked against the schema; a refused one becomes a rejection."""
        for key in keys:
            record = reader.load(stash_refs[key], split)
            body = shards.sample_body(record, part)
            problem = self.checker.problem(body)
            if problem:
                rejections.append(Rejection.of(record, "write", Reject("schema_invalid", problem), part))
                continue
            rows.append(manifest.manifest_row(record, part))
            yield key, record.image_bytes, shards.encode_json(body)


class SampleChecker:
    """Every sample against schemas/record.schema.json, fast.

    fastjsonschema compiles the schema to Python code, about ten times faster than jsonschema's
    validator (which was a third of a record's work in the build). The schema uses nothing
    that draft 2020-12 and draft 7 read differently (its $defs are reached by JSON pointer), and
    jsonschema stays the reference: a sample fastjsonschema refuses is judged and explained by
    jsonschema, so the two can only disagree towards a second look, never towards a lost sample."""

    def __init__(self, schema: dict):
        self.reference = jsonschema.Draft202012Validator(schema)
        # $id/$schema off: fastjsonschema would resolve the relative $id as a URL (and knows draft 7).
        self.fast = fastjsonschema.compile({k: v for k, v in schema.items() if k not in ("$id", "$schema")})

    def problem(self, body: dict) -> str:
        """"" if the body is valid, else the most relevant error as "path: message"."""
        try:
            self.fast(body)
            return ""
        except fastjsonschema.JsonSchemaException:
            pass
        if self.reference.is_valid(body):
            return ""
        error = jsonschema.exceptions.best_match(self.reference.iter_errors(body))
        return f"{'/'.join(map(str, error.absolute_path))}: {error.message}"


def _sum_pairs(pairs) -> tuple[int, int]:
    n = size = 0
    for a, b in pairs:
        n, size = n + a, size + b
    return n, size


def _chunk_ids(element, limits):
    (part, split, bucket), slots = element
    for i in range(len(shards.plan_chunks([(key, size) for key, size, _ in slots], limits))):
        yield (part, split, bucket, i)


def _count_and_size(sample):
    group, (_key, size, _stash_ref) = sample
    return group, (1, size)


def _bucket_count(group_sizes, limits):
    group, (n, size) = group_sizes
    return group, shards.bucket_count(n, size, limits)


def _to_bucket(sample, buckets: dict):
    (part, split), slot = sample
    return (part, split, _bucket(slot[0], buckets[(part, split)])), slot


def _number(chunk_ids) -> dict:
    numbering, next_number = {}, {}
    for part, split, bucket, i in sorted(chunk_ids):
        n = next_number.get((part, split), 0)
        numbering[(part, split, bucket, i)] = n
        next_number[(part, split)] = n + 1
    return numbering


class WriteParts(beam.PTransform):
    """records -> (manifest piece paths, rejections, shard stats)."""

    def __init__(self, out: str, parts, limits: shards.ShardLimits, fail_after=None):
        super().__init__()
        self.out, self.parts, self.limits, self.fail_after = out, tuple(parts), limits, fail_after

    def expand(self, records):
        # The planning steps are the writer's own work: timed as mg_geo.write.micros.
        limits = self.limits
        samples = records | "BySample" >> stage_work(STAGE, _samples, self.parts, self.out)
        sizes = (samples
                 | "Size" >> stage_work(STAGE, _count_and_size, flat=False)
                 | "SumSizes" >> beam.CombinePerKey(_sum_pairs))
        buckets = sizes | "Buckets" >> stage_work(STAGE, _bucket_count, limits, flat=False)
        grouped = (samples
                   | "ToBucket" >> stage_work(STAGE, _to_bucket, flat=False, side_inputs=(beam.pvalue.AsDict(buckets),))
                   | "GroupBucket" >> beam.GroupByKey())
        numbering = (grouped
                     | "ChunkIds" >> stage_work(STAGE, _chunk_ids, limits)
                     | "AllChunks" >> beam.CombineGlobally(beam.combiners.ToListCombineFn()).without_defaults()
                     | "Number" >> stage_work(STAGE, _number, flat=False))
        result = grouped | "WriteShards" >> beam.ParDo(
            _WriteGroups(self.out, limits, self.fail_after), plan_side_input(numbering)
        ).with_outputs(_WriteGroups.REJECTED, _WriteGroups.STATS, main="manifest_pieces")
        return result.manifest_pieces, result[_WriteGroups.REJECTED], result[_WriteGroups.STATS]
