"""The one error type that means "the user's argument is wrong": the CLI prints its message and
exits 2 before any work. Bad *inputs* never raise; they become ledger rows."""


class BadArgument(ValueError):
    pass
