"""Meta part: the location hierarchy as question-answer turns about one image (GaGA stage 1 data).

Templates are versioned data. v2 (prompts/meta/meta_qa.v2.json, the default): each sample is one
structure (a single full answer, coarse-to-fine turns, coordinates first ...) picked by a hash of its
key among those the record's claims allow, with one of 8+ phrasings per unit and coordinates in a
format people use (decimal with 2-4 places, hemisphere letters, degrees-minutes, DMS). Every
assistant answer that names a place ends with the corpus' answer line
("Answer: <city>, <region>, <country> (<lat>, <lon>)", pipeline.evaluate.answer_line) of what the
conversation has established so far. Names come from the geocode stage's truth (pipeline.geo.claims):
a city beyond the city bound is only ever "near X" and never an answer-line city.
v1 (four fixed turns, meta_qa.v1.json) stays selectable: `mg-geo build --meta-templates v1`.
Picks hash (key, unit) so a rerun produces the same text and phrasings spread evenly.
"""
from __future__ import annotations


import jinja2

from pipeline.core.data_files import load_json
from pipeline.core.record import Record, Reject
from pipeline.core.choice import pick
from pipeline.core.stage import Stage
from pipeline.evaluate.answer_line import format_answer_line
from pipeline.geo.claims import COORD_DECIMALS, at_level, claims

DEFAULT_TEMPLATES = "prompts/meta/meta_qa.v2.json"
META_TEMPLATES = {"v1": "prompts/meta/meta_qa.v1.json", "v2": "prompts/meta/meta_qa.v2.json"}  # --meta-templates


def _dms_text(value: float, positive: str, negative: str) -> str:
    return f"{abs(value):.4f}° {positive if value >= 0 else negative}"


def _hemi(value: float, positive: str, negative: str) -> str:
    return positive if value >= 0 else negative


def _minutes(value: float, seconds: bool) -> str:
    v = abs(value)
    deg = int(v)
    minutes = (v - deg) * 60
    if not seconds:
        m = round(minutes, 1)
        if m >= 60:
            deg, m = deg + 1, 0.0
        return f"{deg}°{m:04.1f}′"
    total = round(v * 3600)
    deg, rest = divmod(total, 3600)
    m, sec = divmod(rest, 60)
    return f"{deg}°{m:02d}′{sec:02d}″"


COORD_FORMATS = ("decimal2", "decimal3", "decimal4", "hemisphere3", "degrees_minutes", "dms")


def coords_text(lat: float, lon: float, fmt: str) -> str:
    """The photo's coordinates the way people write them."""
    if fmt.startswith("decimal"):
        d = int(fmt[-1])
        return f"{lat:.{d}f}, {lon:.{d}f}"
    if fmt == "hemisphere3":
        return f"{abs(lat):.3f}° {_hemi(lat, 'N', 'S')}, {abs(lon):.3f}° {_hemi(lon, 'E', 'W')}"
    seconds = fmt == "dms"
    return f"{_minutes(lat, seconds)} {_hemi(lat, 'N', 'S')}, {_minutes(lon, seconds)} {_hemi(lon, 'E', 'W')}"


def place_words(claim: dict) -> str:
    """The claimed hierarchy in words, finest first: 'Lyon, Auvergne-Rhone-Alpes, France';
    a city beyond the bound as 'near Lyon, ...'."""
    names: list = []
    for name in (claim["city"], claim["region"], claim["country"]):
        if name and name.lower() not in (n.lower() for n in names):
            names.append(name)
    text = ", ".join(names)
    return f"near {text}" if claim["city"] and claim["city_near"] else text


