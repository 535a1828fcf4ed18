"""Interactive evaluation with a simulated user: does the model get closer when told it is wrong?

For every test image the evaluated model guesses (round 0). A simulated user who knows the true
location then answers the model's *own* latest guess, with the Dialogue part's rules and
phrasings (pipeline.stages.user_turns, the code the training conversations are made with), in one of
the modes:

    hint        "Not Spain. Here's a hint: <evidence>" — a clue of the Clue part when the sample
                has one; otherwise the direction and distance from the model's guessed point to
                the photo ("about 1,200 km north-east of where you guessed"), which names nothing;
                with neither (no coordinates guessed) the turn falls back to a correction
    correction  "It's not Spain. This photo was taken in Europe. Which country ...?"
    choice      "Not Spain. Is it France, Italy or Portugal?"

for up to K rounds; a conversation whose answer is right down to the city ends there (its answer
carries forward to the later rounds, so every round is scored on every image). Every image runs
in every mode, from the same first guess, so the modes compare on the same images.

What the user says depends on the guess (the wrong name it repeats, the options it leaves out,
the direction from the guessed point), and the truth at a level appears only in the turn that
tells the model it is wrong at that level (choice) or confirms what it already got right (finer).
Right / wrong per level is the Dialogue part's judgement (pipeline.stages.dialogue.score_prediction).

Files: simulated_predictions.jsonl (id, mode, stage = round, the prediction) and
simulated_turns.jsonl (each user turn, for reading what the model was told).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from pipeline.evaluate import model
from pipeline.evaluate.interactive import _group, stage_name  # noqa: F401  (stage_name: re-exported)
from pipeline.evaluate.predictions import GroundTruth, Prediction, PredictionFile, prediction_line, write_ground_truth
from pipeline.evaluate.single import GROUND_TRUTH_FILE, index_predictions
from pipeline.lvlm.types import LvlmBackend, LvlmResult
from pipeline.core.record import Record
from pipeline.stages.user_turns import UserTurn, clue_hint, plan_user_turn

log = logging.getLogger(__name__)
MODES = ("hint", "correction", "choice")
DEFAULT_ROUNDS = 2
PREDICTIONS_FILE = "simulated_predictions.jsonl"
TURNS_FILE = "simulated_turns.jsonl"
PROMPT_VERSION = model.PROMPT_VERSION + "+simulated-user"
COMPASS = ("north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west")


@dataclass
class SimCase:
    """One test image: its truth, the clean JPEG and a Record the user's rules read (key, lat,
    lon, location as the geocode stage labels it, clue when the corpus has one)."""
    truth: GroundTruth
    jpeg: bytes
    record: Record


def located_records(truths: list[GroundTruth], clues: Optional[dict] = None) -> list[Optional[Record]]:
    """A Record per truth, labelled by the build's own geocode stage (None where it rejects the
    point, e.g. far out at sea): the location the Dialogue part's user would know."""
    from pipeline.stages.geocode import GeocodeStage

    records = [Record(key=t.id, source="eval", input_id=t.id, lat=t.lat, lon=t.lon,
                      clue=(clues or {}).get(t.id)) for t in truths]
    outcomes = GeocodeStage().process_batch(records)
    return [o if isinstance(o, Record) else None for o in outcomes]


