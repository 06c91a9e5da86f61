"""The torch path (torch_chunk.py: hand-written forward and backward) against autograd through chunk_step (float64)."""

import pytest
import torch

from miras.memory import RuleConfig, chunkwise_memory, torch_chunk
from miras.memory import chunkwise as chunkwise_module

from .helpers import initial_state, memory_inputs

NAMES = ("q", "k", "v", "eta", "log_alpha", "a1", "a2", "gamma", "beta")


def outputs_and_gradients(
    x, rule, handwritten, monkeypatch, mask=None, split=None, channelwise=False, keep=False, touches=("y", "state")
):  # fmt: skip
    """Reads, final state and the gradients of a loss touching them (`touches`), with one backward or the other."""
    if not handwritten:
        monkeypatch.setattr(chunkwise_module, "handwritten_backward", lambda rule, channelwise: False)
    leaves = {n: x[n].clone().requires_grad_() for n in NAMES}
    state = initial_state(leaves, rule.chunk_size, channelwise)
    per_token = ("q", "k", "v", "eta", "log_alpha")
    bounds = [(0, x["q"].shape[2])] if split is None else [(0, split), (split, x["q"].shape[2])]
    ys = []
    for start, stop in bounds:
        part = {n: leaves[n][:, :, start:stop] for n in per_token}
        part_mask = None if mask is None else mask[:, start:stop]
        y, state = chunkwise_memory(
            **part, state=state, gamma=leaves["gamma"], beta=leaves["beta"], rule=rule, mask=part_mask,
            keep_intermediates=keep,
        )  # fmt: skip
        ys.append(y)
    monkeypatch.undo()
    y = torch.cat(ys, dim=2)
    g = torch.Generator().manual_seed(3)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() if "y" in touches else 0.0
    if "state" in touches:
        loss = loss + 0.1 * (state.a1 * state.a1).sum() + 0.3 * state.a2.sum()
    grads = torch.autograd.grad(loss, [leaves[n] for n in NAMES], allow_unused=True)
    grads = [torch.zeros_like(leaves[n]) if grad is None else grad for n, grad in zip(NAMES, grads)]
    return y.detach(), state, dict(zip(NAMES, grads))


CASES = {
    "defaults p3 q4": (RuleConfig(chunk_size=8), {}),
    "scale-free normaliser": (RuleConfig(chunk_size=8, lq_norm="scale_free"), {}),
    "scale-free, truncated bptt": (RuleConfig(chunk_size=8, detach_state_every=16, lq_norm="scale_free"), {}),
    "scale-free, q4.5, segments": (RuleConfig(chunk_size=8, q=4.5, lq_norm="scale_free"), {"split": 11}),
    # Chunks of 8 (two-level: groups of 2): at chunks of 4 and below these inputs make the scale-free
    # recurrence sensitive enough that the two paths' different rounding grows to ~1e-11.
    "scale-free, two-level, left padding": (
        RuleConfig(chunk_size=8, checkpoint_group=2, lq_norm="scale_free"), {"mask": True}
    ),
    "delta rule p2 q2": (RuleConfig(chunk_size=8, p=2.0, q=2.0), {}),
    "surrogate p1.5 q3": (RuleConfig(chunk_size=4, p=1.5, q=3.0), {}),
    "fractional p2.5 q4.5": (RuleConfig(chunk_size=8, p=2.5, q=4.5), {}),
    "chunk 1": (RuleConfig(chunk_size=1), {}),
    "truncated bptt": (RuleConfig(chunk_size=4, detach_state_every=8), {}),
    "two-level recompute": (RuleConfig(chunk_size=4, checkpoint_group=3), {}),
    "two-level with truncated bptt": (RuleConfig(chunk_size=4, checkpoint_group=3, detach_state_every=8), {}),
    "left padding": (RuleConfig(chunk_size=8), {"mask": True}),
    "segments split inside a chunk": (RuleConfig(chunk_size=8), {"split": 11}),
    "intermediates kept": (RuleConfig(chunk_size=4, checkpoint_group=3), {"keep": True, "mask": True}),
    "intermediates kept, segments": (RuleConfig(chunk_size=8, p=2.5, q=4.5), {"keep": True, "split": 11}),
    "fixed input matrix": (RuleConfig(chunk_size=8, update_input=False), {}),
    "fixed input matrix, scale-free, two-level, left padding": (
        RuleConfig(chunk_size=8, checkpoint_group=2, lq_norm="scale_free", update_input=False), {"mask": True}
    ),
    "fixed input matrix, intermediates kept, segments": (
        RuleConfig(chunk_size=8, lq_norm="scale_free", update_input=False), {"keep": True, "split": 11}
    ),
    "fixed input matrix, truncated bptt": (RuleConfig(chunk_size=4, detach_state_every=8, update_input=False), {}),
}


