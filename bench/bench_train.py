"""Training throughput of a Qwen2.5-VL-3B-sized model: tokens/s, MFU and peak GPU memory.

The model is Qwen2.5-VL-3B-Instruct's architecture with random weights (no hub download: the
config values are below), trained with what `mg-geo train` uses (AdamW, bf16 autocast over fp32
master weights or pure bf16, flash-attention when installed else SDPA, activation checkpointing)
on synthetic batches shaped like MG-Geo samples: one image of --image-size pixels square
(448 -> 1024 patches -> 256 image tokens) followed by text, --seq-len tokens in all.

    python bench/bench_train.py                       # one GPU, defaults below
    python bench/bench_train.py --batch-size 8 --seq-len 1024 --no-gradient-checkpointing
    python bench/bench_train.py --tiny --device cpu   # a seconds-long smoke run of the code path
    python bench/bench_train.py --loop --data OUT --processor QWEN_PROCESSOR_DIR --packing
    python bench/bench_train.py --loop --tiny --data OUT   # the real loop on a CPU (tested)

--loop measures the real `mg-geo train` loop instead: real shards from a build (--data), the real
encoder, collate, DataLoader workers and Trainer (token-weighted steps, packing with --packing),
on the same random-weights architecture (--tiny: the tests' tiny LLaVA and its processor; else
Qwen2.5-VL-3B's config with the processor files of --processor, a local copy of
Qwen/Qwen2.5-VL-3B-Instruct's json/txt files: no weights are read). It prints tokens/s, MFU,
the share of step time spent waiting for data, and peak memory.

Prints one JSON object (and writes it to --out): tokens_per_s, samples_per_s, mfu, peak_memory_gb,
step_time_s, ... MFU counts model FLOPs only (6 x parameters per token + attention; the recompute
of activation checkpointing is not counted) against the card's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.train.trainer import resolve_attention  # noqa: E402

# Qwen/Qwen2.5-VL-3B-Instruct config.json (text part under the transformers 5 text_config layout).
QWEN25_VL_3B = {
    "model_type": "qwen2_5_vl",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": True,
    "text_config": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 70,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "tie_word_embeddings": True,
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "hidden_act": "silu",
        "in_channels": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
}

# Dense bf16 peak FLOP/s by device name (no sparsity), for MFU.
PEAK_BF16 = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12,
             "L40S": 362.0e12, "A10G": 125.0e12, "L4": 121.0e12}


def make_config(tiny: bool, layers: int | None):
    from transformers import Qwen2_5_VLConfig

    values = json.loads(json.dumps(QWEN25_VL_3B))
    if tiny:  # same architecture, toy sizes: checks the code path on a CPU in seconds
        values["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
        values["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 3]
        values["vision_config"].update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                       out_hidden_size=64, fullatt_block_indexes=[1])
    if layers:
        values["text_config"]["num_hidden_layers"] = layers
    return Qwen2_5_VLConfig(**{k: v for k, v in values.items() if k != "model_type"})


def synthetic_batch(config, batch: int, seq_len: int, image_size: int, device) -> dict:
    """One image (vision_start, image tokens, vision_end) then text; loss on the second half of
    the text, like an answer after a question."""
    vision = config.vision_config
    grid = image_size // vision.patch_size
    merge = vision.spatial_merge_size
    n_patches = grid * grid
    n_image_tokens = n_patches // (merge * merge)
    n_text = seq_len - n_image_tokens - 2
    if n_text < 8:
        raise SystemExit(f"--seq-len {seq_len} leaves no room for text after {n_image_tokens} image tokens")
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(0, 150000, (batch, n_text), generator=generator)
    image = torch.full((batch, n_image_tokens), config.image_token_id)
    start = torch.full((batch, 1), config.vision_start_token_id)
    end = torch.full((batch, 1), config.vision_end_token_id)
    input_ids = torch.cat([start, image, end, text], dim=1)
    labels = input_ids.clone()
    labels[:, : seq_len - n_text // 2] = -100
    patch_dim = 3 * vision.temporal_patch_size * vision.patch_size ** 2
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "mm_token_type_ids": (input_ids == config.image_token_id).int().to(device),
        "labels": labels.to(device),
        "pixel_values": torch.randn(batch * n_patches, patch_dim, generator=generator).to(device),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * batch).to(device),
    }


def model_flops_per_step(model, config, batch: int, seq_len: int, image_size: int) -> float:
    """6 x (non-embedding) parameters x tokens for the language model and the vision encoder,
    plus attention (12 x layers x width x context per token, halved for causal text), plus the
    output projection (6 x width x vocab per token, shared with the tied embedding)."""
    text, vision = config.text_config, config.vision_config
    n_patches = (image_size // vision.patch_size) ** 2
    lm_params = sum(p.numel() for n, p in model.named_parameters()
                    if "visual" not in n and "embed_tokens" not in n and "lm_head" not in n)
    vis_params = sum(p.numel() for n, p in model.named_parameters() if "visual" in n)
    tokens = batch * seq_len
    flops = 6 * lm_params * tokens + 6 * text.hidden_size * text.vocab_size * tokens
    flops += 12 * text.num_hidden_layers * text.hidden_size * seq_len * tokens / 2
    flops += 6 * vis_params * batch * n_patches
    # Window attention (112 px windows = 64 patches) except in the full-attention blocks.
    window = (vision.window_size // vision.patch_size) ** 2
    full = len(vision.fullatt_block_indexes)
    flops += 12 * vision.hidden_size * batch * n_patches * (full * n_patches + (vision.depth - full) * min(window, n_patches))
    return flops


def peak_flops(device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def speed_options(args) -> dict:
    """The TrainConfig speed fields this benchmark passes on (those the config knows)."""
    from pipeline.train.config import TrainConfig

    wanted = {"liger": args.liger, "compile": args.compile, "vision_attn": args.vision_attn}
    return {k: v for k, v in wanted.items() if k in TrainConfig.__dataclass_fields__}


def run_loop(args) -> dict:
    """The real training loop (pipeline.train.trainer.Trainer) on a random-weights model."""
    import tempfile

    from transformers import AutoConfig, AutoModelForImageTextToText

    from pipeline.train.config import TrainConfig
    from pipeline.train.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="bench-train-loop-"))
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_vlm import build_tiny_vlm

        processor_dir = build_tiny_vlm(work / "tiny-vlm")
        config = AutoConfig.from_pretrained(processor_dir)
        if args.layers:
            config.text_config.num_hidden_layers = args.layers
    else:
        if not args.processor:
            raise SystemExit("--loop without --tiny needs --processor DIR (Qwen2.5-VL-3B-Instruct's processor files)")
        processor_dir = Path(args.processor)
        config = make_config(tiny=False, layers=args.layers)

    def random_model(dtype, attention):
        torch.manual_seed(0)
        return AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attention)

    steps = args.warmup + args.steps
    cfg = TrainConfig(
        data=args.data, output=str(work / "run"), stage=args.stage, model=str(processor_dir),
        precision=args.precision or "auto", attn=args.attn, gradient_checkpointing=args.gradient_checkpointing,
        max_length=args.max_length, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=1e-5,
        warmup_ratio=0.0, max_steps=steps, epoch_samples=max(1, steps * args.batch_size),
        num_workers=args.num_workers, packing=args.packing, shuffle_buffer=args.shuffle_buffer,
        max_pixels=args.max_pixels, log_every=1, save_every=10**9, **args.speed)
    trainer = Trainer(cfg, model_factory=random_model, write_outputs=False)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = trainer.run()
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = rows[args.warmup:] or rows
    seconds = sum(r["seconds"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    device = trainer.accelerator.device
    peak = peak_flops(device, args.peak_tflops)
    # 6 x parameters per token (the vision tower's counted per text token too: an approximation).
    flops_per_s = 6 * params * tokens / max(seconds, 1e-9)
    result = {
        "mode": "loop", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
        "precision": trainer.precision, "attention": trainer.attention, "packing": bool(trainer.pack_mode),
        "gradient_checkpointing": args.gradient_checkpointing, "batch_size": args.batch_size,
        "grad_accum": args.grad_accum, "max_length": args.max_length, "num_workers": cfg.num_workers,
        "steps": len(timed), "step_time_s": seconds / max(1, len(timed)),
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "samples_per_s": sum(sum(r["parts"].values()) for r in timed) / max(seconds, 1e-9),
        "data_wait": sum(r["data_wait"] * r["seconds"] for r in timed) / max(seconds, 1e-9),
        "model_tflops_per_s": flops_per_s / 1e12, "mfu": flops_per_s / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "last_loss": summary["last_loss"],
    }
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=768, help="tokens per sample, image tokens included (default 768)")
    parser.add_argument("--image-size", type=int, default=448, help="square image side in pixels (default 448: 256 image tokens)")
    parser.add_argument("--precision", choices=("bf16-mixed", "bf16", "fp32"), default=None,
                        help="default bf16-mixed on a GPU (as mg-geo train), fp32 on a CPU")
    parser.add_argument("--attn", default="auto", help="auto | flash_attention_2 | sdpa | eager")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--layers", type=int, help="text layers (default: the 3B's 36)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: a smoke run on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, when not in the table")
    parser.add_argument("--out", help="also write the result JSON here")
    loop = parser.add_argument_group("--loop: the real `mg-geo train` loop")
    loop.add_argument("--loop", action="store_true", help="measure the real training loop on --data's shards")
    loop.add_argument("--data", help="corpus root written by `mg-geo build`")
    loop.add_argument("--processor", help="processor directory (Qwen2.5-VL-3B-Instruct's files) unless --tiny")
    loop.add_argument("--stage", type=int, choices=(1, 2), default=1)
    loop.add_argument("--packing", action="store_true")
    loop.add_argument("--max-length", type=int, default=2048)
    loop.add_argument("--max-pixels", type=int, default=1024 * 28 * 28)
    loop.add_argument("--grad-accum", type=int, default=1)
    loop.add_argument("--num-workers", type=int, default=None, help="default: sized to the CPUs")
    loop.add_argument("--shuffle-buffer", type=int, default=1000)
    loop.add_argument("--liger", action="store_true", help="Liger kernels (when installed)")
    loop.add_argument("--compile", action="store_true", help="torch.compile the model")
    loop.add_argument("--vision-attn", choices=("default", "windows"), default="default")
    args = parser.parse_args(argv)
    if args.loop:
        if not args.data:
            parser.error("--loop needs --data (a corpus root written by `mg-geo build`)")
        args.speed = speed_options(args)
        result = run_loop(args)
        text = json.dumps(result, indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return result

    from transformers import Qwen2_5_VLForConditionalGeneration

    device = torch.device(args.device)
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "fp32")
    attention = resolve_attention(args.attn, precision) if device.type == "cuda" else \
        ("sdpa" if args.attn == "auto" else args.attn)
    config = make_config(args.tiny, args.layers)
    config._attn_implementation = attention
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with device:
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    batch = synthetic_batch(config, args.batch_size, args.seq_len, args.image_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision != "fp32")

    def step() -> float:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    sync()
    elapsed = time.perf_counter() - start

    tokens = args.batch_size * args.seq_len * args.steps
    flops = model_flops_per_step(model, config, args.batch_size, args.seq_len, args.image_size) * args.steps
    peak = peak_flops(device, args.peak_tflops)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters": sum(p.numel() for p in model.parameters()),
        "precision": precision, "attention": attention, "gradient_checkpointing": args.gradient_checkpointing,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "image_size": args.image_size,
        "steps": args.steps, "step_time_s": elapsed / args.steps,
        "tokens_per_s": tokens / elapsed, "samples_per_s": args.batch_size * args.steps / elapsed,
        "model_tflops_per_s": flops / elapsed / 1e12,
        "mfu": flops / elapsed / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "last_loss": losses[-1],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
