"""Issue 21, multi-GPU part: `mg-geo train --fsdp` (FSDP2 fully_shard, sharded DCP checkpoints,
gathered export), on CPU with gloo. One rank runs in the default suite; two ranks (torchrun)
run with MG_GEO_TEST_DDP=1, like the DDP test in test_train.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("torch.distributed.fsdp")

from train_helpers import metrics as _metrics, train as _train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _exported(run: Path) -> dict:
    """The final export as from_pretrained loads it (module names, as the sharded state has them)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(run / "model").state_dict()


def _sharded_model(checkpoint: Path, tmp: Path) -> dict:
    """The model tensors of a DCP checkpoint, read back without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint / "sharded"), str(target))
    return torch.load(target, weights_only=False)["model"]


def _losses(run: Path) -> list[float]:
    return [row["loss"] for row in _metrics(run)]


def test_fsdp_units_and_precision_policy(tiny_model):
    from transformers import AutoModelForImageTextToText

    from pipeline.train.fsdp import mixed_precision, shard_blocks

    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    blocks = shard_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["SiglipEncoderLayer", "Qwen2DecoderLayer", "Qwen2DecoderLayer"]
    for precision, param in (("bf16-mixed", torch.bfloat16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        policy = mixed_precision(precision)
        assert (policy.param_dtype, policy.reduce_dtype) == (param, torch.float32)


def test_fsdp_refuses_lora(tiny_model, corpus, tmp_path):
    assert _train(tiny_model, corpus, tmp_path / "run", "--fsdp", "--lora", "--max-steps", "1") == 1


def test_one_rank_fsdp_trains_like_plain_resumes_and_exports(tiny_model, corpus, tmp_path):
    """A one-rank FSDP2 run (a gloo group of one, fp32) against the plain path on the same data;
    resumed from its sharded checkpoint against itself uninterrupted; its export against the
    sharded weights of its last checkpoint."""
    common = ("--max-steps", "4", "--save-every", "2", "--stage", "2", "--grad-accum", "2",
              "--keep-checkpoints", "5")
    plain, full, resumed = tmp_path / "plain", tmp_path / "full", tmp_path / "resumed"
    assert _train(tiny_model, corpus, plain, *common) == 0
    assert _train(tiny_model, corpus, full, *common, "--fsdp") == 0
    assert not torch.distributed.is_initialized()  # the run's own one-rank group is gone
    assert _losses(full) == pytest.approx(_losses(plain), rel=1e-5)

    checkpoint = full / "checkpoints" / "step-0000002"
    assert (checkpoint / "sharded" / ".metadata").exists()
    assert not (checkpoint / "model.safetensors").exists() and not (checkpoint / "optimizer.pt").exists()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["fsdp"] is True
    # A sharded checkpoint needs --fsdp to resume (and the other way round).
    shutil.copytree(checkpoint, tmp_path / "wrong" / "checkpoints" / checkpoint.name)
    assert _train(tiny_model, corpus, tmp_path / "wrong", *common, "--resume") == 1

    shutil.copytree(checkpoint, resumed / "checkpoints" / checkpoint.name)  # as if it died after step 2
    assert _train(tiny_model, corpus, resumed, *common, "--fsdp", "--resume") == 0
    assert [r["step"] for r in _metrics(resumed)] == [3, 4]
    assert _losses(resumed) == _losses(full)[2:]

    # The export is what the run trained: tensor-equal to the last checkpoint's sharded weights,
    # and equal to the resumed run's export.
    trained = _sharded_model(full / "checkpoints" / "step-0000004", tmp_path)
    exported = _exported(full)
    assert set(exported) == set(trained)
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    first = _sharded_model(checkpoint, tmp_path)
    assert any(not torch.equal(first[k], trained[k]) for k in trained)  # steps 3-4 changed weights
    again = _exported(resumed)
    assert all(torch.equal(again[k], exported[k]) for k in exported)
    # ... and close to the plain path's export (same data, same steps).
    reference = _exported(plain)
    for name, tensor in reference.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    config = json.loads((full / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]


def test_one_rank_fsdp_packed_rows_train_like_plain(tiny_model, corpus, tmp_path):
    common = ("--max-steps", "2", "--stage", "2", "--packing", "--max-length", "320")
    plain, sharded = tmp_path / "plain", tmp_path / "fsdp"
    assert _train(tiny_model, corpus, plain, *common) == 0
    assert _train(tiny_model, corpus, sharded, *common, "--fsdp") == 0
    assert _losses(sharded) == pytest.approx(_losses(plain), rel=1e-5)


def test_one_rank_fsdp_bf16_mixed_keeps_fp32_masters_and_exports_bf16(tiny_model, corpus, tmp_path):
    """The GPU policy (bf16 params, fp32 reduction) on a CPU: bf16 compute, fp32 sharded weights and
    AdamW moments in the checkpoint, a bf16 export; losses near the autocast path's."""
    from fresh_process import REPO as ROOT, TESTS, child_env, run_python

    common = ("--max-steps", "2", "--stage", "2", "--grad-accum", "2")
    autocast, sharded, fp32 = tmp_path / "autocast", tmp_path / "fsdp", tmp_path / "fp32"
    # accelerate's state is per process and fixed by its first mixed_precision: the bf16 runs
    # get a process of their own.
    script = ("import sys; from train_helpers import train; a = sys.argv[1:]; "
              "assert train(a[0], a[1], a[2], *a[4:], '--precision', 'bf16-mixed') == 0; "
              "assert train(a[0], a[1], a[3], *a[4:], '--precision', 'bf16-mixed', '--fsdp') == 0")
    run_python(["-c", script, str(tiny_model), str(corpus), str(autocast), str(sharded), *common],
               env=child_env(ROOT, TESTS))
    assert _train(tiny_model, corpus, fp32, *common, "--precision", "fp32", "--fsdp") == 0
    assert _losses(sharded) == pytest.approx(_losses(autocast), rel=2e-3)
    assert abs(_losses(sharded)[0] - _losses(fp32)[0]) > 1e-6  # the forward ran in bf16
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(sharded / "checkpoints" / "step-0000002" / "sharded"), str(tmp_path / "c.pt"))
    state = torch.load(tmp_path / "c.pt", weights_only=False)
    assert {v.dtype for v in state["model"].values()} == {torch.float32}
    moments = [v["exp_avg"] for v in state["optim"]["state"].values() if "exp_avg" in v]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(str(sharded / "model" / "model.safetensors")).values()} == {torch.bfloat16}


