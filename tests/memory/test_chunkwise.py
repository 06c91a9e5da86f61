"""The chunkwise training path against the token-by-token reference and exact reductions (float64)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from miras import MonetaConfig
from miras.memory import MemoryState, RuleConfig, chunkwise_memory
from miras.memory.naive import memory_read, naive_memory
from miras.memory.rule import anchor_gradients, committed_accumulators, decay_weights, lq_scale

from .helpers import initial_state, memory_inputs, time_slice

# fp64 against the token-by-token loop: 1e-10 absolute, plus 1e-12 relative for the large entries.
# Rounding grows with the magnitude: the gradients reach ~1e4 here (A_0's, summed over every token),
# where a few ulps are ~1e-12 and a chain of ~1e3 operations ~1e-10 absolute (seen: 1.1e-10, that is
# 1.5e-14 relative); a real error in the math is orders of magnitude above either bound.
TOL = dict(rtol=1e-12, atol=1e-10)
NAMES = ("q", "k", "v", "eta", "log_alpha", "a1", "a2", "gamma", "beta")


def running_accumulators(state: MemoryState, gamma, beta, rule):
    """Accumulators after every token, including the open chunk (the anchor plus the buffer's updates)."""
    scale1, scale2 = lq_scale(state.a1, rule), lq_scale(state.a2, rule)
    grads = anchor_gradients(
        state.buffer_k,
        state.buffer_v,
        scale1 * state.a1,
        scale2 * state.a2,
        gamma[None, :, None],
        beta[None, :, None],
        rule,
    )
    cumulative = state.buffer_log_alpha.cumsum(2)
    channelwise = state.buffer_eta.dim() == 4
    last = cumulative[:, :, -1:]
    weights = decay_weights(
        last, cumulative, state.buffer_eta, torch.ones(1, rule.chunk_size, dtype=torch.bool), channelwise
    )
    return committed_accumulators(
        state.a1, state.a2, state.buffer_k, grads, weights[:, :, 0], last[:, :, 0].exp(), rule.update_input
    )


def run_both(x, rule, channelwise, mask=None, impl="torch"):
    leaves = {n: x[n].clone().requires_grad_() for n in NAMES}
    weights = torch.Generator().manual_seed(7)
    state = initial_state(leaves, rule.chunk_size, channelwise)
    y, final = chunkwise_memory(
        *(leaves[n] for n in ("q", "k", "v", "eta", "log_alpha")), state, leaves["gamma"], leaves["beta"], rule, mask,
        impl=impl,
    )  # fmt: skip
    probe_y = 0.1 * torch.randn(y.shape, generator=weights, dtype=y.dtype)
    probe_a1 = 0.1 * torch.randn(final.a1.shape, generator=weights, dtype=y.dtype)
    running = running_accumulators(final, leaves["gamma"], leaves["beta"], rule)
    loss = (y * probe_y).sum() + (final.a1 * probe_a1).sum() + 0.1 * running[1].pow(2).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))

    y_ref, run_ref, anchor_ref = naive_memory(
        *(leaves[n] for n in ("q", "k", "v", "eta", "log_alpha")),
        state.a1,
        state.a2,
        leaves["gamma"],
        leaves["beta"],
        rule,
        mask,
    )
    loss_ref = (y_ref * probe_y).sum() + (anchor_ref[0] * probe_a1).sum() + 0.1 * run_ref[1].pow(2).sum()
    grads_ref = torch.autograd.grad(loss_ref, list(leaves.values()))
    return (y, final, running, grads), (y_ref, anchor_ref, run_ref, grads_ref)


