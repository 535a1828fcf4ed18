"""`mg-geo train` on a tiny random LLaVA (tests/tiny_vlm.py) and tiny shards (tests/tiny_corpus.py):
label masks, data streams, both stages end to end, learning, exact resume, weight round trips."""
from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from train_helpers import metrics as _metrics, train as _train  # noqa: E402
from pipeline.train.collate import IGNORE_INDEX, ChatEncoder, pad_collate  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.data import MixedShardStream, count_samples, default_epoch_samples, find_shards  # noqa: E402
from tiny_corpus import write_tiny_corpus  # noqa: E402
from tiny_vlm import CHAT_TEMPLATE  # noqa: E402


@pytest.fixture(scope="module")
def processor(tiny_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _text(role, text, image=False, **extra):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return {"role": role, "content": content, **extra}


HAND_MADE = [
    _text("system", "You are a geolocation assistant."),
    _text("user", "Where was this photo taken?", image=True),
    _text("assistant", "Tokyo, Japan.", train=False),
    _text("user", "That is not right. Look again."),
    _text("assistant", "Paris, France."),
]
NO_MARKS = CHAT_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")


def _label_runs(example) -> list[list[int]]:
    """Contiguous runs of label tokens."""
    runs, current = [], []
    for label in example["labels"].tolist() + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs


# -- label masks -------------------------------------------------------------------------------

@pytest.mark.parametrize("template", [None, NO_MARKS], ids=["generation-markers", "prefix-renders"])
def test_labels_cover_only_trainable_assistant_tokens(processor, template):
    encoder = ChatEncoder(processor, chat_template=template)
    assert encoder.has_generation_marks is (template is None)
    example, reason = encoder.encode(HAND_MADE, _jpeg())
    assert reason == ""
    tok = processor.tokenizer
    expected = tok("Paris, France.<|im_end|>", add_special_tokens=False)["input_ids"]
    runs = _label_runs(example)
    assert runs == [expected]  # the answer and its end-of-turn token, nothing else
    ids = example["input_ids"].tolist()
    # The labelled run is the last answer in place: right before the final "\n".
    start = len(ids) - 1 - len(expected)
    assert ids[start:start + len(expected)] == expected
    assert example["labels"][start:start + len(expected)].tolist() == expected
    assert tok.decode(ids[-1:]) == "\n"
    # The image placeholder became 16 image tokens (32px / 8px patches), none of them labels.
    image_positions = [i for i, t in enumerate(ids) if t == encoder.image_token_id]
    assert len(image_positions) == 16
    assert all(example["labels"][i] == IGNORE_INDEX for i in image_positions)
    # The "train": false answer is in the input, not in the labels.
    wrong = tok("Tokyo, Japan.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert any(ids[i:i + len(wrong)] == wrong for i in range(len(ids)))


def test_both_mask_methods_agree_on_several_turns(processor):
    conversation = HAND_MADE[:2] + [_text("assistant", "Lima, Peru.")] + HAND_MADE[3:] + [
        _text("user", "And the continent?"), _text("assistant", "Europe.", train=False),
        _text("user", "Coordinates?"), _text("assistant", "48.86, 2.35.")]
    marked = ChatEncoder(processor).encode(conversation, _jpeg())[0]
    prefixed = ChatEncoder(processor, chat_template=NO_MARKS).encode(conversation, _jpeg())[0]
    assert torch.equal(marked["labels"], prefixed["labels"])
    decoded = [processor.tokenizer.decode(run) for run in _label_runs(marked)]
    assert decoded == ["Lima, Peru.<|im_end|>", "Paris, France.<|im_end|>", "48.86, 2.35.<|im_end|>"]


# Qwen2.5-VL-Instruct's stock template (image/text parts): no {% generation %} markers and a default
# system prompt when the conversation has none - the prefix-render path must handle both.
QWEN25_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_qwen25_vl_stock_template_labels_the_trainable_answer(processor):
    encoder = ChatEncoder(processor, chat_template=QWEN25_VL_TEMPLATE)
    assert not encoder.has_generation_marks
    for conversation in (HAND_MADE, HAND_MADE[1:]):  # with and without a system message
        text, ids, mask = encoder.label_mask(conversation)
        assert text.startswith("<|im_start|>system\n")
        assert processor.tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "Paris, France.<|im_end|>"


def test_samples_that_cannot_train_are_dropped_with_a_reason(processor):
    encoder = ChatEncoder(processor, max_length=20)
    context_only = [m if m["role"] != "assistant" else {**m, "train": False} for m in HAND_MADE]
    assert encoder.encode(context_only, _jpeg()) == (None, "no_trainable_tokens")
    two_images = [_text("user", "a", image=True), _text("user", "b", image=True), _text("assistant", "c")]
    assert encoder.encode(two_images, _jpeg()) == (None, "several_images")
    assert encoder.encode(HAND_MADE, _jpeg()) == (None, "too_long")  # image tokens beyond 20 tokens
    # A text that spells the image placeholder: the processor refuses it; the stream drops it.
    stream = MixedShardStream({"meta": ["x.tar"]}, {"meta": 1.0}, ChatEncoder(processor))
    spelled = [_text("user", "What is <image>?", image=True), _text("assistant", "A token.")]
    raw = {"__key__": "k", "jpg": _jpeg(), "json": json.dumps({"meta": {"messages": spelled}}).encode()}
    assert stream._encode("meta", raw) == (None, "encode_error") and "k:" in stream.last_error
    assert stream._encode("clue", raw) == (None, "no_messages")


def test_a_template_that_rewrites_earlier_turns_is_refused(processor):
    from pipeline.train.collate import ConversationError

    # Renders each message differently when it is the last one: prefixes are not prefixes.
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content[-1].text }}"
                "{% if loop.last %}!{% endif %}<|im_end|>\n{% endfor %}")
    with pytest.raises(ConversationError):
        ChatEncoder(processor, chat_template=template).label_mask(HAND_MADE[1:])


