"""Clue part: prompts/schemas loading, selection, quality filters and ClueStage, driven by a
scripted in-process LVLM backend (no network, no model)."""
from __future__ import annotations

import copy
import hashlib
import json
import pickle
from collections import Counter
from pathlib import Path

import pytest

from pipeline.stages.clue import ClueStage, place_text
from pipeline.lvlm.types import LvlmBackend, LvlmResult
from pipeline.core.prompt_files import PromptFileError, load_prompt_set, load_schema
from pipeline.stages.quality import ClueThresholds, country_names, has_coordinates
from pipeline.core.record import Record, make_key
from pipeline.stages.selection import Selection, country_quotas, in_fraction, parse_target, select
from pipeline.core.stage import run_stage
from made_inputs import small_jpeg

REPO = Path(__file__).resolve().parents[1]

LVIV = {"continent": "Europe", "country_code": "UA", "country": "Ukraine", "sovereign_code": "UA",
        "sovereign": "Ukraine", "admin1": "Lviv", "admin2": "", "city": "L'viv",
        "city_id": "L'viv__Lviv_UA", "place_lat": 49.83826, "place_lon": 24.02324, "place_distance_km": 0.3,
        "nearest_country_code": "UA", "country_source": "polygon", "country_disagreement": False}
BOSTON = {"continent": "North America", "country_code": "US", "country": "United States of America",
          "sovereign_code": "US", "sovereign": "United States of America", "admin1": "Massachusetts",
          "admin2": "Suffolk County", "city": "Boston", "city_id": "Boston_Suffolk County_Massachusetts_US",
          "place_lat": 42.35843, "place_lon": -71.05977, "place_distance_km": 1.0,
          "nearest_country_code": "US", "country_source": "polygon", "country_disagreement": False}
ABIDJAN = {"continent": "Africa", "country_code": "CI", "country": "Ivory Coast", "sovereign_code": "CI",
           "sovereign": "Ivory Coast", "admin1": "Abidjan", "admin2": "", "city": "Abidjan",
           "city_id": "Abidjan__Abidjan_CI", "place_lat": 5.35, "place_lon": -4.0,
           "place_distance_km": 1.0, "nearest_country_code": "CI", "country_source": "polygon",
           "country_disagreement": False}
COORDS = {"UA": (49.8397, 24.0297), "US": (42.3601, -71.0589), "CI": (5.36, -4.01)}


@pytest.fixture(scope="module")
def jpeg(exif_samples) -> bytes:
    return small_jpeg(exif_samples / "gps" / "DSCN0010.jpg")


def make_record(name: str, jpeg: bytes, location: dict = LVIV, clue=None) -> Record:
    lat, lon = COORDS[location["country_code"]]
    return Record(key=make_key("exif:/photos", name), source="exif:/photos", input_id=name,
                  image_bytes=jpeg, lat=lat, lon=lon, location=dict(location),
                  image={"sha256": "0" * 64, "width": 64, "height": 48}, split="train", clue=clue)


def result(parsed=None, *, ok=True, reason=None, detail="", text=None) -> LvlmResult:
    return LvlmResult(ok=ok, parsed=parsed if ok else None, text=text if text is not None else json.dumps(parsed),
                      reason=reason, detail=detail, usage={"prompt_tokens": 120, "completion_tokens": 40},
                      cached=False, attempts=1, backend="fake", model="fake-vlm-1")


class ScriptedBackend(LvlmBackend):
    """Answers each request with script(request); remembers every batch it was given."""

    name = "fake"
    model = "fake-vlm-1"

    def __init__(self, script):
        self.script = script
        self.batches: list = []
        self.loads = 0

    def load_model(self) -> None:
        self.loads += 1

    def run_inference(self, batch):
        self.batches.append(list(batch))
        return [self.script(request) for request in batch]

    def stats(self) -> dict:
        return {"requests": sum(len(b) for b in self.batches)}


def good_clue_answer(country="Ukraine", place="L'viv, Ukraine") -> dict:
    return {"clues": [
        {"category": "script_language_signs", "evidence": "Shop sign in Cyrillic letters reading 'Аптека'",
         "implies": "an East Slavic language, Ukrainian spelling", "level": "country"},
        {"category": "architecture", "evidence": "Austro-Hungarian era facades with ornate stucco",
         "implies": "the Habsburg past of Galicia in western Ukraine", "level": "region"},
        {"category": "infrastructure", "evidence": "Tram tracks laid in cobblestone paving",
         "implies": "the historic centre of a large city", "level": "city"}],
        "reasoning": f"Cyrillic signs with Ukrainian spelling, Habsburg-era buildings and cobbled tram "
                     f"streets together point to the old town of {place}.",
        "country": country}


