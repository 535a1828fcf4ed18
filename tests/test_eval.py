"""`mg-geo eval`: predictions/ground-truth files, model runs over shards (single and dialogue), reports."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from fake_openai_server import FakeOpenAIServer

from pipeline.cli import main as _cli  # `mg-geo ARGS` in this process
from pipeline.evaluate.interactive import dialogue_mode, follow_ups, predict_dialogues, score_dialogues
from pipeline.evaluate.predictions import (GroundTruth, GroundTruthError, Prediction, read_ground_truth,
                                           read_predictions, write_ground_truth, write_predictions)
from pipeline.evaluate.shards import iter_samples, shard_paths
from pipeline.evaluate.single import predict_split, score_files
from pipeline.lvlm.types import LvlmBackend, LvlmRequest, LvlmResult
from pipeline.core.record import Record, make_key
from pipeline.io.shards import shard_path, write_shard

KM_PER_DEGREE = 6371.0 * math.pi / 180.0

# (name, colour, country code, country, admin1, city, lat, lon)
PLACES = [
    ("paris", (220, 30, 30), "FR", "France", "Île-de-France", "Paris", 48.8566, 2.3522),
    ("tokyo", (30, 200, 40), "JP", "Japan", "Tokyo", "Tokyo", 35.6762, 139.6503),
    ("lima", (40, 60, 220), "PE", "Peru", "Lima", "Lima", -12.0464, -77.0428),
    ("nairobi", (230, 220, 40), "KE", "Kenya", "Nairobi Area", "Nairobi", -1.2921, 36.8219),
    ("windhoek", (120, 40, 160), "NA", "Namibia", "Khomas", "Windhoek", -22.5609, 17.0658),
]
MADRID = {"country": "Spain", "region": "Madrid", "city": "Madrid", "lat": 40.4168, "lon": -3.7038,
          "confidence": 0.4, "reasoning": "Dry plains and Spanish-looking buildings."}


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _answer(place, **changes) -> dict:
    name, _, _, country, region, city, lat, lon = place
    out = {"country": country, "region": region, "city": city, "lat": lat, "lon": lon,
           "confidence": 0.8, "reasoning": f"It looks like {city}."}
    out.update(changes)
    return out


def _user(text, image=False):
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


def _assistant(text, train=True):
    m = {"role": "assistant", "content": [{"type": "text", "text": text}]}
    if not train:
        m["train"] = False
    return m


# Dialogue follow-ups per place: (turn mode, text), and the dialogue's own correction mode.
# Windhoek's dialogue has one follow-up only and no "mode" key (labelled from its turns).
DIALOGUE_MODES = {"paris": "correction", "tokyo": "hint", "lima": "choice", "nairobi": "hint", "windhoek": None}
FOLLOW_UPS = {
    "paris": [("correction", "It's not Spain. This photo was taken in Europe. Which country?"),
              ("correction", "Closer. Think of the capital.")],
    "tokyo": [("hint", "Not Spain. Look again at this detail: the signs use kanji."),
              ("hint", "Here's a hint: very dense city, trains everywhere.")],
    "lima": [("choice", "Not Spain. Is it Peru, Chile or Bolivia?"),
             ("finer", "Yes, Peru is right. Can you narrow it down to the city?")],
    "nairobi": [("hint", "Not Spain. Here's a hint: matatu minibuses."),
                ("hint", "Which city fits that?")],
    "windhoek": [("choice", "Not Spain. Is it Namibia or Botswana?")],
}


def _record(place, split="test") -> Record:
    name, colour, code, country, region, city, lat, lon = place
    input_id = f"{split}/{name}.jpg"
    # the layout pipeline.stages.dialogue writes: turns[0] is the blind guess, then one turn per user turn
    messages = [_user("Where was this photo taken?", image=True), _assistant("Spain, Madrid.", train=False)]
    turns = [{"mode": "guess", "level": None, "user": "Where was this photo taken?",
              "guess": {"country": "Spain"}, "score": {"level": "none"}}]
    for mode, text in FOLLOW_UPS[name]:
        messages += [_user(text), _assistant("A scripted revision.")]
        turns.append({"mode": mode, "level": "country", "user": text, "guess": {"country": "Spain"},
                      "score": {"level": "none"}})
    dialogue = {"messages": messages, "turns": turns, "first_guess_correct_level": "none"}
    if DIALOGUE_MODES[name]:
        dialogue["mode"] = DIALOGUE_MODES[name]
    return Record(
        key=make_key("test:eval", input_id), source="test:eval", input_id=input_id, image_bytes=_jpeg(colour),
        lat=lat, lon=lon, split=split,
        location={"country_code": code, "country": country, "admin1": region, "admin2": "", "city": city,
                  "continent": "x"},
        meta={"template_version": "t", "messages": [_user("Where?", image=True), _assistant(city)], "qa": []},
        dialogue=dialogue)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """OUT with meta/test and dialogue/test shards written by the build's own shard writer."""
    out = tmp_path / "out"
    records = [_record(p) for p in PLACES]
    for part in ("meta", "dialogue"):
        write_shard(str(out), shard_path(str(out), part, "test", 0), records[:3], part)
        write_shard(str(out), shard_path(str(out), part, "test", 1), records[3:], part)
    return out


