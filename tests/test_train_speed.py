"""Issue 21 (training at hardware speed), the CPU-checkable parts: token-weighted loss, packing,
resume by seeking, the data-wait log, the optional speed paths and their clean fallbacks."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from pipeline import cli  # noqa: E402
from train_helpers import metrics as _metrics, train as _train  # noqa: E402
from pipeline.train.collate import IGNORE_INDEX, ChatEncoder, pack_collate, pad_collate  # noqa: E402
from pipeline.train.data import MixedShardStream, find_shards  # noqa: E402
from pipeline.train.step import (label_tokens, model_inputs, packing_mode,  # noqa: E402
                                 token_weighted_backward)


@pytest.fixture(scope="module")
def encoder(tiny_model):
    from transformers import AutoProcessor

    return ChatEncoder(AutoProcessor.from_pretrained(tiny_model))


@pytest.fixture(scope="module")
def examples(corpus, encoder) -> list[dict]:
    """Stage-2 examples of different lengths (Clue, Dialogue and Meta answers)."""
    shards = {p: find_shards(str(corpus), p, "train") for p in ("meta", "clue", "dialogue")}
    stream = MixedShardStream(shards, {"clue": 1, "dialogue": 1, "meta": 1}, encoder, shuffle_buffer=2)
    out = []
    for part, raw in stream.mixed(0, 1):
        example, _ = stream._encode(part, raw)
        if example is not None:
            out.append(example)
        if len(out) == 6:
            return out


def _model(path):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# -- token-weighted loss -------------------------------------------------------------------------

def test_token_weighted_loss_does_not_depend_on_the_micro_batch_split(tiny_model, encoder, examples):
    model = _model(tiny_model)
    counts = [label_tokens(e["labels"][None]) for e in examples]
    assert len(set(counts)) > 1, counts  # the check means something only with unequal answers
    total = sum(counts)
    results = {}
    for split in ([6], [3, 3], [2, 2, 2], [1, 5], [1] * 6):
        model.zero_grad(set_to_none=True)
        batches, start = [], 0
        for size in split:
            batches.append(pad_collate(examples[start:start + size], encoder.pad_token_id))
            start += size
        loss = token_weighted_backward(model, batches, total)
        results[tuple(split)] = (float(loss), _grads(model))
    ref_loss, ref_grads = results[(6,)]
    for split, (loss, grads) in results.items():
        assert loss == pytest.approx(ref_loss, rel=1e-5), split
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{split} {name}")

    # The old weighting (each micro-batch's mean counts the same) gives another gradient: the
    # comparison above can fail.
    model.zero_grad(set_to_none=True)
    for example in examples:
        (model(**pad_collate([example], encoder.pad_token_id)).loss / len(examples)).backward()
    old = _grads(model)
    assert any(not torch.allclose(old[n], g, rtol=1e-3, atol=1e-6) for n, g in ref_grads.items())


def test_ranks_share_the_step_loss_by_their_tokens(tiny_model, encoder, examples):
    """Two ranks' shares (each scaled by the world size, as DDP averages) add up to the
    one-rank gradient; their logged shares add up to the one-rank loss."""
    model = _model(tiny_model)
    total = sum(label_tokens(e["labels"][None]) for e in examples)
    one = float(token_weighted_backward(model, [pad_collate(examples, encoder.pad_token_id)], total))
    single = _grads(model)
    shares, summed = [], None
    for rank_examples in (examples[:1], examples[1:]):
        model.zero_grad(set_to_none=True)
        shares.append(float(token_weighted_backward(model, [pad_collate(rank_examples, encoder.pad_token_id)],
                                                    total, world=2)))
        grads = _grads(model)
        summed = grads if summed is None else {n: summed[n] + grads[n] for n in grads}
    assert sum(shares) == pytest.approx(one, rel=1e-5)
    for name, grad in single.items():
        torch.testing.assert_close(summed[name] / 2, grad, rtol=1e-4, atol=1e-6)


# -- packing -------------------------------------------------------------------------------------

def test_packed_rows_give_the_padded_loss_and_gradient(tiny_model, encoder, examples):
    model = _model(tiny_model)
    assert packing_mode(model, "sdpa")[0] == "1d"
    padded = pad_collate(examples, encoder.pad_token_id)
    loss = model(**padded).loss
    loss.backward()
    reference = _grads(model)
    for rows, flatten in (([examples[:2], examples[2:5], examples[5:]], False), ([examples[:3], examples[3:]], True)):
        packed = pack_collate(rows, encoder.pad_token_id, flatten=flatten)
        assert "attention_mask" not in packed
        assert len(packed["input_ids"]) == (1 if flatten else len(rows))
        assert label_tokens(packed["labels"]) == label_tokens(padded["labels"])
        model.zero_grad(set_to_none=True)
        packed_loss = model(**model_inputs(packed)).loss
        packed_loss.backward()
        assert float(packed_loss.detach()) == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-6)
        for name, grad in reference.items():
            torch.testing.assert_close(_grads(model)[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    # Without the per-sample positions the rows are one long sequence: another loss (the check can fail).
    packed = model_inputs(pack_collate([examples], encoder.pad_token_id))
    packed.pop("position_ids")
    assert abs(float(model(**packed).loss.detach()) - float(loss.detach())) > 1e-4


def _qwen_example(config, text_len: int, grid: int, seed: int) -> dict:
    """A Qwen2.5-VL-shaped example: vision start, image tokens, vision end, text with labels."""
    g = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    n_image = grid * grid // vision.spatial_merge_size ** 2
    ids = torch.cat([torch.tensor([config.vision_start_token_id]), torch.full((n_image,), config.image_token_id),
                     torch.tensor([config.vision_end_token_id]), torch.randint(0, 1000, (text_len,), generator=g)])
    labels = ids.clone()
    labels[: len(ids) - text_len // 2] = IGNORE_INDEX
    patch_dim = 3 * vision.temporal_patch_size * vision.patch_size ** 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "mm_token_type_ids": (ids == config.image_token_id).int(),
            "pixel_values": torch.randn(grid * grid, patch_dim, generator=g),
            "image_grid_thw": torch.tensor([[1, grid, grid]])}


def test_packed_qwen25_vl_rows_get_per_sample_3d_positions():
    """The Qwen2.5-VL architecture (tiny, from the benchmark's config): packed rows with the 4-row
    positions train like padded rows."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_train import make_config
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = make_config(tiny=True, layers=None)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
    assert packing_mode(model, "sdpa")[0] == "mrope"
    examples = [_qwen_example(config, 12, 4, 0), _qwen_example(config, 20, 8, 1), _qwen_example(config, 7, 4, 2)]
    with torch.no_grad():
        padded = float(model(**pad_collate(examples, 0)).loss)
        packed = pack_collate([examples[:2], examples[2:]], 0)
        inputs = model_inputs(packed, model, "mrope")
        assert inputs["position_ids"].shape == (4, 2, packed["input_ids"].shape[1])
        assert float(model(**inputs).loss) == pytest.approx(padded, rel=1e-5)
        one_row = pack_collate([examples], 0, flatten=True)
        assert float(model(**model_inputs(one_row, model, "mrope")).loss) == pytest.approx(padded, rel=1e-5)
        # The model's own positions for the packed row (one sequence) differ: the check can fail.
        plain = model_inputs(one_row)
        plain.pop("position_ids")
        assert abs(float(model(**plain).loss) - padded) > 1e-4


def test_models_that_cannot_pack_fall_back():
    class Config:
        model_type = "paligemma"

    class Model:
        config = Config()

    mode, why = packing_mode(Model(), "sdpa")
    assert mode is None and "paligemma" in why


# -- resume by seeking -----------------------------------------------------------------------------

def test_a_resumed_stream_seeks_and_continues_the_same_batches(corpus, encoder):
    shards = {p: find_shards(str(corpus), p, "train") for p in ("meta", "clue", "dialogue")}
    weights = {"clue": 0.4, "dialogue": 0.4, "meta": 0.2}

    def stream(states=None, **extra):
        return MixedShardStream(shards, weights, encoder, shuffle_buffer=3, batch_size=2, start_states=states,
                                pad_token_id=encoder.pad_token_id, **extra)

    for extra in ({}, {"pack_tokens": 150}):
        full = iter(stream(**extra))
        first = [next(full) for _ in range(7)]  # well past one pass over every 8-sample part
        state = json.loads(json.dumps(first[-1]["_meta"]["state"]))  # as a checkpoint stores it
        rest = [next(full) for _ in range(4)]
        resumed = iter(stream({0: state}, **extra))
        again = [next(resumed) for _ in range(4)]
        for a, b in zip(rest, again):
            assert a["_meta"]["parts"] == b["_meta"]["parts"]
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        # What it read to continue: the buffered samples again (by offset), then new ones - not
        # the 14+ samples consumed before the checkpoint.
        buffered = sum(len(s["buffer"]) for s in state["parts"].values())
        read_before = first[-1]["_meta"]["read"]
        assert buffered <= again[0]["_meta"]["read"] < read_before
        assert again[-1]["_meta"]["read"] - buffered <= rest[-1]["_meta"]["read"] - read_before + 1  # + a look-ahead


# -- end to end ------------------------------------------------------------------------------------

def test_step_loss_is_the_same_for_any_micro_batch_split(tiny_model, corpus, tmp_path):
    losses = []
    for batch, accum in (("4", "1"), ("2", "2"), ("1", "4")):
        out = tmp_path / f"b{batch}"
        assert _train(tiny_model, corpus, out, "--batch-size", batch, "--grad-accum", accum, "--max-steps", "1",
                      "--stage", "2", "--no-gradient-checkpointing") == 0
        losses.append(_metrics(out)[0]["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)


def test_packed_run_resumes_like_an_uninterrupted_one(tiny_model, corpus, tmp_path, capsys):
    common = ("--max-steps", "4", "--save-every", "2", "--num-workers", "2", "--stage", "2", "--packing",
              "--max-length", "320", "--keep-checkpoints", "5")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert _train(tiny_model, corpus, full, *common) == 0
    logged = capsys.readouterr().err  # the command line logs to stderr
    assert "packing samples into rows of up to 320 tokens" in logged
    assert "% of step time" in logged  # the data-wait share
    rows = _metrics(full)
    assert all(0.0 <= row["data_wait"] <= 1.0 for row in rows)
    assert sum(sum(row["parts"].values()) for row in rows) > 4 * 2  # more samples than rows: packed
    data = json.loads((full / "checkpoints" / "step-0000002" / "data-0.json").read_text())
    assert data["format"] == 2 and set(data["states"]) == {"0", "1"}
    shutil.copytree(full / "checkpoints" / "step-0000002", resumed / "checkpoints" / "step-0000002")
    assert _train(tiny_model, corpus, resumed, *common, "--resume") == 0
    assert [r["loss"] for r in _metrics(resumed)] == [r["loss"] for r in rows][2:]


def test_bad_worker_count_exits_2(capsys):
    assert cli.main(["train", "--data", "d", "--output", "o", "--num-workers", "many"]) == 2
    assert "--num-workers" in capsys.readouterr().err


# -- optional speed paths ----------------------------------------------------------------------------

def test_liger_is_skipped_cleanly_when_missing(tiny_model, corpus, tmp_path, capsys):
    from pipeline.train.speed import liger_available

    if liger_available():
        pytest.skip("liger-kernel is installed here")
    assert _train(tiny_model, corpus, tmp_path / "run", "--liger", "--max-steps", "1") == 0
    assert "--liger: liger-kernel is not installed (pip install 'mg-geo[liger]')" in capsys.readouterr().err
    assert (tmp_path / "run" / "model" / "config.json").exists()


def test_selective_checkpointing_gives_the_same_gradients(tiny_model, encoder, examples):
    from pipeline.train.speed import enable_checkpointing

    batch = pad_collate(examples[:3], encoder.pad_token_id)
    grads = []
    for mode in (None, "full", "selective"):
        model = _model(tiny_model)
        model.train()
        if mode:
            enable_checkpointing(model, selective=mode == "selective")
        model(**batch).loss.backward()
        grads.append(_grads(model))
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name, grad in grads[0].items():
            torch.testing.assert_close(other[name], grad, rtol=1e-5, atol=1e-7)


def test_compiled_blocks_compute_the_same_loss(tiny_model, encoder, examples):
    from pipeline.train.speed import compile_blocks

    batch = pad_collate(examples[:2], encoder.pad_token_id)
    model = _model(tiny_model)
    with torch.no_grad():
        before = float(model(**batch).loss)
        assert compile_blocks(model, backend="eager") == 3  # 1 SigLIP + 2 Qwen2 layers
        assert float(model(**batch).loss) == pytest.approx(before, rel=1e-6)


def test_master_weight_adamw_keeps_updates_bf16_would_lose():
    from pipeline.train.speed import MasterWeightAdamW

    torch.manual_seed(0)
    start = torch.randn(64)
    # On fp32 weights it is AdamW.
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours, ref = MasterWeightAdamW([a], lr=1e-2, weight_decay=0.1), torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for step in range(5):
        for p, opt in ((a, ours), (b, ref)):
            p.grad = torch.sin(start * (step + 1))
            opt.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    # On bf16 weights, updates far below bf16's resolution still add up in the fp32 master.
    w = torch.nn.Parameter(torch.full((8,), 1.0, dtype=torch.bfloat16))
    plain = torch.nn.Parameter(torch.full((8,), 1.0, dtype=torch.bfloat16))
    opt, plain_opt = MasterWeightAdamW([w], lr=1e-4), torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    for _ in range(100):
        for p, o in ((w, opt), (plain, plain_opt)):
            p.grad = torch.ones(8, dtype=torch.bfloat16)
            o.step()
    assert opt.state[w]["master"].dtype == torch.float32
    assert float(opt.state[w]["master"][0]) == pytest.approx(1.0 - 100 * 1e-4, rel=1e-4)
    assert float(w[0]) < 1.0 and float(plain[0]) == 1.0  # bf16 AdamW lost every update
    state = opt.state_dict()
    assert "master" in state["state"][0]


def test_bf16_master_and_selective_checkpointing_runs(tiny_model, corpus, tmp_path):
    out = tmp_path / "run"
    assert _train(tiny_model, corpus, out, "--precision", "bf16-master", "--selective-checkpointing",
                  "--max-steps", "2") == 0
    optimizer = torch.load(out / "checkpoints" / "step-0000002" / "optimizer.pt", weights_only=False)
    masters = [s["master"] for s in optimizer["state"].values()]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    assert all(r["loss"] == r["loss"] for r in _metrics(out))


def _per_window_sdpa(q, k, v, cu):
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        outs.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]))
    return torch.cat(outs, dim=2).transpose(1, 2)  # (1, tokens, heads, dim)