def answer_for(scenarios: dict):
    """A script that answers each record (found by its key in request_id) with its scenario."""
    def script(request):
        key = request.request_id.split(":")[0]
        answer = scenarios[key]
        return answer(request) if callable(answer) else answer
    return script


# --- prompt files and schemas ------------------------------------------------------------------

def test_prompt_sets_and_schemas_load_with_their_versions():
    clue = load_prompt_set("clue")
    assert clue.version == "clue/v2"
    assert {"request", "answer"} <= set(clue.templates) and len(clue.phrasing_lines("questions")) >= 3
    assert "Where was this photo taken, and why?" in clue.phrasing_lines("questions")
    dialogue = load_prompt_set("dialogue")
    assert dialogue.version == "dialogue/v2"
    for name in ("turn_hint", "turn_correction", "turn_choice", "turn_finer", "turn_why", "questions"):
        assert dialogue.phrasing_lines(name)
    assert load_schema("clue").version == "clue-schema/v2"
    assert load_schema("prediction").version == "prediction-schema/v1"
    # the header is a Jinja comment: it never reaches the rendered prompt
    text = clue.render("request", continent="Europe", country="Ukraine", region="Lviv", city="L'viv",
                       city_near=False, city_km="3", place="L'viv, Ukraine")
    assert "version" not in text and "Country: Ukraine" in text and "District" not in text


def test_data_files_are_found_from_any_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    load_prompt_set.cache_clear()
    load_schema.cache_clear()
    assert load_prompt_set("clue").version == "clue/v2"
    assert load_schema("clue").schema["properties"]["clues"]["items"]["properties"]["category"]["enum"]


def test_data_files_are_found_in_an_installed_layout(monkeypatch, tmp_path):
    """A regular install has no repo beside the package: setup.py's data_files put prompts/ and
    schemas/ under <prefix>/share/mg-geo/, where pipeline.core.data_files looks next."""
    import shutil

    from pipeline.core import data_files

    share = tmp_path / "share" / "mg-geo"
    for top in ("prompts", "schemas"):
        shutil.copytree(REPO / top, share / top)
    monkeypatch.setattr(data_files, "_REPO", tmp_path / "site-packages")
    monkeypatch.setattr(data_files, "_SHARE", share)
    load_prompt_set.cache_clear()
    load_schema.cache_clear()
    try:
        assert load_prompt_set("dialogue").version == "dialogue/v2"
        assert load_schema("prediction").version == "prediction-schema/v1"
    finally:
        load_prompt_set.cache_clear()
        load_schema.cache_clear()


def _write_set(root: Path, files: dict) -> str:
    (root / "prompts" / "x").mkdir(parents=True)
    (root / "schemas").mkdir()
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    return str(root)


def test_prompt_set_versions_must_agree_and_exist(tmp_path):
    root = _write_set(tmp_path / "a", {"prompts/x/a.jinja": "{# version: x/v1 #}\nhi {{ who }}",
                                       "prompts/x/b.txt": "# version: x/v2\nline"})
    with pytest.raises(PromptFileError, match="disagree"):
        load_prompt_set("x", root)
    root = _write_set(tmp_path / "b", {"prompts/x/a.jinja": "hi {{ who }}"})
    with pytest.raises(PromptFileError, match="version header"):
        load_prompt_set("x", root)
    root = _write_set(tmp_path / "c", {"prompts/x/a.jinja": "{# version: x/v3 #}\nhi {{ who }}",
                                       "prompts/x/b.txt": "# version: x/v3\n# a comment\none {{ n }}\ntwo {{ n }}",
                                       "schemas/s.schema.json": json.dumps({"type": "object"})})
    prompts = load_prompt_set("x", root)
    assert prompts.version == "x/v3" and prompts.render("a", who="you") == "hi you"
    assert [prompts.phrase("b", i, n=1) for i in range(3)] == ["one 1", "two 1", "one 1"]
    with pytest.raises(Exception):
        prompts.render("a")  # StrictUndefined: a missing variable is an error, not an empty string
    with pytest.raises(PromptFileError, match="version"):
        load_schema("s", root)