def _result(parsed=None, reason=None) -> LvlmResult:
    return LvlmResult(ok=reason is None, parsed=parsed, text=json.dumps(parsed) if parsed else "garbage",
                      reason=reason, detail="scripted" if reason else "", usage={}, cached=False,
                      attempts=1, backend="fake", model="scripted")


class ScriptedBackend(LvlmBackend):
    """Answers by looking at the request: the photo (by sha256) and the conversation so far."""
    name, model = "fake", "scripted"

    def __init__(self, answer):
        self.answer = answer
        self.batches: list[list[LvlmRequest]] = []

    def load_model(self):
        pass

    def run_inference(self, batch):
        self.batches.append(list(batch))
        return [self.answer(r) for r in batch]

    def stats(self):
        return {"requests": sum(len(b) for b in self.batches)}


def _place_of(request: LvlmRequest):
    by_sha = {LvlmRequest.sha256(_jpeg(p[1])): p for p in PLACES}
    return by_sha[request.image_sha256]


# ---- files -----------------------------------------------------------------------------------
OSV5M_HEADER = ("id,latitude,longitude,thumb_original_url,country,sequence,captured_at,lon_bin,lat_bin,cell,"
                "land_cover,road_index,drive_side,climate,soil,dist_sea,quadtree_10_5000,quadtree_10_25000,"
                "quadtree_10_1000,quadtree_10_50000,quadtree_10_12500,quadtree_10_500,quadtree_10_2500,"
                "unique_region,unique_sub-region,unique_city,unique_country,creator_username,creator_id,"
                "region,sub-region,city")


def _osv_row(id_, lat, lon, country, region, sub_region, city):
    filler = ["https://x/thumb.jpg", country, "seq1", "2019-01-01", "3", "4", "5", "1", "0.5", "1", "9", "6",
              "0.1", "1", "2", "3", "4", "5", "6", "7", f"{region}_{country}", f"{sub_region}_{country}",
              f"{city}_{country}", country, "someone", "42"]
    return ",".join([id_, lat, lon] + filler[:1] + [country] + filler[2:] + [region, sub_region, city])


