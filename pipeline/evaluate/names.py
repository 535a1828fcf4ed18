"""Place-name matching for scoring: case- and accent-insensitive names, countries by ISO code.

A model may say "US", "USA", "United States", "États-Unis" or "U.S.A." for the same country, and
ground truth may hold an ISO code (OSV-5M, our shards) or a name (other benchmarks). Countries are
therefore compared as ISO alpha-2 codes whenever both sides can be resolved to one; the alias table
is built from the Natural Earth admin-0 attributes the geocode stage already uses (names in English
and 25 other languages, formal names, ISO alpha-2/alpha-3 codes), plus the handful of everyday
names Natural Earth does not list. Region and city names are compared after normalisation only.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from typing import Optional

import shapefile  # pyshp

from pipeline.geo.polygons import GEONAMES_ONLY, NE_ZIP

# Letters that Unicode does not decompose into a base letter plus a combining mark, so NFKD alone
# would leave "Łódź" and "Lodz" different.
_FOLD = str.maketrans({"ł": "l", "ø": "o", "đ": "d", "ð": "d", "þ": "th", "æ": "ae", "œ": "oe",
                       "ı": "i", "ß": "ss", "ħ": "h", "ŀ": "l"})
_DROP = re.compile(r"[.'’`´]")          # "U.S.A." -> "usa", "Côte d'Ivoire" -> "cote divoire"
_SEPARATORS = re.compile(r"[\W_]+")     # hyphens, commas, brackets, spaces -> one space


def normalize_name(text: object) -> str:
    """Lowercase, accents removed, punctuation folded: the form two names are compared in."""
    if text is None:
        return ""
    folded = unicodedata.normalize("NFKD", str(text).casefold())
    folded = "".join(c for c in folded if not unicodedata.combining(c)).translate(_FOLD)
    return _SEPARATORS.sub(" ", _DROP.sub("", folded)).strip()


def names_match(predicted: object, truth: object) -> bool:
    a, b = normalize_name(predicted), normalize_name(truth)
    return bool(a) and a == b


# Everyday names (and the UK's non-ISO "UK") that Natural Earth's attribute table lacks.
_EXTRA_ALIASES = {
    "US": ["us", "u s", "america", "united states", "the united states", "united states of america"],
    "GB": ["uk", "u k", "great britain", "britain", "england", "scotland", "wales",
           "northern ireland"],
    "NL": ["holland", "the netherlands"],
    "TR": ["turkiye"],
    "MK": ["macedonia"],
    "CZ": ["czech republic"],
    "RU": ["russian federation"],
    "VN": ["viet nam"],
    "BA": ["bosnia", "bosnia and herzegovina", "bosnia herzegovina"],
    "AE": ["uae", "emirates"],
    "CD": ["drc", "dr congo", "congo kinshasa"],
    "CG": ["congo brazzaville"],
    "PS": ["state of palestine", "palestinian territories"],
    "VA": ["vatican city", "holy see"],
    "KR": ["korea republic of"],
}
# Natural Earth columns with names of a unit, English first; all NAME_xx columns follow.
_ENGLISH_FIELDS = ("NAME", "NAME_LONG", "ADMIN", "GEOUNIT", "SUBUNIT", "BRK_NAME", "NAME_EN",
                   "FORMAL_EN", "NAME_CIAWF", "NAME_SORT")


def _alpha2(value: object) -> str:
    text = str(value or "")
    return text if len(text) == 2 and text.isalpha() and text.isupper() else ""


def _own_code(rec: dict) -> str:
    # The same column order as the geocode stage (pipeline.geo.polygons), so that a ground-truth
    # code written by our pipeline and a name resolved here agree: ISO_A2 is "-99" for France,
    # Norway and Kosovo, whose codes sit in the EH / World Bank columns.
    for field in ("ISO_A2", "ISO_A2_EH", "WB_A2"):
        code = _alpha2(rec.get(field))
        if code:
            return code
    return ""


@functools.lru_cache(maxsize=1)
def country_aliases() -> dict[str, str]:
    """normalised name or code -> ISO alpha-2. Names claimed by two countries are left out."""
    with shapefile.Reader(NE_ZIP, encoding="utf-8") as sf:
        fields = [f[0] for f in sf.fields[1:]]
        recs = [dict(zip(fields, r)) for r in sf.records()]
    other_languages = [f for f in fields if f.startswith("NAME_") and len(f) <= 8 and f != "NAME_EN"
                       and f not in _ENGLISH_FIELDS and f not in ("NAME_LEN", "NAME_ALT")]
    # Tiers: an earlier tier always wins; inside one tier a name claimed by two codes is dropped
    # ("Congo" alone, say), since guessing between them would score answers arbitrarily.
    tiers: list[list[tuple[str, str]]] = [[], [], [], [], []]
    for rec in recs:
        code = _own_code(rec)
        if not code:
            continue
        for field in ("ISO_A2", "ISO_A2_EH", "ISO_A3", "ISO_A3_EH", "ADM0_A3"):
            value = str(rec.get(field) or "")
            if value.isalpha() and value.isupper() and len(value) in (2, 3):
                tiers[0].append((value.lower(), code))
        main = rec["TYPE"] in ("Sovereign country", "Country")
        english = [rec.get(f) for f in _ENGLISH_FIELDS] + str(rec.get("NAME_ALT") or "").split(",")
        tiers[2 if main else 3].extend((normalize_name(n), code) for n in english)
        tiers[4].extend((normalize_name(rec.get(f)), code) for f in other_languages)
    tiers[1] = [(normalize_name(n), code) for code, names in _EXTRA_ALIASES.items() for n in names]
    # Territories the geocode stage labels with GeoNames codes (RE, GF, ...) when no polygon is near.
    for code, (name, *_rest) in GEONAMES_ONLY.items():
        tiers[0].append((code.lower(), code))
        tiers[3].append((normalize_name(name), code))
    table: dict[str, str] = {}
    for tier in tiers:
        claimed: dict[str, set] = {}
        for name, code in tier:
            if name and name not in table:
                claimed.setdefault(name, set()).add(code)
        table.update({name: codes.pop() for name, codes in claimed.items() if len(codes) == 1})
    return table


def country_code(text: object) -> Optional[str]:
    """ISO alpha-2 for a country name or code ("United States", "usa", "US" -> "US"), else None."""
    key = normalize_name(text)
    if key.startswith("the ") and key not in country_aliases():
        key = key[4:]
    return country_aliases().get(key) if key else None


def countries_match(predicted: object, truth: object) -> bool:
    """Same ISO code when both sides resolve to one; otherwise equal normalised names."""
    a, b = country_code(predicted), country_code(truth)
    if a and b:
        return a == b
    return names_match(predicted, truth)
