"""Which records get a Clue or Dialogue sample (GaGA: ~70K clue and ~73K dialogue samples next to
4.87M meta samples, so these parts cover a small subset).

Two ways, both deterministic (a hash of the record key and a seed, never Python's salted hash()):

- a fraction, decided per record with no counts needed: `in_fraction(key, fraction, seed)`.
  It is uniform over records, so big countries get proportionally many samples.
- an absolute target (or a fraction of a known population) balanced across countries:
  `select(keys_with_country, target, seed)` needs every (key, country) pair in advance and gives
  each country an equal share, refilling the share of small countries to the others
  (water-filling), so one big country cannot eat the budget.

A record that is not selected simply gets no sample of that part and NO ledger row: the ledger holds
failures only; the build reports how many records each part selected.

With the same seed, the records of a smaller fraction are a subset of those of a larger one, so a
dialogue fraction at most the clue fraction picks records that also have a Clue sample (the
dialogue "hint" mode points at those clues).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from pipeline.core.choice import unit_hash

Target = Union[int, float]
DEFAULT_SEED = "mg-geo"


def in_fraction(key: str, fraction: float, seed: str = DEFAULT_SEED) -> bool:
    return unit_hash(key, seed) < fraction


def parse_target(text: str) -> Target:
    """'0.05' or '5%' -> a fraction (float); '70000' -> an absolute count (int)."""
    text = str(text).strip()
    try:
        if text.endswith("%"):
            value: Target = float(text[:-1]) / 100.0
        elif text.isdigit():
            value = int(text)
        else:
            value = float(text)
    except ValueError:
        raise ValueError(f"a selection target is a count (70000), a fraction (0.05) or a percentage "
                         f"(5%), not {text!r}") from None
    check_target(value)
    return value


def check_target(target: Target) -> None:
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise ValueError(f"selection target must be an int count or a float fraction, not {target!r}")
    if isinstance(target, float) and not 0.0 <= target <= 1.0:
        raise ValueError(f"a selection fraction must be within [0, 1], not {target}")
    if isinstance(target, int) and target < 0:
        raise ValueError(f"a selection count must be >= 0, not {target}")


def country_quotas(sizes: dict, target: int) -> dict:
    """How many records each country gets: an equal share, capped by what the country has, the
    leftovers shared again among the rest (smallest countries settled first). Sums to
    min(target, total)."""
    # Ties in size are broken by a hash of the country, so no country is favoured by its name.
    order = sorted(sizes, key=lambda c: (sizes[c], unit_hash(str(c), "quota")))
    quotas = {}
    remaining = min(target, sum(sizes.values()))
    for i, country in enumerate(order):
        share = math.ceil(remaining / (len(order) - i)) if remaining > 0 else 0
        quotas[country] = min(sizes[country], share)
        remaining -= quotas[country]
    return quotas


def select(keys_with_country: Iterable[tuple], target: Target, seed: str = DEFAULT_SEED) -> set:
    """The keys that get a sample: `target` records (an int), or that fraction of all of them (a
    float), balanced across countries; within a country the keys with the smallest hash win."""
    check_target(target)
    by_country: dict = defaultdict(list)
    seen = set()
    for key, country in keys_with_country:
        if key in seen:
            continue
        seen.add(key)
        by_country[country or ""].append(key)
    total = len(seen)
    count = target if isinstance(target, int) else int(round(target * total))
    quotas = country_quotas({c: len(keys) for c, keys in by_country.items()}, count)
    chosen = set()
    for country, keys in by_country.items():
        keys.sort(key=lambda k: (unit_hash(k, seed), k))
        chosen.update(keys[:quotas[country]])
    return chosen


@dataclass(frozen=True)
class Selection:
    """What a clue/dialogue stage asks of each record: all (the default), a per-record fraction,
    or membership in a key set made by `select` (pickled with the stage: fine for ~100K keys)."""
    fraction: Optional[float] = None
    keys: Optional[frozenset] = None
    seed: str = DEFAULT_SEED

    @classmethod
    def every(cls) -> "Selection":
        return cls()

    @classmethod
    def of_fraction(cls, fraction: float, seed: str = DEFAULT_SEED) -> "Selection":
        check_target(float(fraction))
        return cls(fraction=float(fraction), seed=seed)

    @classmethod
    def of_keys(cls, keys: Iterable[str]) -> "Selection":
        return cls(keys=frozenset(keys))

    def __call__(self, key: str) -> bool:
        if self.keys is not None:
            return key in self.keys
        if self.fraction is not None:
            return in_fraction(key, self.fraction, self.seed)
        return True

    def describe(self) -> str:
        if self.keys is not None:
            return f"{len(self.keys)} selected keys"
        if self.fraction is not None:
            return f"fraction {self.fraction:g} (seed {self.seed!r})"
        return "every record"