def test_osv5m_ground_truth_layout(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("\n".join([
        OSV5M_HEADER,
        _osv_row("0012", "48.8566", "2.3522", "FR", "Île-de-France", "Paris", "Paris"),
        _osv_row("77", "-22.5609", "17.0658", "NA", "Khomas", "", "Windhoek"),   # Namibia's code is "NA"
        _osv_row("78", "-1.5", "179.99", "FJ", "", "", ""),
    ]) + "\n", encoding="utf-8")
    truths = read_ground_truth(path)
    assert truths[0] == GroundTruth("0012", 48.8566, 2.3522, "FR", "Île-de-France", "Paris", "Paris")
    assert truths[1].country == "NA" and truths[1].city == "Windhoek" and truths[1].sub_region == ""
    assert truths[2].id == "78" and truths[2].region == "" and truths[2].lon == 179.99


def test_gaea_style_ground_truth_variants(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("id,lat,lng,city,country\nimg_1,10.5,-20.25,Dakar,Senegal\n", encoding="utf-8")
    assert read_ground_truth(a) == [GroundTruth("img_1", 10.5, -20.25, "Senegal", "", "", "Dakar")]
    b = tmp_path / "b.csv"
    b.write_text("Image_ID,Latitude,Longitude\nq,1,2\n", encoding="utf-8")
    assert read_ground_truth(b) == [GroundTruth("q", 1.0, 2.0)]


@pytest.mark.parametrize("text, message", [
    ("id,lat\n1,2\n", "no longitude column"),
    ("id,lat,lon\n1,2,3\n1,4,5\n", "appears twice"),
    ("id,lat,lon\n1,95,3\n", "lat_out_of_range"),
    ("id,lat,lon\n,1,3\n", "no id"),
])
def test_broken_ground_truth_is_an_error(tmp_path, text, message):
    path = tmp_path / "gt.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(GroundTruthError, match=message):
        read_ground_truth(path)


def test_prediction_file_round_trip_scores_the_same(tmp_path):
    truths = [GroundTruth(p[0], p[6], p[7], p[2], p[4], "", p[5]) for p in PLACES]
    predictions = [
        Prediction("paris", 48.85, 2.35, "France", "Ile-de-France", "Paris", 0.9, "Haussmann façades"),
        Prediction("tokyo", 34.69, 135.50, "Japan", "Osaka", "Osaka", None, ""),
        Prediction("lima", error="refusal"),
        Prediction("windhoek", -22.0, 17.0, "Namibia", "Khomas", "Windhoek", 0.3, "Ünïcödé ✓"),
        # nairobi: missing
    ]
    direct, _ = score_files(truths, _as_file(predictions), {})
    jsonl = tmp_path / "p.jsonl"
    write_predictions(jsonl, predictions)
    back = read_predictions(jsonl)
    assert back.predictions == predictions and back.unreadable_rows == 0
    assert score_files(truths, back, {})[0]["metrics"] == direct["metrics"]
    # the same predictions as csv (what other tools write), and the truth through its csv
    csv_path = tmp_path / "p.csv"
    pd.DataFrame([{"id": p.id, "lat": p.lat, "lon": p.lon, "country": p.country, "region": p.region,
                   "city": p.city} for p in predictions]).to_csv(csv_path, index=False)
    gt_path = tmp_path / "gt.csv"
    write_ground_truth(gt_path, truths)
    assert read_ground_truth(gt_path) == truths
    from_csv, _ = score_files(read_ground_truth(gt_path), read_predictions(csv_path), {})
    m = from_csv["metrics"]
    assert m == {**direct["metrics"], "unparseable_reasons": {"missing_coordinates": 1}}
    assert (m["samples"], m["answered"], m["unparseable"], m["missing"]) == (5, 3, 1, 1)
    assert m["country_accuracy"] == pytest.approx(3 / 5) and m["city_accuracy"] == pytest.approx(2 / 5)


def _as_file(predictions):
    from pipeline.evaluate.predictions import PredictionFile
    return PredictionFile(list(predictions), 0)


def test_messy_prediction_rows_are_counted(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "a", "latitude": "12.5", "lng": "-3"}),      # text numbers, other spellings
        json.dumps({"id": "b", "lat": "north-ish", "lon": 3}),
        json.dumps({"id": "c", "lat": 91, "lon": 3}),
        json.dumps({"id": "d", "lat": 10, "lon": 180.5}),
        json.dumps({"id": "e", "lat": None, "lon": 3}),
        json.dumps({"id": "f", "lat": True, "lon": 3}),
        json.dumps({"lat": 1, "lon": 2}),                              # no id: unreadable
        '{"id": "g", "lat": 1, "lon"',                                # broken JSON: unreadable
        "[1, 2]",                                                     # not an object: unreadable
        "",
        json.dumps({"id": "a", "lat": 0, "lon": 0}),                   # duplicate: first row wins
        json.dumps({"id": "nobody", "lat": 0, "lon": 0}),              # not in the ground truth
    ]) + "\n", encoding="utf-8")
    pf = read_predictions(path)
    by_id = {p.id: p for p in pf.predictions if p.id != "a" or p.lat != 0}
    assert (by_id["a"].lat, by_id["a"].lon, by_id["a"].error) == (12.5, -3.0, "")
    assert [by_id[k].error for k in "bcdef"] == ["bad_coordinates", "lat_out_of_range", "lon_out_of_range",
                                                 "missing_coordinates", "bad_coordinates"]
    assert pf.unreadable_rows == 3
    truths = [GroundTruth(k, 12.5, -3.0) for k in "abcdefgh"]
    report, curves = score_files(truths, pf, {})
    assert report["file_checks"] == {"unreadable_rows": 3, "duplicate_rows": 1, "unknown_ids": 1}
    m = report["metrics"]
    assert (m["answered"], m["unparseable"], m["missing"]) == (1, 5, 2)  # g (broken line) and h: missing
    assert m["unparseable_reasons"] == {"bad_coordinates": 2, "lat_out_of_range": 1, "lon_out_of_range": 1,
                                        "missing_coordinates": 1}
    assert m["within_1km"] == pytest.approx(1 / 8)
    assert curves["predictions"].count(None) == 7


