"""Which implementation runs a segment's chunk sequence: the torch path, compiled or not, or the Triton kernels.

Chosen per call by the `impl` argument of chunkwise_memory (MonetaConfig.memory_impl), never by
module state:

- "torch": torch_chunk.py, the hand-written forward and backward, eager; the reference, runs
  everywhere.
- "compiled": the same functions through torch.compile (one small graph per chunk step and per
  group of chunks, compiled on first use per shape). Needs a working torch.compile (a C++ compiler on
  the CPU); the same function as "torch".
- "triton": triton_chunk.py, one launch for the whole chunk sequence. Runs on CUDA tensors with
  triton installed (`pip install 'miras[triton]'`), or on CPU tensors under TRITON_INTERPRET=1 (the
  tests). Where it cannot run, or for a rule it does not cover, the torch path runs instead and a
  warning says why: the same function either way, so a checkpoint trained with "triton" still
  loads and runs on a CPU.
- "auto": follows the model. Inside a model (or block) that torch.compile is tracing, "compiled": the
  compiled block then runs the memory's steps compiled too, which is what makes compiled training pay
  on the CPU (bench/RESULTS.md); in eager, the torch path. The Triton path has only been checked under
  the interpreter; "auto" moves to Triton on CUDA once bench/gpu.sh has measured it correct and faster
  on a GPU.

One-token decoding (memory_step) always runs the torch path.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from .rule import RuleConfig

IMPLEMENTATIONS = ("auto", "torch", "compiled", "triton")


def triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on tensors of this device here, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'miras[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        return None
    return f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device.type} tensors"


def triton_unsupported(rule: RuleConfig, channelwise: bool) -> str | None:
    """Why the Triton kernels do not cover this rule, or None when they do."""
    if channelwise:
        return "channel-wise gates (channelwise_gates=True) are not in the Triton kernels"
    if rule.inner_grad_clamp is not None:
        return "the inner gradient clamp (inner_grad_clamp) is not in the Triton kernels"
    return None


def select_impl(impl: str, device: torch.device, rule: RuleConfig, channelwise: bool) -> str:
    """The implementation that runs: "torch", "compiled" or "triton" (see the module docstring)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"memory implementation {impl!r} is invalid: expected one of {', '.join(IMPLEMENTATIONS)}")
    if impl == "compiled":
        return "compiled"
    if impl == "auto":
        # Read while Dynamo traces the caller, so the choice is a constant of the compiled graph.
        return "compiled" if torch.compiler.is_compiling() else "torch"
    if impl == "torch":
        return "torch"
    reason = triton_unsupported(rule, channelwise) or triton_unavailable(device)
    if reason is not None:
        warnings.warn(f"memory_impl='triton': {reason}; running the torch path", stacklevel=3)
        return "torch"
    return "triton"
