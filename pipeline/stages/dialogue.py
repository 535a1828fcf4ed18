"""Dialogue part: a multi-turn conversation in which the assistant guesses where a photo was taken,
the user corrects it, and the assistant revises (GaGA's dialogue data).

Turn 1: the LVLM guesses BLIND (prompts/dialogue/guess.jinja, schemas/prediction.schema.json); the
guess is scored against the truth by level (country, region, city) and by haversine distance.
Then up to max_rounds rounds, each a user turn and an assistant revision:

- the latest answer is wrong at a level (country always; below, when it named a region or city
  that is not right): the user corrects it in the sample's mode, fixed per sample by a hash of its key:
    hint        points at a visible clue from the Clue part (record.clue["clues"]); without one,
                falls back to correction
    correction  "not X; it is in <the level above> Y"
    choice      "is it A, B or C?" with the truth among the nearest other countries / regions /
                towns of the geocoder's place list (pipeline.geo.places); falls back to correction
                when there is no neighbour
- the latest answer is right so far and names nothing finer: the user confirms and asks for the
  next level (finer)
- the latest answer is right down to the city: the user asks why (why), and the dialogue ends.

Each revision is a second request that shows the model the history, the correction and the truth
(down to the level asked for) and must reach the truth at that level, else the record is rejected
with revision_missed_truth. An answer the user then corrects stays in the conversation as context
with "train": false (the wrong first guess always is): the model learns to revise, not to repeat.

One run_inference call per batch for the blind guesses, then one per round.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

from pipeline.core.choice import pick
from pipeline.evaluate.answer_line import format_answer_line, truth_answer_line
from pipeline.geo.claims import COORD_DECIMALS, claims, truth_view
from pipeline.stages.clue import LvlmPartStage, assistant_message, place_text, user_message
from pipeline.stages.quality import fold, has_coordinates, looks_like_refusal, names_finer_than
from pipeline.core.record import Record, Reject
from pipeline.core.stage import Outcome
from pipeline.geo.places import haversine_km
# The user's turns are shared with the simulated user of interactive evaluation.
from pipeline.stages.user_turns import CORRECTIVE, RANK, TRUTH, plan_user_turn

log = logging.getLogger(__name__)

MODES = ("hint", "correction", "choice")        # how the user corrects a wrong answer
CITY_KM = 25.0  # a guess this close to the photo counts as the right city (GeoGuessr-style scale)
# Words that only say what kind of region a name is ("Lviv Oblast" = "Lviv").
REGION_WORDS = frozenset(
    "oblast province provincia prefecture state region county governorate voivodeship department "
    "departement municipality district krai kray okrug republic autonomous community canton land "
    "parish territory of the city special administrative federal capital metropolitan".split())


def same_name(a: Optional[str], b: Optional[str]) -> bool:
    x, y = fold(a), fold(b)
    return bool(x) and x == y


def same_region(predicted: Optional[str], truth: Optional[str]) -> bool:
    """Region names match after dropping words like 'Oblast' or 'Province', or when one is a
    whole-word part of the other ('Bavaria' vs 'Free State of Bavaria')."""
    a = [w for w in fold(predicted).split() if w not in REGION_WORDS]
    b = [w for w in fold(truth).split() if w not in REGION_WORDS]
    if not a or not b:
        return same_name(predicted, truth)
    return a == b or _contains(a, b) or _contains(b, a)


def _contains(words: list, part: list) -> bool:
    n = len(part)
    return any(words[i:i + n] == part for i in range(len(words) - n + 1))


def score_prediction(prediction: dict, record: Record, names, city_km: float = CITY_KM) -> dict:
    """How right a guess is: per level, the finest level right from the country down, and the
    distance to the photo. A named city is right by name (the place or its district) or when the
    guessed point is within city_km (a neighbouring town's name for a suburb); a guess naming no
    city never has the city right, whatever its coordinates, since the conversation shows names.
    A right city implies a right region (region names vary more than places do)."""
    loc = record.location or {}
    distance = None
    if _number(prediction.get("lat")) and _number(prediction.get("lon")) and record.lat is not None:
        distance = haversine_km(record.lat, record.lon, float(prediction["lat"]), float(prediction["lon"]))
    country = names.same_country(prediction.get("country"), loc)
    city = country and (same_name(prediction.get("city"), loc.get("city"))
                        or same_name(prediction.get("city"), loc.get("admin2"))
                        or (bool(fold(prediction.get("city"))) and distance is not None and distance <= city_km))
    # Where the place list has no region name (some small countries) there is no region to get wrong.
    region = country and (city or not fold(loc.get("admin1"))
                          or same_region(prediction.get("region"), loc.get("admin1")))
    level = "city" if city and region else "region" if region else "country" if country else "none"
    return {"country": bool(country), "region": bool(region), "city": bool(city),
            "distance_km": None if distance is None else round(distance, 1), "level": level}


def _own_answer_line(prediction: dict) -> str:
    """The blind guess's answer line: its own names and coordinates, at the precision of its level."""
    level = "city" if prediction.get("city") else "region" if prediction.get("region") else "country"
    return format_answer_line(prediction, COORD_DECIMALS[level])


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class _Conversation:
    record: Record                             # the record with its truth_view location (what is said)
    original: Record                           # the record as it came (what the sample keeps)
    mode: str                                  # the sample's correction mode (MODES)
    question: str = ""                         # the user's opening question
    messages: list = field(default_factory=list)
    history: list = field(default_factory=list)  # [{"role", "text"}] for the revision prompt
    turns: list = field(default_factory=list)
    results: list = field(default_factory=list)
    prediction: Optional[dict] = None
    score: Optional[dict] = None
    done: bool = False


@dataclass
class _Plan:
    conversation: _Conversation
    mode: str          # hint | correction | choice | finer | why
    level: str         # the level the revision must get right
    user_text: str
    request: object


class DialogueStage(LvlmPartStage):
    name = "dialogue"
    part = "dialogue"
    prompt_set_name = "dialogue"
    schema_name = "prediction"

    def __init__(self, options=None, *, max_rounds: int = 2, city_km: float = CITY_KM,
                 choice_options: int = 3, **kwargs):
        """max_rounds: user/assistant rounds after the blind guess (>= 1);
        city_km: a guess within this distance of the photo has the right city;
        choice_options: answers offered in choice mode, the truth included (>= 2);
        the rest as LvlmPartStage (options, backend=, selection=, batch_size=, params=, data_root=)."""
        super().__init__(options, **kwargs)
        if max_rounds < 1:
            raise ValueError("max_rounds must be >= 1")
        if choice_options < 2:
            raise ValueError("choice_options must be >= 2")
        self.max_rounds = max_rounds
        self.city_km = city_km
        self.choice_options = choice_options
        self.places = None

    def setup(self) -> None:
        super().setup()
        if self.places is None:
            from pipeline.geo.places import load_places  # one table per process, shared with geocode

            self.places = load_places()

    def __getstate__(self):
        state = super().__getstate__()
        state["places"] = None
        return state

    def mode_of(self, key: str) -> str:
        return MODES[pick(key, "dialogue-mode", len(MODES))]

    def process(self, record: Record) -> Outcome:
        return self.process_batch([record])[0]

    def process_batch(self, records: list) -> list:
        outcomes, todo = self.triage(records)
        conversations = {i: _Conversation(records[i].replace(location=truth_view(records[i].location)),
                                          records[i], self.mode_of(records[i].key)) for i in todo}

        # Turn 1: every blind guess of the batch in one call.
        order = list(conversations)
        questions = self.prompts.phrasing_lines("questions")
        for i in order:
            c = conversations[i]
            c.question = self.prompts.phrase("questions", pick(c.record.key, "dialogue-question", len(questions)))
            c.messages.append(user_message(c.question))
            c.history.append({"role": "user", "text": f"[photo] {c.question}"})
        guess_prompt = self.prompts.render("guess")
        requests = [self.request(conversations[i].record, guess_prompt, "guess") for i in order]
        for i, result in zip(order, self.infer(requests)):
            outcomes[i] = self._guarded(conversations[i], self._apply_guess, result) or outcomes[i]

        # Then one call per round for every conversation still going.
        for round_no in range(1, self.max_rounds + 1):
            live = [i for i in order if not isinstance(outcomes[i], Reject) and not conversations[i].done]
            plans = {}
            for i in live:
                plan = self._guarded(conversations[i], self._plan, round_no)
                if isinstance(plan, Reject):
                    outcomes[i] = plan
                else:
                    plans[i] = plan
            ids = list(plans)
            for i, result in zip(ids, self.infer([plans[i].request for i in ids])):
                outcomes[i] = self._guarded(conversations[i], self._apply_revision, plans[i], result, round_no) \
                    or outcomes[i]

        for i in order:
            if not isinstance(outcomes[i], Reject):
                outcomes[i] = self._guarded(conversations[i], self._sample)
        return outcomes

    def _guarded(self, conversation: _Conversation, step, *args):
        """Run one step for one conversation; its exception becomes that record's Reject only."""
        try:
            return step(conversation, *args)
        except Exception as exc:  # noqa: BLE001 - one bad record never stops the batch, see Stage
            log.exception("dialogue stage failed on %s", conversation.record.input_id)
            return Reject("internal_error", f"{type(exc).__name__}: {exc}")

    # -- turn 1 -------------------------------------------------------------------------------
    def _apply_guess(self, c: _Conversation, result) -> Optional[Reject]:
        problem = self._answer_problem(result)
        if problem:
            return problem
        c.prediction = result.parsed
        c.score = score_prediction(result.parsed, c.record, self.names, self.city_km)
        c.results.append(result)
        self._add_answer(c, result.parsed, _own_answer_line(result.parsed))
        c.turns.append({"mode": "guess", "level": None, "user": c.question,
                        "guess": result.parsed, "score": c.score})
        return None

    def _answer_problem(self, result) -> Optional[Reject]:
        problem = self.answer_problem(result)
        if problem:
            return problem
        reasoning = str(result.parsed.get("reasoning") or "")
        if looks_like_refusal(reasoning):
            return Reject("refusal", f"refusal-like reasoning: {reasoning[:200]!r}")
        if has_coordinates(reasoning):
            return Reject("invented_coordinates", f"coordinates in the reasoning: {reasoning[:200]!r}")
        return None

    def _add_answer(self, c: _Conversation, prediction: dict, answer_line: str) -> None:
        text = self.prompts.render("answer", reasoning=str(prediction.get("reasoning") or "").strip(),
                                   answer_line=answer_line)
        c.messages.append(assistant_message(text))
        c.history.append({"role": "assistant", "text": text})

    # -- rounds -------------------------------------------------------------------------------
    def _plan(self, c: _Conversation, round_no: int) -> _Plan:
        loc = c.record.location
        turn = plan_user_turn(self.prompts, c.record, c.prediction, c.score, c.mode, round_no,
                              places=self.places, names=self.names, choice_options=self.choice_options)
        mode, level, user_text = turn.mode, turn.level, turn.text
        truth = {"continent": loc.get("continent") or "",
                 "country": loc.get("country"),
                 "region": loc.get("admin1") if RANK[level] >= RANK["region"] else None,
                 "city": loc.get("city") if RANK[level] >= RANK["city"] else None}
        target = place_text(loc) if mode == "why" else loc.get(TRUTH[level])
        prompt = self.prompts.render("revision", history=c.history, user_text=user_text, truth=truth,
                                     mode=mode, level=level, target=target,
                                     confirmed=turn.context.get("confirmed", ""))
        request = self.request(c.record, prompt, f"round{round_no}")
        return _Plan(c, mode, level, user_text, request)

    def _apply_revision(self, c: _Conversation, plan: _Plan, result, round_no: int) -> Optional[Reject]:
        problem = self._answer_problem(result)
        if problem:
            return problem
        prediction = result.parsed
        score = score_prediction(prediction, c.record, self.names, self.city_km)
        if RANK[score["level"]] < RANK[plan.level]:
            wanted = c.record.location.get(TRUTH[plan.level])
            return Reject("revision_missed_truth",
                          f"round {round_no} ({plan.mode}) asked for the {plan.level} {wanted!r}; the revision "
                          f"says {place_text(prediction, ('city', 'region', 'country'))!r}")
        # Claims match evidence: the user's turn and what was right before support the level asked
        # for (one finer than what is settled), no finer; the reasoning may not name a finer truth.
        allowed = plan.level if plan.mode != "why" else "city"
        extra = names_finer_than(str(prediction.get("reasoning") or ""), claims(c.record.location), allowed)
        if extra:
            return Reject("claim_beyond_evidence",
                          f"round {round_no} ({plan.mode}) asked for the {plan.level}; the revision names "
                          f"{', '.join(extra)}")
        if plan.mode in CORRECTIVE:
            c.messages[-1]["train"] = False  # the answer the user just corrected is context only
        c.messages.append(user_message(plan.user_text, image=False))
        c.history.append({"role": "user", "text": plan.user_text})
        self._add_answer(c, prediction, truth_answer_line(c.record.location, c.record.lat, c.record.lon, allowed))
        c.results.append(result)
        c.turns.append({"mode": plan.mode, "level": plan.level, "user": plan.user_text,
                        "guess": prediction, "score": score})
        c.prediction, c.score = prediction, score
        c.done = plan.mode == "why"
        return None

    def _sample(self, c: _Conversation) -> Record:
        sample = {"messages": c.messages, "turns": c.turns,
                  "first_guess_correct_level": c.turns[0]["score"]["level"], "mode": c.mode}
        sample.update(self.provenance(c.results))
        return c.original.replace(dialogue=sample)