# ---- model runs over shards ------------------------------------------------------------------
def _single_answers(request):
    place = _place_of(request)
    name = place[0]
    if name == "tokyo":
        return _result(_answer(place, region="Kanto", city="Yokohama", lat=35.4437, lon=139.6380))
    if name == "lima":
        return _result(reason="invalid_json")
    if name == "nairobi":
        return _result(_answer(place, lat="far away"))
    if name == "windhoek":
        return _result(_answer(place, country="Namibia", lat=place[6] + 0.5))
    return _result(_answer(place))


def test_model_run_writes_files_that_rescore_identically(corpus, tmp_path):
    backend = ScriptedBackend(_single_answers)
    paths = shard_paths(str(corpus), "meta", "test")
    assert len(paths) == 2
    pred_path, truth_path, skipped = predict_split(backend, iter_samples(paths), tmp_path / "run",
                                                   sampling={"temperature": 0}, batch_size=2)
    assert skipped == 0
    assert [len(b) for b in backend.batches] == [2, 2, 1]
    request = backend.batches[0][0]
    # The corpus' answer line is asked for, and no JSON schema that would make a backend ask for JSON.
    assert request.schema is None and "Answer: <city>, <region>, <country>" in request.messages[0]["content"][1]["text"]
    assert request.messages[0]["content"][0] == {"type": "image"} and request.image_jpeg
    truths = read_ground_truth(truth_path)
    assert [t.country for t in truths] == ["FR", "JP", "PE", "KE", "NA"]
    report, _ = score_files(truths, read_predictions(pred_path), {})
    m = report["metrics"]
    assert (m["samples"], m["answered"], m["unparseable"], m["missing"]) == (5, 3, 2, 0)
    assert m["unparseable_reasons"] == {"bad_coordinates": 1, "invalid_json": 1}
    assert m["country_accuracy"] == pytest.approx(3 / 5)          # paris, tokyo, windhoek ("Namibia" = "NA")
    assert m["region_accuracy"] == pytest.approx(2 / 5)           # tokyo said Kanto
    assert m["city_accuracy"] == pytest.approx(2 / 5)
    assert m["within_1km"] == pytest.approx(1 / 5)
    assert m["within_200km"] == pytest.approx(3 / 5)              # Yokohama ~26 km, Windhoek 55.6 km
    # the CLI scoring the files gives the same numbers and writes the three outputs
    report_dir = tmp_path / "report"
    rc = _cli(["eval", "--predictions", str(pred_path), "--ground-truth", str(truth_path),
               "--report-dir", str(report_dir)])
    assert rc == 0
    written = json.loads((report_dir / "metrics.json").read_text())
    assert written["kind"] == "single" and written["metrics"] == m
    md = (report_dir / "metrics.md").read_text()
    assert "| Country (%) | 60.0 |" in md and "| <25 km (%) | 20.0 |" in md and "| <200 km (%) | 60.0 |" in md
    with Image.open(report_dir / "error_cdf.png") as im:
        assert im.format == "PNG" and im.width > 300