class MetaStage(Stage):
    name = "meta"

    def __init__(self, templates: str = DEFAULT_TEMPLATES):
        self.templates = templates
        self._compiled = None

    def setup(self):
        if self._compiled is not None:
            return
        spec = load_json(self.templates)
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
        self.version = spec["version"]
        if "structures" in spec:
            self.structures = {name: tuple(units) for name, units in spec["structures"].items()}
            self._options_by_shape: dict = {}  # which levels a claim names -> its structures
            self._compiled = {
                unit: {"requires": body["requires"], "establishes": frozenset(body["establishes"]),
                       "questions": [env.from_string(q) for q in body["questions"]],
                       "answers": [env.from_string(a) for a in body["answers"]]}
                for unit, body in spec["units"].items()}
            return
        self.structures = None
        self.order = spec["order"]
        self._compiled = {
            level: {
                "requires": body["requires"],
                "questions": [env.from_string(q) for q in body["questions"]],
                "answers": [env.from_string(a) for a in body["answers"]],
            }
            for level, body in spec["levels"].items()
        }

    def process(self, record: Record) -> Record | Reject:
        loc = record.location or {}
        if record.lat is None or not loc.get("country"):
            return Reject("meta_no_location", "record reached the meta stage without a location")
        if self.structures is not None:
            return self._process_v2(record)
        values = {
            "continent": loc.get("continent", ""), "country": loc.get("country", ""),
            "admin1": loc.get("admin1", ""), "admin2": loc.get("admin2", ""), "city": loc.get("city", ""),
            "lat": f"{record.lat:.4f}", "lon": f"{record.lon:.4f}",
            "lat_text": _dms_text(record.lat, "N", "S"), "lon_text": _dms_text(record.lon, "E", "W"),
        }
        qa = []
        for level in self.order:
            tpl = self._compiled[level]
            if not all(values.get(field) for field in tpl["requires"]):
                continue  # e.g. places with no admin1 in the geocoder: no region question
            qi = pick(record.key, level + "/q", len(tpl["questions"]))
            ai = pick(record.key, level + "/a", len(tpl["answers"]))
            qa.append({"level": level, "question": tpl["questions"][qi].render(**values),
                       "answer": tpl["answers"][ai].render(**values), "template": f"{level}/q{qi}a{ai}"})
        messages = []
        for i, item in enumerate(qa):
            content = [{"type": "text", "text": item.pop("question")}]
            if i == 0:
                content.insert(0, {"type": "image"})
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": item.pop("answer")}]})
        # qa keeps which level and phrasing each turn pair is; the text itself lives in messages
        # only (held twice, it was a third of every record the runner shuffles).
        return record.replace(meta={"template_version": self.version, "messages": messages, "qa": qa})

    def tally(self, record: Record):
        """The sample's turn structure, counted into report.json ("meta_structures")."""
        meta = record.meta or {}
        return meta.get("structure") or (meta.get("template_version") and "fixed_v1")

    # -- v2 -------------------------------------------------------------------------------------
    def _units_for(self, claim: dict, units: tuple) -> tuple:
        """The structure's units the claims allow (no region unit without a region ...); empty when
        what is left would not establish every claimed level and the coordinates."""
        have = {"continent": bool(claim["continent"]), "country": bool(claim["country"]),
                "region": bool(claim["region"]), "city": bool(claim["city"])}
        kept = tuple(u for u in units if all(have[r] for r in self._compiled[u]["requires"]))
        established = set().union(*(self._compiled[u]["establishes"] for u in kept)) if kept else set()
        needed = {"country", "coords"} | {lv for lv in ("region", "city") if claim[lv]}
        return kept if needed <= established else ()

    def _options(self, claim: dict) -> list:
        """(structure, its units) the claim allows. They depend only on which levels the claim
        names, so each of the few shapes is worked out once per worker."""
        shape = tuple(bool(claim[level]) for level in ("continent", "country", "region", "city"))
        options = self._options_by_shape.get(shape)
        if options is None:
            options = [(name, self._units_for(claim, units)) for name, units in self.structures.items()]
            options = self._options_by_shape[shape] = [(name, units) for name, units in options if units]
        return options

    def _process_v2(self, record: Record) -> Record:
        claim = claims(record.location)
        options = self._options(claim)
        name, units = options[pick(record.key, "meta-structure", len(options))]
        fmt = COORD_FORMATS[pick(record.key, "meta-coords", len(COORD_FORMATS))]
        values = {"continent": claim["continent"] or "the world", "country": claim["country"],
                  "region": claim["region"], "city": claim["city"], "city_near": claim["city_near"],
                  "city_text": ("near " if claim["city_near"] else "") + claim["city"],
                  "place": place_words(claim), "coords": coords_text(record.lat, record.lon, fmt)}
        messages, qa, established = [], [], set()
        for n, unit in enumerate(units):
            tpl = self._compiled[unit]
            qi = pick(record.key, f"{unit}/q", len(tpl["questions"]))
            ai = pick(record.key, f"{unit}/a", len(tpl["answers"]))
            established |= tpl["establishes"]
            answer = tpl["answers"][ai].render(**values)
            line = self._answer_line(claim, established, record)
            if line:
                answer += "\n\n" + line
            content = [{"type": "text", "text": tpl["questions"][qi].render(**values)}]
            if n == 0:
                content.insert(0, {"type": "image"})
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            qa.append({"level": unit, "template": f"{unit}/q{qi}a{ai}"})
        return record.replace(meta={"template_version": self.version, "structure": name,
                                    "coords_format": fmt, "messages": messages, "qa": qa})

    @staticmethod
    def _answer_line(claim: dict, established: set, record: Record) -> str:
        """The answer line of what the turns so far established; "" when no place yet."""
        level = next((lv for lv in ("city", "region", "country") if lv in established), "")
        if not level:
            return ""
        names = at_level(claim, level)
        reached = "city" if names["city"] else "region" if names["region"] else "country"
        coords = {"lat": record.lat, "lon": record.lon} if "coords" in established else {}
        return format_answer_line({**names, **coords}, COORD_DECIMALS[reached])
