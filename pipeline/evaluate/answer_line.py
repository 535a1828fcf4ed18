"""Reading a location out of a model's free-text answer: the one parser `eval` and `chat` share.

A model trained on the corpus ends its reply with an answer line, the way the Clue and Dialogue
samples do ("Answer: L'viv, Ukraine." / "My answer: Lviv, Lviv Oblast, Ukraine."); a model
asked for the prediction schema answers JSON. Both are accepted:

    Answer: <city>, <region>, <country> (<lat>, <lon>)

- names run from the finest level to the country; levels the model does not claim are left out
  from the fine end ("Answer: France", "Answer: Bavaria, Germany"), or left empty / "?" / "-"
  in place ("Answer: Lyon, , France"); the corpus itself (format_answer_line) always writes the
  unambiguous forms: "Answer: France", "Answer: -, Bavaria, Germany", "Answer: Lyon, , France",
  "Answer: Lyon, Auvergne-Rhone-Alpes, France", each with "(lat, lon)" where it gives coordinates;
- three names are city, region, country; one is the country; with two, the first is the region
  when it carries a region word ("Lviv Oblast", "Province of Cuenca"), otherwise the city
  (the corpus' own answers drop a region that repeats the city: "Tokyo, Japan");
- more than three names: the first is the city, the last two region and country;
- the coordinates are optional: "(48.85, 2.35)", "(48.85°N, 2.35°E)", "48.85, 2.35" after the
  names or "- 48.85, 2.35"; hemisphere letters set the sign;
- the LAST answer line counts (a reply may quote an earlier guess before revising it).

A JSON object anywhere in the text (fenced or bare) wins over an answer line: it is what the
prediction schema asks for. What comes back is a plain dict with the schema's keys (missing ones
absent), for pipeline.evaluate.predictions.prediction_from_answer.
"""
from __future__ import annotations

import re
from typing import Optional

from pipeline.lvlm.answers import extract_json_object
from pipeline.stages.quality import fold

# Words that say a name is a first-level region. Same list the Dialogue part uses to compare
# region names (pipeline.stages.dialogue.REGION_WORDS), minus words that are also common in city names.
REGION_WORDS = frozenset(
    "oblast province provincia prefecture state region county governorate voivodeship department "
    "departement municipality district krai kray okrug republic autonomous community canton land "
    "parish territory".split())
_LINE = re.compile(r"^\W*(?:my\s+)?(?:final\s+)?answer\s*[:\-–—]\s*(?P<body>.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_NUMBER = r"[-+−]?\d{1,3}(?:\.\d+)?"
_COORD = (rf"(?P<lat>{_NUMBER})\s*°?\s*(?P<ns>[NSns])?\s*[,;/ ]\s*"
          rf"(?P<lon>{_NUMBER})\s*°?\s*(?P<ew>[EWew])?")
_COORDS_AT_END = re.compile(rf"(?:[-–—:@]\s*)?\(?\s*{_COORD}\s*\)?\s*\.?\s*$")
LOCATION_KEYS = ("country", "region", "city", "lat", "lon", "latitude", "longitude")
_EMPTY = {"", "?", "-", "–", "—", "unknown", "none", "null", "n/a"}


def _coordinates(body: str) -> tuple[str, Optional[float], Optional[float]]:
    """(names part, lat, lon) with the coordinates cut off the end of the answer line."""
    match = _COORDS_AT_END.search(body)
    if not match:
        return body, None, None
    lat = float(match.group("lat").replace("−", "-"))
    lon = float(match.group("lon").replace("−", "-"))
    if (match.group("ns") or "").upper() == "S":
        lat = -abs(lat)
    if (match.group("ew") or "").upper() == "W":
        lon = -abs(lon)
    return body[:match.start()], lat, lon


def _is_region(name: str) -> bool:
    return any(word in REGION_WORDS for word in fold(name).split())


def parse_answer_line(body: str) -> Optional[dict]:
    """The names and coordinates of one answer line's text (after "Answer:"); None if empty."""
    names_part, lat, lon = _coordinates(body.strip())
    names = [n.strip().strip(".").strip() for n in names_part.strip().rstrip(".").split(",")]
    names = [None if n.lower() in _EMPTY else n for n in names]
    while names and names[-1] is None and len(names) > 1:  # "Lyon, France, " -> trailing empty
        names.pop()
    if not any(names) and lat is None:
        return None
    out: dict = {}
    if len(names) == 1:
        out["country"] = names[0]
    elif len(names) == 2:
        level = "region" if names[0] and _is_region(names[0]) else "city"
        out[level], out["country"] = names[0], names[1]
    elif len(names) >= 3:
        out["city"], out["region"], out["country"] = names[0], names[-2], names[-1]
    out = {k: v for k, v in out.items() if v}
    if lat is not None:
        out["lat"], out["lon"] = lat, lon
    return out


def parse_answer(text: Optional[str]) -> Optional[dict]:
    """A location dict from a reply: its JSON object if it has one, else its last answer line,
    else None (the caller counts the reply as unparseable)."""
    if not text or not text.strip():
        return None
    obj, _ = extract_json_object(text)
    if isinstance(obj, dict) and any(key in obj for key in LOCATION_KEYS):
        return obj
    lines = list(_LINE.finditer(text))
    for match in reversed(lines):
        parsed = parse_answer_line(match.group("body"))
        if parsed:
            return parsed
    return None


def format_answer_line(prediction: dict, decimals: int = 4) -> str:
    """The answer line for a prediction dict (levels it does not name are left out), so what chat
    prints and what every corpus answer ends with can be read back by parse_answer_line."""
    # A comma inside a name ("Southern Nations, Nationalities, and People's Region") would split it.
    city, region, country = (" ".join(str(prediction.get(k) or "").replace(",", " ").split())
                             for k in ("city", "region", "country"))
    if city and not region:
        names = [city, "", country]
    elif region and not city and country:
        names = ["-", region, country]  # two names would read as city, country
    else:
        names = [n for n in (city, region, country) if n]
    text = "Answer: " + ", ".join(names) if country else "Answer: " + ", ".join(n for n in names if n)
    lat, lon = prediction.get("lat"), prediction.get("lon")
    if isinstance(lat, (int, float)) and isinstance(lon, (int, float)):
        text += f" ({lat:.{decimals}f}, {lon:.{decimals}f})"
    return text


def truth_answer_line(location: dict, lat, lon, level: str = "city") -> str:
    """The answer line a corpus sample ends with: the record's truth (pipeline.geo.claims) cut to
    `level` (no finer than the truth itself), with the photo's coordinates at that level's precision."""
    from pipeline.geo.claims import COORD_DECIMALS, at_level, claims

    claim = claims(location)
    names = at_level(claim, level)
    reached = "city" if names["city"] else "region" if names["region"] else "country"
    return format_answer_line({**names, "lat": lat, "lon": lon}, COORD_DECIMALS[reached])