@pytest.mark.parametrize("lq_norm", ["scale_free", "inverse"])
@pytest.mark.parametrize("channelwise", [False, True])
# (64, 23) and (64, 8): one open chunk, which runs padded to 24 and 16 slots, not 64 (chunkwise._short_chunk).
@pytest.mark.parametrize("chunk_size,length", [(1, 7), (4, 23), (16, 37), (64, 8), (64, 23), (64, 70)])
def test_chunkwise_equals_token_loop(chunk_size, length, channelwise, lq_norm):
    rule = RuleConfig(chunk_size=chunk_size, lq_norm=lq_norm)
    x = memory_inputs(length=length, channelwise=channelwise)
    (y, final, running, grads), (y_ref, anchor_ref, run_ref, grads_ref) = run_both(x, rule, channelwise)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(final.a1, anchor_ref[0], **TOL)
    torch.testing.assert_close(final.a2, anchor_ref[1], **TOL)
    torch.testing.assert_close(running[0], run_ref[0], **TOL)
    torch.testing.assert_close(running[1], run_ref[1], **TOL)
    assert final.buffer_len.tolist() == [length % chunk_size] * 2
    for name, got, want in zip(NAMES, grads, grads_ref):
        # Relative to the gradient's size once it exceeds 1 (eta's reaches ~7e3 at chunk 1: 1e-10 is then ~100 ulp).
        scale = want.abs().max().clamp_min(1.0)
        torch.testing.assert_close(
            got / scale, want / scale, **TOL, msg=lambda m, name=name: f"gradient of {name}: {m}"
        )


@pytest.mark.parametrize("lq_norm", ["scale_free", "inverse"])
@pytest.mark.parametrize("channelwise", [False, True])
@pytest.mark.parametrize("chunk_size,length", [(4, 23), (16, 37), (64, 23)])
def test_a_fixed_input_matrix_equals_token_loop(chunk_size, length, channelwise, lq_norm):
    """update_input=False: only A1 decays and takes writes; A2 leaves the op as it came in, yet its gradient flows."""
    rule = RuleConfig(chunk_size=chunk_size, lq_norm=lq_norm, update_input=False)
    x = memory_inputs(length=length, channelwise=channelwise)
    (y, final, running, grads), (y_ref, anchor_ref, run_ref, grads_ref) = run_both(x, rule, channelwise)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(final.a1, anchor_ref[0], **TOL)
    torch.testing.assert_close(running[0], run_ref[0], **TOL)
    fixed = x["a2"].expand_as(final.a2)
    assert torch.equal(final.a2, fixed) and torch.equal(running[1], fixed)
    assert not torch.allclose(final.a1, x["a1"]) or length < chunk_size
    for name, got, want in zip(NAMES, grads, grads_ref):
        scale = want.abs().max().clamp_min(1.0)
        torch.testing.assert_close(
            got / scale, want / scale, **TOL, msg=lambda m, name=name: f"gradient of {name}: {m}"
        )
    assert grads[NAMES.index("a2")].abs().max() > 0


def test_masked_tokens_are_skipped_and_do_not_count_toward_chunks():
    rule = RuleConfig(chunk_size=4)
    x = memory_inputs(length=19)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, :6] = False  # left padding
    mask[0, 9] = False  # a hole
    (y, final, running, _), (y_ref, anchor_ref, run_ref, _) = run_both(x, rule, False, mask)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(running[0], run_ref[0], **TOL)
    assert final.buffer_len.tolist() == [18 % 4, 13 % 4]
    assert torch.all(y[1, :, :6] == 0)


def test_chunk_one_is_the_per_token_recurrence_with_lagged_normaliser():
    """b = 1: A_t = alpha A_{t-1} - eta grad l(s(A_{t-1}) A_{t-1}), read with s(A_{t-1}) * A_t.

    Written independently of miras.memory: the inner gradient comes from autograd of the l_p loss.
    """
    rule = RuleConfig(chunk_size=1)
    x = memory_inputs(batch=1, heads=1, length=9)
    y, _ = chunkwise_memory(
        *(x[n] for n in ("q", "k", "v", "eta", "log_alpha")), initial_state(x, 1), x["gamma"], x["beta"], rule
    )
    acc1, acc2 = x["a1"][0], x["a2"][0]
    gamma, beta = x["gamma"][0], x["beta"][0]
    for t in range(9):
        s1, s2 = lq_scale(acc1, rule), lq_scale(acc2, rule)
        w1, w2 = (s1 * acc1).requires_grad_(), (s2 * acc2).requires_grad_()
        k, v = x["k"][0, 0, t], x["v"][0, 0, t]
        loss = (memory_read(k, w1, w2, gamma, beta, rule) - v).abs().pow(3).sum()
        g1, g2 = torch.autograd.grad(loss, (w1, w2))
        alpha, eta = x["log_alpha"][0, 0, t].exp(), x["eta"][0, 0, t]
        acc1, acc2 = alpha * acc1 - eta * g1, alpha * acc2 - eta * g2
        expected = memory_read(x["q"][0, 0, t], s1 * acc1, s2 * acc2, gamma, beta, rule)
        torch.testing.assert_close(y[0, 0, t], expected, **TOL)


