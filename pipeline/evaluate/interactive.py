"""Replay evaluation (`eval --interactive --user replay`) on the Dialogue test split: the recorded
user turns fed after the model's own answers. The default interactive evaluation is the simulated
user of pipeline.evaluate.simulated, whose turns answer the evaluated model's guesses.

For every dialogue sample the model answers the sample's opening question (stage 0, the first
guess); then the sample's own next user turn (a hint, a correction, a choice ...) is appended after
the model's *own* answer and the model revises (stage 1), and again after the following user turn
(stage 2). Every stage is scored like a single guess; the gain of stage k is measured on the
dialogues that reach stage k, against their own first guesses, overall and per correction mode.

Caveat inherent to replaying a recorded dialogue: the user turns were written against the
generator's guesses ("Not Spain."), which may not be what the evaluated model said.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from pipeline.evaluate import model
from pipeline.evaluate.metrics import LEVELS, THRESHOLDS_KM, error_distances, score_sample, summarize, threshold_key
from pipeline.evaluate.predictions import (GroundTruth, Prediction, PredictionFile, prediction_line,
                                           truth_from_sample, write_ground_truth)
from pipeline.evaluate.shards import ShardSample
from pipeline.evaluate.single import GROUND_TRUTH_FILE, chunks, limited, index_predictions
from pipeline.lvlm.types import LvlmBackend, LvlmResult

log = logging.getLogger(__name__)
PREDICTIONS_FILE = "dialogue_predictions.jsonl"
PROMPT_VERSION = model.PROMPT_VERSION + "+dialogue"
DEFAULT_MAX_CORRECTIONS = 2
# Metrics whose change from the first guess is the "gain" (median km: negative = better).
GAIN_KEYS = ([f"{level}_accuracy" for level in LEVELS] + [f"geo_{level}_accuracy" for level in LEVELS]
             + [threshold_key(km) for km in THRESHOLDS_KM]
             + ["geoscore", "median_km"])


def stage_name(stage: int) -> str:
    return "first_guess" if stage == 0 else f"after_{stage}"


@dataclass
class DialogueCase:
    truth: GroundTruth
    jpeg: bytes
    opening: dict                                   # the sample's first user message (with image)
    follow_ups: list[tuple[str, str]] = field(default_factory=list)  # (turn mode, user text)
    mode: str = ""                                  # the dialogue's correction mode (per-mode table)


def dialogue_mode(modes: list[str]) -> str:
    """A label from the modes of the turns fed: the one mode, or "mixed"."""
    distinct = sorted(set(m or "unknown" for m in modes))
    if not distinct:
        return "none"
    return distinct[0] if len(distinct) == 1 else "mixed"


def follow_ups(dialogue: dict, limit: int) -> Optional[tuple[dict, list[tuple[str, str]], str]]:
    """(opening user message, [(mode, text)] of the next `limit` user turns, the dialogue's mode)
    from record.dialogue as pipeline.stages.dialogue writes it: `turns` starts with the blind guess
    (mode "guess", the opening question) and has one entry per later user turn, whose mode says
    what that turn is (hint, correction, choice, or finer / why after a right answer); the
    sample's own correction mode is dialogue["mode"]. None without an opening user message."""
    users = [m for m in dialogue.get("messages") or [] if m.get("role") == "user"]
    if not users:
        return None
    opening = {"role": "user", "content": users[0].get("content")}
    if not any(isinstance(p, dict) and p.get("type") == "image" for p in opening["content"] or []):
        opening = model.image_question(model.message_text(users[0]))  # keep the question, add the image
    modes = [str(t.get("mode") or "") for t in dialogue.get("turns") or []
             if isinstance(t, dict) and t.get("mode") != "guess"]
    fed = [(modes[i] if i < len(modes) else "", model.message_text(message))
           for i, message in enumerate(users[1:limit + 1])]
    return opening, fed, str(dialogue.get("mode") or "") or dialogue_mode([m for m, _ in fed])


def case_from_sample(sample: ShardSample, max_corrections: int) -> Optional[DialogueCase]:
    truth = truth_from_sample(sample.record)
    dialogue = sample.record.get("dialogue")
    parsed = follow_ups(dialogue, max_corrections) if truth and isinstance(dialogue, dict) else None
    if parsed is None:
        return None
    return DialogueCase(truth, sample.jpeg, *parsed)


def run_cases(backend: LvlmBackend, cases: list[DialogueCase], sampling: dict) -> list[Prediction]:
    """Walk a batch of dialogues stage by stage (all stage-k requests of the batch go together)."""
    conversations = [[case.opening] for case in cases]
    last: dict[int, LvlmResult] = {}
    predictions: list[Prediction] = []
    for stage in range(0, max((len(c.follow_ups) for c in cases), default=0) + 1):
        active = [i for i, c in enumerate(cases) if len(c.follow_ups) >= stage]
        requests = []
        for i in active:
            if stage:
                conversations[i] = conversations[i] + [
                    model.text_message("assistant", model.history_text(last[i])),
                    model.text_message("user", model.revision_request_text(cases[i].follow_ups[stage - 1][1]))]
            requests.append(model.make_request(conversations[i], cases[i].jpeg, sampling=sampling,
                                               request_id=f"{cases[i].truth.id}/dialogue/{stage}",
                                               prompt_version=PROMPT_VERSION))
        for i, result in zip(active, model.run_batch(backend, requests)):
            last[i] = result
            predictions.append(model.to_prediction(cases[i].truth.id, result, stage=stage, mode=cases[i].mode))
    return predictions


def predict_dialogues(backend: LvlmBackend, samples: Iterable[ShardSample], out_dir: Path, *, sampling: dict,
                      batch_size: int = 32, limit: int = 0,
                      max_corrections: int = DEFAULT_MAX_CORRECTIONS) -> tuple[Path, Path, int]:
    """Run the dialogues; write dialogue_predictions.jsonl (one row per dialogue and stage) and
    ground_truth.csv. Returns both paths and the samples skipped (no ground truth or dialogue)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path, truth_path = out_dir / PREDICTIONS_FILE, out_dir / GROUND_TRUTH_FILE
    truths: list[GroundTruth] = []
    skipped = 0
    with pred_path.open("w", encoding="utf-8") as out:
        for chunk in chunks(limited(samples, limit), batch_size):
            cases = []
            for sample in chunk:
                case = case_from_sample(sample, max_corrections)
                if case is None:
                    skipped += 1
                else:
                    cases.append(case)
            truths += [c.truth for c in cases]
            out.writelines(prediction_line(p) for p in run_cases(backend, cases, sampling))
            out.flush()
            log.info("eval --interactive: %d dialogues done", len(truths))
    write_ground_truth(truth_path, truths)
    return pred_path, truth_path, skipped


def _group(truths: list[GroundTruth], table: dict, stages: list[int]) -> tuple[dict, dict]:
    """Per-stage metrics, gains against the first guess, and CDF curves for one set of dialogues."""
    first = {t.id: score_sample(t, table.get((t.id, 0))) for t in truths}
    out = {"stages": {}, "gains": {}}
    curves = {}
    for stage in stages:
        reached = truths if stage == 0 else [t for t in truths if (t.id, stage) in table]
        if stage and not reached:
            continue
        scores = [score_sample(t, table.get((t.id, stage))) for t in reached]
        name = stage_name(stage)
        out["stages"][name] = summarize(scores)
        curves[name] = error_distances(scores)
        if stage:
            base = summarize([first[t.id] for t in reached])
            gain = {"samples": len(reached)}
            for key in GAIN_KEYS:
                now, before = out["stages"][name][key], base[key]
                gain[key] = None if now is None or before is None else now - before
            out["gains"][name] = gain
    return out, curves


def score_dialogues(truths: list[GroundTruth], pred_file: PredictionFile, inputs: dict) -> tuple[dict, dict]:
    """The interactive report (metrics.json) and CDF curves by stage, from a predictions file with
    a `stage` column (0 = first guess) and a `mode` column."""
    table, checks = index_predictions(pred_file, {t.id for t in truths})
    stages = sorted({stage for _, stage in table} | {0})
    mode_of: dict[str, str] = {}
    for (pred_id, stage), pred in sorted(table.items(), key=lambda item: item[0][1]):
        if pred.mode:
            mode_of.setdefault(pred_id, pred.mode)
    overall, curves = _group(truths, table, stages)
    by_mode = {mode: _group([t for t in truths if mode_of.get(t.id) == mode], table, stages)[0]
               for mode in sorted(set(mode_of.values()))}
    report = {"kind": "interactive", "inputs": inputs, "file_checks": checks.as_dict(),
              "stages": overall["stages"], "gains": overall["gains"], "by_mode": by_mode}
    return report, curves
