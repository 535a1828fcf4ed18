"""`mg-geo train`: fine-tune an image-text-to-text model on the corpus shards (stage 1 or 2).

One GPU: `mg-geo train ...`; several: `accelerate launch --num_processes N -m pipeline.cli train ...`
or `torchrun --nproc_per_node N -m pipeline.cli train ...` (docs/training.md).
"""
from __future__ import annotations

import argparse
import logging
from pipeline.commands.argtypes import positive_int

log = logging.getLogger("pipeline.train")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _workers(text: str):
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of workers >= 0 or 'auto', got {text!r}")
    return value


def _mix(text: str) -> dict:
    from pipeline.train.config import TrainConfig, parse_mix

    try:
        mix = parse_mix(text)
        TrainConfig(data="", output="", mix=mix).part_weights()  # validates names and weights
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return mix


def register(sub) -> None:
    from pipeline.train.config import DEFAULT_MAX_PIXELS, DEFAULT_MODEL

    p = sub.add_parser(
        "train", help="fine-tune a vision-language model on the corpus (stage 1: Meta; stage 2: Clue+Dialogue)",
        description="Fine-tune an image-text-to-text model on MG-Geo shards. Stage 1 trains on Meta; "
        "stage 2 (--init-from stage 1's OUTPUT/model) on Clue + Dialogue with a Meta replay. "
        "Loss is on assistant tokens only; messages marked \"train\": false are context.")
    p.add_argument("--data", required=True, help="corpus root written by `mg-geo build` (DATA/{part}/{split}/*.tar)")
    p.add_argument("--output", required=True, help="run directory: checkpoints/, model/, tensorboard/, metrics.jsonl")
    p.add_argument("--stage", type=int, choices=(1, 2), default=1, help="1: Meta; 2: Clue + Dialogue + Meta replay (default 1)")
    p.add_argument("--mix", type=_mix, default={}, metavar="PART=W,...",
                   help="part weights overriding the stage preset, e.g. clue=0.45,dialogue=0.45,meta=0.1")
    p.add_argument("--replay", type=_fraction, default=0.1, help="stage 2: share of Meta samples in the mix (default 0.1)")
    p.add_argument("--split", default="train", help="split to train on (default train)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or path of the model and processor (default {DEFAULT_MODEL})")
    p.add_argument("--init-from", help="weights to start from, e.g. stage 1's OUTPUT/model (default: --model)")
    p.add_argument("--chat-template", help="jinja file replacing the processor's chat template")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (peft) instead of all weights")
    p.add_argument("--lora-r", type=positive_int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=positive_int, default=32, help="LoRA alpha (default 32)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    p.add_argument("--lora-targets", default="language",
                   help="'language' (attention+MLP projections of the language model; default), 'all-linear', "
                   "a regex or a comma list of module names")
    p.add_argument("--freeze-vision", action="store_true", help="do not train the vision encoder (its merger/projector still trains)")
    p.add_argument("--precision", choices=("auto", "bf16-mixed", "bf16", "bf16-master", "fp32"), default="auto",
                   help="auto: bf16-mixed where the GPU supports bf16, else fp32; bf16: bf16 weights and AdamW "
                   "state; bf16-master: bf16 weights, fp32 master weights and AdamW state (default auto)")
    p.add_argument("--attn", choices=("auto", "flash_attention_2", "sdpa", "eager"), default="auto",
                   help="auto: flash_attention_2 when flash-attn is installed on a GPU, else sdpa (default auto)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="keep activations (faster, more memory)")
    p.add_argument("--selective-checkpointing", action="store_true",
                   help="activation checkpointing keeps matmul and attention outputs and recomputes only "
                   "element-wise ops (less recompute, more memory than full checkpointing)")
    p.add_argument("--liger", action="store_true",
                   help="Liger fused kernels (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE) when "
                   "liger-kernel is installed and a GPU is present; otherwise skipped with a log line")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's repeated blocks")
    p.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and optimizer state over the ranks with FSDP2 (fully_shard per "
                   "decoder/vision block, bf16 compute with fp32 reduction under bf16-mixed); checkpoints are "
                   "sharded (torch.distributed.checkpoint). For full fine-tunes that do not fit one GPU with DDP")
    p.add_argument("--vision-attn", choices=("default", "windows"), default="default",
                   help="windows: Qwen2.5-VL's vision window attention in one call per layer "
                   "(flash-attn varlen when installed, else one masked SDPA call) instead of one per window")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"pixels per image at most, which caps image tokens (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--max-length", type=positive_int, default=2048, help="tokens per sample at most (default 2048)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="samples per device per micro-step (default 4)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5; LoRA: try 2e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="warm-up share of the steps (default 0.03)")
    p.add_argument("--scheduler", default="cosine", help="transformers scheduler name (default cosine)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default 1.0)")
    p.add_argument("--max-steps", type=positive_int, help="optimizer steps (default: --epochs x steps per epoch)")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs when --max-steps is not given (default 1)")
    p.add_argument("--epoch-samples", type=positive_int,
                   help="mixed samples per epoch (default: until the smallest weighted part is seen once, from _stats.json)")
    p.add_argument("--shuffle-buffer", type=positive_int, default=1000, help="sample shuffle buffer per worker (default 1000)")
    p.add_argument("--num-workers", type=_workers, default=None, metavar="N|auto",
                   help="DataLoader workers per device, which decode, tokenise and batch (default auto: "
                   "the CPUs per GPU minus one, at most 8)")
    p.add_argument("--packing", action="store_true",
                   help="pack whole samples into rows of up to --max-length tokens (no padding; per-sample "
                   "positions); models that cannot train on packed rows fall back to padded batches")
    p.add_argument("--resample", choices=("auto", "on", "off"), default="auto",
                   help="draw shards with replacement; auto: on with several ranks (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights init, data order and dropout (default 0)")
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between log lines (default 10)")
    p.add_argument("--save-every", type=positive_int, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=2, help="checkpoints kept (default 2)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from OUTPUT's latest checkpoint (or the one given); starts fresh if there is none")
    p.set_defaults(func=run)


def config_from_args(args):
    from pipeline.train.config import TrainConfig

    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{name: getattr(args, name) for name in fields if hasattr(args, name)})


def run(args) -> int:
    try:
        from pipeline.train.trainer import TrainError, Trainer
    except ImportError as exc:
        log.error("`mg-geo train` needs the train extra (pip install 'mg-geo[train]'): %s", exc)
        return 2
    cfg = config_from_args(args)
    if cfg.stage == 2 and not cfg.init_from:
        log.warning("stage 2 without --init-from starts from %s, not from a stage 1 model", cfg.model)
    try:
        summary = Trainer(cfg).run()
    except (TrainError, OSError) as exc:  # bad layout, checkpoint mismatch, model not found
        log.error("%s", exc)
        return 1
    log.info("done: %s", summary)
    return 0
