"""The pipeline's last stage on the pipeline's own output: the real build (all three parts, the
LVLM answered by the loopback server) writes the shards, then both training stages run on them."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from fake_openai_server import FakeOpenAIServer  # noqa: E402
from llm_responder import SmartResponder  # noqa: E402
from tiny_vlm import build_tiny_vlm  # noqa: E402

from pipeline import cli  # noqa: E402


@pytest.fixture(scope="module")
def built_corpus(tmp_path_factory, exif_samples) -> Path:
    out = tmp_path_factory.mktemp("built") / "out"
    with FakeOpenAIServer(SmartResponder()) as server:
        rc = cli.main(["build", "--source", f"exif:{exif_samples / 'gps'}", "--out", str(out),
                       "--parts", "meta,clue,dialogue", "--split-ratios", "1,0,0",
                       "--lvlm-endpoint", server.base_url, "--lvlm-model", "fake-vlm"])
    assert rc == 0
    return out


def test_both_stages_train_on_the_real_build(built_corpus, tmp_path):
    report = json.loads((built_corpus / "report.json").read_text())
    assert all(report["samples"][part]["train"] > 0 for part in ("meta", "clue", "dialogue"))
    model = build_tiny_vlm(tmp_path / "tiny")
    common = ["--data", str(built_corpus), "--model", str(model), "--batch-size", "2", "--num-workers", "0",
              "--log-every", "1", "--shuffle-buffer", "4", "--warmup-ratio", "0"]
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    assert cli.main(["train", "--output", str(stage1), "--stage", "1", "--max-steps", "2", *common]) == 0
    assert cli.main(["train", "--output", str(stage2), "--stage", "2", "--init-from", str(stage1 / "model"),
                     "--max-steps", "3", *common]) == 0
    rows = [json.loads(line) for line in (stage2 / "metrics.jsonl").read_text().splitlines()]
    parts = Counter()
    for row in rows:
        parts.update(row["parts"])
        assert row["loss"] == row["loss"] and row["loss"] > 0  # finite, not NaN
    assert parts["clue"] + parts["dialogue"] > 0