# --- selection ---------------------------------------------------------------------------------

def test_select_balances_countries_and_is_deterministic():
    keys = [(f"a{i}", "FR") for i in range(1000)] + [(f"b{i}", "UA") for i in range(10)] + \
           [(f"c{i}", "CI") for i in range(5)]
    chosen = select(keys, 60, seed="s1")
    by_country = Counter(c for k, c in keys if k in chosen)
    assert by_country == {"CI": 5, "UA": 10, "FR": 45}
    assert select(list(reversed(keys)), 60, seed="s1") == chosen          # order does not matter
    assert select(keys, 60, seed="s2") != chosen                          # the seed does
    assert len(select(keys, 0.1, seed="s1")) == round(0.1 * len(keys))
    assert len(select(keys, 5000)) == len(keys)
    # 3 equal countries, 10 records: shares 4/3/3 in some order, never more than the budget
    quotas = country_quotas({"A": 100, "B": 100, "C": 100}, 10)
    assert sorted(quotas.values()) == [3, 3, 4]


def test_fraction_predicate_and_targets():
    keys = [f"k{i}" for i in range(20000)]
    small = {k for k in keys if in_fraction(k, 0.02)}
    large = {k for k in keys if in_fraction(k, 0.05)}
    assert small <= large                       # same seed: a smaller fraction is a subset
    assert 0.04 < len(large) / len(keys) < 0.06
    assert parse_target("0.05") == 0.05 and parse_target("5%") == 0.05 and parse_target("70000") == 70000
    with pytest.raises(ValueError):
        parse_target("1.5")
    assert Selection.every()("anything") and not Selection.of_keys({"a"})("b")


# --- quality helpers ---------------------------------------------------------------------------

def test_country_names_know_aliases_and_codes():
    names = country_names()
    assert names.same_country("USA", BOSTON) and names.same_country("U.S.", BOSTON)
    assert names.same_country("United States", BOSTON) and names.same_country("US", BOSTON)
    assert names.same_country("Côte d'Ivoire", ABIDJAN) and names.same_country("CIV", ABIDJAN)
    assert not names.same_country("Ghana", ABIDJAN) and not names.same_country("Poland", LVIV)
    assert names.name("UA") == "Ukraine"


@pytest.mark.parametrize("text,expected", [
    ("located at 48.8566, 2.3522 in the centre", True), ("around 49.84° N, 24.03° E", True),
    ("49°50'N", True), ("latitude 49.8", True), ("GPS coordinates: -33.9", True),
    ("speed limit 50 and a 2.5 m height sign", False), ("built in the 1890s", False),
])
def test_coordinates_detector(text, expected):
    assert has_coordinates(text) is expected


# --- ClueStage ---------------------------------------------------------------------------------

def test_good_answers_become_samples_in_one_batched_call(jpeg):
    records = [make_record(f"p{i}.jpg", jpeg) for i in range(4)] + [make_record("boston.jpg", jpeg, BOSTON)]
    boston = good_clue_answer("USA", "Boston, Massachusetts, USA")
    backend = ScriptedBackend(lambda r: result(boston if "boston" in r.request_id else good_clue_answer()))
    stage = ClueStage(backend=backend, params={"temperature": 0.2, "max_tokens": 800, "seed": 7}, batch_size=8)
    kept, rejected = run_stage(stage, records)
    assert rejected == [] and len(kept) == 5 and backend.loads == 1
    assert len(backend.batches) == 1 and len(backend.batches[0]) == 5     # one call for the batch
    request = backend.batches[0][0]
    assert request.image_jpeg == jpeg and request.image_sha256 == hashlib.sha256(jpeg).hexdigest()
    assert request.image_sha256 != records[0].image["sha256"]
    assert request.schema_name == "clue" and request.schema_version == "clue-schema/v2"
    assert request.prompt_version == "clue/v2" and request.params == {"max_tokens": 800, "seed": 7, "temperature": 0.2}
    prompt = request.messages[0]["content"][1]["text"]
    assert request.messages[0]["content"][0] == {"type": "image"}
    for truth in ("Europe", "Ukraine", "Lviv", "L'viv"):
        assert truth in prompt                                           # the model sees the truth
    sample = kept[0].clue
    user, assistant = sample["messages"]
    assert user["role"] == "user" and user["content"][0] == {"type": "image"}
    assert user["content"][1]["text"] in load_prompt_set("clue").phrasing_lines("questions")
    text = assistant["content"][0]["text"]
    assert "Cyrillic letters" in text and text.rstrip().endswith("Answer: L'viv, Lviv, Ukraine (49.8397, 24.0297)")
    assert "train" not in assistant
    assert [c["category"] for c in sample["clues"]] == ["script_language_signs", "architecture", "infrastructure"]
    assert sample["prompt_version"] == "clue/v2" and sample["schema_version"] == "clue-schema/v2"
    assert sample["backend"] == "fake" and sample["model"] == "fake-vlm-1"
    assert sample["params"] == {"max_tokens": 800, "seed": 7, "temperature": 0.2}
    assert sample["usage"] == {"prompt_tokens": 120, "completion_tokens": 40, "requests": 1}
    assert kept[4].clue["country"] == "USA"                               # an alias is the right country
    json.dumps(kept[0].to_json())                                         # the shard json serialises


