"""Qwen2.5-VL's vision window attention in one kernel launch per layer (`--vision-attn windows`).

With SDPA or eager, transformers runs the vision tower's attention once per window (an image of
1024 patches has 16 windows of 64: 16 small launches per layer, 32 layers) and once per image in
the full-attention layers. Attention implementations whose name contains "flash" are instead
handed the whole sequence with cu_seq_lens (the varlen convention). This module registers such a
function through transformers' public AttentionInterface and sets it on the vision config only:

- flash-attn installed, CUDA, half precision: flash_attn_varlen_func;
- else torch's own varlen attention (torch.nn.attention.varlen) on CUDA, half precision;
- else (any device, any dtype): the windows gathered into one padded batch and one SDPA call
  with a key-padding mask - numerically the per-window result (tested on CPU against it).

With flash-attn installed on a GPU, use_window_attention simply gives the vision tower
transformers' own flash_attention_2 (see its docstring for why the custom function may be
refused by transformers' loader).
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch

log = logging.getLogger("pipeline.train")

WINDOW_ATTENTION = "mg_geo_flash_windows"  # "flash" in the name: transformers passes cu_seq_lens


def _padded_sdpa(query, key, value, cu_seqlens, max_len: Optional[int], scaling):
    """query/key/value (heads, tokens, dim); windows [cu[i], cu[i+1]) -> (tokens, heads, dim)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    longest = int(max_len) if max_len is not None else int(lengths.max())
    steps = torch.arange(longest, device=query.device)
    valid = steps[None, :] < lengths[:, None]                                   # (windows, longest)
    index = torch.where(valid, cu_seqlens[:-1, None] + steps[None, :], 0)
    q, k, v = (t[:, index].transpose(0, 1) for t in (query, key, value))      # (windows, heads, longest, dim)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scaling)
    return out.transpose(1, 2)[valid]                                          # (tokens, heads, dim), in order


def window_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """AttentionInterface function: (batch=1, heads, tokens, dim) in, ((1, tokens, heads, dim), None)
    out, every window [cu[i], cu[i+1]) attending only to itself, in one call."""
    if cu_seq_lens_q is None:  # not the vision tower's varlen call: plain full attention
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    q, k, v = query[0], key[0], value[0]  # (heads, tokens, dim)
    cu = cu_seq_lens_q.to(torch.int32)
    half = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    longest = int(max_length_q) if max_length_q is not None else None
    if half and importlib.util.find_spec("flash_attn"):
        from flash_attn import flash_attn_varlen_func

        longest = longest or int((cu[1:] - cu[:-1]).max())
        out = flash_attn_varlen_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu, cu,
                                     longest, longest, softmax_scale=scaling, causal=False)
    elif half and importlib.util.find_spec("torch.nn.attention.varlen"):
        from torch.nn.attention.varlen import varlen_attn

        longest = longest or int((cu[1:] - cu[:-1]).max())
        out = varlen_attn(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu, cu, longest, longest,
                          scale=scaling)
    else:
        out = _padded_sdpa(q, k, v, cu_seq_lens_q.long(), longest, scaling)
    return out.unsqueeze(0), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(WINDOW_ATTENTION, window_attention)
    return WINDOW_ATTENTION


def use_window_attention(model) -> bool:
    """One attention launch per vision layer for the Qwen2.5-VL family, through public APIs only:
    with flash-attn on a GPU the vision tower alone switches to flash_attention_2 (varlen), the
    language model keeps its attention; else window_attention is registered and set on the vision
    config. transformers 5 loads every implementation whose name contains "flash" as a flash-attn
    build or Hub kernel, so the last step can be refused: then the tower keeps its per-window
    calls and the log says so. False when nothing changed."""
    vision = getattr(model.config, "vision_config", None)
    if vision is None or getattr(vision, "window_size", None) is None:
        log.warning("--vision-attn windows: %s has no vision window attention; using its default",
                    type(model).__name__)
        return False
    current = getattr(vision, "_attn_implementation", None) or ""
    if "flash" in current:
        log.info("--vision-attn windows: the vision tower already runs %s varlen", current)
        return False
    choice = "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") \
        else register()
    try:
        model.set_attn_implementation({"vision_config": choice})
    except (ValueError, ImportError) as exc:
        log.warning("--vision-attn windows: transformers refused %s for the vision tower (%s); it keeps "
                    "one attention call per window", choice, str(exc).splitlines()[0][:160])
        return False
    log.info("vision attention: one %s call per layer", choice)
    return True
