"""The training loop: model setup, optimisation steps, logs, checkpoints, the final export.

accelerate gives one code path for one CPU/GPU and for several GPUs (`accelerate launch` or
`torchrun` set the ranks; DDP wraps the model). --fsdp is a separate path (pipeline/train/fsdp.py):
accelerate only starts the process group, the model is sharded with FSDP2's fully_shard and
checkpoints are sharded through torch.distributed.checkpoint. Checkpoints are written by us, not by
accelerate's save_state or the transformers Trainer: weights are saved as the unwrapped model's
own state_dict and loaded back strictly, then compared tensor by tensor with the file - a VLM
whose checkpoint key layout differs from its module names (LLaVA, Qwen2-VL after the
transformers 5 renames) can otherwise lose weights silently.

OUTPUT/
  train_config.json              the resolved TrainConfig of the last start
  metrics.jsonl                  one line per logged step (loss, lr, tokens/s, samples/s, epoch, ...)
  tensorboard/                   the same scalars for TensorBoard
  checkpoints/step-NNNNNNN/      model.safetensors (LoRA: adapter tensors only), optimizer.pt,
                                 scheduler.pt, rng-RANK.pt, data-RANK.json, trainer_state.json (last)
                                 --fsdp: sharded/ (torch.distributed.checkpoint: model + optimizer,
                                 each rank's shards) instead of model.safetensors and optimizer.pt
  model/                         final weights (LoRA merged) + processor: from_pretrained-loadable,
                                 the --init-from of the next stage
  adapter/                       LoRA runs: the adapter alone (peft format)
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import random
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.train.collate import ChatEncoder
from pipeline.train.config import TrainConfig
from pipeline.train.data import (MixedShardStream, count_samples, default_epoch_samples, default_workers,
                                 find_shards, make_loader)
from pipeline.train.speed import apply_liger, compile_blocks, enable_checkpointing, make_optimizer
from pipeline.train.step import label_tokens, model_inputs, packing_mode, token_weighted_backward

log = logging.getLogger("pipeline.train")

# Language-model linear layers of Qwen2(-VL)/LLaVA-style models (module names under transformers 5).
LANGUAGE_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_MODULE_MARKERS = (".vision_tower.", ".visual.", ".vision_model.")


class TrainError(RuntimeError):
    """A run that cannot go on (bad data layout, checkpoint mismatch, ...)."""


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def resolve_attention(requested: str, precision: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and precision != "fp32" and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def load_processor(cfg: TrainConfig):
    from transformers import AutoProcessor

    source = cfg.init_from if cfg.init_from and _has_processor(cfg.init_from) else cfg.model
    processor = AutoProcessor.from_pretrained(source)
    image_processor = getattr(processor, "image_processor", None)
    # Dynamic-resolution processors (Qwen2-VL family) read their pixel cap from size/max_pixels;
    # the encoder also downscales every image to max_pixels, which caps the others.
    if image_processor is not None and isinstance(getattr(image_processor, "size", None), dict) \
            and "longest_edge" in image_processor.size and "shortest_edge" in image_processor.size:
        image_processor.size = {**image_processor.size, "longest_edge": cfg.max_pixels}
        if hasattr(image_processor, "max_pixels"):
            image_processor.max_pixels = cfg.max_pixels
    if cfg.chat_template:
        processor.chat_template = Path(cfg.chat_template).read_text(encoding="utf-8")
    return processor


def _has_processor(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / name).exists() for name in
                              ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"))


def load_model(source: str, dtype: torch.dtype, attention: str):
    """from_pretrained that refuses to start with weights it did not load."""
    from transformers import AutoModelForImageTextToText

    choices = [attention] + [a for a in ("sdpa", "eager") if a != attention]
    for i, choice in enumerate(choices):
        try:
            model, info = AutoModelForImageTextToText.from_pretrained(
                source, dtype=dtype, attn_implementation=choice, output_loading_info=True)
            break
        except (ValueError, ImportError) as exc:  # this model or install lacks that attention kernel
            if i == len(choices) - 1:
                raise
            log.warning("attention %s not available for %s (%s); trying %s", choice, source, exc, choices[i + 1])
    bad = {k: info.get(k) for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise TrainError(f"{source}: weights not loaded: {bad} - the checkpoint's key layout does not "
                         "match this transformers version's model")
    if info.get("unexpected_keys"):
        log.warning("%s: unused checkpoint tensors: %s", source, sorted(info["unexpected_keys"])[:10])
    return model


def trainable_state(model, lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: the whole state_dict, or only the adapter for LoRA."""
    state = model.state_dict()
    if not lora:
        return state
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}