def _bearing(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2, dl = math.radians(lat1), math.radians(lat2), math.radians(lon2 - lon1)
    y = math.sin(dl) * math.cos(p2)
    x = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return (math.degrees(math.atan2(y, x)) + 360.0) % 360.0


def direction_hint(record: Record, level: str, round_no: int, prediction: Optional[dict] = None) -> str:
    """A clue of the Clue part when the record has one, else where the photo lies from the
    guessed point ("" without a guessed point: the turn becomes a correction)."""
    clue = clue_hint(record, level, round_no, prediction)
    if clue:
        return clue
    from pipeline.geo.places import haversine_km

    lat, lon = (prediction or {}).get("lat"), (prediction or {}).get("lon")
    if not isinstance(lat, (int, float)) or not isinstance(lon, (int, float)) or record.lat is None:
        return ""
    km = haversine_km(lat, lon, record.lat, record.lon)
    if km < 1:
        return ""
    direction = COMPASS[int((_bearing(lat, lon, record.lat, record.lon) + 22.5) // 45) % 8]
    rounded = f"{km:,.0f}" if km < 100 else f"{round(km, -1 if km < 1000 else -2):,.0f}"
    return f"the photo was taken about {rounded} km {direction} of where you guessed"


class SimulatedUser:
    """Knows the truth of each case; answers a guess with the Dialogue part's rules."""

    def __init__(self, *, choice_options: int = 3, city_km: Optional[float] = None, data_root: Optional[str] = None):
        from pipeline.stages.dialogue import CITY_KM
        from pipeline.geo.places import load_places
        from pipeline.core.prompt_files import load_prompt_set
        from pipeline.stages.quality import country_names

        self.prompts = load_prompt_set("dialogue", data_root)
        self.places = load_places()
        self.names = country_names()
        self.choice_options = choice_options
        self.city_km = CITY_KM if city_km is None else city_km

    def score(self, record: Record, prediction: dict) -> dict:
        from pipeline.stages.dialogue import score_prediction

        return score_prediction(prediction, record, self.names, self.city_km)

    def reply(self, record: Record, prediction: dict, mode: str, round_no: int) -> Optional[UserTurn]:
        """The user's turn to this guess, or None when it is right down to the city (done)."""
        score = self.score(record, prediction)
        if score["level"] == "city":
            return None
        return plan_user_turn(self.prompts, record, prediction, score, mode, round_no, places=self.places,
                              names=self.names, choice_options=self.choice_options, hint=direction_hint)


def prediction_dict(pred: Prediction) -> dict:
    """The fields the user's rules read from a guess (an unusable answer guesses nothing)."""
    if not pred.usable and pred.lat is None and not pred.country:
        return {}
    return {"country": pred.country or None, "region": pred.region or None, "city": pred.city or None,
            "lat": pred.lat, "lon": pred.lon}


@dataclass
class _Conversation:
    case: SimCase
    mode: str
    messages: list = field(default_factory=list)
    last: Optional[Prediction] = None
    done: bool = False


def run_cases(backend: LvlmBackend, cases: list[SimCase], user: SimulatedUser, *, modes: tuple = MODES,
              rounds: int = DEFAULT_ROUNDS, sampling: Optional[dict] = None) -> tuple[list[Prediction], list[dict]]:
    """All conversations of a batch, round by round (one backend call per round). Returns the
    predictions (one per case, mode and round 0..rounds) and the user turns."""
    sampling = dict(sampling or {})
    opening = model.image_question()

    def request(case: SimCase, messages: list, tag: str):
        return model.make_request(messages, case.jpeg, sampling=sampling, request_id=f"{case.truth.id}/{tag}",
                                  prompt_version=PROMPT_VERSION)

    first: list[LvlmResult] = model.run_batch(backend, [request(c, [opening], "guess") for c in cases])
    predictions: list[Prediction] = []
    turns: list[dict] = []
    conversations: list[_Conversation] = []
    for case, result in zip(cases, first):
        for mode in modes:
            conv = _Conversation(case, mode, [opening, model.text_message("assistant", model.history_text(result))])
            conv.last = model.to_prediction(case.truth.id, result, stage=0, mode=mode)
            predictions.append(conv.last)
            conversations.append(conv)
    for round_no in range(1, rounds + 1):
        asking: list[_Conversation] = []
        for conv in conversations:
            turn = None if conv.done else user_turn(user, conv, round_no)
            if turn is None:
                conv.done = True
                continue
            turns.append({"id": conv.case.truth.id, "mode": conv.mode, "round": round_no, "turn_mode": turn.mode,
                          "level": turn.level, "text": turn.text})
            conv.messages.append(model.text_message("user", model.revision_request_text(turn.text)))
            asking.append(conv)
        results = model.run_batch(backend, [request(c.case, list(c.messages), f"{c.mode}/{round_no}") for c in asking])
        for conv, result in zip(asking, results):
            conv.messages.append(model.text_message("assistant", model.history_text(result)))
            conv.last = model.to_prediction(conv.case.truth.id, result, stage=round_no, mode=conv.mode)
        for conv in conversations:  # every round scores every image: a finished one carries forward
            predictions.append(Prediction(**{**conv.last.__dict__, "stage": round_no}))
    return predictions, turns


def user_turn(user: SimulatedUser, conv: _Conversation, round_no: int) -> Optional[UserTurn]:
    return user.reply(conv.case.record, prediction_dict(conv.last), conv.mode, round_no)


def simulate(backend: LvlmBackend, cases: Iterable[SimCase], out_dir: Path, *, modes: tuple = MODES,
             rounds: int = DEFAULT_ROUNDS, sampling: Optional[dict] = None, batch_size: int = 32,
             user: Optional[SimulatedUser] = None) -> tuple[Path, Path]:
    """Run every case in every mode; write simulated_predictions.jsonl, simulated_turns.jsonl and
    ground_truth.csv to out_dir. Returns (predictions path, ground-truth path)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    user = user or SimulatedUser()
    pred_path, truth_path = out_dir / PREDICTIONS_FILE, out_dir / GROUND_TRUTH_FILE
    truths: list[GroundTruth] = []
    batch: list[SimCase] = []
    with pred_path.open("w", encoding="utf-8") as preds, (out_dir / TURNS_FILE).open("w", encoding="utf-8") as said:
        def flush():
            if not batch:
                return
            predictions, turns = run_cases(backend, batch, user, modes=modes, rounds=rounds, sampling=sampling)
            preds.writelines(prediction_line(p) for p in predictions)
            said.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in turns)
            truths.extend(c.truth for c in batch)
            log.info("eval --interactive (simulated user): %d images done", len(truths))
            batch.clear()

        for case in cases:
            batch.append(case)
            if len(batch) >= batch_size:
                flush()
        flush()
    write_ground_truth(truth_path, truths)
    return pred_path, truth_path


def is_simulated(pred_file: PredictionFile) -> bool:
    """Whether a predictions file holds simulated-user runs: an id answered in several modes
    (a replayed dialogue has one mode per id)."""
    modes: dict[str, set] = {}
    for p in pred_file.predictions:
        modes.setdefault(p.id, set()).add(p.mode)
    return any(len(m) > 1 for m in modes.values())


def score_simulated(truths: list[GroundTruth], pred_file: PredictionFile, inputs: dict) -> tuple[dict, dict]:
    """The report (accuracy per mode and round, gain over round 0) and CDF curves per mode's last
    round and the first guess."""
    indexed, checks = index_predictions(pred_file, {t.id for t in truths},
                                        key=lambda pred: (pred.mode or "none", pred.id, pred.stage))
    tables: dict[str, dict] = {}
    for (mode, pred_id, stage), pred in indexed.items():
        tables.setdefault(mode, {})[(pred_id, stage)] = pred
    by_mode, curves = {}, {}
    for mode in sorted(tables, key=lambda m: (MODES.index(m) if m in MODES else len(MODES), m)):
        stages = sorted({stage for _, stage in tables[mode]} | {0})
        by_mode[mode], mode_curves = _group(truths, tables[mode], stages)
        if not curves:
            curves["first guess"] = mode_curves[stage_name(0)]
        last = stage_name(stages[-1])
        if stages[-1]:
            curves[f"{mode}, {last.replace('_', ' ')}"] = mode_curves[last]
    report = {"kind": "simulated", "inputs": inputs, "file_checks": checks.as_dict(), "stages": {}, "gains": {},
              "by_mode": by_mode}
    return report, curves


def cases_from_samples(samples: Iterable, skipped: list[str], batch_size: int = 256) -> Iterable[SimCase]:
    """SimCases from ShardSamples (corpus shards, or benchmarks via benchmarks.as_shard_samples):
    the truth from the sample, the location from the geocode stage (a corpus record's own clue is
    kept, for hints). Samples without usable truth, or at a point the geocoder rejects, are listed
    in `skipped`."""
    from pipeline.evaluate.predictions import truth_from_sample

    def located(chunk):
        truths = [truth_from_sample(s.record) for s in chunk]
        usable = [(s, t) for s, t in zip(chunk, truths) if t is not None]
        skipped.extend(f"{s.key}: no ground truth" for s, t in zip(chunk, truths) if t is None)
        records = located_records([t for _, t in usable], {t.id: s.record.get("clue") for s, t in usable})
        for (sample, truth), record in zip(usable, records):
            if record is None:
                skipped.append(f"{truth.id}: the geocoder cannot place ({truth.lat}, {truth.lon})")
            else:
                yield SimCase(truth, sample.jpeg, record)

    chunk: list = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) >= batch_size:
            yield from located(chunk)
            chunk = []
    if chunk:
        yield from located(chunk)