def test_pad_collate_pads_tokens_and_stacks_images(processor):
    encoder = ChatEncoder(processor)
    short = encoder.encode(HAND_MADE[1:3] + [_text("assistant", "Oslo.")], _jpeg())[0]
    long = encoder.encode(HAND_MADE, _jpeg())[0]
    batch = pad_collate([short, long], pad_token_id=encoder.pad_token_id)
    n = len(long["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, n)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    pad = n - len(short["input_ids"])
    assert batch["attention_mask"][0, -pad:].sum() == 0
    assert (batch["labels"][0, -pad:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, -pad:] == encoder.pad_token_id).all()


# -- data streams ------------------------------------------------------------------------------

def test_shards_are_found_and_counted(corpus):
    shards = find_shards(str(corpus), "meta", "train")
    assert [Path(s).name for s in shards] == ["meta-train-000000.tar", "meta-train-000001.tar"]
    assert count_samples(shards) == 8
    for stats in corpus.glob("meta/train/*_stats.json"):
        stats.rename(stats.with_suffix(".bak"))  # without the writer's stats: count the tar members
    try:
        assert count_samples(shards) == 8
    finally:
        for bak in corpus.glob("meta/train/*.bak"):
            bak.rename(bak.with_suffix(".json"))
    assert default_epoch_samples({"meta": 1000, "clue": 90}, {"meta": 0.1, "clue": 0.9}) == 100


def test_ranks_read_disjoint_shards_and_parts_mix_by_weight(corpus):
    shards = {p: find_shards(str(corpus), p, "train") for p in ("meta", "clue", "dialogue")}
    seen = []
    for rank in (0, 1):
        stream = MixedShardStream(shards, {"meta": 1.0}, None, world=2, rank=rank, resample="off", shuffle_buffer=2)
        seen.append({raw["__url__"] for _, raw in _take(stream.mixed(0, 1), 4)})  # one pass: 1 shard each
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(shards["meta"])

    weights = {"clue": 0.45, "dialogue": 0.45, "meta": 0.1}
    stream = MixedShardStream(shards, weights, None, shuffle_buffer=4)
    counts = Counter(part for part, _ in _take(stream.mixed(0, 1), 2000))
    for part, weight in weights.items():
        assert abs(counts[part] / 2000 - weight) < 0.04, counts
    again = MixedShardStream(shards, weights, None, shuffle_buffer=4)
    assert [r["__key__"] for _, r in _take(again.mixed(0, 1), 50)] == \
        [r["__key__"] for _, r in _take(stream.mixed(0, 1), 50)]  # seeded: the same stream


def _take(iterator, n):
    return [item for _, item in zip(range(n), iterator)]


# -- training ----------------------------------------------------------------------------------

def _state(path: Path) -> dict:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path).state_dict()


def test_loss_falls_on_a_fixed_set(tiny_model, corpus, tmp_path):
    assert _train(tiny_model, corpus, tmp_path / "run", "--max-steps", "24", "--lr", "5e-3",
                  "--scheduler", "constant", "--save-every", "1000") == 0
    losses = [row["loss"] for row in _metrics(tmp_path / "run")]
    assert len(losses) == 24
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses


def test_both_stages_run_end_to_end(tiny_model, corpus, tmp_path):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    assert _train(tiny_model, corpus, stage1, "--stage", "1", "--max-steps", "3") == 0
    rows = _metrics(stage1)
    assert set().union(*(row["parts"] for row in rows)) == {"meta"}
    assert {"loss", "lr", "tokens_per_s", "samples_per_s", "epoch"} <= set(rows[-1])
    assert list((stage1 / "tensorboard").glob("events.out.tfevents.*"))
    assert (stage1 / "checkpoints" / "step-0000003" / "trainer_state.json").exists()

    assert _train(tiny_model, corpus, stage2, "--stage", "2", "--init-from", str(stage1 / "model"),
                  "--max-steps", "4", "--replay", "0.3") == 0
    parts = Counter()
    for row in _metrics(stage2):
        parts.update(row["parts"])
    assert sum(parts.values()) == 8 and set(parts) <= {"clue", "dialogue", "meta"}
    assert parts["clue"] + parts["dialogue"] > 0
    assert json.loads((stage2 / "train_config.json").read_text())["init_from"] == str(stage1 / "model")
    s1, s2 = _state(stage1 / "model"), _state(stage2 / "model")
    assert s1.keys() == s2.keys() and any(not torch.equal(s1[k], s2[k]) for k in s1)


def test_resume_matches_an_uninterrupted_run(tiny_model, corpus, tmp_path):
    # Two DataLoader workers and a stop after an odd number of batches: the resumed run must also
    # continue each worker's stream and the round-robin batch order.
    common = ("--max-steps", "6", "--save-every", "3", "--num-workers", "2", "--stage", "2",
              "--keep-checkpoints", "5")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert _train(tiny_model, corpus, full, *common) == 0
    checkpoint = full / "checkpoints" / "step-0000003"
    shutil.copytree(checkpoint, resumed / "checkpoints" / checkpoint.name)  # as if the run died after step 3
    assert _train(tiny_model, corpus, resumed, *common, "--resume") == 0

    full_losses = {row["step"]: row["loss"] for row in _metrics(full)}
    resumed_losses = {row["step"]: row["loss"] for row in _metrics(resumed)}
    assert sorted(resumed_losses) == [4, 5, 6]
    assert [resumed_losses[s] for s in (4, 5, 6)] == [full_losses[s] for s in (4, 5, 6)]
    a, b = _state(full / "model"), _state(resumed / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("optimizer.pt", "scheduler.pt"):
        assert (resumed / "checkpoints" / "step-0000006" / name).exists()


def test_restored_weights_equal_saved_ones(tiny_model, corpus, tmp_path):
    from pipeline.train.trainer import Trainer, load_weights

    output = tmp_path / "run"
    assert _train(tiny_model, corpus, output, "--max-steps", "2") == 0
    saved = load_file(str(output / "checkpoints" / "step-0000002" / "model.safetensors"))
    exported = _state(output / "model")  # from_pretrained of the final export
    assert set(exported) == set(saved)
    assert all(torch.equal(exported[k], saved[k]) for k in saved)

    # A fresh model (the untrained one) restored from the checkpoint: every tensor equal.
    trainer = Trainer(TrainConfig(data=str(corpus), output=str(output), model=str(tiny_model)))
    model = trainer._build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(before[k], saved[k]) for k in saved)
    load_weights(model, output / "checkpoints" / "step-0000002" / "model.safetensors", lora=False)
    restored = model.state_dict()
    assert set(restored) == set(saved) and all(torch.equal(restored[k], saved[k]) for k in saved)


def test_lora_run_saves_the_adapter_and_a_merged_model(tiny_model, corpus, tmp_path):
    output = tmp_path / "lora"
    assert _train(tiny_model, corpus, output, "--lora", "--lora-r", "4", "--max-steps", "2") == 0
    saved = load_file(str(output / "checkpoints" / "step-0000002" / "model.safetensors"))
    assert saved and all("lora_" in name for name in saved)  # the checkpoint holds the adapter only
    assert (output / "adapter" / "adapter_config.json").exists()
    merged = _state(output / "model")
    assert not any("lora_" in name for name in merged)
    base = _state(tiny_model)
    assert merged.keys() == base.keys()


def test_an_output_with_checkpoints_is_not_overwritten(tiny_model, corpus, tmp_path):
    output = tmp_path / "run"
    assert _train(tiny_model, corpus, output, "--max-steps", "1") == 0
    assert _train(tiny_model, corpus, output, "--max-steps", "1") == 1  # needs --resume
    assert _train(tiny_model, corpus, output, "--max-steps", "1", "--resume") == 0  # already done


def test_missing_part_is_an_error(tiny_model, tmp_path):
    corpus = write_tiny_corpus(tmp_path / "meta-only", samples=4, parts=("meta",))
    assert _train(tiny_model, corpus, tmp_path / "run", "--stage", "2", "--max-steps", "1") == 1


def test_gpu_bench_code_path_runs_on_a_cpu(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_train import make_config, main

    config = make_config(tiny=False, layers=None)  # the real 3B sizes are what the GPU run uses
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers, config.vision_config.depth) == (2048, 36, 32)
    result = main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                   "--seq-len", "40", "--image-size", "56", "--out", str(tmp_path / "bench.json")])
    assert result["tokens_per_s"] > 0 and result["last_loss"] > 0
    assert json.loads((tmp_path / "bench.json").read_text())["seq_len"] == 40


