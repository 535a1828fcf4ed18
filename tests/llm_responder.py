"""A "smart" responder for tests/fake_openai_server.py: valid answers made by reading the request.

The build's prompts say what they want, so the answer can be derived from the prompt alone:

    clue       (prompts/clue/request.jinja states the true location)  -> a clue JSON
               (schemas/clue.schema.json) with 3 specific, distinct clues and the true country,
               which passes every filter of pipeline.stages.quality
    blind guess (prompts/dialogue/guess.jinja, no location in it)      -> a prediction whose
               correctness is fixed per image by a hash of its sha256 (see GUESS_KINDS): a wrong
               country, the right country only, or right down to the city. The truth comes from
               the clue request of the same image seen earlier (the clue stage runs first);
               without it the guess is a wrong country
    revision   (prompts/dialogue/revision.jinja gives the truth down to the level asked) -> a
               prediction that names exactly that truth

Every answer is a pure function of (prompt, image, the truth learnt for the image), so the same
request always gets the same answer: what a cache test and a resumed run need.

Misbehaving on purpose: `misbehave={marker: kind}` answers any request whose prompt text or image
sha256 contains the marker with a bad answer of that kind instead (the server's own fault kinds
cover the protocol-level failures; these are answers only the pipeline's filters can catch):

    refuse          a refusal sentence without JSON
    schema          a JSON object the request's schema rejects
    few_clues       a schema-valid clue answer with a single clue        (clue: too_few_clues)
    wrong_country   a schema-valid clue answer for another country       (clue: wrong_country)
    overclaim       a clue answer whose clues are all about the country but whose summary names
                    the town                                            (clue: claim_beyond_evidence)
    miss_truth      a revision that stays on the wrong country (dialogue: revision_missed_truth)
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from typing import Optional

CLUE_MARK = "You are annotating photos for a geolocation training set."
GUESS_MARK = "and give your best guess."
REVISION_MARK = "You are writing the assistant's next reply"
GUESS_KINDS = ("wrong_country", "country_only", "city")
# Plausible wrong answers, none of them a place the test inputs are in (checked against the truth
# when it is known; the first that differs is used).
WRONG_COUNTRIES = ("Iceland", "Mongolia", "Bhutan")
REFUSAL = "I'm sorry, but I can't help with identifying where this photo was taken."
MISBEHAVIOURS = ("refuse", "schema", "few_clues", "wrong_country", "miss_truth", "overclaim")


def request_kind(prompt: str) -> str:
    """"clue", "guess", "revision" or "other", from the prompt text (re-asks keep the original
    prompt at the top, so they are recognised the same way)."""
    if CLUE_MARK in prompt:
        return "clue"
    if REVISION_MARK in prompt:
        return "revision"
    if GUESS_MARK in prompt:
        return "guess"
    return "other"


def _field(prompt: str, label: str) -> Optional[str]:
    """The value of a '- Label: value' line of a prompt (the first one), or None."""
    match = re.search(rf"^- {re.escape(label)}: (.*)$", prompt, re.MULTILINE)
    return match.group(1).strip() if match and match.group(1).strip() else None


def clue_truth(prompt: str) -> dict:
    return {"continent": _field(prompt, "Continent"), "country": _field(prompt, "Country"),
            "region": _field(prompt, "Region (first-level division)"),
            "city": _field(prompt, "Nearest city or town")}


def revision_truth(prompt: str) -> dict:
    # Only the part after "For you only": the history above may quote earlier answers.
    tail = prompt.split("For you only", 1)[-1]
    return {"continent": _field(tail, "Continent"), "country": _field(tail, "Country"),
            "region": _field(tail, "Region"), "city": _field(tail, "Nearest city or town")}


def guess_kind(image_sha256: str) -> str:
    return GUESS_KINDS[int(hashlib.sha256(image_sha256.encode()).hexdigest()[:8], 16) % len(GUESS_KINDS)]


def place(truth: dict) -> str:
    names = []
    for level in ("city", "region", "country"):
        value = truth.get(level)
        if value and value.lower() not in {n.lower() for n in names}:
            names.append(value)
    return ", ".join(names)


def clue_answer(truth: dict) -> dict:
    country, region = truth["country"], truth.get("region") or truth["country"]
    return {
        "clues": [
            {"category": "script_language_signs",
             "evidence": "a white street name plate with dark lettering on the corner building",
             "implies": f"the official language and signage style of {country}", "level": "country"},
            {"category": "vegetation",
             "evidence": "broadleaf trees and trimmed hedges along the pavement edge",
             "implies": f"the temperate planting usual around {region}", "level": "region"},
            {"category": "infrastructure",
             "evidence": "grey concrete utility poles carrying low-voltage cables",
             "implies": "the power distribution style of this country", "level": "country"},
        ],
        # The finest clue is about the region: the summary names the region, never the town.
        "reasoning": ("The signage, the roadside planting and the utility poles fit together. "
                      f"Taken together they point to {place({**truth, 'city': None})}."),
        "country": country,
    }


def prediction(country: str, region: Optional[str], city: Optional[str], reasoning: str,
               confidence: float) -> dict:
    return {"country": country, "region": region, "city": city, "lat": 10.0, "lon": 20.0,
            "confidence": confidence, "reasoning": reasoning}


def wrong_country(truth: Optional[dict]) -> str:
    known = (truth or {}).get("country")
    return next(c for c in WRONG_COUNTRIES if c != known)


class SmartResponder:
    """responder(seen, body) for FakeOpenAIServer; also remembers what it answered."""

    def __init__(self, misbehave: Optional[dict] = None):
        for kind in (misbehave or {}).values():
            if kind not in MISBEHAVIOURS:
                raise ValueError(f"unknown misbehaviour {kind!r}; one of {MISBEHAVIOURS}")
        self.misbehave = dict(misbehave or {})
        self.truth_by_image: dict = {}     # image sha256 -> truth read from its clue request
        self.answers: list = []            # (kind, image sha256, prompt, answer text)
        self._lock = threading.Lock()

    def __call__(self, seen, body) -> str:
        prompt = seen.prompt
        image = seen.image_sha256[0] if seen.image_sha256 else ""
        kind = request_kind(prompt)
        answer = self._misbehaviour(kind, prompt, image)
        if answer is None:
            answer = self._answer(kind, prompt, image)
        text = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
        with self._lock:
            self.answers.append((kind, image, prompt, text))
        return text

    def _answer(self, kind: str, prompt: str, image: str):
        if kind == "clue":
            truth = clue_truth(prompt)
            with self._lock:
                self.truth_by_image[image] = truth
            return clue_answer(truth)
        if kind == "guess":
            with self._lock:
                truth = self.truth_by_image.get(image)
            how = guess_kind(image) if truth else "wrong_country"
            if how == "wrong_country":
                return prediction(wrong_country(truth), None, None,
                                  "The bare hills and the pale facades made me think of a northern island "
                                  "country. The signs are too small to read.", 0.2)
            if how == "country_only":
                return prediction(truth["country"], None, None,
                                  "The street signs and the planting look typical of this country. "
                                  "The region is hard to say.", 0.5)
            return prediction(truth["country"], truth.get("region"), truth.get("city"),
                              "The signs, the buildings and the trees all fit one place I know well.", 0.8)
        if kind == "revision":
            truth = revision_truth(prompt)
            return prediction(truth["country"], truth.get("region"), truth.get("city"),
                              "Looking again, the lettering on the street plate and the planting along "
                              "the pavement fit this place better than my first answer.", 0.9)
        return {"answer": "ok"}

    def _misbehaviour(self, kind: str, prompt: str, image: str):
        how = next((v for marker, v in self.misbehave.items() if marker in prompt or marker in image), None)
        if how is None:
            return None
        if how == "refuse":
            return REFUSAL
        if how == "schema":
            return {"unexpected_field": 1}
        if how in ("few_clues", "wrong_country") and kind == "clue":
            truth = clue_truth(prompt)
            answer = clue_answer(truth)
            if how == "few_clues":
                answer["clues"] = answer["clues"][:1]
            else:
                other = wrong_country(truth)
                answer["country"] = other
                answer["reasoning"] = f"The signage and the planting point to {other}."
            return answer
        if how == "overclaim" and kind == "clue":
            truth = clue_truth(prompt)
            answer = clue_answer(truth)
            for clue in answer["clues"]:
                clue["level"] = "country"
            answer["reasoning"] = f"Taken together the clues point to {place(truth)}."
            return answer
        if how == "miss_truth" and kind == "revision":
            truth = revision_truth(prompt)
            return prediction(wrong_country(truth), None, None,
                              "I still think this is the same country as before.", 0.3)
        return None
