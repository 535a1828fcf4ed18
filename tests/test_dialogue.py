"""Dialogue part: blind guess, scoring, correction modes, revisions and the batch call pattern,
driven by a scripted in-process LVLM backend (no network, no model)."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from pipeline.stages.dialogue import DialogueStage, same_region, score_prediction
from pipeline.stages.user_turns import neighbour_names
from pipeline.lvlm.types import LvlmBackend, LvlmResult
from pipeline.stages.quality import country_names
from pipeline.core.record import Record, make_key
from pipeline.core.stage import run_stage
from made_inputs import small_jpeg

LVIV = {"continent": "Europe", "country_code": "UA", "country": "Ukraine", "sovereign_code": "UA",
        "sovereign": "Ukraine", "admin1": "Lviv", "admin2": "", "city": "L'viv",
        "city_id": "L'viv__Lviv_UA", "place_lat": 49.83826, "place_lon": 24.02324, "place_distance_km": 0.3,
        "nearest_country_code": "UA", "country_source": "polygon", "country_disagreement": False}
PARIS = {"continent": "Europe", "country_code": "FR", "country": "France", "sovereign_code": "FR",
         "sovereign": "France", "admin1": "Ile-de-France", "admin2": "Paris", "city": "Saint-Ouen",
         "city_id": "Saint-Ouen_Paris_Ile-de-France_FR", "place_lat": 48.9, "place_lon": 2.33333,
         "place_distance_km": 0.5, "nearest_country_code": "FR", "country_source": "polygon",
         "country_disagreement": False}
POINTS = {"UA": (49.8397, 24.0297), "FR": (48.8966, 2.3400)}

WRONG_COUNTRY = {"country": "Poland", "region": "Subcarpathian Voivodeship", "city": "Rzeszów", "lat": 50.04,
                 "lon": 22.0, "confidence": 0.4, "reasoning": "Latin-looking shop fronts and Central European "
                 "facades suggest south-eastern Poland."}
COUNTRY_ONLY = {"country": "Ukraine", "region": None, "city": None, "lat": 50.45, "lon": 30.52,
                "confidence": 0.5, "reasoning": "Cyrillic signs with Ukrainian letters point to Ukraine."}
WRONG_REGION = {"country": "Ukraine", "region": "Kyiv", "city": "Kyiv", "lat": 50.45, "lon": 30.52,
                "confidence": 0.5, "reasoning": "Cyrillic signs and a wide boulevard suggest the capital."}
RIGHT_CITY = {"country": "Ukraine", "region": "Lviv Oblast", "city": "Lviv", "lat": 49.84, "lon": 24.03,
              "confidence": 0.8, "reasoning": "Habsburg-era facades, cobbled tram streets and Ukrainian signs "
              "point to the old town of Lviv."}
TRUTH = {"UA": LVIV, "FR": PARIS}


@pytest.fixture(scope="module")
def jpeg(exif_samples) -> bytes:
    return small_jpeg(exif_samples / "gps" / "DSCN0012.jpg")


def make_record(name: str, jpeg: bytes, location: dict = LVIV, clue=None) -> Record:
    lat, lon = POINTS[location["country_code"]]
    return Record(key=make_key("exif:/photos", name), source="exif:/photos", input_id=name, image_bytes=jpeg,
                  lat=lat, lon=lon, location=dict(location), image={"sha256": "0" * 64}, split="train", clue=clue)


def result(parsed=None, *, ok=True, reason=None, detail="") -> LvlmResult:
    return LvlmResult(ok=ok, parsed=parsed if ok else None, text=json.dumps(parsed), reason=reason,
                      detail=detail, usage={"prompt_tokens": 100, "completion_tokens": 30}, cached=False,
                      attempts=1, backend="fake", model="fake-vlm-1")


def prompt_of(request) -> str:
    return request.messages[0]["content"][-1]["text"]


def truthful_revision(request, location: dict) -> dict:
    """What a good model does with the revision prompt: the truth down to the level it was given."""
    prompt = prompt_of(request)
    return {"country": location["country"],
            "region": location["admin1"] if "- Region:" in prompt else None,
            "city": location["city"] if "- Nearest city or town:" in prompt else None,
            "lat": location["place_lat"], "lon": location["place_lon"], "confidence": 0.9,
            "reasoning": "Looking again, the Cyrillic spelling and the Habsburg facades fit this place."}


class ScriptedBackend(LvlmBackend):
    """guesses: key -> blind answer (LvlmResult or dict); revisions: key -> callable(request) or
    LvlmResult overriding the truthful reviser. Remembers every batch."""

    name = "fake"
    model = "fake-vlm-1"

    def __init__(self, guesses: dict, locations: dict, revisions: dict | None = None):
        self.guesses, self.locations, self.revisions = guesses, locations, revisions or {}
        self.batches: list = []

    def load_model(self) -> None:
        pass

    def run_inference(self, batch):
        self.batches.append(list(batch))
        out = []
        for request in batch:
            key, purpose = request.request_id.split(":")
            if purpose == "guess":
                answer = self.guesses[key]
            else:
                answer = self.revisions.get(key) or truthful_revision(request, self.locations[key])
                answer = answer(request) if callable(answer) else answer
            out.append(answer if isinstance(answer, LvlmResult) else result(answer))
        return out

    def stats(self) -> dict:
        return {"requests": sum(len(b) for b in self.batches)}


def run(records, guesses: dict, revisions=None, **stage_args):
    backend = ScriptedBackend({r.key: guesses[r.input_id] for r in records},
                              {r.key: r.location for r in records},
                              {r.key: v for r in records for k, v in (revisions or {}).items() if k == r.input_id})
    stage = DialogueStage(backend=backend, params={"temperature": 0.3, "max_tokens": 400, "seed": 1}, **stage_args)
    kept, rejected = run_stage(stage, records)
    return stage, backend, {r.input_id: r for r in kept}, rejected


def name_with_mode(mode: str, prefix: str) -> str:
    """An input name whose key the stage assigns `mode` (modes are a hash of the key)."""
    stage = DialogueStage(backend=ScriptedBackend({}, {}))
    for i in range(200):
        name = f"{prefix}{i}.jpg"
        if stage.mode_of(make_key("exif:/photos", name)) == mode:
            return name
    raise AssertionError(f"no key with mode {mode}")


def texts(sample) -> list:
    return [m["content"][-1]["text"] for m in sample["messages"]]


# --- scoring -----------------------------------------------------------------------------------

def test_score_by_level_and_distance(jpeg):
    names = country_names()
    lviv = make_record("a.jpg", jpeg)
    assert score_prediction(RIGHT_CITY, lviv, names)["level"] == "city"
    assert score_prediction(COUNTRY_ONLY, lviv, names)["level"] == "country"
    wrong = score_prediction(WRONG_COUNTRY, lviv, names)
    assert wrong["level"] == "none" and 120 < wrong["distance_km"] < 160
    # Paris named for a Saint-Ouen photo 6 km away is the right city (distance), hence region too
    paris = make_record("p.jpg", jpeg, PARIS)
    guess = {"country": "FR", "region": None, "city": "Paris", "lat": 48.8566, "lon": 2.3522}
    assert score_prediction(guess, paris, names)["level"] == "city"
    assert same_region("Lviv Oblast", "Lviv") and same_region("Free State of Bavaria", "Bavaria")
    assert not same_region("Kyiv Oblast", "Lviv")


def test_neighbours_come_from_the_place_list(jpeg):
    stage = DialogueStage(backend=ScriptedBackend({}, {}))
    stage.setup()
    lviv = make_record("a.jpg", jpeg)
    countries = neighbour_names(stage.places, lviv, "country", stage.names, 2, exclude=["Poland"])
    assert len(countries) == 2 and "Poland" not in countries and "Ukraine" not in countries
    regions = neighbour_names(stage.places, lviv, "region", stage.names, 2)
    assert len(regions) == 2 and "Lviv" not in regions
    towns = neighbour_names(stage.places, lviv, "city", stage.names, 2)
    assert len(towns) == 2 and "L'viv" not in towns


# --- conversations -----------------------------------------------------------------------------

def test_wrong_first_guess_is_context_and_is_corrected_then_refined(jpeg):
    name = name_with_mode("correction", "w")
    stage, backend, kept, rejected = run([make_record(name, jpeg)], {name: WRONG_COUNTRY})
    assert rejected == []
    sample = kept[name].dialogue
    roles = [m["role"] for m in sample["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert sample["messages"][0]["content"][0] == {"type": "image"}
    assert sample["messages"][1]["train"] is False                       # the wrong guess: context only
    assert all("train" not in m for m in sample["messages"][2:])
    assert sample["first_guess_correct_level"] == "none"
    assert [(t["mode"], t["level"]) for t in sample["turns"]] == [("guess", None), ("correction", "country"),
                                                                  ("finer", "region")]
    assert [t["score"]["level"] for t in sample["turns"]] == ["none", "country", "region"]
    lines = texts(sample)
    assert "Poland" in lines[1] and "Poland" in lines[2] and "Europe" in lines[2]   # "not Poland; in Europe"
    assert "Ukraine" in lines[3] and "Lviv" in lines[5]
    # the revision request carries the history, the correction and the truth only down to the level
    revision = prompt_of(backend.batches[1][0])
    assert "Poland" in revision and lines[2] in revision and "Country: Ukraine" in revision
    assert "- Region:" not in revision
    assert "- Region: Lviv" in prompt_of(backend.batches[2][0])


def test_right_first_guess_goes_finer_and_a_right_city_asks_why(jpeg):
    stage, backend, kept, rejected = run([make_record("c.jpg", jpeg), make_record("y.jpg", jpeg)],
                                         {"c.jpg": COUNTRY_ONLY, "y.jpg": RIGHT_CITY})
    assert rejected == []
    finer = kept["c.jpg"].dialogue
    assert finer["first_guess_correct_level"] == "country"
    assert [t["mode"] for t in finer["turns"]] == ["guess", "finer", "finer"]
    assert [t["level"] for t in finer["turns"][1:]] == ["region", "city"]
    assert all("train" not in m for m in finer["messages"])               # nothing was wrong
    assert "Ukraine" in texts(finer)[2]                                   # "Yes, Ukraine is right ..."
    why = kept["y.jpg"].dialogue
    assert why["first_guess_correct_level"] == "city"
    assert [t["mode"] for t in why["turns"]] == ["guess", "why"] and len(why["messages"]) == 4
    assert all("train" not in m for m in why["messages"])
    # one call for the blind guesses, then one per round (the why dialogue ended after round 1)
    assert [len(b) for b in backend.batches] == [2, 2, 1]
    assert [r.request_id.split(":")[1] for r in backend.batches[0]] == ["guess", "guess"]


def test_a_wrong_region_is_corrected_at_the_region_level(jpeg):
    name = name_with_mode("correction", "r")
    _, _, kept, rejected = run([make_record(name, jpeg)], {name: WRONG_REGION})
    sample = kept[name].dialogue
    assert rejected == [] and sample["first_guess_correct_level"] == "country"
    assert (sample["turns"][1]["mode"], sample["turns"][1]["level"]) == ("correction", "region")
    assert sample["messages"][1]["train"] is False and "Kyiv" in texts(sample)[2]


def test_a_wrong_city_without_a_region_is_corrected_not_confirmed(jpeg):
    name = name_with_mode("correction", "k")
    guess = dict(COUNTRY_ONLY, city="Kyiv")
    _, _, kept, rejected = run([make_record(name, jpeg)], {name: guess})
    sample = kept[name].dialogue
    assert rejected == [] and (sample["turns"][1]["mode"], sample["turns"][1]["level"]) == ("correction", "region")
    assert sample["messages"][1]["train"] is False and "Kyiv" in texts(sample)[2]


def test_hint_points_at_a_clue_and_falls_back_to_correction_without_one(jpeg):
    name = name_with_mode("hint", "h")
    clue = {"clues": [{"category": "script_language_signs", "evidence": "Shop sign in Cyrillic reading 'Аптека'.",
                       "implies": "Ukrainian spelling", "level": "country"}]}
    _, _, kept, _ = run([make_record(name, jpeg, clue=clue)], {name: WRONG_COUNTRY})
    turn = kept[name].dialogue["turns"][1]
    assert turn["mode"] == "hint" and "shop sign in Cyrillic reading 'Аптека'" in turn["user"]
    _, _, kept, _ = run([make_record(name, jpeg)], {name: WRONG_COUNTRY})
    turn = kept[name].dialogue["turns"][1]
    assert turn["mode"] == "correction" and "Europe" in turn["user"]


def test_choice_offers_the_truth_among_neighbours(jpeg):
    name = name_with_mode("choice", "c")
    _, _, kept, rejected = run([make_record(name, jpeg)], {name: WRONG_COUNTRY})
    assert rejected == []
    turn = kept[name].dialogue["turns"][1]
    assert turn["mode"] == "choice"
    options = re.split(r", | or ", re.search(r"(?:Is it|for you:|of these:) (.+?)[?.]", turn["user"]).group(1))
    assert len(options) == 3 and len(set(options)) == 3
    assert "Ukraine" in options and "Poland" not in options


def test_modes_are_deterministic_and_all_used():
    stage = DialogueStage(backend=ScriptedBackend({}, {}))
    keys = [make_key("exif:/photos", f"img{i}.jpg") for i in range(600)]
    modes = Counter(stage.mode_of(k) for k in keys)
    assert set(modes) == {"hint", "correction", "choice"} and min(modes.values()) > 150
    again = DialogueStage(backend=ScriptedBackend({}, {}))
    assert [again.mode_of(k) for k in keys] == [stage.mode_of(k) for k in keys]


def test_a_revision_that_misses_the_truth_is_rejected(jpeg):
    name = name_with_mode("correction", "m")
    stubborn = dict(WRONG_COUNTRY, reasoning="I still think the facades look Polish.")
    _, _, kept, rejected = run([make_record(name, jpeg), make_record("ok.jpg", jpeg)],
                               {name: WRONG_COUNTRY, "ok.jpg": RIGHT_CITY}, revisions={name: stubborn})
    assert [(r.input_id, r.reason, r.part) for r in rejected] == [(name, "revision_missed_truth", "dialogue")]
    assert kept[name].dialogue is None and kept["ok.jpg"].dialogue is not None


def test_a_revision_that_names_a_finer_place_than_asked_is_rejected(jpeg):
    """After "not Poland; it is in Europe" the revision may settle the country, not leap to the
    city: a revision whose reasoning names the true city when the country was asked for claims
    more than the evidence supports. The same reasoning is fine once the city is asked for."""
    name = name_with_mode("correction", "o")

    def leaping(request):
        answer = truthful_revision(request, LVIV)
        answer["reasoning"] = "The trams and the opera house say this is Lviv."
        return answer
    _, _, kept, rejected = run([make_record(name, jpeg), make_record("ok.jpg", jpeg)],
                               {name: WRONG_COUNTRY, "ok.jpg": RIGHT_CITY}, revisions={name: leaping, "ok.jpg": leaping})
    assert [(r.input_id, r.reason, r.part) for r in rejected] == [(name, "claim_beyond_evidence", "dialogue")]
    assert "Lviv" in rejected[0].detail and "country" in rejected[0].detail
    assert kept[name].dialogue is None and kept["ok.jpg"].dialogue is not None


def test_backend_and_answer_failures_keep_their_reasons(jpeg):
    guesses = {"schema.jpg": result(ok=False, reason="schema_invalid", detail="lat: required"),
               "refused.jpg": result(ok=False, reason="refusal", detail="model refused"),
               "sorry.jpg": dict(COUNTRY_ONLY, reasoning="I'm sorry, I cannot determine where this photo was taken."),
               "bad.jpg": dict(COUNTRY_ONLY, confidence=3),
               "coords.jpg": dict(COUNTRY_ONLY, reasoning="Ukraine, around 49.84, 24.03 by the look of it."),
               "late.jpg": COUNTRY_ONLY}
    records = [make_record(n, jpeg) for n in guesses]
    _, _, kept, rejected = run(records, guesses,
                               revisions={"late.jpg": result(ok=False, reason="timeout", detail="60 s")})
    assert {r.input_id: r.reason for r in rejected} == {
        "schema.jpg": "schema_invalid", "refused.jpg": "refusal", "sorry.jpg": "refusal", "bad.jpg": "schema_invalid",
        "coords.jpg": "invented_coordinates", "late.jpg": "timeout"}
    assert len(kept) == len(records) and all(r.dialogue is None for r in kept.values())


def test_every_sample_records_how_it_was_made(jpeg):
    names = [name_with_mode(m, f"p{m}") for m in ("hint", "correction", "choice")]
    records = [make_record(n, jpeg) for n in names] + [make_record("paris.jpg", jpeg, PARIS)]
    guesses = {n: WRONG_COUNTRY for n in names}
    guesses["paris.jpg"] = {"country": "Belgium", "region": None, "city": None, "lat": 50.85, "lon": 4.35,
                            "confidence": 0.3, "reasoning": "French signs and grey roofs suggest Belgium."}
    _, backend, kept, rejected = run(records, guesses, batch_size=8)
    assert rejected == [] and [len(b) for b in backend.batches] == [4, 4, 4]
    guess = backend.batches[0][0]
    assert guess.schema_name == "prediction" and guess.schema_version == "prediction-schema/v1"
    assert guess.prompt_version == "dialogue/v2" and guess.messages[0]["content"][0] == {"type": "image"}
    assert "Ukraine" not in prompt_of(guess) and "Lviv" not in prompt_of(guess)     # the guess is blind
    for record in kept.values():
        sample = record.dialogue
        assert sample["prompt_version"] == "dialogue/v2" and sample["schema_version"] == "prediction-schema/v1"
        assert sample["backend"] == "fake" and sample["model"] == "fake-vlm-1"
        assert sample["params"] == {"max_tokens": 400, "seed": 1, "temperature": 0.3}
        assert sample["usage"] == {"prompt_tokens": 300, "completion_tokens": 90, "requests": 3}
        assert sample["messages"][1]["train"] is False
        json.dumps(record.to_json())
    assert "France" in texts(kept["paris.jpg"].dialogue)[3]
