"""`mg-geo`: build the corpus, make the sample set, train, evaluate, chat."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.commands import COMMANDS


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (prog: error: ...) and exit status 2,
    not the usage block; `--help` still shows the usage. Subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mg-geo", description="MG-Geo: geolocation training corpora (GaGA Meta/Clue/Dialogue parts) "
        "built with Apache Beam, and the training and evaluation that use them.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="debug logging of mg-geo (and a failed build's traceback); -vv adds the libraries' (Beam, Pillow ...) "
                             "own INFO and DEBUG lines (thousands)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"pipeline.commands.{name}").register(sub)
    return parser


class _DropBeamGcpNotice(logging.Filter):
    """Beam says "apitools not found" at import whenever its GCP extras are absent; only Dataflow
    and gs:// need them, and the line would stand before every error message we print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("apitools not found")


class _DropBeamErrors(logging.Filter):
    """Beam logs a failing step's error with its traceback as the job stops; the command then says
    it in one line (and -v logs Beam's lines and the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("apache_beam") and record.levelno >= logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """`mg-geo ARGS`: parse, then run the subcommand; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropBeamGcpNotice())
    logging.getLogger("apache_beam").setLevel(logging.WARNING)  # its INFO is runner chatter; -v shows it
    parser = make_parser()
    # Only `build` passes flags on (to Beam's PipelineOptions), and only those Beam knows.
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "accepts_extra", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse's --help (0) or its one-line error (2)
        return int(exc.code or 0)
    if extra:
        problem = unknown_flag(extra, _flags(parser, args.command))
        if problem:
            print(f"mg-geo {args.command}: error: {problem}", file=sys.stderr)
            return 2
    args.extra = extra
    # -v: mg-geo's own debug lines; -vv: every library's too (Pillow, matplotlib, Beam: thousands).
    logging.getLogger().setLevel(logging.DEBUG if args.verbose >= 2 else logging.INFO)
    logging.getLogger("pipeline").setLevel(logging.DEBUG if args.verbose else logging.NOTSET)
    if not args.verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_DropBeamErrors())
    if args.verbose >= 2:
        logging.getLogger("apache_beam").setLevel(logging.DEBUG)
    return int(args.func(args) or 0)


def _flags(parser: argparse.ArgumentParser, command: str) -> list[str]:
    """Every --flag of `mg-geo COMMAND`."""
    sub = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
    return [o for action in sub.choices[command]._actions for o in action.option_strings if o.startswith("--")]


def unknown_flag(extra: list[str], own_flags: list[str]) -> str | None:
    """What is wrong with the arguments mg-geo passes on to Beam, or None: a flag that neither
    mg-geo nor Beam's PipelineOptions knows would be dropped with a warning (`--max_side 256`
    built at 768), so it is an error naming the nearest valid flag."""
    import contextlib
    import io

    from apache_beam.options.pipeline_options import PipelineOptions

    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    level, said = beam_log.level, io.StringIO()
    beam_log.setLevel(logging.ERROR)  # its "Discarding unparseable args" warning: we say it better
    try:
        with contextlib.redirect_stderr(said):  # Beam's argparse prints its whole usage on an error
            options = PipelineOptions(extra)
            beam_names = set(options.get_all_options(retain_unknown_options=False))
            unknown = set(options.get_all_options(retain_unknown_options=True)) - beam_names
    except SystemExit:
        lines = [line for line in said.getvalue().splitlines() if "error:" in line]
        return (lines[-1].split("error:", 1)[1].strip() if lines else "bad Apache Beam flags") + \
            " (an Apache Beam flag)"
    finally:
        beam_log.setLevel(level)
    if not unknown:
        stray = [t for t in extra if not t.startswith("-")]
        if stray and not any(t.startswith("--") for t in extra):
            return f"unexpected argument {stray[0]!r}"
        return None
    flag = next(t.split("=", 1)[0] for t in extra
                if t.startswith("--") and t[2:].split("=", 1)[0].replace("-", "_") in unknown)
    candidates = {c.replace("_", "-"): c for c in own_flags}
    candidates.update({f"--{n}".replace("_", "-"): f"--{n}" for n in beam_names if f"--{n}".replace("_", "-") not in candidates})
    near = nearest(flag.replace("_", "-"), list(candidates))
    hint = f"; did you mean {candidates[near]}?" if near else " (--help lists mg-geo's flags)"
    return f"unknown flag {flag} (neither mg-geo nor Apache Beam knows it){hint}"


def nearest(flag: str, candidates: list[str]) -> str | None:
    """The candidate most like `flag` (difflib's ratio both ways; a shared first word counts
    extra, so --clue-fraction finds --clue-target), or None when nothing is close."""
    import difflib

    def score(candidate: str) -> float:
        ratio = max(difflib.SequenceMatcher(None, flag, candidate).ratio(),
                    difflib.SequenceMatcher(None, candidate, flag).ratio())
        same_word = flag.lstrip("-").split("-")[0] == candidate.lstrip("-").split("-")[0]
        return ratio + (0.25 if same_word else 0.0)
    best = max(candidates, key=score, default=None)
    return best if best is not None and score(best) >= 0.7 else None


def run() -> None:
    """The `mg-geo` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