def _with(**changes):
    answer = good_clue_answer()
    answer.update(changes)
    return answer


def _clues(*evidence):
    base = good_clue_answer()["clues"]
    return [dict(base[i % len(base)], evidence=e) for i, e in enumerate(evidence)]


BAD_ANSWERS = {
    "backend_schema_invalid": (result(ok=False, reason="schema_invalid", detail="clues: required"), "schema_invalid"),
    "backend_invalid_json": (result(ok=False, reason="invalid_json", detail="not JSON"), "invalid_json"),
    "local_schema_invalid": (result(_with(clues=[dict(good_clue_answer()["clues"][0], category="food")] * 2)),
                             "schema_invalid"),
    "refusal": (result(_with(clues=[], reasoning="I'm sorry, but I can't help with identifying locations.")),
                "refusal"),
    "too_few": (result(_with(clues=good_clue_answer()["clues"][:1])), "too_few_clues"),
    "short_evidence": (result(_with(clues=_clues("Cyrillic shop sign reading 'Аптека'", "trees"))),
                       "evidence_missing_or_generic"),
    "generic_evidence": (result(_with(clues=_clues("Cyrillic shop sign reading 'Аптека'",
                                                   "The image shows a city street with buildings"))),
                         "evidence_missing_or_generic"),
    "duplicate": (result(_with(clues=_clues("Shop sign in Cyrillic letters reading 'Аптека'",
                                            "Shop signs in Cyrillic letters reading 'Аптека'"))), "duplicate_text"),
    "coordinates": (result(_with(reasoning="The old town of L'viv, Ukraine, at 49.84, 24.03.")),
                    "invented_coordinates"),
    "wrong_country_field": (result(_with(country="Poland")), "wrong_country"),
    "wrong_country_summary": (result(_with(reasoning="Cyrillic signs and Habsburg facades: this must be Russia.")),
                              "wrong_country"),
}


def test_each_quality_filter_rejects_with_its_own_reason(jpeg):
    records = [make_record(f"{name}.jpg", jpeg) for name in BAD_ANSWERS] + [make_record("fine.jpg", jpeg)]
    scenarios = {r.key: BAD_ANSWERS[r.input_id[:-4]][0] if r.input_id != "fine.jpg" else result(good_clue_answer())
                 for r in records}
    stage = ClueStage(backend=ScriptedBackend(answer_for(scenarios)))
    kept, rejected = run_stage(stage, records)
    reasons = {row.input_id[:-4]: row.reason for row in rejected}
    assert reasons == {name: reason for name, (_, reason) in BAD_ANSWERS.items()}
    assert all(row.part == "clue" and row.stage == "clue" for row in rejected)
    # a clue reject keeps the record (its meta sample) without a clue sample
    assert len(kept) == len(records)
    assert [r.input_id for r in kept if r.clue is not None] == ["fine.jpg"]


def test_summary_may_name_a_ruled_out_neighbour(jpeg):
    answer = _with(reasoning="The plates could pass for Polish, but the Cyrillic signs rule Poland out. "
                             "This is the old town of L'viv, Ukraine, close to the border with Poland.")
    kept, rejected = run_stage(ClueStage(backend=ScriptedBackend(lambda r: result(answer))),
                               [make_record("a.jpg", jpeg)])
    assert rejected == [] and kept[0].clue is not None


