"""memory/dispatch.py: which implementation a call's `impl` names, read per call (never module state)."""

from __future__ import annotations

import torch

from miras.memory.dispatch import select_impl
from miras.memory.rule import RuleConfig

RULE = RuleConfig(chunk_size=4)
CPU = torch.device("cpu")


def test_auto_follows_the_model_compiled_steps_inside_a_compiled_caller_the_torch_path_in_eager():
    def marks_the_choice(x):  # the string is a constant of the traced graph, so the output carries it
        return x + (1.0 if select_impl("auto", x.device, RULE, False) == "compiled" else 0.0)

    assert select_impl("auto", CPU, RULE, False) == "torch"
    assert marks_the_choice(torch.zeros(1)).item() == 0.0
    torch._dynamo.reset()
    assert torch.compile(marks_the_choice, backend="eager", fullgraph=True)(torch.zeros(1)).item() == 1.0


def test_a_named_implementation_is_kept_inside_a_compiled_caller():
    def marks_torch(x):
        return x + (1.0 if select_impl("torch", x.device, RULE, False) == "torch" else 0.0)

    torch._dynamo.reset()
    assert torch.compile(marks_torch, backend="eager", fullgraph=True)(torch.zeros(1)).item() == 1.0
