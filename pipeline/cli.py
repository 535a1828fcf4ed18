"""`mg-geo`: build the corpus, make the sample set, train, evaluate, chat."""
from __future__ import annotations

import argparse
import gc
import importlib
import logging
import sys

from pipeline.commands import COMMANDS
from pipeline.gc_pause import gc_paused


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


def main(argv: list[str] | None = None, freeze_imports: bool = False) -> int:
    """`mg-geo ARGS`; freeze_imports: gc.freeze() once the imports are done, so that no later
    collection walks them again (only in a process that ends with the command: see run())."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropBeamGcpNotice())
    logging.getLogger("apache_beam").setLevel(logging.WARNING)  # its INFO is runner chatter; -v shows it
    with gc_paused():  # pipeline.gc_pause: the imports are ~1M objects that live on
        parser = make_parser()
        # Only `build` passes unknown flags on (to Beam's PipelineOptions); elsewhere they are errors.
        args, extra = parser.parse_known_args(argv)
        before_imports = getattr(args, "before_imports", None)
        if before_imports is not None:  # what must happen while the process is small (a fork)
            before_imports(args, extra)
        for module in getattr(args, "preload", ()):  # the command's own heavy imports
            importlib.import_module(module)
    if freeze_imports:
        gc.freeze()
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.verbose:
        logging.getLogger("apache_beam").setLevel(logging.INFO)
    return int(args.func(args) or 0)


def run() -> None:
    """The `mg-geo` process: main(), then exit without the interpreter's final garbage collections.

    After a build the heap holds Beam, pyarrow, matplotlib and the geocoder's tables; the
    collections Python runs at exit walk all of it (0.58 s measured after a 2,000-photo build,
    longer than some commands). Frozen objects are skipped; nothing is left to flush by then (files
    are closed, output is written). main() itself stays free of this, for callers in a process
    that goes on (tests, notebooks)."""
    code = main(freeze_imports=True)
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