def test_p2_q2_no_decay_is_mini_batch_gradient_descent():
    """p = 2, q = 2, alpha = 1: each chunk is one mini-batch GD step on the squared error (the delta rule
    generalised to the MLP memory, TTT-style); token t of a chunk reads W_0 - sum_{j<=t} eta_j grad_j."""
    b = 4
    rule = RuleConfig(p=2.0, q=2.0, chunk_size=b)
    x = memory_inputs(batch=1, heads=1, length=8)
    x["log_alpha"] = torch.zeros_like(x["log_alpha"])
    y, _ = chunkwise_memory(
        *(x[n] for n in ("q", "k", "v", "eta", "log_alpha")), initial_state(x, b), x["gamma"], x["beta"], rule
    )
    gamma, beta = x["gamma"][0], x["beta"][0]
    w1, w2 = x["a1"][0], x["a2"][0]
    for start in range(0, 8, b):
        anchor1, anchor2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
        for t in range(start, start + b):
            err = memory_read(x["k"][0, 0, t], anchor1, anchor2, gamma, beta, rule) - x["v"][0, 0, t]
            g1, g2 = torch.autograd.grad(err.pow(2).sum(), (anchor1, anchor2))
            w1, w2 = w1 - x["eta"][0, 0, t] * g1, w2 - x["eta"][0, 0, t] * g2
            torch.testing.assert_close(y[0, 0, t], memory_read(x["q"][0, 0, t], w1, w2, gamma, beta, rule), **TOL)


@pytest.mark.parametrize("channelwise", [False, True])
def test_gradcheck_tiny(channelwise):
    rule = RuleConfig(chunk_size=3)
    x = memory_inputs(batch=1, heads=1, length=7, head_dim=3, width=5, channelwise=channelwise)
    leaves = [x[n].clone().requires_grad_() for n in NAMES]

    def fn(q, k, v, eta, log_alpha, a1, a2, gamma, beta):
        state = MemoryState.initial(a1, a2, 1, 3, channelwise)
        y, final = chunkwise_memory(q, k, v, eta, log_alpha, state, gamma, beta, rule)
        return y, final.a1, final.a2

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5)


# Chunk 64: the whole 37 tokens and each first segment are one open chunk (the short path), and each second
# segment starts inside the carried open chunk.
@pytest.mark.parametrize("chunk_size", [8, 64])
@pytest.mark.parametrize("split", [1, 5, 16, 17, 30])
def test_segments_with_carried_state_equal_one_pass(split, chunk_size):
    rule = RuleConfig(chunk_size=chunk_size)
    x = memory_inputs(length=37)
    args = ("q", "k", "v", "eta", "log_alpha")
    leaves = {n: x[n].clone().requires_grad_() for n in NAMES}
    state = initial_state(leaves, chunk_size)
    y, final = chunkwise_memory(*(leaves[n] for n in args), state, leaves["gamma"], leaves["beta"], rule)
    first, middle = chunkwise_memory(
        *(time_slice(leaves, 0, split)[n] for n in args), state, leaves["gamma"], leaves["beta"], rule
    )
    second, end = chunkwise_memory(
        *(time_slice(leaves, split, 37)[n] for n in args), middle, leaves["gamma"], leaves["beta"], rule
    )
    torch.testing.assert_close(torch.cat([first, second], 2), y, **TOL)
    torch.testing.assert_close(end.a1, final.a1, **TOL)
    torch.testing.assert_close(end.buffer_k, final.buffer_k, **TOL)
    assert end.buffer_len.tolist() == final.buffer_len.tolist()
    g_one = torch.autograd.grad(y.pow(2).sum(), list(leaves.values()))
    g_two = torch.autograd.grad(torch.cat([first, second], 2).pow(2).sum(), list(leaves.values()))
    for got, want in zip(g_two, g_one):
        torch.testing.assert_close(got, want, **TOL)


