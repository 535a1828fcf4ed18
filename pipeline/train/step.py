"""One optimizer step's forward/backward: the loss weighted by label tokens, and packed inputs.

Token weighting: the models' loss is the mean over the label tokens of one forward. Averaging
those means over micro-batches (and ranks) gives a short Meta answer the weight of a long
Dialogue turn. Here every micro-batch contributes (its mean x its label tokens) / (label tokens
of the whole step on all ranks): the gradient of the step is that of the sum of all token losses
over the number of tokens, whatever the split into micro-batches and ranks. DDP and FSDP average
gradients over ranks, so each rank's loss is also multiplied by the number of ranks.

Packing (collate.pack_collate) feeds rows of several samples with position ids restarting per
sample and no attention mask. That is transformers' own packed-sequence convention, which its
mask builders (SDPA, eager, flex) and flash-attention varlen understand for models with 1D
positions. The Qwen2-VL family takes 3D rope positions: they are made here per sample with the
model's public get_rope_index and stacked under the text positions, the 4-row layout its forward
documents for packed inputs. Other models, whose inputs packing would change (bidirectional image
attention, prefix masks, ...), get padded batches and a log line.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional

import torch

from pipeline.train.collate import IGNORE_INDEX

log = logging.getLogger("pipeline.train")

# model_type -> how packed position ids are made: "1d" (restart per sample) or "mrope" (Qwen2-VL family).
PACKING_MODELS = {"llava": "1d", "qwen2_vl": "mrope", "qwen2_5_vl": "mrope"}
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def label_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss counts: labels are shifted by one inside the model, so the first never is."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def packing_mode(model, attention: str) -> tuple[Optional[str], str]:
    """("1d" | "mrope", "") when packed rows train exactly like padded ones, else (None, why)."""
    model_type = getattr(model.config, "model_type", "")
    if model_type not in PACKING_MODELS:
        return None, f"model type {model_type!r} is not known to train correctly on packed rows"
    if attention not in PACKING_ATTENTION:
        return None, f"attention {attention!r} does not read packed position ids"
    if PACKING_MODELS[model_type] == "mrope" and not hasattr(_inner(model), "get_rope_index"):
        return None, f"{type(model).__name__} has no get_rope_index for per-sample 3D positions"
    return PACKING_MODELS[model_type], ""


def _inner(model):
    """The base model holding get_rope_index (ForConditionalGeneration.model)."""
    return getattr(model, "model", model)


def mrope_positions(model, batch: dict, seq_lens: list[list[int]]) -> torch.Tensor:
    """(4, rows, length) position ids for a packed Qwen2-VL-family batch: row 0 the text positions
    (restarting per sample; they make the packed attention mask), rows 1-3 get_rope_index's 3D
    positions computed for each sample on its own."""
    inner = _inner(model)
    input_ids, mm = batch["input_ids"], batch.get("mm_token_type_ids")
    grids = batch.get("image_grid_thw")
    merge = model.config.vision_config.spatial_merge_size
    image_token = model.config.image_token_id
    per_image = [int(g.prod()) // (merge * merge) for g in grids] if grids is not None else []
    next_image = 0
    rows = []
    for r, lengths in enumerate(seq_lens):
        parts, start = [], 0
        for n in lengths:
            ids = input_ids[r:r + 1, start:start + n]
            text = torch.arange(n, device=ids.device).view(1, 1, n)
            image_tokens = int((ids == image_token).sum())
            first = next_image
            while image_tokens > 0 and next_image < len(per_image):
                image_tokens -= per_image[next_image]
                next_image += 1
            if next_image > first:
                seg_mm = mm[r:r + 1, start:start + n] if mm is not None else (ids == image_token).int()
                spatial, _ = inner.get_rope_index(ids, mm_token_type_ids=seg_mm,
                                                  image_grid_thw=grids[first:next_image], attention_mask=None)
            else:
                spatial = text.expand(3, 1, n)
            parts.append(torch.cat([text, spatial.to(text.dtype)], dim=0))
            start += n
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=1)


def model_inputs(batch: dict, model=None, mode: Optional[str] = None) -> dict:
    """The batch without bookkeeping keys, for model(**inputs); packed Qwen2-VL batches get their
    4-row positions."""
    seq_lens = batch.get("_seq_lens")
    inputs = {k: v for k, v in batch.items() if not k.startswith("_")}
    if seq_lens is not None:
        # A cache (the text config's use_cache defaults to True) turns off transformers'
        # packed-sequence masks, so packed rows must run without one.
        inputs["use_cache"] = False
    if mode == "mrope" and seq_lens is not None:
        inputs["position_ids"] = mrope_positions(model, inputs, seq_lens)
    return inputs


def token_weighted_backward(model, micro_batches: list[dict], total_tokens: int, *, world: int = 1,
                            backward: Callable = None, no_sync: Callable = None,
                            forward: Callable = None) -> torch.Tensor:
    """Forward and backward every micro-batch of one optimizer step, each loss scaled so that
    the step's gradient is that of sum(token losses) / total_tokens (all ranks' label tokens).
    Returns this rank's share of the step loss (sum over its tokens / total_tokens), detached:
    summed over ranks it is the step's mean token loss. no_sync(model) skips the gradient
    all-reduce of all but the last micro-batch (DDP)."""
    backward = backward or (lambda loss: loss.backward())
    forward = forward or (lambda batch: model(**batch).loss)
    share = None
    for i, batch in enumerate(micro_batches):
        tokens = label_tokens(batch["labels"])
        if tokens == 0:
            raise ValueError("a micro-batch has no label tokens; the encoder should have dropped its samples")
        last = i == len(micro_batches) - 1
        context = no_sync(model) if (no_sync and not last) else contextlib.nullcontext()
        with context:
            loss = forward(batch)  # mean over this micro-batch's label tokens
            part = loss * (tokens / total_tokens)
            backward(part * world)
        part = part.detach().float()
        share = part if share is None else share + part  # no .item(): no GPU sync per micro-batch
    return share
