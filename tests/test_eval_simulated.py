"""The simulated user of interactive evaluation: its turns answer the model's own guess, never
give the truth away early, and the rounds are scored per mode with the gain over round 0."""
from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image

from pipeline.evaluate.predictions import GroundTruth, PredictionFile
from pipeline.evaluate.simulated import MODES, SimCase, SimulatedUser, located_records, run_cases, score_simulated
from pipeline.lvlm.types import LvlmBackend, LvlmRequest, LvlmResult
from pipeline.stages.quality import fold

# (id, lat, lon): GeoNames places, so the geocoder labels them with their own names
TRUTHS = [GroundTruth("lyon", 45.74846, 4.84671), GroundTruth("nairobi", -1.2921, 36.8219),
          GroundTruth("lima", -12.0464, -77.0428), GroundTruth("osaka", 34.6937, 135.5023),
          GroundTruth("toronto", 43.7001, -79.4163), GroundTruth("windhoek", -22.5594, 17.0832)]
# Guesses of every kind the rules distinguish, each with coordinates (for direction hints) or not.
GUESSES = [
    {"country": "Spain", "region": "Madrid", "city": "Madrid", "lat": 40.4165, "lon": -3.70256},
    {"country": "Italy", "region": "Lazio", "city": "Rome", "lat": 41.89193, "lon": 12.51133},
    {"country": "Brazil", "lat": -15.78, "lon": -47.93},
    {"country": "Australia"},
    {},                                          # an unparseable answer: nothing guessed
]


@pytest.fixture(scope="module")
def user():
    return SimulatedUser()


@pytest.fixture(scope="module")
def records():
    return dict(zip([t.id for t in TRUTHS], located_records(TRUTHS)))


def _near_truth_guesses(record):
    """Right country / wrong region, right region / wrong or no city: from the truth's own labels."""
    loc = record.location
    return [
        {"country": loc["country"], "region": "Nowhere Province", "city": "Nowhereville",
         "lat": record.lat + 3.0, "lon": record.lon + 3.0},
        {"country": loc["country"], "region": loc["admin1"], "city": "Nowhereville",
         "lat": record.lat + 0.6, "lon": record.lon - 0.6},
        {"country": loc["country"], "region": loc["admin1"]},
        {"country": loc["country"]},
    ]


def _mentions(text: str, name: str) -> bool:
    name = fold(name)
    return bool(name) and re.search(rf"(?<!\w){re.escape(name)}(?!\w)", fold(text)) is not None


def test_turns_answer_the_models_own_guess(user, records):
    lyon = records["lyon"]
    spain, italy = GUESSES[0], GUESSES[1]
    for mode in MODES:
        a, b = user.reply(lyon, spain, mode, 1), user.reply(lyon, italy, mode, 1)
        assert a.text != b.text, mode
        assert "Spain" in a.text and "Italy" in b.text and "Spain" not in b.text
        assert user.reply(lyon, spain, mode, 1).text == a.text           # deterministic
    # the direction hint is about the guessed point; the choice never offers the rejected name
    assert "north-east" in user.reply(lyon, spain, "hint", 1).text
    assert "north-west" in user.reply(lyon, italy, "hint", 1).text
    choice = user.reply(lyon, italy, "choice", 1)
    assert choice.mode == "choice" and "France" in choice.context["options"] and "Italy" not in choice.context["options"]
    # right down to the city: nothing more to say
    loc = lyon.location
    assert user.reply(lyon, {"country": loc["country"], "region": loc["admin1"], "city": loc["city"],
                             "lat": lyon.lat, "lon": lyon.lon}, "hint", 1) is None


def test_the_truth_never_appears_before_the_model_is_told_it_is_wrong_at_that_level(user, records):
    checked = 0
    for record in records.values():
        loc = record.location
        truth_names = {"country": loc["country"], "region": loc["admin1"], "city": loc["city"]}
        for guess in GUESSES + _near_truth_guesses(record):
            score = user.score(record, guess)
            for mode in MODES:
                for round_no in (1, 2):
                    turn = user.reply(record, guess, mode, round_no)
                    if turn is None:
                        continue
                    checked += 1
                    # A name the turn may say (the model got that level right, or this very turn
                    # tells it that it is wrong there) is taken out first: the truth region
                    # "Nairobi Area" offered in a choice says the region, not the city Nairobi.
                    allowed = {level for level in truth_names
                               if score[level] or (turn.level == level and turn.mode == "choice")}
                    rest = turn.text
                    for level in sorted(allowed, key=lambda lv: -len(truth_names[lv] or "")):
                        rest = re.sub(re.escape(truth_names[level] or "\0"), " ", rest, flags=re.IGNORECASE)
                    for level, name in truth_names.items():
                        if not _mentions(turn.text, name):
                            continue
                        # allowed only where the model already said it, or where this very turn
                        # tells it that it is wrong at that level
                        told_wrong_here = turn.level == level and turn.mode == "choice"
                        assert score[level] or told_wrong_here or not _mentions(rest, name), (
                            record.key, guess, mode, level, turn.text)
                        if told_wrong_here:  # and it says so before naming the truth
                            head = turn.text[:turn.text.index(turn.context["options"])].lower()
                            assert re.search(r"\bnot\b|\bwrong\b|n't", head), turn.text
    assert checked > 200


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buf, format="JPEG")
    return buf.getvalue()