def save_weights(model, path: Path, lora: bool) -> None:
    from safetensors.torch import save_file

    state = trainable_state(model, lora)
    # save_file refuses tensors that share memory (tied embeddings): keep the first name of each.
    seen, unique = set(), {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if tensor.device.type != "meta" and key in seen:
            continue
        seen.add(key)
        unique[name] = tensor.detach().contiguous().cpu()
    save_file(unique, str(path))


def load_weights(model, path: Path, lora: bool) -> None:
    """Strict load, then proof: every tensor in the file equals the model's after loading."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    expected = trainable_state(model, lora)
    unknown = sorted(set(saved) - set(expected))
    absent = sorted(k for k in expected if k not in saved and not _shares_memory_with_saved(k, expected, saved))
    if unknown or absent:
        raise TrainError(f"{path}: checkpoint does not fit the model: unknown {unknown[:5]}, missing {absent[:5]}")
    with torch.no_grad():
        for name, tensor in saved.items():
            expected[name].copy_(tensor.to(expected[name].device, expected[name].dtype))
    current = trainable_state(model, lora)
    for name, tensor in saved.items():
        if not torch.equal(current[name].detach().cpu().to(tensor.dtype), tensor):
            raise TrainError(f"{path}: {name} differs from the checkpoint after loading")


def _shares_memory_with_saved(name: str, state: dict, saved: dict) -> bool:
    tensor = state[name]
    return any(state[k].data_ptr() == tensor.data_ptr() for k in saved if k in state)


def freeze_vision(model) -> int:
    """Freeze the vision encoder (not its projector/merger); returns the number of frozen tensors."""
    frozen = 0
    for name, param in model.named_parameters():
        dotted = f".{name}."
        if any(m in dotted for m in VISION_MODULE_MARKERS) and ".merger." not in dotted:
            param.requires_grad_(False)
            frozen += 1
    return frozen


class Trainer:
    """One `mg-geo train` run. model_factory(dtype, attention) replaces loading cfg.model's weights
    (the benchmark trains a randomly initialised model built from a config); write_outputs=False
    skips checkpoints and the final export (a benchmark's 3B model would write tens of GB)."""

    def __init__(self, cfg: TrainConfig, model_factory=None, write_outputs: bool = True):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = cfg
        self.out = Path(cfg.output)
        self.precision = resolve_precision(cfg.precision)
        # Some VLMs hold parameters no loss reaches (a SigLIP tower's pooling head and last norm
        # when LLaVA reads an inner layer): DDP must be told, or it waits for their gradients.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        # bf16-master holds bf16 weights and computes in them: no autocast (and none of its casts).
        if cfg.fsdp and cfg.lora:
            raise TrainError("--fsdp trains all weights; it does not combine with --lora")
        if cfg.fsdp and self.precision == "bf16-master":
            raise TrainError("--fsdp keeps fp32 sharded master weights with bf16 compute under "
                             "--precision bf16-mixed; --precision bf16-master does not apply")
        # --fsdp: the model is never handed to accelerate (it only starts the process group), so
        # its mixed_precision has no effect there: FSDP2's policy does the casts (fsdp.py).
        self.accelerator = Accelerator(mixed_precision="bf16" if self.precision in ("bf16", "bf16-mixed") else "no",
                                       step_scheduler_with_optimizer=False, kwargs_handlers=[ddp])
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        if cfg.num_workers is None:  # auto: sized to the CPUs of this machine's ranks
            cfg.num_workers = default_workers(self.accelerator.num_processes // max(1, getattr(
                self.accelerator.state, "num_machines", 1) or 1))
        self.workers = max(1, cfg.num_workers)
        self.weights = cfg.part_weights()
        self.model_factory, self.write_outputs = model_factory, write_outputs

    # -- setup -----------------------------------------------------------------------------
    def _plan(self) -> None:
        cfg = self.cfg
        self.shards = {p: find_shards(cfg.data, p, cfg.split) for p in self.weights}
        empty = [p for p, s in self.shards.items() if not s]
        if empty:
            raise TrainError(f"no shards for part(s) {', '.join(empty)} under "
                             f"{cfg.data}/{{part}}/{cfg.split}/ (build them with --parts)")
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.world
        if cfg.epoch_samples:
            self.epoch_samples = cfg.epoch_samples
        else:
            counts = {p: count_samples(s) for p, s in self.shards.items()}
            self.epoch_samples = default_epoch_samples(counts, self.weights)
            log.info("samples per part: %s -> epoch of %d mixed samples", counts, self.epoch_samples)
        self.max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.epoch_samples / self.global_batch))

    def _build_model(self):
        cfg = self.cfg
        attention = self.attention = resolve_attention(cfg.attn, self.precision)
        # Full fine-tuning keeps fp32 master weights under bf16 autocast; a frozen LoRA base and
        # pure-bf16 runs hold the weights in bf16.
        dtype = torch.float32
        if self.precision in ("bf16", "bf16-master") or (cfg.lora and self.precision != "fp32"):
            dtype = torch.bfloat16
        source = cfg.init_from or cfg.model
        model = self.model_factory(dtype, attention) if self.model_factory else load_model(source, dtype, attention)
        self.attention = getattr(model.config, "_attn_implementation", None) or attention  # after any fallback
        log.info("model %s (%s, %s attention, %s)", source, type(model).__name__, attention, self.precision)
        model.config.use_cache = False
        if cfg.freeze_vision:
            log.info("froze %d vision-encoder tensors", freeze_vision(model))
        if cfg.liger:
            apply_liger(model)
        if cfg.vision_attn != "default":
            from pipeline.train.attention import use_window_attention

            use_window_attention(model)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model, selective=cfg.selective_checkpointing)
        elif cfg.selective_checkpointing:
            log.warning("--selective-checkpointing has no effect with --no-gradient-checkpointing")
        if cfg.lora:
            from peft import LoraConfig, get_peft_model

            targets = {"language": LANGUAGE_LORA_TARGETS}.get(cfg.lora_targets, cfg.lora_targets)
            if targets != "all-linear" and "," in targets:
                targets = [t.strip() for t in targets.split(",") if t.strip()]
            model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                     lora_dropout=cfg.lora_dropout, target_modules=targets))
            if cfg.gradient_checkpointing:
                model.enable_input_require_grads()
        if cfg.compile:
            log.info("torch.compile: %d blocks compiled (the first steps include compile time)", compile_blocks(model))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        log.info("trainable parameters: %d of %d (%.2f%%)", n_train, n_all, 100 * n_train / max(1, n_all))
        return model

    def _build_optimizer(self, model):
        from transformers import get_scheduler

        decay, no_decay = [], []
        for _, param in model.named_parameters():
            if param.requires_grad:
                (decay if param.dim() >= 2 else no_decay).append(param)  # no decay on norms and biases
        optimizer = make_optimizer([{"params": decay, "weight_decay": self.cfg.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}], lr=self.cfg.lr,
                                   master_weights=self.precision == "bf16-master")
        scheduler = get_scheduler(self.cfg.scheduler, optimizer,
                                  num_warmup_steps=math.ceil(self.cfg.warmup_ratio * self.max_steps),
                                  num_training_steps=self.max_steps)
        return optimizer, scheduler

    # -- checkpoints -------------------------------------------------------------------------
    def _checkpoint_dirs(self) -> list[Path]:
        root = self.out / "checkpoints"
        if not root.is_dir():
            return []
        return sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").exists())

    def _save_checkpoint(self) -> Path:
        acc = self.accelerator
        final = self.out / "checkpoints" / f"step-{self.step:07d}"
        tmp = final.with_name(final.name + ".partial")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / f"rng-{self.rank}.pt")
        (tmp / f"data-{self.rank}.json").write_text(json.dumps(
            {"format": 2, "states": self.states, "batches": self.batches, "workers": self.workers,
             "world": self.world, "packing": bool(self.pack_mode), "batch_size": self.cfg.batch_size,
             "max_length": self.cfg.max_length}))
        acc.wait_for_everyone()
        if self.cfg.fsdp:  # every rank writes its shards of weights and optimizer state
            from pipeline.train.fsdp import save_sharded

            save_sharded(self.model, self.optimizer, tmp)
            acc.wait_for_everyone()
        if self.is_main:
            if not self.cfg.fsdp:
                save_weights(acc.unwrap_model(self.model), tmp / "model.safetensors", self.cfg.lora)
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            # Written last: a checkpoint without it is incomplete and ignored.
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"step": self.step, "max_steps": self.max_steps, "epoch_samples": self.epoch_samples,
                 "global_batch": self.global_batch, "world": self.world, "fsdp": self.cfg.fsdp}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self._checkpoint_dirs()[: -max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        if self.is_main:
            log.info("checkpoint %s", final)
        return final

    def _load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        state = json.loads((path / "trainer_state.json").read_text())
        if bool(state.get("fsdp")) != self.cfg.fsdp:
            raise TrainError(f"{path} was written {'with' if state.get('fsdp') else 'without'} --fsdp; "
                             f"resume it {'with' if state.get('fsdp') else 'without'} --fsdp")
        if self.cfg.fsdp:
            from pipeline.train.fsdp import load_sharded

            load_sharded(self.model, self.optimizer, path)
        else:
            load_weights(acc.unwrap_model(self.model), path / "model.safetensors", self.cfg.lora)
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
        self.step = int(state["step"])
        rng_file, data_file = path / f"rng-{self.rank}.pt", path / f"data-{self.rank}.json"
        if rng_file.exists():
            rng = torch.load(rng_file, map_location="cpu", weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        data = json.loads(data_file.read_text()) if data_file.exists() else None
        layout = {"workers": self.workers, "world": self.world, "packing": bool(self.pack_mode),
                  "batch_size": self.cfg.batch_size, "max_length": self.cfg.max_length}
        if data and data.get("format") == 2 and all(data.get(k) == v for k, v in layout.items()):
            self.states = {int(k): v for k, v in data["states"].items()}
            self.batches = int(data["batches"])
        else:
            # Another rank/worker/batch layout (or a checkpoint from before stream states) cannot
            # continue the same streams: start new ones with a seed of their own rather than
            # replay the samples already trained on.
            log.warning("resuming with a different number of ranks, workers, batch size or packing: "
                        "the data order starts anew")
            self.data_seed = self.cfg.seed + 1_000_003 * self.step
        log.info("resumed from %s at step %d", path, self.step)

    def _resume_path(self) -> Optional[Path]:
        existing = self._checkpoint_dirs()
        if self.cfg.resume is None:
            if existing:
                raise TrainError(f"{self.out} already has checkpoints; pass --resume to continue "
                                 "or choose another --output")
            return None
        if self.cfg.resume == "latest":
            return existing[-1] if existing else None
        path = Path(self.cfg.resume)
        if not (path / "trainer_state.json").exists():
            raise TrainError(f"{path} is not a complete checkpoint (no trainer_state.json)")
        return path

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        from accelerate.utils import set_seed

        cfg, acc = self.cfg, self.accelerator
        self._plan()
        set_seed(cfg.seed)
        processor = load_processor(cfg)
        self.processor = processor
        encoder = ChatEncoder(processor, max_length=cfg.max_length, max_pixels=cfg.max_pixels)
        model = self._build_model()
        self.pack_mode = None
        if cfg.packing:
            self.pack_mode, why = packing_mode(model, self.attention)
            if self.pack_mode:
                log.info("packing samples into rows of up to %d tokens (%s positions%s)", cfg.max_length,
                         self.pack_mode, ", one flattened row per micro-batch" if self._flatten() else "")
            else:
                log.warning("--packing off: %s; training on padded batches", why)
        self.own_group = False
        if cfg.fsdp:  # shard first, then the optimizer over the sharded parameters; no acc.prepare
            from pipeline.train import fsdp

            self.own_group = fsdp.start_process_group(acc.device, self.world)
            fsdp.shard_model(model, acc.device, self.world, self.precision)
            self.model = model
            self.optimizer, self.scheduler = self._build_optimizer(model)
        else:
            optimizer, scheduler = self._build_optimizer(model)
            self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        try:
            return self._run(encoder)
        finally:
            if self.own_group:
                torch.distributed.destroy_process_group()

    def _run(self, encoder) -> dict:
        cfg, acc = self.cfg, self.accelerator
        self.step, self.states, self.batches, self.data_seed = 0, {}, 0, cfg.seed
        resume = self._resume_path()
        if resume:
            self._load_checkpoint(resume)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(cfg.to_json())

        stream = MixedShardStream(self.shards, self.weights, encoder, seed=self.data_seed, rank=self.rank,
                                  world=self.world, shuffle_buffer=cfg.shuffle_buffer, resample=cfg.resample,
                                  start_states=self.states, worker_offset=self.batches % self.workers,
                                  batch_size=cfg.batch_size, pack_tokens=cfg.max_length if self.pack_mode else 0,
                                  flatten=self._flatten(), pad_token_id=encoder.pad_token_id)
        loader = make_loader(stream, cfg.num_workers, pin_memory=acc.device.type == "cuda")
        writer, metrics = None, None
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tensorboard"))
            metrics = open(self.out / "metrics.jsonl", "a", encoding="utf-8")
        log.info("training steps %d -> %d: %d %s per step (%d per device x %d accumulation x %d ranks), "
                 "epoch = %d samples, %d data workers per rank", self.step, self.max_steps, self.global_batch,
                 "packed rows" if self.pack_mode else "samples", cfg.batch_size, cfg.grad_accum, self.world,
                 self.epoch_samples, cfg.num_workers)

        params = [p for p in self.model.parameters() if p.requires_grad]
        batches = iter(loader)
        window = _new_window()
        dropped: dict = {}
        last_loss = None
        if cfg.fsdp:
            from pipeline.train.fsdp import clip_grad_norm, no_gradient_sync

            unwrapped, backward, clip = self.model, None, clip_grad_norm
            no_sync = no_gradient_sync if self.world > 1 else None
        else:
            unwrapped, backward, clip = acc.unwrap_model(self.model), acc.backward, acc.clip_grad_norm_
            no_sync = acc.no_sync if self.world > 1 else None
        self.model.train()
        try:
            while self.step < self.max_steps:
                waiting = time.perf_counter()
                micro = [next(batches) for _ in range(cfg.grad_accum)]
                window["wait"] += time.perf_counter() - waiting
                inputs, tokens = [], 0
                for batch in micro:
                    meta = batch.pop("_meta")
                    self.states[meta["worker"]] = meta["state"]
                    self.batches += 1
                    dropped = meta["dropped"]
                    window["tokens"] += meta["tokens"]
                    window["samples"] += len(meta["parts"])
                    window["parts"].update(meta["parts"])
                    tokens += label_tokens(batch["labels"])
                    batch = {k: v.to(acc.device, non_blocking=True) if torch.is_tensor(v) else v
                             for k, v in batch.items()}
                    inputs.append(model_inputs(batch, unwrapped, self.pack_mode))
                total = tokens
                if self.world > 1:  # the step's label tokens on all ranks
                    total = int(acc.reduce(torch.tensor(tokens, device=acc.device), reduction="sum"))
                window["label_tokens"] += tokens
                step_loss = token_weighted_backward(self.model, inputs, total, world=self.world,
                                                    backward=backward, no_sync=no_sync)
                if cfg.max_grad_norm:
                    clip(params, cfg.max_grad_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                window["loss"] = window["loss"] + step_loss
                window["steps"] += 1
                last_loss = step_loss
                if self.step % cfg.log_every == 0 or self.step == self.max_steps:
                    self._log(window, lr, dropped, writer, metrics)
                    window = _new_window()
                if self.write_outputs and (self.step % cfg.save_every == 0 or self.step == self.max_steps):
                    saving = time.perf_counter()
                    self._save_checkpoint()
                    window["start"] += time.perf_counter() - saving  # rates count training time only
        finally:
            if writer:
                writer.close()
            if metrics:
                metrics.close()
        if self.write_outputs:
            self._export()
        if last_loss is not None and self.world > 1:
            last_loss = acc.reduce(last_loss, reduction="sum")
        return {"step": self.step, "max_steps": self.max_steps, "output": str(self.out),
                "last_loss": float(last_loss) if last_loss is not None else None}

    def _flatten(self) -> bool:
        """Packed micro-batches as one row when flash-attention runs them varlen."""
        return bool(self.pack_mode) and "flash" in self.attention

    def _log(self, window: dict, lr: float, dropped: dict, writer, metrics) -> None:
        acc = self.accelerator
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        # loss: each rank holds its share of every step's mean token loss; the shares add up.
        totals = torch.stack([torch.as_tensor(window["loss"], dtype=torch.float64, device=acc.device) / window["steps"],
                              torch.tensor(float(window["tokens"]), dtype=torch.float64, device=acc.device),
                              torch.tensor(float(window["samples"]), dtype=torch.float64, device=acc.device),
                              torch.tensor(float(window["label_tokens"]), dtype=torch.float64, device=acc.device),
                              torch.tensor(window["wait"], dtype=torch.float64, device=acc.device)])
        totals = acc.reduce(totals, reduction="sum")
        row = {"step": self.step, "loss": float(totals[0]), "lr": lr, "seconds": elapsed, "tokens": int(totals[1]),
               "tokens_per_s": float(totals[1]) / elapsed, "samples_per_s": float(totals[2]) / elapsed,
               "label_tokens": int(totals[3]),
               "data_wait": min(1.0, float(totals[4]) / self.world / elapsed),
               "epoch": self.step * self.global_batch / self.epoch_samples,
               "parts": dict(window["parts"]), "dropped": dropped}
        if torch.cuda.is_available():
            row["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if self.is_main:
            log.info("step %d/%d loss %.4f lr %.3g tokens/s %.0f samples/s %.2f epoch %.2f data wait %.0f%% of step time",
                     self.step, self.max_steps, row["loss"], lr, row["tokens_per_s"], row["samples_per_s"],
                     row["epoch"], 100 * row["data_wait"])
            for key in ("loss", "lr", "tokens_per_s", "samples_per_s", "epoch", "data_wait"):
                writer.add_scalar(f"train/{key}", row[key], self.step)
            writer.flush()
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    def _export(self) -> None:
        """OUTPUT/model: the final weights as a from_pretrained directory with the processor."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.cfg.fsdp:
            self._export_fsdp()
            return
        if not self.is_main:
            return
        model = acc.unwrap_model(self.model)
        if self.cfg.lora:
            model.save_pretrained(self.out / "adapter")
            model = model.merge_and_unload()
        if self.precision != "fp32":
            model = model.to(torch.bfloat16)
        model.config.use_cache = True
        target = self.out / "model"
        model.save_pretrained(target)
        self.processor.save_pretrained(target)
        log.info("model written to %s", target)


    def _export_fsdp(self) -> None:
        """--fsdp: gather the full weights to rank 0's CPU (a collective), which saves them."""
        from pipeline.train.fsdp import full_state_dict

        state = full_state_dict(self.model)
        if self.is_main:
            if self.precision != "fp32":
                state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
            self.model.config.use_cache = True
            target = self.out / "model"
            # save_pretrained names the architecture without FSDP2's class prefix.
            self.model.save_pretrained(target, state_dict=state)
            self.processor.save_pretrained(target)
            log.info("model written to %s (gathered from FSDP shards)", target)
        self.accelerator.wait_for_everyone()


def _new_window() -> dict:
    """Sums over the steps between two log lines (parts: samples per part on this rank; wait:
    seconds the loop waited for the DataLoader)."""
    return {"loss": 0.0, "steps": 0, "tokens": 0, "samples": 0, "label_tokens": 0, "wait": 0.0,
            "parts": Counter(), "start": time.perf_counter()}