def _dialogue_answers(request):
    """The model guesses Madrid first, then gets it right once the sample's turns say enough:
    Paris after 1 follow-up, Tokyo after 2, Lima never, Nairobi after 1, Windhoek after 1."""
    place = _place_of(request)
    follow_ups_seen = sum(1 for m in request.messages if m["role"] == "user") - 1
    needed = {"paris": 1, "tokyo": 2, "lima": 99, "nairobi": 1, "windhoek": 1}[place[0]]
    return _result(_answer(place) if follow_ups_seen >= needed else dict(MADRID))


def test_dialogue_run_and_gain_after_corrections(corpus, tmp_path):
    backend = ScriptedBackend(_dialogue_answers)
    paths = shard_paths(str(corpus), "dialogue", "test")
    pred_path, truth_path, skipped = predict_dialogues(backend, iter_samples(paths), tmp_path / "run",
                                                       sampling={}, batch_size=10, max_corrections=2)
    assert skipped == 0
    # one batch per stage: 5 first guesses, 5 after one follow-up, 4 after two (windhoek has one)
    assert [len(b) for b in backend.batches] == [5, 5, 4]
    paris_stage2 = next(r for r in backend.batches[2] if _place_of(r)[0] == "paris")
    roles = [m["role"] for m in paris_stage2.messages]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    # the model's own answers are the history (not the sample's scripted ones), then the sample's turns
    assert json.loads(paris_stage2.messages[1]["content"][0]["text"])["city"] == "Madrid"
    assert json.loads(paris_stage2.messages[3]["content"][0]["text"])["city"] == "Paris"
    assert paris_stage2.messages[2]["content"][0]["text"].startswith(FOLLOW_UPS["paris"][0][1])
    assert paris_stage2.messages[4]["content"][0]["text"].startswith(FOLLOW_UPS["paris"][1][1])
    assert paris_stage2.messages[0]["content"][0] == {"type": "image"}

    report, curves = score_dialogues(read_ground_truth(truth_path), read_predictions(pred_path), {})
    stages = report["stages"]
    assert list(stages) == ["first_guess", "after_1", "after_2"]
    assert stages["first_guess"]["country_accuracy"] == 0.0
    assert stages["after_1"]["samples"] == 5 and stages["after_1"]["country_accuracy"] == pytest.approx(3 / 5)
    assert stages["after_2"]["samples"] == 4 and stages["after_2"]["country_accuracy"] == pytest.approx(3 / 4)
    assert report["gains"]["after_1"]["country_accuracy"] == pytest.approx(3 / 5)
    assert report["gains"]["after_2"]["samples"] == 4
    assert report["gains"]["after_2"]["city_accuracy"] == pytest.approx(3 / 4)
    assert report["gains"]["after_1"]["median_km"] < 0
    # per mode: paris=correction, tokyo+nairobi=hint, lima+windhoek=choice (windhoek from its turn)
    by_mode = report["by_mode"]
    assert set(by_mode) == {"correction", "hint", "choice"}
    assert by_mode["hint"]["stages"]["after_1"]["country_accuracy"] == pytest.approx(1 / 2)
    assert by_mode["hint"]["gains"]["after_2"]["country_accuracy"] == pytest.approx(1.0)
    assert by_mode["correction"]["gains"]["after_1"]["city_accuracy"] == 1.0
    assert by_mode["choice"]["stages"]["after_1"]["samples"] == 2
    assert by_mode["choice"]["stages"]["after_1"]["city_accuracy"] == pytest.approx(1 / 2)
    assert by_mode["choice"]["stages"]["after_2"]["samples"] == 1           # lima only
    assert by_mode["choice"]["gains"]["after_2"]["country_accuracy"] == 0.0
    assert set(curves) == {"first_guess", "after_1", "after_2"}

    # the CLI re-scoring of the files writes the same report and the dialogue tables
    report_dir = tmp_path / "report"
    assert _cli(["eval", "--interactive", "--predictions", str(pred_path), "--ground-truth", str(truth_path),
                 "--report-dir", str(report_dir)]) == 0
    written = json.loads((report_dir / "metrics.json").read_text())
    assert written["stages"] == stages and written["by_mode"] == json.loads(json.dumps(by_mode))
    md = (report_dir / "metrics.md").read_text()
    assert "| all | after 1 | 5 | 60.0 |" in md and "| hint | after 2 | 2 | +100.0 |" in md
    assert (report_dir / "error_cdf.png").stat().st_size > 1000


