"""`mg-geo`: build the corpus, make the sample set, train, evaluate, chat."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.commands import COMMANDS


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mg-geo", description="MG-Geo: geolocation training corpora (GaGA Meta/Clue/Dialogue parts) "
        "built with Apache Beam, and the training and evaluation that use them.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"pipeline.commands.{name}").register(sub)
    return parser


class _DropBeamGcpNotice(logging.Filter):
    """Beam says "apitools not found" at import whenever its GCP extras are absent; only Dataflow
    and gs:// need them, and the line would stand before every error message we print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("apitools not found")


def main(argv: list[str] | None = None) -> int:
    """`mg-geo ARGS`: parse, then run the subcommand; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropBeamGcpNotice())
    logging.getLogger("apache_beam").setLevel(logging.WARNING)  # its INFO is runner chatter; -v shows it
    parser = make_parser()
    # Only `build` passes unknown flags on (to Beam's PipelineOptions); elsewhere they are errors.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.verbose:
        logging.getLogger("apache_beam").setLevel(logging.INFO)
    return int(args.func(args) or 0)


def run() -> None:
    """The `mg-geo` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
