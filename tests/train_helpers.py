"""`mg-geo train` in this process with the small settings the train tests share, and its metrics."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline import cli


def train(tiny_model, corpus, output, *extra) -> int:
    argv = ["train", "--data", str(corpus), "--output", str(output), "--model", str(tiny_model),
            "--batch-size", "2", "--num-workers", "0", "--log-every", "1", "--shuffle-buffer", "4",
            "--lr", "2e-3", "--warmup-ratio", "0", *extra]
    return cli.main(argv)


def metrics(output: Path) -> list[dict]:
    """metrics.jsonl of a run, a dict per logged step."""
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