class Listener(LvlmBackend):
    """Guesses Madrid first; then follows the user: a choice turn's options are searched for the
    true country (it "recognises" it), a correction gets the country right one round later, and
    a hint never helps. Records what it was told."""
    name, model = "fake", "listener"

    def __init__(self, truths_by_sha):
        self.truths = truths_by_sha
        self.seen: list[LvlmRequest] = []

    def load_model(self):
        pass

    def stats(self):
        return {}

    def run_inference(self, batch):
        out = []
        for request in batch:
            self.seen.append(request)
            loc = self.truths[request.image_sha256]
            users = [m["content"][0]["text"] for m in request.messages[1:] if m["role"] == "user"]
            answer = {"country": "Spain", "region": "Madrid", "city": "Madrid", "lat": 40.4165, "lon": -3.70256,
                      "confidence": 0.3, "reasoning": "Dry plains."}
            right_country = {"country": loc["country"], "region": None, "city": None,
                             "lat": loc["place_lat"] + 0.3, "lon": loc["place_lon"] + 0.3, "confidence": 0.5,
                             "reasoning": "The user said so."}
            said = [json.loads(m["content"][0]["text"]) for m in request.messages if m["role"] == "assistant"]
            choice = any(w in u for u in users for w in ("one of these", "Is it", "narrow it down for you"))
            corrected = any(w in u for u in users[:-1] for w in ("pointer", "taken in", "somewhere in"))
            if choice or corrected or any(a["country"] == loc["country"] for a in said):  # once right, stays
                answer = right_country
            text = json.dumps(answer)
            out.append(LvlmResult(True, answer, text, None, "", {}, False, 1, "fake", "listener"))
        return out


def test_rounds_per_mode_and_gain_over_round_zero(user, records):
    colours = [(40 * i, 100, 200 - 30 * i) for i in range(len(TRUTHS))]
    cases = [SimCase(t, _jpeg(c), records[t.id]) for t, c in zip(TRUTHS, colours)]
    backend = Listener({LvlmRequest.sha256(c.jpeg): c.record.location for c in cases})
    predictions, turns = run_cases(backend, cases, user, rounds=2)
    # one first guess per image, then per mode and round only the conversations still going
    assert len([r for r in backend.seen if len(r.messages) == 1]) == len(cases)
    assert len(predictions) == len(cases) * len(MODES) * 3
    # round 2's request carries the model's own answers and the user's turns to them
    second = next(r for r in backend.seen if r.request_id.endswith("correction/2"))
    assert [m["role"] for m in second.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert json.loads(second.messages[1]["content"][0]["text"])["city"] == "Madrid"
    assert second.messages[2]["content"][0]["text"].split(".")[0] in (
        "Spain is wrong, but here's a pointer: it's in Europe", "It's not Spain", "No, not Spain")
    assert {t["mode"] for t in turns} == set(MODES)

    report, curves = score_simulated(TRUTHS, PredictionFile(predictions, 0), {})
    by_mode = report["by_mode"]
    assert list(by_mode) == list(MODES)
    for mode in MODES:
        assert list(by_mode[mode]["stages"]) == ["first_guess", "after_1", "after_2"]
        assert by_mode[mode]["stages"]["first_guess"]["geo_country_accuracy"] == 0.0
        assert by_mode[mode]["stages"]["after_2"]["samples"] == len(TRUTHS)
    # choice: right country after round 1; correction: after round 2; hint: never
    assert by_mode["choice"]["stages"]["after_1"]["geo_country_accuracy"] == 1.0
    assert by_mode["correction"]["stages"]["after_1"]["geo_country_accuracy"] == 0.0
    assert by_mode["correction"]["stages"]["after_2"]["geo_country_accuracy"] == 1.0
    assert by_mode["hint"]["gains"]["after_2"]["geo_country_accuracy"] == 0.0
    assert by_mode["choice"]["gains"]["after_2"]["geo_country_accuracy"] == 1.0
    assert by_mode["choice"]["gains"]["after_1"]["within_200km"] == 1.0
    assert by_mode["correction"]["gains"]["after_1"]["median_km"] == 0.0
    assert by_mode["correction"]["gains"]["after_2"]["median_km"] < 0
    assert "first guess" in curves and "choice, after 2" in curves


def test_cli_interactive_on_the_corpus_test_split_runs_the_simulated_user(tmp_path):
    """`eval --out OUT --interactive`: meta/test shards, every mode, turns answering the guesses."""
    from fake_openai_server import FakeOpenAIServer
    from test_eval import _cli, _record, PLACES

    from pipeline.io.shards import shard_path, write_shard

    out = tmp_path / "out"
    write_shard(str(out), shard_path(str(out), "meta", "test", 0), [_record(p) for p in PLACES], "meta")
    madrid = {"country": "Spain", "region": "Madrid", "city": "Madrid", "lat": 40.4165, "lon": -3.70256,
              "confidence": 0.3, "reasoning": "Dry plains."}
    with FakeOpenAIServer(lambda seen, body: madrid) as server:
        assert _cli(["eval", "--out", str(out), "--interactive", "--modes", "correction,choice",
                     "--max-corrections", "1", "--lvlm-endpoint", server.base_url]) == 0
        assert server.count == len(PLACES) * (1 + 2)         # first guesses, then one round per mode
    report_dir = out / "eval" / "meta-test"
    report = json.loads((report_dir / "metrics.json").read_text())
    assert report["kind"] == "simulated" and list(report["by_mode"]) == ["correction", "choice"]
    assert report["by_mode"]["choice"]["stages"]["after_1"]["samples"] == len(PLACES)
    turns = [json.loads(line) for line in (report_dir / "simulated_turns.jsonl").open()]
    assert len(turns) == 2 * len(PLACES) and all("Spain" in t["text"] for t in turns)
    assert "# Interactive evaluation with a simulated user" in (report_dir / "metrics.md").read_text()
