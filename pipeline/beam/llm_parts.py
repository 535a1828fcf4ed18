"""The Clue and Dialogue parts inside the build: flags, the launch check, selection, stages.

Loaded only when `--parts` names clue or dialogue. A fraction target is decided per record (no
counts needed); an absolute target is balanced across countries, which needs every (key, country)
first: a small global step makes that key set and records outside it bypass the stage.
"""
from __future__ import annotations

import apache_beam as beam

from pipeline.beam.wrapper import ApplyStages
from pipeline.core.errors import BadArgument
from pipeline.stages.selection import Selection, select

STATS_FILE = "_work/lvlm_stats.json"  # [stats, ...]: the latest of each backend object


def lvlm_options(config):
    from pipeline.lvlm import options_from_args
    args = config.lvlm_args
    if args is None:
        raise BadArgument("the clue/dialogue parts need LVLM options (--lvlm-endpoint ...)")
    if getattr(args, "out", None) is None:
        args.out = config.out
    return options_from_args(args)


def check_llm(config) -> None:
    """At launch: stop with one message when no LVLM is usable (names --lvlm-endpoint and --parts meta)."""
    from pipeline.lvlm import LvlmUnavailable, check_backend, reset_shared_backends
    try:
        check_backend(lvlm_options(config))
    except LvlmUnavailable as exc:
        raise BadArgument(str(exc)) from None
    reset_shared_backends()  # in-process runs: this build's counters start at zero


def llm_stages(config):
    """(stage, target) pairs in order: clue first, so dialogue hints can point at its clues."""
    from pipeline.stages.clue import ClueStage
    from pipeline.stages.dialogue import DialogueStage

    options, args = lvlm_options(config), config.lvlm_args
    stages = []
    if "clue" in config.parts:
        stages.append((ClueStage(options, batch_size=args.lvlm_batch_size), args.clue_target))
    if "dialogue" in config.parts:
        stages.append((DialogueStage(options, batch_size=args.lvlm_batch_size,
                                     max_rounds=args.dialogue_max_rounds), args.dialogue_target))
    return stages


class ApplySelected(beam.PTransform):
    """ApplyStages([stage]) on the selected records only; the rest pass by untouched (no sample, no
    ledger row: report.json counts them as not selected). -> (records, rejections, stats snapshots)."""

    def __init__(self, stage, target):
        super().__init__(label=stage.name)
        self.stage, self.target = stage, target

    def expand(self, records):
        if isinstance(self.target, float):
            self.stage.selection = Selection.of_fraction(self.target)
            return records | "Run" >> ApplyStages([self.stage])
        target = self.target
        chosen = (records
                  | "KeyCountry" >> beam.Map(lambda r: (r.key, (r.location or {}).get("country_code", "")))
                  | "AllKeys" >> beam.combiners.ToList()
                  | "Select" >> beam.Map(lambda pairs: frozenset(select(pairs, target))))
        # The chosen keys reach the stage as a side input and it passes the others by (as it does
        # for a fraction). Splitting the records and flattening them back together shipped whole
        # records through a Flatten, which Beam's local runner with 2 workers was seen to lose
        # records from (pipeline/beam/graph.py, the input count).
        return records | "Run" >> ApplyStages([self.stage], side_input=beam.pvalue.AsSingleton(chosen))


def read_backend_stats(out: str) -> dict:
    """The LVLM backends' counters the job gathered (STATS_FILE), merged over every worker."""
    from pipeline.io import outdir
    from pipeline.lvlm import merge_stats
    found = outdir.read_json(out, STATS_FILE, default=[])
    return merge_stats(found) if found else {}
