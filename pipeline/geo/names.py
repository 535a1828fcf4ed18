"""Everyday place names: the country name people say for an ISO code, and admin-1 names without a
purely administrative word ("Shanxi Sheng" -> "Shanxi", "Muhafazat Matruh" -> "Matruh").

Both tables are versioned data (prompts/names/names.v1.json); the geocode stage writes the names it
gives into the record and the version into location["names_version"], and keeps the codes and
reverse_geocoder's raw admin-1 name beside them for matching.
"""
from __future__ import annotations

from functools import lru_cache

from pipeline.core.data_files import load_json

NAMES_FILE = "prompts/names/names.v1.json"


@lru_cache(maxsize=4)
def load_names(path: str = NAMES_FILE) -> dict:
    spec = load_json(path)
    if not str(spec.get("version") or ""):
        raise ValueError(f"{path}: no version")
    return spec


def names_version(path: str = NAMES_FILE) -> str:
    return load_names(path)["version"]


def country_name(code: str, fallback: str, path: str = NAMES_FILE) -> str:
    """The everyday English name for an ISO alpha-2 code; `fallback` (Natural Earth's) if unlisted."""
    entry = load_names(path)["countries"].get(str(code or "").upper())
    return entry["name"] if entry else fallback


def country_aliases(path: str = NAMES_FILE) -> dict:
    """ISO code -> every name the data file gives it (everyday name first, then the aliases)."""
    return {code: [e["name"], *e.get("aliases", [])] for code, e in load_names(path)["countries"].items()}


def clean_region(name: str, code: str, path: str = NAMES_FILE) -> str:
    """An admin-1 name without the administrative prefix/suffix people drop in that country.
    A name that would be left empty is returned unchanged."""
    text = str(name or "").strip()
    affixes = load_names(path)["region_affixes"]
    for key in (str(code or "").upper(), "*"):
        rule = affixes.get(key) or {}
        for prefix in rule.get("prefixes", ()):
            if text.lower().startswith(prefix.lower() + " ") and len(text) > len(prefix) + 1:
                text = text[len(prefix) + 1:].strip()
        for suffix in sorted(rule.get("suffixes", ()), key=len, reverse=True):
            if text.lower().endswith(" " + suffix.lower()) and len(text) > len(suffix) + 1:
                text = text[:-len(suffix) - 1].strip()
                break
    return text
