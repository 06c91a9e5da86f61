"""How the model is spread over processes: DDP through Accelerate, or FSDP2 applied here.

FSDP2 is applied by miras itself (`fully_shard` on every block, then the root), not by Accelerate's
plugin, because that plugin silently falls back to DDP on CPU: this way the 2-process CPU tests run
exactly the code a GPU run executes. `accelerate launch --config_file accelerate_configs/fsdp.yaml`
selects it through the ACCELERATE_USE_FSDP variable, which is consumed here so Accelerate itself
does not wrap the model a second time.
"""

from __future__ import annotations

import contextlib
import os

import torch

_TRUE = ("1", "true", "yes")


def take_fsdp_request(flag: bool) -> bool:
    """True when FSDP2 was asked for (--fsdp or an Accelerate FSDP config); clears Accelerate's switch."""
    from_env = os.environ.pop("ACCELERATE_USE_FSDP", "").lower() in _TRUE
    return flag or from_env


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """fully_shard each MONETA block, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def gradient_sync(model: torch.nn.Module, accelerator, enabled: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP no_sync, FSDP2 requires_gradient_sync)."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return accelerator.no_sync(model)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def as_float(value) -> float:
    """A norm that may be a DTensor (FSDP2) as a Python float."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


def reshard(model: torch.nn.Module) -> None:
    """After a forward without backward (evaluation), FSDP2 leaves the root's parameters gathered; shard them
    again so the optimizer and state-dict code see the DTensor parameters they know."""
    if hasattr(model, "reshard"):
        model.reshard()