def test_window_attention_in_one_call_equals_per_window_sdpa():
    from pipeline.train.attention import window_attention

    torch.manual_seed(0)
    cu = torch.tensor([0, 64, 128, 150, 214, 230, 294], dtype=torch.int32)  # uneven windows, as at image edges
    q, k, v = (torch.randn(1, 4, 294, 16, requires_grad=True) for _ in range(3))
    expected = _per_window_sdpa(q, k, v, cu)
    out, _ = window_attention(None, q, k, v, scaling=16 ** -0.5, cu_seq_lens_q=cu, max_length_q=64)
    assert out.shape == expected.shape == (1, 294, 4, 16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # One attention over all tokens is something else: the comparison can fail.
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    assert not torch.allclose(whole, expected, atol=1e-3)


def test_vision_window_attention_flag_falls_back_cleanly_on_cpu(tiny_model):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_train import make_config, synthetic_batch
    from transformers import AutoModelForImageTextToText

    from pipeline.train.attention import use_window_attention

    config = make_config(tiny=True, layers=None)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa").eval()
    batch = synthetic_batch(config, 1, 80, 112, "cpu")
    with torch.no_grad():
        before = float(model(**batch).loss)
        changed = use_window_attention(model)
        assert float(model(**batch).loss) == pytest.approx(before, rel=1e-5)
    if not changed:  # without flash-attn, transformers 5 refuses a custom "flash" implementation
        assert model.config.vision_config._attn_implementation == "sdpa"
    assert use_window_attention(_model(tiny_model)) is False  # LLaVA/SigLIP: no window attention


def test_bench_loop_runs_the_real_loop_on_a_cpu(corpus, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_train import main

    result = main(["--loop", "--tiny", "--data", str(corpus), "--steps", "2", "--warmup", "1", "--batch-size", "2",
                   "--num-workers", "0", "--packing", "--max-length", "320", "--shuffle-buffer", "4",
                   "--out", str(tmp_path / "loop.json")])
    assert result["mode"] == "loop" and result["packing"] is True and result["steps"] == 2
    assert result["tokens_per_s"] > 0 and 0.0 <= result["data_wait"] <= 1.0 and result["last_loss"] > 0
    assert result["samples_per_s"] > 0 and json.loads((tmp_path / "loop.json").read_text())["model"] == \
        "LlavaForConditionalGeneration"
