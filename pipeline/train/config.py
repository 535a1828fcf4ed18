"""TrainConfig: what one `mg-geo train` run does, resolved from flags and the stage preset.

Stage presets follow GaGA: stage 1 learns from the Meta part alone; stage 2 learns from Clue and
Dialogue and keeps a replay fraction of Meta so the stage-1 skill is not forgotten.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from pipeline.core.record import PARTS  # plain Python: no Beam import in training

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
# Qwen2.5-VL turns each 28x28 pixel block into one image token: 1024 tokens at most by default.
DEFAULT_MAX_PIXELS = 1024 * 28 * 28


@dataclass
class TrainConfig:
    data: str                                  # corpus root: DATA/{part}/{split}/*.tar
    output: str                                # run directory (checkpoints, model, logs)
    stage: int = 1
    mix: dict = field(default_factory=dict)    # part -> weight; empty = the stage preset
    replay: float = 0.1                        # stage 2: fraction of Meta samples in the mix
    split: str = "train"
    model: str = DEFAULT_MODEL                 # hub id or path: processor (and weights unless init_from)
    init_from: Optional[str] = None            # weights to start from (stage 1 output for stage 2)
    chat_template: Optional[str] = None        # path of a jinja file replacing the processor's template
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    freeze_vision: bool = False
    precision: str = "auto"                    # auto | bf16-mixed | bf16 | bf16-master | fp32
    attn: str = "auto"                         # auto | flash_attention_2 | sdpa | eager
    gradient_checkpointing: bool = True
    selective_checkpointing: bool = False      # keep matmul/attention outputs, recompute the rest
    liger: bool = False                        # Liger kernels when installed (GPU)
    compile: bool = False                      # torch.compile the repeated blocks
    fsdp: bool = False                         # FSDP2 fully_shard + sharded (DCP) checkpoints
    vision_attn: str = "default"               # default | windows (one attention call per vision layer)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_length: int = 2048
    batch_size: int = 4                        # per device
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    max_steps: Optional[int] = None            # optimizer steps; default = epochs * steps per epoch
    epochs: float = 1.0
    epoch_samples: Optional[int] = None        # samples (all ranks) per epoch; default from _stats.json
    shuffle_buffer: int = 1000
    num_workers: Optional[int] = None          # DataLoader workers per rank; None = sized to the CPUs
    packing: bool = False                      # pack whole samples into rows of max_length tokens
    resample: str = "auto"                     # auto (on with several ranks) | on | off
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: Optional[str] = None               # None | "latest" | a checkpoint directory

    def part_weights(self) -> dict[str, float]:
        """Normalised mixing weights of the parts this run reads (weight > 0)."""
        if self.mix:
            weights = dict(self.mix)
        elif self.stage == 1:
            weights = {"meta": 1.0}
        else:
            # Clue and Dialogue share what the Meta replay leaves.
            rest = (1.0 - self.replay) / 2
            weights = {"clue": rest, "dialogue": rest, "meta": self.replay}
        unknown = sorted(set(weights) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown part(s) in the mix: {', '.join(unknown)} (parts: {', '.join(PARTS)})")
        if any(w < 0 for w in weights.values()):
            raise ValueError("mix weights must not be negative")
        total = sum(weights.values())
        if total <= 0:
            raise ValueError("the mix needs at least one part with a positive weight")
        return {p: weights[p] / total for p in PARTS if weights.get(p, 0) > 0}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)


def parse_mix(text: str) -> dict[str, float]:
    """'clue=0.45,dialogue=0.45,meta=0.1' -> {'clue': 0.45, ...}."""
    out = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--mix takes part=weight pairs like meta=1 or clue=0.45,dialogue=0.45,meta=0.1; "
                             f"got {text!r}") from None
    return out
