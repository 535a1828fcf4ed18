"""What both backends do with a model's answer text: find the JSON object, validate it against the
schema, recognise refusals, and build the instruction / re-ask messages.

Shared so that an answer is judged the same way whether it came from a server or from an
in-process model (the transformers backend has no response_format, so it always uses the
schema-in-prompt instructions that the openai backend falls back to).
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import jsonschema

# A refusal is recognised only when there is no JSON object in the answer: a JSON answer that
# happens to contain "I'm sorry" in a field is still an answer.
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i apologi[sz]e|as an ai|unfortunately,? i|"
    r"i (?:can ?not|can't|won't|will not|am unable to|am not able to|'m unable to|'m not able to)"
    r"\s+(?:help|assist|comply|provide|identify|determine|do that|fulfil|answer|share))",
    re.IGNORECASE)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
MAX_DETAIL = 300


@dataclass(frozen=True)
class Verdict:
    ok: bool
    parsed: Optional[dict]
    reason: Optional[str]   # invalid_json | schema_invalid | refusal | empty_answer
    detail: str


def check_answer(text: Optional[str], schema: Optional[dict], refusal: Optional[str] = None) -> Verdict:
    """Judge one answer. With a schema the answer must hold a JSON object valid against it;
    without one any non-empty text is an answer (parsed is its JSON object when it is one)."""
    if refusal:
        return Verdict(False, None, "refusal", _short(f"model refused: {refusal}"))
    text = (text or "").strip()
    obj, error = extract_json_object(text)
    if schema is None:
        if not text:
            return Verdict(False, None, "empty_answer", "the model returned no text")
        return Verdict(True, obj, None, "")
    if obj is None:
        if _REFUSAL.search(text):
            return Verdict(False, None, "refusal", _short(f"refusal-like text without JSON: {text!r}"))
        return Verdict(False, None, "invalid_json", _short(f"{error}; answer starts {text[:80]!r}"))
    problem = schema_problem(obj, schema)
    if problem:
        return Verdict(False, None, "schema_invalid", _short(problem))
    return Verdict(True, obj, None, "")


def extract_json_object(text: str) -> tuple[Optional[dict], str]:
    """The JSON object in an answer: the whole text, a ```json fence, or the first object that
    parses starting at a '{' (models like to add a sentence around it)."""
    if not text:
        return None, "empty answer"
    candidates = [text] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    error = "no JSON object in the answer"
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError as exc:
            error = f"not JSON ({exc})"
            continue
        if isinstance(value, dict):
            return value, ""
        error = f"JSON {type(value).__name__}, not an object"
    decoder = json.JSONDecoder()
    for start in [m.start() for m in re.finditer(r"\{", text)][:50]:
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value, ""
    return None, error


@lru_cache(maxsize=64)
def _validator(schema_json: str):
    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_problem(obj: dict, schema: dict) -> str:
    """'' when obj is valid, else the most relevant validation error with its JSON path."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is None:
        return ""
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"at {where}: {error.message}"


def schema_instructions(schema: dict) -> str:
    return ("\n\nAnswer with one JSON object and nothing else (no prose, no code fence). "
            "It must be valid against this JSON schema:\n"
            + json.dumps(schema, ensure_ascii=False, sort_keys=True))


def with_instructions(messages: list[dict], schema: Optional[dict]) -> list[dict]:
    """A copy of messages whose last user turn ends with the schema instructions."""
    if schema is None:
        return messages
    out = copy.deepcopy(messages)
    for message in reversed(out):
        if message.get("role") == "user":
            _append_text(message, schema_instructions(schema))
            return out
    out.append({"role": "user", "content": [{"type": "text", "text": schema_instructions(schema).strip()}]})
    return out


def reask_messages(messages: list[dict], bad_answer: str, verdict: Verdict) -> list[dict]:
    """The conversation plus the rejected answer and a user turn naming what was wrong, so the
    re-ask is not the same deterministic request again."""
    return list(messages) + [
        {"role": "assistant", "content": [{"type": "text", "text": bad_answer or ""}]},
        {"role": "user", "content": [{"type": "text", "text":
            f"That answer was rejected ({verdict.reason}: {verdict.detail}). "
            "Reply again with only the corrected JSON object."}]},
    ]


def _append_text(message: dict, text: str) -> None:
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = content + text
        return
    parts = content if isinstance(content, list) else []
    for part in reversed(parts):
        if part.get("type") == "text":
            part["text"] = part.get("text", "") + text
            break
    else:
        parts.append({"type": "text", "text": text.strip()})
    message["content"] = parts


def _short(text: str) -> str:
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL - 3] + "..."
