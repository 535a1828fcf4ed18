"""Subcommands of `mg-geo`. Each module has `register(subparsers)`, which adds its parser and sets
`func=run`; heavy imports (torch, transformers) happen inside `run`, so `mg-geo --help` is fast and
works without the `train` extra."""
COMMANDS = ("build", "download", "sample", "stats", "train", "eval", "chat")
