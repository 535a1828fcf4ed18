"""`mg-geo chat IMAGE`: a terminal assistant that guesses where a photo was taken and revises its
guess from your hints and corrections.

    mg-geo chat photo.jpg --lvlm-endpoint http://localhost:8000/v1
    mg-geo chat photo.jpg --lvlm-backend transformers --lvlm-model ./checkpoint
    printf 'The signs are in Portuguese\\n/quit\\n' | mg-geo chat photo.jpg ...   # scripted

On a terminal it prompts for each line; with stdin from a pipe or file it reads lines until EOF
(or /quit) and prints each answer, so a conversation can be scripted. At most --max-rounds user
turns are answered.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.lvlm.options import add_lvlm_arguments

EXIT_BAD_INPUT = 2
PROMPT = "you> "


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def register(sub) -> argparse.ArgumentParser:
    from pipeline.evaluate.assistant import DEFAULT_MAX_ROUNDS

    p = sub.add_parser("chat", help="terminal assistant: guesses where a photo was taken, revises on your hints",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="the photo (jpeg, png, webp, tiff, bmp, gif)")
    p.add_argument("--max-rounds", type=_non_negative, default=DEFAULT_MAX_ROUNDS,
                   help=f"user turns answered after the first guess (default {DEFAULT_MAX_ROUNDS})")
    p.add_argument("--max-side", type=int, default=768,
                   help="longer image side sent to the model, as in the corpus (default 768)")
    add_lvlm_arguments(p)
    p.set_defaults(func=run)
    return p


def _lines(stdin, stdout, interactive: bool):
    """User lines: prompted on a terminal, read until EOF otherwise."""
    while True:
        if interactive:
            stdout.write(PROMPT)
            stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            return
        yield line


def run(args) -> int:
    from pipeline.evaluate.assistant import Assistant, PhotoError, load_photo
    from pipeline.lvlm import open_backend
    from pipeline.lvlm.options import options_from_args
    from pipeline.lvlm.types import LvlmUnavailable

    stdin, stdout = sys.stdin, sys.stdout
    try:
        with open(args.image, "rb") as f:
            photo = load_photo(f.read(), max_side=args.max_side)
    except (OSError, PhotoError) as exc:
        print(f"mg-geo chat: cannot use {args.image}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    options = options_from_args(args)
    try:
        backend = open_backend(options)
    except LvlmUnavailable as exc:
        print(f"mg-geo chat: no model to talk to: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    interactive = stdin.isatty()
    try:
        assistant = Assistant(backend, photo, max_rounds=args.max_rounds)
        reply = assistant.start()
        print(reply.text, file=stdout, flush=True)
        if interactive and not reply.done:
            print("(type a hint or correction, /quit to end)", file=stdout, flush=True)
        for line in ([] if reply.done else _lines(stdin, stdout, interactive)):
            reply = assistant.handle(line)
            if reply is None:
                continue
            print(reply.text, file=stdout, flush=True)
            if reply.done:
                break
    except KeyboardInterrupt:  # Ctrl-C on a terminal ends the conversation quietly
        print(file=stdout)
        return 130
    finally:
        backend.close()
    return 0
