"""`--fsdp`: FSDP2 sharding, sharded checkpoints and the gathered export (public torch APIs only).

The DDP path lets accelerate wrap the model. This path does not hand the model, the optimizer or
the scheduler to accelerate (accelerate still starts the process group and gives rank, device,
reduce and barrier): it shards the model itself with `torch.distributed.fsdp.fully_shard`, the
optimizer is then built over the sharded (DTensor) parameters, and checkpoints go through
`torch.distributed.checkpoint` (DCP).

- Sharding: every block of the model's outermost ModuleLists (the decoder layers, the vision
  blocks) is one FSDP unit, then the whole model (embeddings, projector, norm, LM head) is the
  root unit. Parameters, gradients and AdamW states are split across the ranks (Shard(0)); a unit's
  full parameters exist only while its forward or backward runs.
- Precision: `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` for bf16-mixed (fp32
  sharded master weights, bf16 compute, fp32 gradient reduce-scatter); fp32 runs keep fp32
  throughout. No autocast: the policy casts parameters and floating-point inputs.
- Gradients: FSDP2 averages across ranks like DDP, so step.token_weighted_backward's scaling is
  unchanged; non-final micro-batches run with `set_requires_gradient_sync(False)` (the gradient
  is reduce-scattered once per optimizer step).
- Checkpoints: `get_state_dict(model, optimizer)` -> `dcp.save` into CHECKPOINT/sharded/ (each
  rank writes its shards); resume does `dcp.load` into the freshly sharded model's state dict and
  `set_state_dict`. Resharding to another number of ranks is DCP's job (it loads by global offsets),
  but the data position then starts anew (trainer._load_checkpoint).
- Export: `get_model_state_dict(..., StateDictOptions(full_state_dict=True, cpu_offload=True))`
  gathers full tensors on rank 0's CPU, which saves them with save_pretrained.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("pipeline.train")

SHARDED_DIR = "sharded"  # the DCP folder inside a checkpoint


def start_process_group(device: torch.device, world: int = 1) -> bool:
    """A one-rank process group when no launcher made one (fully_shard and DCP need one);
    returns True when this call created it (the caller destroys it at the end)."""
    if dist.is_initialized():
        return False
    if world > 1:
        from pipeline.train.trainer import TrainError

        raise TrainError(f"--fsdp over {world} ranks needs the launcher's process group (torchrun or "
                         "accelerate launch); none was started")
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def shard_blocks(model) -> list:
    """The blocks that become FSDP units: the items of every outermost nn.ModuleList (decoder
    layers, vision blocks); nested lists (experts, ...) stay inside their block's unit."""
    blocks, taken = [], []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList):
            continue
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue
        items = [m for m in module if any(True for _ in m.parameters())]
        if items:
            taken.append(name)
            blocks.extend(items)
    return blocks


def mixed_precision(precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    param_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def shard_model(model, device: torch.device, world: int, precision: str) -> int:
    """fully_shard each block, then the whole model, in place; returns the number of block units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    policy = mixed_precision(precision)
    # No model.to(device) first: fully_shard moves each unit's tensors to the mesh's device as it
    # shards them, so a GPU holds one full block at a time during setup, not the whole model.
    blocks = shard_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    log.info("FSDP2: %d blocks + the root sharded over %d rank(s), params %s, gradient reduction %s",
             len(blocks), world, policy.param_dtype, policy.reduce_dtype)
    return len(blocks)


@contextlib.contextmanager
def no_gradient_sync(model):
    """FSDP2's no_sync: gradients accumulate unsharded until the step's last micro-batch."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(params, max_norm: float):
    """clip_grad_norm_ over DTensor gradients (the norm is reduced over the ranks)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def save_sharded(model, optimizer, path: Path) -> None:
    """Collective: every rank writes its shards of model + optimizer under path/sharded/."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path / SHARDED_DIR))


def load_sharded(model, optimizer, path: Path) -> None:
    """Collective: read path/sharded/ into the sharded model and optimizer (strict)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    sharded = str(path / SHARDED_DIR)
    saved = set(dcp.FileSystemReader(sharded).read_metadata().state_dict_metadata)
    model_state, optim_state = get_state_dict(model, optimizer)
    missing = sorted(k for k in model_state if f"model.{k}" not in saved)
    if missing:
        from pipeline.train.trainer import TrainError

        raise TrainError(f"{sharded}: weights missing from the checkpoint: {missing[:5]}")
    # get_state_dict gives every parameter an (empty) optimizer state; parameters no loss has
    # reached yet (a SigLIP pooling head LLaVA never reads) had none when the checkpoint was
    # saved. They stay without one, as in the uninterrupted run; everything else loads strictly.
    stateless = [f for f in optim_state["state"] if not any(k.startswith(f"optim.state.{f}.") for k in saved)]
    for fqn in stateless:
        del optim_state["state"][fqn]
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=sharded)
    # strict=False only for those optimizer states: the weights were checked above, and dcp.load
    # fails on any other key the checkpoint lacks.
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    log.info("loaded sharded weights and optimizer state from %s (%d parameter(s) had no optimizer state)",
             sharded, len(stateless))


def full_state_dict(model) -> dict:
    """Collective: the full (unsharded) weights on rank 0's CPU; other ranks get an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
