"""Asking an LVLM for a location, for `eval` and `chat` alike: the prompt, the request and turning
the answer into a Prediction. The request asks for the corpus' answer line and sends no JSON
schema (a schema would make a backend ask for JSON instead, or force it with structured output);
a JSON answer is still read. Backends (pipeline.lvlm) own transport, retries and caching.
"""
from __future__ import annotations

import json
from typing import Optional

from pipeline.core.data_files import load_json
from pipeline.evaluate.answer_line import parse_answer
from pipeline.evaluate.predictions import Prediction, prediction_from_answer
from pipeline.lvlm.types import LvlmBackend, LvlmRequest, LvlmResult

SCHEMA_FILE = "schemas/prediction.schema.json"
SCHEMA_NAME = "prediction"
# Part of every request's cache key: change a wording below => bump the version.
PROMPT_VERSION = "geolocate/v2"
# The answer format every corpus answer ends with (pipeline.evaluate.answer_line): a model trained on
# the corpus answers in it; a JSON answer (schemas/prediction.schema.json's fields) is read too.
ANSWER_FORMAT = ("End your reply with one final line in this format: "
                 "Answer: <city>, <region>, <country> (<lat>, <lon>) - leave out the levels you cannot "
                 "tell, from the city end, e.g. \"Answer: -, Bavaria, Germany (48.1, 11.6)\" or "
                 "\"Answer: Germany (51.2, 10.4)\".")
QUESTION = ("Where was this photo taken? Look for clues in the image (landscape, vegetation, climate, "
            "architecture, road markings, signs and their script, vehicles, people) and give your best "
            "guess of the country, the region (state or province), the city or nearest town and the GPS "
            "coordinates, with your confidence from 0 to 1 and a short reasoning. " + ANSWER_FORMAT)
REVISE = ("\n\nTake this into account and give your revised guess: country, region, city, coordinates, "
          "confidence and reasoning. " + ANSWER_FORMAT)


def prediction_schema() -> tuple[dict, str]:
    """(schema, version) of the prediction answer; the version travels in the cache key."""
    schema = load_json(SCHEMA_FILE)
    return schema, str(schema.get("version") or schema.get("$id") or "")


def text_message(role: str, text: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def image_question(text: str = QUESTION) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


def message_text(message: dict) -> str:
    """The text parts of an HF chat message joined (content may also be a plain string)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text")


def revision_request_text(user_text: str) -> str:
    return user_text.rstrip() + REVISE


def make_request(messages: list[dict], jpeg: bytes, *, sampling: dict, request_id: str,
                 prompt_version: str = PROMPT_VERSION) -> LvlmRequest:
    _, version = prediction_schema()
    return LvlmRequest(messages=messages, image_jpeg=jpeg, image_sha256=LvlmRequest.sha256(jpeg),
                       schema=None, schema_name=SCHEMA_NAME, schema_version=version,
                       prompt_version=prompt_version, params=dict(sampling), request_id=request_id)


def to_prediction(pred_id: str, result: LvlmResult, *, stage: int = 0, mode: str = "") -> Prediction:
    """The schema's JSON answer, or else the answer line of a free-text reply (a model trained on
    the corpus ends with "Answer: city, region, country (lat, lon)"; answer_line reads both);
    a reply with neither becomes an unusable Prediction carrying the backend's reason."""
    answer = result.parsed if result.ok and isinstance(result.parsed, dict) else parse_answer(result.text)
    if not isinstance(answer, dict):
        return Prediction(id=pred_id, error=result.reason or "no_answer", stage=stage, mode=mode)
    return prediction_from_answer(pred_id, answer, stage=stage, mode=mode)


def history_text(result: LvlmResult) -> str:
    """What the assistant 'said' in the conversation history: its JSON answer in a canonical
    form (no code fences or chatter around it), or its raw text when none parsed."""
    if result.ok and isinstance(result.parsed, dict):
        return json.dumps(result.parsed, ensure_ascii=False)
    return (result.text or "").strip() or "I could not give an answer."


def run_batch(backend: LvlmBackend, requests: list[LvlmRequest]) -> list[LvlmResult]:
    if not requests:
        return []
    results = backend.run_inference(requests)
    if len(results) != len(requests):
        raise RuntimeError(f"backend {backend.name} returned {len(results)} results for {len(requests)} requests")
    return results


def describe(prediction: Optional[Prediction]) -> str:
    """One line for people: 'Lyon, Auvergne-Rhône-Alpes, France (45.76, 4.84), confidence 0.6'."""
    if prediction is None or not prediction.usable:
        return f"no usable answer ({prediction.error if prediction else 'none'})"
    place = ", ".join(p for p in (prediction.city, prediction.region, prediction.country) if p) or "somewhere"
    conf = f", confidence {prediction.confidence:.2f}" if prediction.confidence is not None else ""
    return f"{place} ({prediction.lat:.4f}, {prediction.lon:.4f}){conf}"