def test_detach_state_every_keeps_outputs_and_truncates_gradients():
    x = memory_inputs(length=32)
    args = ("q", "k", "v", "eta", "log_alpha")
    outputs = {}
    for every in (0, 16):
        rule = RuleConfig(chunk_size=8, detach_state_every=every)
        leaves = {n: x[n].clone().requires_grad_() for n in NAMES}
        y, _ = chunkwise_memory(
            *(leaves[n] for n in args), initial_state(leaves, 8), leaves["gamma"], leaves["beta"], rule
        )
        (grad_k,) = torch.autograd.grad(y[:, :, 16:].pow(2).sum(), [leaves["k"]])
        outputs[every] = (y.detach(), grad_k)
    torch.testing.assert_close(outputs[16][0], outputs[0][0], rtol=0, atol=0)
    assert outputs[0][1][:, :, :16].abs().max() > 1e-3  # full BPTT: late outputs depend on early keys
    assert torch.all(outputs[16][1][:, :, :16] == 0)  # truncated at token 16


@pytest.mark.parametrize("every", [0, 16])
def test_two_level_checkpointing_gives_the_same_outputs_and_gradients_and_keeps_fewer_states(every):
    x = memory_inputs(length=45, width=16)  # 6 chunks of 8, the last one partial
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[1, :5] = False  # a left-padded row
    args = ("q", "k", "v", "eta", "log_alpha")
    results = {}
    for group in (0, 4):
        rule = RuleConfig(chunk_size=8, detach_state_every=every, checkpoint_group=group)
        leaves = {n: x[n].clone().requires_grad_() for n in NAMES}
        state_bytes = []

        def pack(t, saved=state_bytes, shape=x["a1"].shape[-2:]):
            if t.dim() >= 4 and t.shape[-2:] == shape:  # (B, H, d_h, m) accumulators, one or stacked
                saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, state = chunkwise_memory(
                *(leaves[n] for n in args), initial_state(leaves, 8), leaves["gamma"], leaves["beta"], rule, mask
            )
        kept = sum(state_bytes)
        grads = torch.autograd.grad(y.pow(2).sum() + state.a1.sum(), list(leaves.values()))
        results[group] = (y.detach(), state.a1.detach(), grads, kept)
    for got, want in zip(results[4][:2] + results[4][2], results[0][:2] + results[0][2]):
        scale = want.abs().max().clamp_min(1.0)  # relative once a gradient exceeds 1 (some reach ~100)
        torch.testing.assert_close(got / scale, want / scale, **TOL)
    assert results[4][3] < results[0][3]  # fewer chunk-boundary states saved through the forward


