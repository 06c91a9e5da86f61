"""The Triton kernels (triton_chunk.py) under TRITON_INTERPRET=1 on the CPU, against the references.

The interpreter runs each program in Python over numpy (~1 ms per Triton op), so the shapes are tiny
and each test runs the kernels on few chunks; the kernels are generic in the dtype, so float64 runs
check the formulas to rounding (1e-10, as the torch path's tests) and one float32 run checks the
precision users get.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import triton  # noqa: E402,F401  (miras[test] installs it: missing is a failure, not a skip)

if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it before anything imports triton
    pytest.skip("the kernels are tested under TRITON_INTERPRET=1, which tests/conftest.py sets unless it is set",
                allow_module_level=True)

from miras import MonetaConfig, MonetaForCausalLM  # noqa: E402
from miras.memory import RuleConfig, chunkwise_memory  # noqa: E402
from miras.memory.naive import naive_memory  # noqa: E402

from .helpers import initial_state, memory_inputs  # noqa: E402
from .test_chunkwise import running_accumulators  # noqa: E402

NAMES = ("q", "k", "v", "eta", "log_alpha", "a1", "a2", "gamma", "beta")
PER_TOKEN = NAMES[:5]
TIGHT = dict(rtol=0, atol=1e-10)


def assert_gradient_close(name, got, want):
    """1e-10 relative to the gradient's largest entry (p < 2's surrogate makes gradients of ~1e3)."""
    scale = want.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got / scale, want / scale, **TIGHT, msg=lambda m: f"gradient of {name}: {m}")


def probes(y, state, seed=7):
    """Fixed random weights for a loss touching the reads and the final state (drawn in float64 for every dtype)."""
    g = torch.Generator().manual_seed(seed)
    shapes = (y.shape, state.a1.shape, state.a2.shape)
    return tuple(torch.randn(shape, generator=g, dtype=torch.float64).to(y.dtype) for shape in shapes)


def run_segments(x, rule, impl, mask=None, split=None):
    """chunkwise_memory over [0, split) then [split, T) with the state carried (an open chunk between).

    Returns the reads, the final state, the running accumulators (open chunk included), the leaves.
    """
    leaves = {n: x[n].clone().requires_grad_() for n in NAMES}
    state = initial_state(leaves, rule.chunk_size)
    length = x["q"].shape[2]
    bounds = [(0, length)] if split is None else [(0, split), (split, length)]
    ys = []
    for start, stop in bounds:
        part = {n: leaves[n][:, :, start:stop] for n in PER_TOKEN}
        part_mask = None if mask is None else mask[:, start:stop]
        y, state = chunkwise_memory(
            **part, state=state, gamma=leaves["gamma"], beta=leaves["beta"], rule=rule, mask=part_mask, impl=impl
        )
        ys.append(y)
    running = running_accumulators(state, leaves["gamma"], leaves["beta"], rule)
    return torch.cat(ys, dim=2), state, running, leaves


def loss_of(y, anchor, running, weights):
    probe_y, probe_a1, probe_a2 = weights
    return (y * probe_y).sum() + (anchor[0] * probe_a1).sum() + 0.1 * (running[1] * running[1]).sum() + (
        anchor[1] * probe_a2
    ).sum()


def test_triton_equals_the_token_loop_with_padding_a_partial_chunk_and_a_carried_open_chunk():
    """Outputs, final state and every input gradient against naive.py in float64.

    Row 0 has a hole, row 1 is left-padded; the first segment ends inside a chunk (its open chunk
    is carried into the second as the state's buffer); the last chunk is partial.
    """
    rule = RuleConfig(chunk_size=8)
    x = memory_inputs(batch=2, heads=2, length=21, head_dim=4, width=16)
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[0, 13] = False
    mask[1, :4] = False
    y, state, running, leaves = run_segments(x, rule, "triton", mask, split=11)
    assert type(state.a1.grad_fn).__name__ == "TritonMemoryBackward"  # the kernels ran, not the torch path
    assert state.buffer_len.tolist() == [20 % 8, 17 % 8]
    weights = probes(y, state)
    grads = torch.autograd.grad(loss_of(y, (state.a1, state.a2), running, weights), list(leaves.values()))

    ref_leaves = {n: x[n].clone().requires_grad_() for n in NAMES}
    batch_a1 = ref_leaves["a1"].expand(2, *x["a1"].shape)
    batch_a2 = ref_leaves["a2"].expand(2, *x["a2"].shape)
    y_ref, run_ref, anchor_ref = naive_memory(
        *(ref_leaves[n] for n in PER_TOKEN), batch_a1, batch_a2, ref_leaves["gamma"], ref_leaves["beta"], rule, mask
    )
    grads_ref = torch.autograd.grad(loss_of(y_ref, anchor_ref, run_ref, weights), list(ref_leaves.values()))

    torch.testing.assert_close(y, y_ref, **TIGHT)
    torch.testing.assert_close(state.a1, anchor_ref[0], **TIGHT)
    torch.testing.assert_close(state.a2, anchor_ref[1], **TIGHT)
    torch.testing.assert_close(running[0], run_ref[0], **TIGHT)
    torch.testing.assert_close(running[1], run_ref[1], **TIGHT)
    for name, got, want in zip(NAMES, grads, grads_ref):
        assert_gradient_close(name, got, want)


CASES = {
    "scale-free normaliser": (RuleConfig(chunk_size=8, lq_norm="scale_free"), {}),
    "scale-free normaliser, two-level": (RuleConfig(chunk_size=8, lq_norm="scale_free", checkpoint_group=2), {}),
    "delta rule p2 q2": (RuleConfig(chunk_size=8, p=2.0, q=2.0), {}),
    "surrogate p1.5 q3": (RuleConfig(chunk_size=4, p=1.5, q=3.0), {}),
    "fractional p2.5 q4.5": (RuleConfig(chunk_size=8, p=2.5, q=4.5), {}),
    "truncated bptt and two-level recompute": (RuleConfig(chunk_size=4, detach_state_every=8, checkpoint_group=2), {}),
    "d_h 5, m 72: two m tiles, masked": (RuleConfig(chunk_size=16), {"head_dim": 5, "width": 72, "length": 20}),
    "fixed input matrix, scale-free": (RuleConfig(chunk_size=8, lq_norm="scale_free", update_input=False), {}),
    "fixed input matrix, truncated bptt and two-level recompute": (
        RuleConfig(chunk_size=4, detach_state_every=8, checkpoint_group=2, update_input=False), {}
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_equals_the_torch_path(case):
    """Rule variants against the torch path (the reference implementation) in float64."""
    rule, shape = CASES[case]
    x = memory_inputs(batch=2, heads=1, **{"length": 14, "head_dim": 4, "width": 16, **shape})
    results = {}
    for impl in ("torch", "triton"):
        y, state, running, leaves = run_segments(x, rule, impl)
        loss = loss_of(y, (state.a1, state.a2), running, probes(y, state))
        grads = torch.autograd.grad(loss, list(leaves.values()))
        results[impl] = (y.detach(), state.a1.detach(), state.a2.detach(), grads)
    (y, a1, a2, grads), (y_ref, a1_ref, a2_ref, grads_ref) = results["triton"], results["torch"]
    torch.testing.assert_close(y, y_ref, **TIGHT)
    torch.testing.assert_close(a1, a1_ref, **TIGHT)
    torch.testing.assert_close(a2, a2_ref, **TIGHT)
    for name, got, want in zip(NAMES, grads, grads_ref):
        assert_gradient_close(name, got, want)


def test_float32_error_against_the_float64_reference_is_at_the_torch_paths_level():
    """Float32 kernels against the float64 torch path: relative to each tensor's size, within 1e-5
    (outputs, state) and 3e-5 (gradients), and within 5x the torch path's own float32 error
    (measured here: 2e-6 and 3e-6 for the kernels, 1.5e-6 and 2.5e-6 for the torch path).

    Why these bounds: everything runs in float32 with fp32 accumulation ("ieee" dot on the CPU), the
    state passes through the l_q normaliser and LayerNorm every chunk, and the gradients go through
    second derivatives (gelu'', the l_p error's), so a few hundred roundings stack up. On a GPU the
    matmul inputs are TF32 (10-bit mantissa) under torch's default "high" precision, for both paths:
    bench/gpu.sh compares the two paths there.
    """
    rule = RuleConfig(chunk_size=8)
    x = memory_inputs(batch=1, heads=2, length=20, head_dim=4, width=16)
    x32 = {n: t.float() for n, t in x.items()}
    outputs = {}
    for name, inputs, impl in (("ref", x, "torch"), ("torch32", x32, "torch"), ("triton32", x32, "triton")):
        y, state, running, leaves = run_segments(inputs, rule, impl)
        loss = loss_of(y, (state.a1, state.a2), running, probes(y, state))
        grads = torch.autograd.grad(loss, list(leaves.values()))
        outputs[name] = [t.detach().double() for t in (y, state.a1, state.a2, *grads)]
    labels = ("y", "a1", "a2") + NAMES
    for i, label in enumerate(labels):
        want = outputs["ref"][i]
        scale = want.abs().max().clamp_min(1e-6)
        err_triton = ((outputs["triton32"][i] - want).abs().max() / scale).item()
        err_torch = ((outputs["torch32"][i] - want).abs().max() / scale).item()
        bound = 1e-5 if i < 3 else 3e-5
        assert err_triton < bound, f"{label}: float32 Triton error {err_triton:.1e} >= {bound:.0e}"
        assert err_triton < 5 * max(err_torch, 1e-7), f"{label}: Triton {err_triton:.1e}, torch {err_torch:.1e}"


def test_model_with_memory_impl_triton_matches_torch():
    """MonetaConfig.memory_impl reaches the mixer: the same logits and parameter gradients (float32)."""
    config = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_heads=2, intermediate_size=32, chunk_size=8)
    ids = torch.randint(0, 50, (1, 11), generator=torch.Generator().manual_seed(0))
    results = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        model = MonetaForCausalLM(MonetaConfig(memory_impl=impl, **config))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results[impl] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=0, atol=1e-5)
    for name, grad in results["torch"][1].items():
        scale = grad.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(results["triton"][1][name] / scale, grad / scale, rtol=0, atol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------------
# Dispatch


def tiny_call(impl, rule=None, channelwise=False):
    rule = rule or RuleConfig(chunk_size=4)
    x = memory_inputs(batch=1, heads=1, length=3, channelwise=channelwise)
    state = initial_state({n: x[n].requires_grad_() for n in NAMES}, 4, channelwise)
    _, state = chunkwise_memory(*(x[n] for n in PER_TOKEN), state, x["gamma"], x["beta"], rule, impl=impl)
    return state


def ran_triton(state):
    return type(state.a1.grad_fn).__name__ == "TritonMemoryBackward"


def test_auto_and_torch_run_the_torch_path_and_triton_the_kernels():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning
        assert not ran_triton(tiny_call("auto"))
        assert not ran_triton(tiny_call("torch"))
        assert ran_triton(tiny_call("triton"))


@pytest.mark.parametrize(
    "rule,channelwise,reason",
    [
        (RuleConfig(chunk_size=4), True, "channel-wise gates"),
        (RuleConfig(chunk_size=4, inner_grad_clamp=1.0), False, "inner gradient clamp"),
    ],
)
def test_rules_the_kernels_do_not_cover_fall_back_to_torch_with_a_warning(rule, channelwise, reason):
    with pytest.warns(UserWarning, match=rf"memory_impl='triton': .*{reason}.*torch path"):
        assert not ran_triton(tiny_call("triton", rule, channelwise))


def test_cpu_without_the_interpreter_falls_back_to_torch_with_a_warning(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.warns(UserWarning, match=r"need CUDA tensors \(or TRITON_INTERPRET=1 on the CPU\), got cpu"):
        assert not ran_triton(tiny_call("triton"))


def test_unknown_implementation_is_an_error_naming_the_choices():
    expected = r"implementation 'cuda' is invalid: expected one of auto, torch, compiled, triton"
    with pytest.raises(ValueError, match=expected):
        tiny_call("cuda")


def test_without_triton_miras_imports_runs_and_memory_impl_triton_falls_back():
    """A machine without triton (simulated: the import blocked): `import miras` and the default path work,
    and memory_impl="triton" runs the torch path with a warning naming the missing package."""
    code = (
        "import sys, warnings\n"
        "sys.modules['triton'] = None  # import triton now raises ImportError, as when it is not installed\n"
        "import torch, miras\n"
        "config = dict(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_heads=2, intermediate_size=32,"
        " chunk_size=4)\n"
        "ids = torch.zeros(1, 5, dtype=torch.long)\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('error')\n"
        "    miras.MonetaForCausalLM(miras.MonetaConfig(**config))(ids)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    miras.MonetaForCausalLM(miras.MonetaConfig(memory_impl='triton', **config))(ids)\n"
        "assert any('triton is not installed' in str(w.message) for w in caught), [str(w.message) for w in caught]\n"
        "assert 'miras.memory.triton_chunk' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_training_step_on_the_triton_path_launches_no_operator_per_chunk(monkeypatch):
    """What bench/profile_train_step.py counts as GPU launches: each Triton launch once (the interpreter's ATen copies
    inside it not at all), one forward and one backward launch per layer, and as many operators for 4 chunks a row
    as for 2: nothing of the memory runs chunk by chunk outside the kernels."""
    from collections import Counter
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    from miras.memory import triton_chunk

    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "bench"))
    import profile_train_step as counter

    monkeypatch.setattr(triton_chunk, "_launch", triton_chunk._launch)  # the labelling below is undone after
    counter.label_triton_launches()
    config = MonetaConfig(vocab_size=20, hidden_size=16, num_hidden_layers=2, num_heads=2, intermediate_size=32,
                          chunk_size=4, memory_impl="triton")  # fmt: skip
    model = MonetaForCausalLM(config)

    def in_launch(event) -> bool:
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("triton_"):
            parent = parent.cpu_parent
        return parent is not None

    counts = {}
    for length in (8, 16):
        ids = torch.randint(0, 20, (1, length), generator=torch.Generator().manual_seed(0))
        model.zero_grad(set_to_none=True)  # each step creates the gradients rather than adding to them
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(ids, labels=ids).loss.backward()
        events = list(prof.events())
        counts[length] = counter.kernels_of(events)
        inside = Counter(e.name for e in events if in_launch(e) and counter.is_kernel(e))
        assert inside  # the interpreter's copies, which a GPU does not run: left out of the count
        assert counts[length] == Counter(e.name for e in events if counter.is_kernel(e)) - inside
    assert counts[8]["triton_forward"] == counts[8]["triton_backward"] == 2
    assert counts[8] == counts[16]
