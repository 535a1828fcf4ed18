"""`mg-geo build`'s flags for the Clue and Dialogue parts, apart from pipeline.beam.llm_parts (which
imports Beam) so that the command line is made without loading it."""
from __future__ import annotations

from pipeline.stages.selection import parse_target


def _target(text: str):
    try:
        return parse_target(text)
    except ValueError as exc:
        import argparse
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_part_arguments(parser) -> None:
    g = parser.add_argument_group("Clue and Dialogue parts")
    g.add_argument("--clue-target", type=_target, default=1.0,
                   help="records that get a clue sample: a fraction (0.015, 1.5%%) or a count (70000, "
                        "balanced across countries); default every record")
    g.add_argument("--dialogue-target", type=_target, default=1.0,
                   help="the same for dialogue samples (GaGA: ~73K dialogues next to ~70K clues)")
    g.add_argument("--dialogue-max-rounds", type=int, default=2, help="correction rounds per dialogue (default 2)")
    g.add_argument("--lvlm-batch-size", type=int, default=64,
                   help="records per stage call; the backend keeps --lvlm-concurrency requests in flight")