def test_inner_loop_runs_in_fp32_under_bf16_autocast():
    x = memory_inputs(length=20, dtype=torch.float32)
    rule = RuleConfig(chunk_size=8)
    bf16 = {n: (t.to(torch.bfloat16) if n in ("q", "k", "v") else t) for n, t in x.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = chunkwise_memory(
            *(bf16[n] for n in ("q", "k", "v", "eta", "log_alpha")), initial_state(x, 8), x["gamma"], x["beta"], rule
        )
    assert y.dtype == torch.float32 and state.a1.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("update_input", [True, False])
def test_compiled_memory_equals_token_loop(update_input):
    """impl="compiled": the torch path's steps through torch.compile, float64, against the token-by-token loop;
    with a fixed input matrix too (its products with the shared A2 take another form outside a compile)."""
    rule = RuleConfig(chunk_size=8, update_input=update_input, lq_norm="inverse" if update_input else "scale_free")
    x = memory_inputs(length=19)  # two full chunks and an open one
    (y, final, running, grads), (y_ref, anchor_ref, run_ref, grads_ref) = run_both(x, rule, False, impl="compiled")
    assert "chunk_memory" in type(final.a1.grad_fn).__name__
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(final.a1, anchor_ref[0], **TOL)
    torch.testing.assert_close(running[1], run_ref[1], **TOL)
    for name, got, want in zip(NAMES, grads, grads_ref):
        scale = want.abs().max().clamp_min(1.0)
        torch.testing.assert_close(got / scale, want / scale, **TOL, msg=name)


def collapsed_head_step(lq_floor: float, lq_norm: str = "inverse"):
    """fp32 forward and backward of a head that has shut itself off, at the given normaliser floor.

    The fixture is layer 0, head 3 of a real training step (the passkey task at lr 1e-2, tokens 256-458 of
    one row, the accumulators at token 256 and the gradient that reached the reads): the head had learned
    alpha ~ 0.02 and eta ~ 1e-5, so its accumulators decay to ~1e-16 within a chunk. The normaliser
    1 / max(||A||_4, floor)^2 then sits at its cap, 1 / floor^2; at a floor of 1e-6 that is 1e12, the
    memory's pre-LayerNorm values reach ~1e19 and their squares overflow fp32, and the backward is NaN.
    """
    x = load_file(Path(__file__).parent.parent / "data" / "collapsed_memory_head.safetensors")
    leaves = {name: x[name].clone().requires_grad_(True) for name in NAMES}
    state = MemoryState.initial(leaves["a1"], leaves["a2"], 1, 64, False)
    inputs = [leaves[name] for name in ("q", "k", "v", "eta", "log_alpha")]
    rule = RuleConfig(lq_floor=lq_floor, lq_norm=lq_norm)
    y, _ = chunkwise_memory(*inputs, state, leaves["gamma"], leaves["beta"], rule)
    y.backward(x["dy"])
    return y, {name: t.grad for name, t in leaves.items()}


def test_the_default_floor_keeps_a_collapsed_head_finite_in_fp32():
    assert RuleConfig().lq_floor == MonetaConfig().lq_floor  # the op's default is the model's
    y, grads = collapsed_head_step(MonetaConfig().lq_floor)
    assert torch.isfinite(y).all()
    assert not [name for name, g in grads.items() if not torch.isfinite(g).all()]
    # The fixture still reaches the overflow: at the old floor the same step is not finite.
    _, old = collapsed_head_step(1e-6)
    assert [name for name, g in old.items() if not torch.isfinite(g).all()]


def test_the_scale_free_normaliser_reads_a_collapsed_head_finitely_in_fp32():
    """The scale-free normaliser does not grow as the accumulator decays: no floor is needed."""
    assert MonetaConfig().lq_norm == "scale_free"  # the model's default (the op's RuleConfig keeps the paper's)
    y, grads = collapsed_head_step(1e-6, "scale_free")
    assert torch.isfinite(y).all()
    assert not [name for name, g in grads.items() if not torch.isfinite(g).all()]


@pytest.mark.parametrize("lq_norm", ["inverse", "scale_free"])
def test_an_all_zero_accumulator_reads_and_trains_finitely(lq_norm):
    """A head whose accumulators underflowed to exactly 0 in fp32 (a head that forgets everything): W = 0, and
    the normaliser's forward and backward stay finite (no 0/0 in the norms' gradients)."""
    x = {name: t.float() for name, t in memory_inputs(length=20).items()}
    x["a1"][1], x["a2"][1] = 0.0, 0.0  # head 1 starts empty
    leaves = {name: t.clone().requires_grad_() for name, t in x.items()}
    rule = RuleConfig(chunk_size=8, lq_norm=lq_norm)
    per_token = (leaves[n] for n in ("q", "k", "v", "eta", "log_alpha"))
    y, state = chunkwise_memory(*per_token, initial_state(leaves, 8), leaves["gamma"], leaves["beta"], rule)
    assert "chunk_memory" in type(state.a1.grad_fn).__name__  # the hand-written backward ran
    grads = torch.autograd.grad((y * y).sum() + state.a1.sum() + state.a2.sum(), list(leaves.values()))
    assert torch.isfinite(y).all() and torch.isfinite(state.a1).all()
    assert not [name for name, g in zip(leaves, grads) if not torch.isfinite(g).all()]
    # the same through autograd on the rule's own normaliser
    empty = torch.zeros(2, 4, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(lq_scale(empty, rule).sum(), empty)
    assert torch.isfinite(lq_scale(empty, rule)).all() and torch.isfinite(grad).all()