@pytest.mark.parametrize("group_rows", [2048, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_handwritten_backward_equals_autograd(case, group_rows, monkeypatch):
    """group_rows 8: the batched parts run over groups of one or two chunks (several groups per sequence)."""
    rule, options = CASES[case]
    x = memory_inputs(length=29, head_dim=4, width=16)
    mask = None
    if options.get("mask"):
        mask = torch.ones(2, 29, dtype=torch.bool)
        mask[0, :6] = False
    kwargs = dict(mask=mask, split=options.get("split"))
    monkeypatch.setattr(torch_chunk, "GROUP_ROWS", group_rows)
    y_hand, state_hand, hand = outputs_and_gradients(x, rule, True, monkeypatch, keep=options.get("keep", False),
                                                     **kwargs)  # fmt: skip
    y_auto, state_auto, auto = outputs_and_gradients(x, rule, False, monkeypatch, **kwargs)
    # The routing under test: the last committed state comes out of the hand-written op or not.
    assert "chunk_memory" in type(state_hand.a1.grad_fn).__name__
    assert "chunk_memory" not in type(state_auto.a1.grad_fn).__name__
    torch.testing.assert_close(y_hand, y_auto, rtol=0, atol=1e-12)
    for name in NAMES:
        scale = auto[name].abs().max().clamp_min(1.0)
        torch.testing.assert_close(hand[name] / scale, auto[name] / scale, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("touches", [("y",), ("state",)])
@pytest.mark.parametrize("update_input", [False, True])
def test_handwritten_backward_when_the_loss_ignores_an_output(touches, update_input, monkeypatch):
    """Training reads y and drops the final state: the op's backward gets no gradient for it (None, not zeros)."""
    rule = RuleConfig(chunk_size=8, update_input=update_input)
    x = memory_inputs(length=32, head_dim=4, width=16)
    _, state, hand = outputs_and_gradients(x, rule, True, monkeypatch, touches=touches)
    _, _, auto = outputs_and_gradients(x, rule, False, monkeypatch, touches=touches)
    assert "chunk_memory" in type(state.a1.grad_fn).__name__
    for name in NAMES:
        scale = auto[name].abs().max().clamp_min(1.0)
        torch.testing.assert_close(hand[name] / scale, auto[name] / scale, rtol=0, atol=1e-10, msg=name)


def test_channelwise_gates_and_the_inner_clamp_fall_back_to_autograd(monkeypatch):
    x = memory_inputs(length=12, head_dim=4, width=16, channelwise=True)
    _, state, _ = outputs_and_gradients(x, RuleConfig(chunk_size=4), True, monkeypatch, channelwise=True)
    assert "chunk_memory" not in type(state.a1.grad_fn).__name__
    x = memory_inputs(length=12, head_dim=4, width=16)
    _, state, _ = outputs_and_gradients(x, RuleConfig(chunk_size=4, inner_grad_clamp=1.0), True, monkeypatch)
    assert "chunk_memory" not in type(state.a1.grad_fn).__name__


def test_handwritten_backward_passes_gradcheck():
    rule = RuleConfig(chunk_size=3)
    x = memory_inputs(batch=1, heads=1, length=7, head_dim=3, width=6)
    leaves = [x[n].clone().requires_grad_() for n in NAMES]

    def fn(*tensors):
        t = dict(zip(NAMES, tensors))
        state = initial_state(t, rule.chunk_size)
        per_token = {n: t[n] for n in ("q", "k", "v", "eta", "log_alpha")}
        y, state = chunkwise_memory(**per_token, state=state, gamma=t["gamma"], beta=t["beta"], rule=rule)
        return y, state.a1, state.a2

    assert "chunk_memory" in type(fn(*leaves)[1].grad_fn).__name__
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("update_input", [True, False])
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("group", [0, 2])
def test_the_memory_forward_runs_twice_per_step(update_input, keep, group, monkeypatch):
    """Counted per chunk: reads computed (forward, and the backward's recompute unless kept) and the per-chunk
    forward step. Block checkpointing runs the op's forward itself twice; here keep=True stands for it. With a
    fixed input matrix the forward keeps the reads' small products, so the backward recomputes no read."""
    calls = {"read": 0, "step": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += args[0].shape[0] if name == "read" else 1  # read: chunks in the group
            return fn(*args, **kwargs)

        return wrapped

    step = "_forward_step" if update_input else "_forward_step_fixed"
    monkeypatch.setattr(torch_chunk, "_read", counting("read", torch_chunk._read))
    monkeypatch.setattr(torch_chunk, step, counting("step", getattr(torch_chunk, step)))
    torch_chunk._steps.cache_clear()  # the step functions are bound when the (cached) _Steps is built
    rule = RuleConfig(chunk_size=4, checkpoint_group=group, update_input=update_input)
    x = memory_inputs(length=24, head_dim=4, width=16)
    leaves = {n: x[n].clone().requires_grad_() for n in NAMES}
    per_token = {n: leaves[n] for n in ("q", "k", "v", "eta", "log_alpha")}
    runs = 2 if keep else 1  # with keep, the caller's own recompute: run the op's forward again
    for _ in range(runs):
        y, state = chunkwise_memory(**per_token, state=initial_state(leaves, 4), gamma=leaves["gamma"],
                                    beta=leaves["beta"], rule=rule, keep_intermediates=keep)  # fmt: skip
    (y.sum() + state.a1.sum()).backward()
    torch_chunk._steps.cache_clear()
    chunks = 24 // 4
    kept_products = not update_input and not keep and group <= 1
    assert calls["read"] == (chunks if kept_products else 2 * chunks)
    # Two-level recompute re-runs the per-chunk part of the forward, not the reads; kept: never.
    assert calls["step"] == (2 * chunks if keep or group > 1 else chunks)