def test_follow_ups_pair_turn_modes_with_user_turns():
    dialogue = _record(PLACES[2]).dialogue
    opening, turns, mode = follow_ups(dialogue, 5)
    assert opening["content"][0] == {"type": "image"}
    assert turns == FOLLOW_UPS["lima"] and mode == "choice"   # the "guess" turn is the opening, skipped
    assert follow_ups(dialogue, 1)[1] == FOLLOW_UPS["lima"][:1]
    assert follow_ups(_record(PLACES[4]).dialogue, 2)[2] == "choice"   # no "mode" key: from the turns
    assert follow_ups({"messages": []}, 2) is None
    assert dialogue_mode(["hint", "correction"]) == "mixed" and dialogue_mode([]) == "none"


def test_predictions_scored_against_shard_ground_truth(corpus, tmp_path):
    preds = tmp_path / "p.csv"
    keys = [make_key("test:eval", f"test/{p[0]}.jpg") for p in PLACES]
    pd.DataFrame([{"id": k, "lat": p[6], "lon": p[7], "country": p[2]} for k, p in zip(keys, PLACES)]).to_csv(
        preds, index=False)
    report_dir = tmp_path / "r"
    assert _cli(["eval", "--out", str(corpus), "--predictions", str(preds), "--report-dir", str(report_dir)]) == 0
    m = json.loads((report_dir / "metrics.json").read_text())["metrics"]
    assert m["samples"] == 5 and m["within_1km"] == 1.0 and m["country_accuracy"] == 1.0


def test_eval_end_to_end_over_http(corpus, capsys):
    """`mg-geo eval --out OUT` against a loopback OpenAI-compatible server."""
    by_photo = {LvlmRequest.sha256(_jpeg(p[1])): _answer(p) for p in PLACES}
    with FakeOpenAIServer(lambda seen, body: by_photo[seen.image_sha256[0]]) as server:
        rc = _cli(["eval", "--out", str(corpus), "--lvlm-endpoint", server.base_url, "--batch-size", "2"])
        assert server.count == len(PLACES)
    assert rc == 0
    report_dir = corpus / "eval" / "meta-test"
    report = json.loads((report_dir / "metrics.json").read_text())
    m = report["metrics"]
    assert (m["samples"], m["within_1km"], m["country_accuracy"], m["city_accuracy"]) == (5, 1.0, 1.0, 1.0)
    assert report["inputs"]["backend"] == "openai" and report["inputs"]["model"] == "fake-vlm"
    assert report["lvlm"]["options"]["api_key"] is None and report["lvlm"]["stats"]["requests"] == 5
    assert (report_dir / "predictions.jsonl").exists() and (report_dir / "ground_truth.csv").exists()
    assert "| Country (%) | 100.0 |" in capsys.readouterr().out


def test_cli_reports_bad_inputs(tmp_path, capsys):
    assert _cli(["eval", "--predictions", str(tmp_path / "nope.jsonl")]) == 2   # no ground truth anywhere
    assert "needs --ground-truth" in capsys.readouterr().err
    assert _cli(["eval", "--predictions", str(tmp_path / "nope.jsonl"), "--ground-truth", str(tmp_path / "x.csv")]) == 2
    assert _cli(["eval", "--out", str(tmp_path / "empty"), "--lvlm-endpoint", "http://127.0.0.1:9/v1"]) == 2
    assert "no shards found" in capsys.readouterr().err
