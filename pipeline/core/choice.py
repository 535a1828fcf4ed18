"""Deterministic choices from a record key: the same key makes the same choice in every process,
run and runner (Python's hash() is salted per process). Phrasings, dialogue modes, option order and
which records get a Clue or Dialogue sample are all chosen this way."""
from __future__ import annotations

import hashlib


def unit_hash(key: str, seed: str) -> float:
    """A uniform number in [0, 1) from (seed, key)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def pick(key: str, salt: str, n: int) -> int:
    """An index in [0, n) from (salt, key)."""
    return min(int(unit_hash(key, salt) * n), n - 1)
