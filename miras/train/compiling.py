"""Whether a training run compiles its blocks (`--compile auto|on|off`), decided once, from the run's plan.

Compiling (each block one graph through torch.compile, the memory's steps compiled inside it) costs a fixed
time on the first step, ~50 s on a 2-core CPU with an empty Inductor cache, and then saves every step: 7-11% at
the bench shape (d=256, T=2048 and 8192), 7.5% at T=256 with block checkpointing (bench/RESULTS.md, "Compiled by
default on a long CPU run"). It pays back after ~120 steps at the bench shape and ~2,300 at T=256, the smallest
shape a real run takes, so "auto" compiles a CPU run planned for at least AUTO_COMPILE_MIN_STEPS micro-steps
(forward-backward passes: optimizer steps times --grad-accum), and nothing shorter (the dry run, a test, a quick
try). The decision reads only the plan (the device and the planned passes), so a resumed run decides as the run it
continues did and its losses stay the same bit for bit.

On CUDA "auto" stays eager until bench/gpu.sh has measured compiled training on a GPU; FSDP2 with compiled blocks
is not exercised by the tests, so "auto" leaves it eager too. "on" compiles wherever asked.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..storage.base import one_line

AUTO_COMPILE_MIN_STEPS = 2000


def compile_decision(choice: str, device_type: str, micro_steps: int, use_fsdp: bool) -> tuple[bool, str]:
    """Whether to compile, and why, in words for the log: "on", "off", or "auto" from the plan.

    micro_steps: the forward-backward passes the run plans, its optimizer steps times --grad-accum (each pass
    gains from the compilation).
    """
    if choice == "on":
        return True, "on (--compile on)"
    if choice == "off":
        return False, "off (--compile off)"
    if device_type != "cpu":
        return False, f"off (auto: compiled training is measured on the CPU only, this run is on {device_type})"
    if use_fsdp:
        return False, "off (auto: compiled blocks under FSDP2 are not tested)"
    if micro_steps < AUTO_COMPILE_MIN_STEPS:
        return False, (
            f"off (auto: {micro_steps} micro-steps planned; compiling, ~50 s, pays from ~{AUTO_COMPILE_MIN_STEPS} "
            "on the CPU)"
        )
    broken = compiler_unavailable()
    if broken is not None:
        return False, f"off (auto: torch.compile does not work here: {broken}; --compile on to insist)"
    return True, f"on (auto: a CPU run of {micro_steps} micro-steps; the first one compiles, ~50 s)"


def compiler_unavailable() -> str | None:
    """Why torch.compile cannot build a CPU kernel here (no C++ compiler, no Python headers...), or None.

    Compiles one tiny function, a few seconds once per process: cheaper than a run that fails on its first step.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = torch.compile(lambda x: (x * 2.0 + 1.0).sin(), fullgraph=True, dynamic=False)
            probe(torch.ones(8))
    except Exception as error:  # any failure of the toolchain means the same thing: stay eager
        return one_line(error).split(" Set TORCHDYNAMO_VERBOSE")[0][:200]  # torch's advice on reporting goes
    return None


def compile_for_training(block: nn.Module, backend: str = "inductor") -> None:
    """torch.compile the block as one graph (fullgraph) for its training calls; evaluation runs it eagerly.

    A training call is the block in train mode with gradients on: the step's forward, and its recompute under
    activation checkpointing. Evaluation and generation use a cache, in which each block reads its own layer's
    entry: Dynamo would specialise a graph per layer and, past its recompile limit, fail (fullgraph). They are a
    small share of a run, so they stay eager. The state dict and the module tree are unchanged.
    backend: torch.compile's (the tests capture with "aot_eager", sparing Inductor's C++ code generation).
    """
    compiled = torch.compile(block._call_impl, fullgraph=True, backend=backend)
    eager = block._call_impl

    def call(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    block._compiled_call_impl = call  # what nn.Module.compile sets, and what nn.Module.__call__ runs when set
