"""A stage is plain Python on records: it returns the record (changed) or a Reject.

Stage authors write `process(record)` (or `process_batch(records)` when per-call work such as a
KD-tree query should be amortised) and, if they hold heavy state (geocoder, model), `setup()`.
Nothing here imports Beam: stages are unit-tested directly with `run_stage`. The Beam wrapper in
`pipeline.beam.wrapper` does the counting, timing and the ledger side output for every stage alike.
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, Optional, Union

from pipeline.core.record import Record, Reject
from pipeline.core.ledger import Rejection

Outcome = Union[Record, Reject]
log = logging.getLogger(__name__)


class Stage:
    name: str = "stage"
    batch_size: int = 0  # > 0: the Beam wrapper batches elements before calling process_batch
    # "" : a Reject removes the record from the corpus. A part name ("clue", "dialogue"): a Reject
    # only means that part has no sample; the record goes on unchanged (its Meta sample stays).
    part: str = ""

    def setup(self) -> None:
        """Load heavy state once per worker. Must be idempotent."""

    def teardown(self) -> None:
        """Best effort at worker shutdown (Beam may skip it): flush what setup() opened."""

    def use_side_input(self, value) -> None:
        """A value the job computed before this stage runs (ApplyStage(..., side_input=...)), handed
        over before the records that need it. Only stages that ask for one implement this."""
        raise NotImplementedError(f"stage {self.name} takes no side input")

    def stats_snapshot(self) -> Optional[tuple[str, int, dict]]:
        """Cumulative statistics of this stage's own state in this process (an LVLM backend's
        counters), sent on at each bundle's end: (identity of what counted, time.monotonic_ns()
        when read, the stats). The build keeps each identity's latest. Most stages: None."""
        return None

    def tally(self, record: Record) -> Optional[str]:
        """A label to count for a record this stage kept (the Meta part's turn structure), summed
        per stage into report.json's stage counters as "tally.<label>". Most stages: None."""
        return None

    def process(self, record: Record) -> Outcome:
        raise NotImplementedError

    def process_batch(self, records: list[Record]) -> list[Outcome]:
        return [self.safe_process(r) for r in records]

    def safe_process(self, record: Record) -> Outcome:
        # A bad input never stops the run: an unexpected exception becomes a ledger row that
        # names the exception, so the defect is visible instead of the whole job failing.
        try:
            return self.process(record)
        except Exception as exc:  # noqa: BLE001 - deliberate catch-all, see above
            log.exception("stage %s failed on %s", self.name, record.input_id)
            return Reject("internal_error", f"{type(exc).__name__}: {exc}")


def run_stage(stage: Stage, records: Iterable[Record]) -> tuple[list[Record], list[Rejection]]:
    """Run one stage without Beam: the reference semantics the Beam wrapper must match."""
    stage.setup()
    kept: list[Record] = []
    rejected: list[Rejection] = []
    for record, outcome in iter_outcomes(stage, list(records)):
        if isinstance(outcome, Reject):
            rejected.append(Rejection.of(record, stage.name, outcome, stage.part))
            if stage.part:
                kept.append(record)
        else:
            kept.append(outcome)
    return kept, rejected


def run_stages(stages: Iterable[Stage], records: Iterable[Record]) -> tuple[list[Record], list[Rejection]]:
    kept, rejected = list(records), []
    for stage in stages:
        kept, more = run_stage(stage, kept)
        rejected += more
    return kept, rejected


def iter_outcomes(stage: Stage, records: list[Record]) -> Iterator[tuple[Record, Outcome]]:
    outcomes = stage.process_batch(records) if stage.batch_size else [stage.safe_process(r) for r in records]
    if len(outcomes) != len(records):
        raise RuntimeError(f"stage {stage.name} returned {len(outcomes)} outcomes for {len(records)} records")
    return zip(records, outcomes)