@pytest.mark.skipif(not __import__("os").environ.get("MG_GEO_TEST_DDP"),
                    reason="two-process DDP run (~20 s on 2 cores); set MG_GEO_TEST_DDP=1")
def test_two_ranks_resume_like_an_uninterrupted_run(tiny_model, corpus, tmp_path):
    import os
    import subprocess
    import sys

    def launch(output, *extra):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pipeline.cli",
                "train", "--data", str(corpus), "--output", str(output), "--model", str(tiny_model),
                "--stage", "2", "--max-steps", "4", "--save-every", "2", "--batch-size", "2",
                "--num-workers", "1", "--log-every", "1", "--shuffle-buffer", "4", *extra]
        env = {**os.environ, "ACCELERATE_USE_CPU": "true"}  # accelerate's gloo DDP on CPU
        subprocess.run(argv, check=True, env=env, cwd=Path(__file__).resolve().parents[1])

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(full)
    checkpoint = full / "checkpoints" / "step-0000002"
    assert {p.name for p in checkpoint.glob("data-*.json")} == {"data-0.json", "data-1.json"}
    assert json.loads((full / "train_config.json").read_text())["stage"] == 2
    shutil.copytree(checkpoint, resumed / "checkpoints" / checkpoint.name)
    launch(resumed, "--resume")
    assert [r["loss"] for r in _metrics(resumed)] == [r["loss"] for r in _metrics(full)][2:]
    a, b = _state(full / "model"), _state(resumed / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_from_pretrained_either_key_layout_or_refuse(tiny_model, tmp_path):
    """transformers 5 writes VLMs in the old key layout (language_model.model.*) and names the
    modules model.language_model.*: both must load completely, and a checkpoint that lacks a
    tensor must stop the run instead of starting from a random one."""
    from safetensors.torch import save_file

    from pipeline.train.trainer import TrainError, load_model

    reference = _state(tiny_model)
    on_disk = load_file(str(tiny_model / "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in on_disk)  # the legacy layout on disk
    assert any(k.startswith("model.language_model.") for k in reference)  # the module names
    for name, tensors in (("module-layout", reference), ("missing", dict(list(on_disk.items())[1:]))):
        copy = tmp_path / name
        shutil.copytree(tiny_model, copy)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(copy / "model.safetensors"),
                  metadata={"format": "pt"})
        if name == "missing":
            with pytest.raises(TrainError, match="weights not loaded"):
                load_model(str(copy), torch.float32, "sdpa")
        else:
            loaded = load_model(str(copy), torch.float32, "sdpa").state_dict()
            assert loaded.keys() == reference.keys()
            assert all(torch.equal(loaded[k], reference[k]) for k in reference)
