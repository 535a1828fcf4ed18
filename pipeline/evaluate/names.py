"""Place-name matching for scoring: case- and accent-insensitive names, countries by ISO code.

A model may say "US", "USA", "United States" or "U.S.A." for one country, and ground truth may
hold an ISO code (OSV-5M, our shards) or a name (other benchmarks). Countries are compared as ISO
alpha-2 codes whenever both sides resolve to one, through the same Natural Earth name table the
clue/dialogue quality filters use (pipeline.stages.quality), so the corpus and its evaluation agree on
what names a country. Region and city names are compared after normalisation only.
"""
from __future__ import annotations

import re
import unicodedata

from pipeline.stages.quality import country_names

# Letters that Unicode does not decompose into a base letter plus a combining mark, so NFKD alone
# would leave "Łódź" and "Lodz" different.
_FOLD = str.maketrans({"ł": "l", "ø": "o", "đ": "d", "ð": "d", "þ": "th", "æ": "ae", "œ": "oe",
                       "ı": "i", "ß": "ss", "ħ": "h", "ŀ": "l"})
_DROP = re.compile(r"[.'’`´]")          # "St. Gallen" -> "st gallen", "L'Aquila" -> "laquila"
_SEPARATORS = re.compile(r"[\W_]+")     # hyphens, commas, brackets, spaces -> one space


def normalize_name(text: object) -> str:
    """Lowercase, accents removed, punctuation folded: the form two names are compared in.
    Letters of every script are kept (a city answered as 東京 still compares with 東京)."""
    if text is None:
        return ""
    folded = unicodedata.normalize("NFKD", str(text).casefold())
    folded = "".join(c for c in folded if not unicodedata.combining(c)).translate(_FOLD)
    return _SEPARATORS.sub(" ", _DROP.sub("", folded)).strip()


def names_match(predicted: object, truth: object) -> bool:
    a, b = normalize_name(predicted), normalize_name(truth)
    return bool(a) and a == b


def country_codes(text: object) -> set:
    """ISO alpha-2 codes a country name or code stands for ("usa", "United States" -> {"US"})."""
    value = str(text or "").strip()
    if not value:
        return set()
    # The table reads bare codes only in upper case; "fr" or "deu" from a model is still a code.
    return country_names().codes(value) or country_names().codes(value.upper())


def countries_match(predicted: object, truth: object) -> bool:
    """Same ISO code when both sides resolve to one; otherwise equal normalised names."""
    a, b = country_codes(predicted), country_codes(truth)
    if a and b:
        return bool(a & b)
    return names_match(predicted, truth)
