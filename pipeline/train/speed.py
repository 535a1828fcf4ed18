"""Optional memory/speed paths of `mg-geo train`, each off unless asked for and each skipped with
one clear log line where this install or device cannot run it:

- Liger kernels (`pip install 'mg-geo[liger]'`, GPU): fused linear cross-entropy (the logits are
  never materialised), RMSNorm, SwiGLU, RoPE, through Liger's public apply_liger_kernel_to_<model
  type>(model=...) functions;
- selective activation checkpointing: torch's create_selective_checkpoint_contexts keeps the
  outputs of matmuls and attention and recomputes only the cheap element-wise ops;
- torch.compile of the repeated blocks (regional compilation: one compiled graph per block class,
  reused by every layer, so compile time does not grow with depth);
- bf16 weights with fp32 master weights and fp32 AdamW state (MasterWeightAdamW).
"""
from __future__ import annotations

import importlib.util
import inspect
import logging

import torch

log = logging.getLogger("pipeline.train")

LIGER_KERNELS = ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy")


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def apply_liger(model) -> bool:
    """Liger's kernels on this model instance; False (with a log line saying why) when
    liger-kernel is missing, there is no GPU, or Liger does not know the model type."""
    if not liger_available():
        log.warning("--liger: liger-kernel is not installed (pip install 'mg-geo[liger]'); "
                    "training without fused kernels")
        return False
    if not torch.cuda.is_available():
        log.warning("--liger: Liger's Triton kernels need a GPU; training without fused kernels")
        return False
    import liger_kernel.transformers as liger

    model_type = getattr(model.config, "model_type", "")
    apply = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if apply is None:
        log.warning("--liger: Liger has no kernels for model type %r; training without them", model_type)
        return False
    accepted = inspect.signature(apply).parameters
    options = {k: True for k in LIGER_KERNELS if k in accepted}
    apply(model=model, **options)
    log.info("Liger kernels applied to %s: %s", model_type, ", ".join(sorted(options)))
    return True


# Ops whose outputs selective checkpointing keeps (the costly ones to recompute).
_SAVED_OPS = ("mm", "addmm", "bmm", "baddbmm", "linear", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward")


def _saved_ops() -> list:
    ops = []
    for name in _SAVED_OPS:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None and hasattr(packet, "default"):
            ops.append(packet.default)
    return ops


def selective_checkpoint_context():
    """context_fn for torch.utils.checkpoint: save matmul/attention outputs, recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = set(_saved_ops())

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def enable_checkpointing(model, selective: bool) -> None:
    """transformers' activation checkpointing (non-reentrant: works with frozen inputs and DDP),
    optionally selective."""
    kwargs = {"use_reentrant": False}
    if selective:
        kwargs["context_fn"] = selective_checkpoint_context
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_blocks(model, backend: str = "inductor") -> int:
    """torch.compile every block of every nn.ModuleList (the decoder and vision layers) in place;
    returns how many. dynamic=True: packed and padded batches change length every step."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                block.compile(backend=backend, dynamic=True)
                count += 1
    return count


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights: an fp32 master copy of every weight and fp32 moments live in the
    optimizer state; the update is computed in fp32 and the bf16 weight is the master rounded.
    Pure-bf16 training then keeps bf16 activations and gradients (no autocast casts) while small
    updates are not lost to bf16 rounding. The state dict holds the master weights, so a resumed
    run continues from exactly the same fp32 values."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["master"] = p.detach().to(torch.float32, copy=True)
                    state["exp_avg"] = torch.zeros_like(state["master"])
                    state["exp_avg_sq"] = torch.zeros_like(state["master"])
                master, m, v = state["master"], state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                step = float(state["step"])
                grad = p.grad.to(torch.float32)
                if group["weight_decay"]:
                    master.mul_(1 - group["lr"] * group["weight_decay"])
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                master.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** step))
                p.copy_(master)
        return loss


def make_optimizer(groups: list[dict], lr: float, master_weights: bool):
    """torch's AdamW, or MasterWeightAdamW for bf16 weights with fp32 state."""
    if master_weights:
        return MasterWeightAdamW(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)
