"""The answer-line parser eval and chat share: free-text replies and JSON alike."""
from __future__ import annotations

import json

import pytest

from pipeline.evaluate.assistant import format_reply
from pipeline.evaluate.answer_line import format_answer_line, parse_answer, parse_answer_line
from pipeline.evaluate.model import to_prediction
from pipeline.lvlm.types import LvlmResult


@pytest.mark.parametrize("line, expected", [
    ("Lyon, Auvergne-Rhône-Alpes, France (45.76, 4.84)",
     {"city": "Lyon", "region": "Auvergne-Rhône-Alpes", "country": "France", "lat": 45.76, "lon": 4.84}),
    ("France", {"country": "France"}),
    ("France.", {"country": "France"}),
    ("Lviv Oblast, Ukraine", {"region": "Lviv Oblast", "country": "Ukraine"}),   # region word
    ("Tokyo, Japan", {"city": "Tokyo", "country": "Japan"}),                    # city by default
    ("Lyon, , France (45.76, 4.84)", {"city": "Lyon", "country": "France", "lat": 45.76, "lon": 4.84}),
    ("?, Bavaria, Germany", {"region": "Bavaria", "country": "Germany"}),
    ("Quito, Pichincha, Ecuador (0.18°S, 78.47°W)",
     {"city": "Quito", "region": "Pichincha", "country": "Ecuador", "lat": -0.18, "lon": -78.47}),
    ("Sydney, New South Wales, Australia - -33.87, 151.21",
     {"city": "Sydney", "region": "New South Wales", "country": "Australia", "lat": -33.87, "lon": 151.21}),
    ("Manhattan, New York City, New York, United States",
     {"city": "Manhattan", "region": "New York", "country": "United States"}),
    ("(10.5, -20.25)", {"lat": 10.5, "lon": -20.25}),
])
def test_answer_line_levels_and_coordinates(line, expected):
    assert parse_answer_line(line) == expected
    assert parse_answer(f"Some reasoning about the photo.\n\nAnswer: {line}") == expected


def test_last_answer_line_wins_and_other_spellings():
    text = ("Earlier I said:\nAnswer: Spain\nBut the signs are Portuguese.\nMy answer: Porto, Portugal (41.15, -8.61).")
    assert parse_answer(text) == {"city": "Porto", "country": "Portugal", "lat": 41.15, "lon": -8.61}
    assert parse_answer("no location given at all") is None
    assert parse_answer("Answer: ") is None and parse_answer("") is None and parse_answer(None) is None


def test_json_is_still_accepted_and_wins():
    obj = {"country": "Peru", "region": "Lima", "city": "Lima", "lat": -12.05, "lon": -77.04}
    assert parse_answer(json.dumps(obj)) == obj
    assert parse_answer("```json\n" + json.dumps(obj) + "\n```\nAnswer: Chile") == obj
    # a JSON object that is no location does not hide the answer line
    assert parse_answer('{"note": 1}\nAnswer: Chile') == {"country": "Chile"}


def _result(text, ok=False, parsed=None):
    return LvlmResult(ok=ok, parsed=parsed, text=text, reason=None if ok else "invalid_json", detail="",
                      usage={}, cached=False, attempts=1, backend="fake", model="m")


def test_eval_reads_free_text_replies_through_the_answer_line():
    pred = to_prediction("x", _result("Dense kanji signage.\nAnswer: Osaka, Osaka, Japan (34.69, 135.50)"))
    assert (pred.city, pred.region, pred.country, pred.lat, pred.lon, pred.error) == (
        "Osaka", "Osaka", "Japan", 34.69, 135.5, "")
    names_only = to_prediction("y", _result("Answer: Japan"))
    assert names_only.country == "Japan" and names_only.error == "missing_coordinates"
    assert to_prediction("z", _result("I have no idea.")).error == "invalid_json"


def test_chat_prints_the_line_eval_reads_back():
    answer = {"country": "France", "region": None, "city": "Lyon", "lat": 45.76, "lon": 4.84,
              "confidence": 0.5, "reasoning": "Tiled roofs."}
    result = _result(json.dumps(answer), ok=True, parsed=answer)
    text = format_reply(to_prediction("chat", result), result)
    assert text.splitlines()[-1] == "Answer: Lyon, , France (45.7600, 4.8400)"
    back = parse_answer(text)
    assert (back["city"], back["country"], back["lat"], back["lon"]) == ("Lyon", "France", 45.76, 4.84)
    assert "region" not in back
    assert format_answer_line({"country": "Chile"}) == "Answer: Chile"
