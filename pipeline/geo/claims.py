"""What a sample may claim about where its photo is: the geocode stage's truth hierarchy as one dict.

Every text writer (meta, clue, dialogue, the simulated user) reads the truth from here instead of
reverse_geocoder's admin1/city (which may lie across a border or far away). A location written by
an older geocode stage, or built by hand (benchmarks, tests), has no truth_* fields: its admin1 and
city are then taken as they are.
"""
from __future__ import annotations

LEVELS = ("country", "region", "city")
RANK = {"none": 0, "continent": 0, "country": 1, "region": 2, "city": 3}
COORD_DECIMALS = {"city": 4, "region": 2, "country": 1, "none": 1}  # answer-line precision per claim


def claims(location: dict) -> dict:
    """{continent, country, region, city, city_near, level}: names the text may use; `city` with
    city_near True may only be said as "near <city>" and is no city claim (level stops above it)."""
    loc = location or {}
    if "truth_level" in loc:
        region, city, near = loc.get("truth_region") or "", loc.get("truth_city") or "", bool(loc.get("truth_city_near"))
    else:
        region, city, near = loc.get("admin1") or "", loc.get("city") or "", False
    country = loc.get("country") or ""
    level = "city" if city and not near and country else "region" if region and country else \
        "country" if country else "none"
    return {"continent": loc.get("continent") or "", "country": country, "region": region, "city": city,
            "city_near": near, "level": level}


def at_level(claim: dict, level: str) -> dict:
    """The claim cut to `level`: {country, region, city} with finer levels empty; a "near" city is
    never an answer-line city."""
    rank = min(RANK.get(level, 0), RANK[claim["level"]])
    return {"country": claim["country"] if rank >= 1 else "",
            "region": claim["region"] if rank >= 2 else "",
            "city": claim["city"] if rank >= 3 and not claim["city_near"] else ""}


def finer(level: str, steps: int = 1) -> str:
    """The level `steps` below `level` ("none" -> "country"), capped at city."""
    order = ("none",) + LEVELS
    return order[min(len(order) - 1, order.index(level if level in order else "none") + steps)]


def truth_view(location: dict) -> dict:
    """The location as the Dialogue part and its simulated user see it: admin1 and city replaced by
    the claimed region and city (a city only "near" is no city), admin2 dropped (it is
    reverse_geocoder's and may lie across a border); the truth_* fields kept."""
    claim = claims(location)
    return {**(location or {}), "admin1": claim["region"],
            "city": claim["city"] if claim["level"] == "city" else "", "admin2": "",
            "truth_level": claim["level"] if claim["level"] != "none" else "country",
            "truth_region": claim["region"], "truth_city": claim["city"], "truth_city_near": claim["city_near"]}