def test_thresholds_are_configurable(jpeg):
    two = _with(clues=good_clue_answer()["clues"][:2])
    stage = ClueStage(backend=ScriptedBackend(lambda r: result(two)), thresholds=ClueThresholds(min_clues=3))
    _, rejected = run_stage(stage, [make_record("a.jpg", jpeg)])
    assert [r.reason for r in rejected] == ["too_few_clues"]
    stage = ClueStage(backend=ScriptedBackend(lambda r: result(_with(country="Poland"))),
                      thresholds=ClueThresholds(check_country=False))
    _, rejected = run_stage(stage, [make_record("a.jpg", jpeg)])
    assert rejected == []


def test_unselected_records_pass_without_request_or_ledger_row(jpeg):
    records = [make_record(f"s{i}.jpg", jpeg) for i in range(40)]
    backend = ScriptedBackend(lambda r: result(good_clue_answer()))
    selection = Selection.of_fraction(0.3, seed="t")
    kept, rejected = run_stage(ClueStage(backend=backend, selection=selection), records)
    chosen = [r.input_id for r in records if selection(r.key)]
    assert 0 < len(chosen) < 40 and rejected == []
    assert [r.input_id for r in kept if r.clue] == chosen
    assert len(backend.batches[0]) == len(chosen)
    assert all(r.clue is None for r in kept if r.input_id not in chosen)


def test_backend_failure_and_missing_inputs_become_rejects(jpeg):
    class Broken(ScriptedBackend):
        def run_inference(self, batch):
            raise ConnectionError("server went away")

    no_location = make_record("nl.jpg", jpeg).replace(location=None)
    kept, rejected = run_stage(ClueStage(backend=Broken(None)), [make_record("a.jpg", jpeg), no_location])
    assert sorted(r.reason for r in rejected) == ["lvlm_error", "no_location"] and len(kept) == 2


def test_stage_needs_options_or_backend_and_pickles_without_a_made_backend():
    with pytest.raises(ValueError):
        ClueStage()
    from pipeline.lvlm.options import LvlmOptions

    stage = ClueStage(LvlmOptions(backend="openai", endpoint="http://127.0.0.1:9", api_key="k", seed=3))
    assert stage.params == {"max_tokens": 512, "seed": 3, "temperature": 0.0}
    stage._backend = object()  # as if setup() had made one
    clone = pickle.loads(pickle.dumps(stage))
    assert clone.backend is None and clone.prompts.version == "clue/v2"


def test_place_text_skips_empty_and_repeated_levels():
    assert place_text(LVIV) == "L'viv, Ukraine"
    assert place_text({"city": "Paris", "admin1": "Paris", "country": "France"}) == "Paris, France"
    assert place_text(copy.deepcopy(BOSTON)) == "Boston, Massachusetts, United States of America"


def test_runs_inside_the_beam_wrapper(jpeg):
    """The stage pickles into Beam's DoFn, gets batched, and clue rejects keep their records."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline.beam.wrapper import ApplyStages, LatestSnapshots

    good = result(good_clue_answer())
    few = result(_with(clues=good_clue_answer()["clues"][:1]))
    records = [make_record(f"b{i}.jpg", jpeg) for i in range(6)]
    stage = ClueStage(backend=ScriptedBackend(lambda r: few if r.request_id.startswith("b0-") else good),
                      batch_size=4)
    with beam.Pipeline("DirectRunner") as p:
        kept, rejected, stats = p | beam.Create(records) | ApplyStages([stage])
        # The backend's counters leave through the stats output, not a file written in teardown.
        latest = stats | beam.CombineGlobally(LatestSnapshots()).without_defaults()
        assert_that(latest | "requests" >> beam.Map(lambda found: sum(s["requests"] for s in found)),
                    equal_to([6]), label="stats")
        assert_that(kept | "has" >> beam.Map(lambda r: (r.input_id, r.clue is not None)),
                    equal_to([(r.input_id, r.input_id != "b0.jpg") for r in records]), label="kept")
        assert_that(rejected | "why" >> beam.Map(lambda row: (row.input_id, row.reason, row.part)),
                    equal_to([("b0.jpg", "too_few_clues", "clue")]), label="rejected")
