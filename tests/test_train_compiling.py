"""`miras train --compile auto|on|off`: the decision, read from the run's plan only, and what it logs and records."""

from __future__ import annotations

import json

import pytest
import torch

from miras.train import main
from miras.train.args import build_parser
from miras.train.compiling import AUTO_COMPILE_MIN_STEPS, compile_decision, compile_for_training

from .test_modeling import assert_decoding_equals_forward
from .test_train import TINY, fresh_accelerator_state  # noqa: F401 (the fixture resets Accelerate's state)


def test_the_help_states_the_auto_threshold_that_the_code_uses():
    help_text = " ".join(build_parser().format_help().split())
    assert f"at least {AUTO_COMPILE_MIN_STEPS} micro-steps" in help_text


@pytest.mark.parametrize(
    ("argv", "choice"),
    [([], "auto"), (["--compile"], "on"), (["--compile", "on"], "on"), (["--compile", "off"], "off")],
)
def test_compile_flag_values(argv, choice):
    assert build_parser().parse_args(argv).compile == choice


def test_auto_compiles_a_long_cpu_run_only():
    assert compile_decision("auto", "cpu", AUTO_COMPILE_MIN_STEPS, use_fsdp=False)[0]
    short, why = compile_decision("auto", "cpu", AUTO_COMPILE_MIN_STEPS - 1, use_fsdp=False)
    assert not short and f"{AUTO_COMPILE_MIN_STEPS - 1} micro-steps planned" in why
    assert not compile_decision("auto", "cuda", 10**6, use_fsdp=False)[0]
    assert not compile_decision("auto", "cpu", 10**6, use_fsdp=True)[0]
    # What the user names is done whatever the plan.
    assert compile_decision("on", "cpu", 1, use_fsdp=False) == (True, "on (--compile on)")
    assert compile_decision("off", "cpu", 10**6, use_fsdp=False) == (False, "off (--compile off)")


def test_auto_stays_eager_where_torch_compile_cannot_build_a_kernel():
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()  # the probe of an earlier test would otherwise be reused, compiled
    with inductor_config.patch({"force_disable_caches": True, "cpp.cxx": (None, "/nonexistent/c++")}):
        compiled, why = compile_decision("auto", "cpu", 10**6, use_fsdp=False)
    torch._dynamo.reset()
    assert not compiled
    assert why.startswith("off (auto: torch.compile does not work here: ") and "C++ compiler" in why
    assert "\n" not in why and "TORCHDYNAMO_VERBOSE" not in why


def test_a_short_run_stays_eager_and_says_so(tmp_path, capsys):
    """The plan counts forward-backward passes: 2 optimizer steps of 3 micro-steps each are 6."""
    args = [*TINY, "--max-steps", "2", "--grad-accum", "3", "--output-dir", str(tmp_path), "--run-name", "short"]
    assert main(args) == 0
    assert "compile off (auto: 6 micro-steps planned;" in capsys.readouterr().out
    assert json.loads((tmp_path / "short" / "config.json").read_text())["compiled"] is False


def test_compiled_blocks_train_as_eager_ones_and_evaluate_and_decode_eagerly():
    """Twelve layers: were the cached evaluation compiled, each layer's cache entry would be one more graph of the
    block's code, past Dynamo's recompile limit of 8, which fullgraph turns into an error."""
    from torch._dynamo.utils import counters

    from miras import MonetaConfig, MonetaForCausalLM

    torch._dynamo.reset()
    config = MonetaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=12, num_heads=2, intermediate_size=48,
                          chunk_size=4, memory_impl="torch")  # fmt: skip (the memory's own compile is tested apart)
    torch.manual_seed(0)
    model, eager = MonetaForCausalLM(config).train(), MonetaForCausalLM(config).train()
    eager.load_state_dict(model.state_dict())
    for one in (model, eager):
        (getattr(one, "activation_checkpointing_enable", None) or one.gradient_checkpointing_enable)()
    for block in model.model.layers:
        compile_for_training(block, backend="aot_eager")
    assert list(model.state_dict()) == list(eager.state_dict())
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    results = []
    for one in (model, eager):
        loss = one(ids, labels=ids).loss
        results.append((loss.detach(), *torch.autograd.grad(loss, list(one.parameters()))))
    for c, e in zip(*results):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1, graphs  # the training call went through the compiler

    model.eval()
    assert_decoding_equals_forward(model, ids)
    assert counters["stats"]["unique_graphs"] == graphs  # evaluation and decoding compiled nothing