@pytest.mark.skipif(not os.environ.get("MG_GEO_TEST_DDP"),
                    reason="two-process DDP and FSDP runs (~1-2 min on 2 cores); set MG_GEO_TEST_DDP=1")
def test_two_rank_fsdp_matches_ddp_and_resumes(tiny_model, corpus, tmp_path):
    def launch(output, *extra):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pipeline.cli",
                "train", "--data", str(corpus), "--output", str(output), "--model", str(tiny_model),
                "--stage", "2", "--max-steps", "4", "--save-every", "2", "--batch-size", "2", "--grad-accum", "2",
                "--num-workers", "1", "--log-every", "1", "--shuffle-buffer", "4", "--lr", "2e-3",
                "--warmup-ratio", "0", "--keep-checkpoints", "5", *extra]
        env = {**os.environ, "ACCELERATE_USE_CPU": "true"}  # accelerate starts a gloo group on CPU
        subprocess.run(argv, check=True, env=env, cwd=REPO)

    ddp, full, resumed = tmp_path / "ddp", tmp_path / "full", tmp_path / "resumed"
    launch(ddp)
    launch(full, "--fsdp")
    assert _losses(full) == pytest.approx(_losses(ddp), rel=1e-5)

    checkpoint = full / "checkpoints" / "step-0000002"
    shards = sorted(p.name for p in (checkpoint / "sharded").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shards
    assert {p.name for p in checkpoint.glob("data-*.json")} == {"data-0.json", "data-1.json"}
    shutil.copytree(checkpoint, resumed / "checkpoints" / checkpoint.name)
    launch(resumed, "--fsdp", "--resume")
    assert [r["step"] for r in _metrics(resumed)] == [3, 4]
    assert _losses(resumed) == pytest.approx(_losses(full)[2:], rel=1e-6)

    trained = _sharded_model(full / "checkpoints" / "step-0000004", tmp_path)
    exported = _exported(full)
    assert set(exported) == set(trained) and all(torch.equal(exported[k], trained[k]) for k in trained)
    reference = _exported(ddp)
    for name, tensor in reference.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
