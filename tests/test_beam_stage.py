"""The shared Beam wrapper: a chain of stages in one ParDo (ApplyStages) gives what one ApplyStages
per stage gives and what the stages give without Beam (run_stages): the same records, the same
ledger rows, the same counters, with a batched stage inside the chain whose last batch is short,
a part stage that keeps the records it rejects, and an unexpected exception as a ledger row."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from pipeline.beam.wrapper import ApplyStages, LatestSnapshots, stage_metrics
from pipeline.core.record import Record, Reject
from pipeline.core.stage import Stage, run_stages


class _DropOdd(Stage):
    name = "dropodd"

    def process(self, record):
        n = record.provenance["n"]
        if n == 13:
            raise ValueError("thirteen")  # becomes internal_error
        return Reject("odd", str(n)) if n % 2 else record


class _BatchedTag(Stage):
    """Batched like the geocoder: records a batch's size; a short last batch shows the flush."""
    name = "batched"
    batch_size = 4

    def process_batch(self, records):
        out = []
        for r in records:
            if r.provenance["n"] % 10 == 0:
                out.append(Reject("tens", str(r.provenance["n"])))
            else:
                r.provenance["batch"] = len(records)
                out.append(r)
        return out


class _PartStage(Stage):
    name = "partstage"
    part = "clue"

    def process(self, record):
        return Reject("no_clue", "") if record.provenance["n"] % 3 == 0 else record


STAGES = (_DropOdd, _BatchedTag, _PartStage)
N = 27


def _records():
    return [Record(key=f"k{n:02d}", source="test:x", input_id=str(n), provenance={"n": n}) for n in range(N)]


def _summary(kept, rejected):
    return (sorted(r.key for r in kept),
            sorted((r.key, r.stage, r.reason, r.part) for r in rejected))


def _run_beam(chained: bool):
    p = beam.Pipeline()
    records = p | beam.Create(_records(), reshuffle=False)
    rejected = []
    if chained:
        records, more, _ = records | ApplyStages([cls() for cls in STAGES])
        rejected.append(more)
    else:
        for cls in STAGES:
            records, more, _ = records | cls.name >> ApplyStages([cls()])
            rejected.append(more)
    kept_keys = records | "KeptKeys" >> beam.Map(lambda r: r.key)
    ledger = (tuple(rejected) | beam.Flatten()
              | "LedgerRows" >> beam.Map(lambda r: (r.key, r.stage, r.reason, r.part)))
    expected_kept, expected_ledger = _summary(*run_stages([cls() for cls in STAGES], _records()))
    assert_that(kept_keys, equal_to(expected_kept), label="kept")
    assert_that(ledger, equal_to(expected_ledger), label="ledger")
    result = p.run()
    result.wait_until_finish()
    return {k: v for k, v in stage_metrics(result).items() if k in {c.name for c in STAGES}}


def test_a_chain_of_stages_gives_what_a_transform_per_stage_gives():
    chained, separate = _run_beam(True), _run_beam(False)
    for counts in (chained, separate):
        assert counts["dropodd"].pop("micros") >= 0 and counts["batched"].pop("micros") >= 0
        counts["partstage"].pop("micros")
    assert chained == separate
    # 27 in; 13 odd (13 itself an internal error); 14 even -> batched: 0,10,20 rejected; 11 on;
    # the part stage rejects 6, 12, 18, 24 for its part only: all 11 go on.
    assert chained["dropodd"] == {"in": 27, "out": 14, "rejected": 13, "reason.odd": 12, "reason.internal_error": 1}
    assert chained["batched"] == {"in": 14, "out": 11, "rejected": 3, "reason.tens": 3}
    assert chained["partstage"] == {"in": 11, "out": 7, "rejected": 4, "reason.no_clue": 4}


def test_a_batched_stage_in_a_chain_gets_full_batches_and_the_rest_at_the_bundle_end():
    p = beam.Pipeline()
    kept, _, _ = p | beam.Create(_records(), reshuffle=False) | ApplyStages([_DropOdd(), _BatchedTag()])
    sizes = kept | beam.Map(lambda r: r.provenance["batch"])
    # The 14 even records reach it in one bundle: batches of 4, 4, 4 and the last 2 (24, 26) at the
    # bundle's end; 0, 10 and 20 are rejected from the full batches, so 9 records say 4.
    assert_that(sizes | beam.combiners.Count.PerElement(), equal_to([(4, 9), (2, 2)]))
    p.run().wait_until_finish()


class _Counting(Stage):
    """Counts what it saw in a process-wide object and reports it as a snapshot, as an LVLM stage
    reports its backend's counters."""
    name = "counting"
    seen = {"n": 0}

    def process(self, record):
        self.seen["n"] += 1
        return record

    def stats_snapshot(self):
        import time
        return "counter", time.monotonic_ns(), dict(self.seen)


def test_stage_statistics_leave_through_an_output_and_the_latest_snapshot_wins():
    _Counting.seen["n"] = 0
    p = beam.Pipeline()
    _, _, stats = p | beam.Create(_records()) | ApplyStages([_Counting()])
    latest = stats | beam.CombineGlobally(LatestSnapshots()).without_defaults()
    assert_that(latest, equal_to([[{"n": N}]]))  # one identity; its last snapshot counted all 27
    p.run().wait_until_finish()


def test_latest_snapshots_keeps_the_newest_of_each_identity_in_any_order():
    combine = LatestSnapshots()
    snaps = [("a", 2, {"n": 2}), ("b", 1, {"n": 10}), ("a", 3, {"n": 3}), ("a", 1, {"n": 1})]
    for order in (snaps, snaps[::-1]):
        accs = [combine.add_input(combine.create_accumulator(), s) for s in order]
        assert combine.extract_output(combine.merge_accumulators(accs)) == [{"n": 3}, {"n": 10}]
