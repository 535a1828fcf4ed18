"""Single-guess evaluation: one question per test image, one prediction, scored.

`predict_split` runs a model over shard samples and streams predictions + ground truth to files;
`score_files` scores any predictions file against any ground-truth file. `eval` always scores
the files it just wrote, so a run and a later re-score of its files give the same numbers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.evaluate import model
from pipeline.evaluate.metrics import by_continent, error_distances, score_all, summarize
from pipeline.evaluate.predictions import (GroundTruth, PredictionFile, prediction_line,
                                           truth_from_sample, write_ground_truth)
from pipeline.evaluate.shards import ShardSample
from pipeline.lvlm.types import LvlmBackend

log = logging.getLogger(__name__)
PREDICTIONS_FILE = "predictions.jsonl"
GROUND_TRUTH_FILE = "ground_truth.csv"


@dataclass
class FileChecks:
    unreadable_rows: int = 0   # lines that are not JSON objects, rows without an id
    duplicate_rows: int = 0    # a second row for the same id (and stage): the first one counts
    unknown_ids: int = 0       # rows whose id is not in the ground truth: ignored

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def index_predictions(pred_file: PredictionFile, truth_ids: set[str],
                      key=lambda pred: (pred.id, pred.stage)) -> tuple[dict, FileChecks]:
    """key(prediction) (default (id, stage)) -> the first Prediction with it, and what was odd
    about the file."""
    checks = FileChecks(unreadable_rows=pred_file.unreadable_rows)
    table: dict = {}
    for pred in pred_file.predictions:
        if pred.id not in truth_ids:
            checks.unknown_ids += 1
        elif key(pred) in table:
            checks.duplicate_rows += 1
        else:
            table[key(pred)] = pred
    return table, checks


def score_files(truths: list[GroundTruth], pred_file: PredictionFile, inputs: dict) -> tuple[dict, dict]:
    """The report dict (metrics.json) and the CDF curves for one predictions file."""
    table, checks = index_predictions(pred_file, {t.id for t in truths})
    scores = score_all(truths, {pid: p for (pid, stage), p in table.items() if stage == 0})
    report = {"kind": "single", "inputs": inputs, "file_checks": checks.as_dict(), "metrics": summarize(scores),
              "by_continent": by_continent(scores)}
    return report, {"predictions": error_distances(scores)}


def chunks(samples: Iterable[ShardSample], size: int) -> Iterator[list[ShardSample]]:
    chunk: list[ShardSample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def predict_split(backend: LvlmBackend, samples: Iterable[ShardSample], out_dir: Path, *,
                  sampling: dict, batch_size: int = 32, limit: int = 0) -> tuple[Path, Path, int]:
    """Ask the model about every sample; write predictions.jsonl and ground_truth.csv as it goes
    (only a batch of images is held in memory). Returns both paths and the samples skipped for
    having no usable ground truth (no key or coordinates in their json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path, truth_path = out_dir / PREDICTIONS_FILE, out_dir / GROUND_TRUTH_FILE
    truths: list[GroundTruth] = []
    skipped = done = 0
    with pred_path.open("w", encoding="utf-8") as out:
        for chunk in chunks(limited(samples, limit), batch_size):
            batch = []
            for sample in chunk:
                truth = truth_from_sample(sample.record)
                if truth is None:
                    skipped += 1
                    continue
                truths.append(truth)
                batch.append((truth.id, model.make_request(
                    [model.image_question()], sample.jpeg, sampling=sampling, request_id=f"{truth.id}/eval")))
            results = model.run_batch(backend, [req for _, req in batch])
            for (truth_id, _), result in zip(batch, results):
                out.write(prediction_line(model.to_prediction(truth_id, result)))
            out.flush()
            done += len(batch)
            log.info("eval: %d samples answered so far", done)
    write_ground_truth(truth_path, truths)
    return pred_path, truth_path, skipped


def limited(samples: Iterable[ShardSample], limit: int) -> Iterator[ShardSample]:
    for i, sample in enumerate(samples):
        if limit and i >= limit:
            return
        yield sample
