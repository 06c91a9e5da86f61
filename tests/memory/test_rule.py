import math

import pytest
import torch

from miras.memory.rule import (
    RuleConfig,
    abs_pow,
    anchor_gradients,
    decay_weights,
    gelu,
    layer_norm,
    lp_error_gradient,
    lq_scale,
)


def _memory_loss(w1, w2, k, v, gamma, beta, p, eps):
    u, _, _ = layer_norm(gelu(k @ w2.T) @ w1.T, gamma, beta, eps)
    return (k + u - v).abs().pow(p).sum()


@pytest.mark.parametrize("p", [2.0, 2.5, 3.0, 4.0])
def test_hand_written_inner_gradient_matches_autograd(p):
    g = torch.Generator().manual_seed(0)
    dh, m = 5, 20
    w1 = (0.3 * torch.randn(dh, m, generator=g, dtype=torch.float64)).requires_grad_()
    w2 = (0.3 * torch.randn(m, dh, generator=g, dtype=torch.float64)).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(1, dh, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(1, dh, generator=g, dtype=torch.float64)
    gamma = 1 + 0.1 * torch.randn(dh, generator=g, dtype=torch.float64)
    beta = 0.1 * torch.randn(dh, generator=g, dtype=torch.float64)
    rule = RuleConfig(p=p)
    expected1, expected2 = torch.autograd.grad(_memory_loss(w1, w2, k, v, gamma, beta, p, rule.ln_eps), (w1, w2))
    grads = anchor_gradients(k, v, w1.detach(), w2.detach(), gamma, beta, rule)
    torch.testing.assert_close(torch.outer(grads.gz[0], grads.act[0]), expected1, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.outer(grads.gh[0], k[0]), expected2, rtol=0, atol=1e-12)


def test_surrogate_approaches_exact_gradient_for_large_sharpness():
    err = torch.linspace(-2, 2, 41, dtype=torch.float64)
    exact = lp_error_gradient(err, RuleConfig(p=3.0))
    smooth = lp_error_gradient(err, RuleConfig(p=3.0, smooth_lp=True, sign_sharpness=1e4, abs_eps=1e-12))
    torch.testing.assert_close(smooth, exact, rtol=1e-4, atol=1e-6)


def test_surrogate_for_p_below_two_is_finite_and_differentiable_at_zero():
    err = torch.tensor([0.0, 1e-9, -1e-9, 0.5], dtype=torch.float64, requires_grad=True)
    rule = RuleConfig(p=1.0)
    assert rule.uses_surrogate
    out = lp_error_gradient(err, rule)
    (grad,) = torch.autograd.grad(out.sum(), err)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert grad[0] > 0  # sign's surrogate has a useful derivative at 0, unlike torch.sign


def test_lq_normaliser_inverts_scale_for_q4_and_respects_the_floor():
    acc = torch.randn(3, 4, 8, dtype=torch.float64)
    w = lq_scale(acc, RuleConfig(q=4.0, lq_norm="inverse")) * acc
    norm_a = acc.abs().pow(4).sum((-2, -1)).pow(0.25)
    norm_w = w.abs().pow(4).sum((-2, -1)).pow(0.25)
    torch.testing.assert_close(norm_w, 1 / norm_a)
    tiny = 1e-9 * acc
    assert torch.all(lq_scale(tiny, RuleConfig(q=4.0, lq_floor=1.0, lq_norm="inverse")) == 1.0)
    assert torch.all(lq_scale(acc, RuleConfig(q=2.0)) == 1.0)


@pytest.mark.parametrize("magnitude", [1e-12, 1e10])
def test_lq_normaliser_and_its_gradient_stay_finite_for_tiny_and_huge_accumulators(magnitude):
    # In fp32, sum |A|^4 underflows to 0 for entries below ~1e-10 (overflows above ~1e9), and the
    # backward of x^(1/4) at 0 is inf: a training run turned NaN exactly there.
    rule = RuleConfig(q=4.0, lq_norm="inverse")
    acc = (magnitude * torch.randn(2, 6, 24)).requires_grad_()
    scale = lq_scale(acc, rule)
    (grad,) = torch.autograd.grad(scale.sum(), acc)
    assert torch.isfinite(scale).all() and torch.isfinite(grad).all()
    ref_acc = acc.detach().double().requires_grad_()
    norm = ref_acc.abs().pow(4).sum((-2, -1), keepdim=True).pow(0.25).clamp_min(rule.lq_floor)
    (ref_grad,) = torch.autograd.grad(norm.pow(-2.0).sum(), ref_acc)
    torch.testing.assert_close(scale.double(), norm.pow(-2.0).detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-37)


def test_lq_normaliser_matches_the_plain_formula_in_the_normal_range():
    acc = torch.randn(3, 8, 32, dtype=torch.float64)
    plain = acc.abs().pow(4).sum((-2, -1), keepdim=True).pow(0.25).clamp_min(1e-6).pow(-2.0)
    # Equal to rounding: the power-of-two scaling is exact, |A|^4 is taken as (A^2)^2 instead of pow.
    torch.testing.assert_close(lq_scale(acc, RuleConfig(q=4.0, lq_norm="inverse")), plain, rtol=1e-14, atol=0)


def scale_free_formula(acc: torch.Tensor, q: float) -> torch.Tensor:
    """(||A||_2 / ||A||_q)^(q-2), written plainly (float64)."""
    l2 = acc.pow(2).sum((-2, -1), keepdim=True).sqrt()
    lq = acc.abs().pow(q).sum((-2, -1), keepdim=True).pow(1.0 / q)
    return (l2 / lq).pow(q - 2.0)


@pytest.mark.parametrize("q", [4.0, 4.5])
def test_scale_free_normaliser_keeps_the_memory_one_homogeneous_in_the_accumulator(q):
    rule = RuleConfig(q=q, lq_norm="scale_free")
    acc = torch.randn(3, 8, 32, dtype=torch.float64).requires_grad_()
    scale = lq_scale(acc, rule)
    torch.testing.assert_close(scale, scale_free_formula(acc.detach(), q), rtol=1e-13, atol=0)
    # W = s(A) A: scaling A scales W by the same factor (the "inverse" normaliser scales W by c^(3-q)).
    for factor in (1e-6, 0.3, 1e5):
        torch.testing.assert_close(lq_scale(factor * acc, rule), scale, rtol=1e-13, atol=0)
    # From 1 on a one-hot A to n^((1/2 - 1/q)(q - 2)) on a flat |A|, smaller the peakier A is.
    flat = torch.ones(8, 32, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(16)
    assert lq_scale(flat, rule).item() == pytest.approx(256 ** ((0.5 - 1 / q) * (q - 2)), rel=1e-13)
    one_hot = torch.zeros(8, 32, dtype=torch.float64)
    one_hot[3, 5] = -7.0
    assert lq_scale(one_hot, rule).item() == pytest.approx(1.0, rel=1e-14)
    assert ((scale > 1) & (scale < lq_scale(flat, rule))).all()
    peaky = acc.detach().clone()
    peaky[..., 0, 0] = 100.0
    assert (lq_scale(peaky, rule) < scale).all()
    # Its gradient against autograd through the plain formula.
    (grad,) = torch.autograd.grad((scale * torch.arange(1.0, 4.0, dtype=torch.float64)[:, None, None]).sum(), acc)
    ref_acc = acc.detach().requires_grad_()
    ref = scale_free_formula(ref_acc, q)
    (ref_grad,) = torch.autograd.grad((ref * torch.arange(1.0, 4.0, dtype=torch.float64)[:, None, None]).sum(), ref_acc)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("magnitude", [1e-30, 1e-12, 1e10, 1e30])
def test_scale_free_normaliser_is_the_same_at_any_magnitude_in_fp32(magnitude):
    rule = RuleConfig(q=4.0, lq_norm="scale_free")
    base = torch.randn(2, 6, 24)
    acc = (magnitude * base).requires_grad_()
    scale = lq_scale(acc, rule)
    (grad,) = torch.autograd.grad(scale.sum(), acc)
    assert torch.isfinite(scale).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(scale.double(), scale_free_formula(base.double(), 4.0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("channelwise", [False, True])
def test_decay_weights_stay_finite_for_extreme_decays(channelwise):
    b = 16
    shape = (2, b, 3) if channelwise else (2, b)
    log_alpha = torch.full(shape, -500.0, dtype=torch.float64)
    cumulative = log_alpha.cumsum(1)
    eta = torch.ones(shape, dtype=torch.float64)
    causal = torch.ones(b, b, dtype=torch.bool).tril()
    weights = decay_weights(cumulative, cumulative, eta, causal, channelwise)
    assert torch.isfinite(weights).all()
    diag = weights.diagonal(dim1=1, dim2=2)
    assert torch.all(diag == 1.0)  # D[t, t] = eta_t
    upper = ~causal
    assert torch.all((weights[:, upper] if not channelwise else weights[:, upper, :]) == 0)
    assert math.isclose(float(weights[0, 1, 0] if not channelwise else weights[0, 1, 0, 0]), 0.0, abs_tol=1e-200)


@pytest.mark.parametrize("exponent", [2.0, 3.0, 4.0, 4.5, 1.0])
def test_abs_pow_equals_the_generic_power_with_its_gradient(exponent):
    x = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    fast = abs_pow(x, exponent)
    plain = x.abs().pow(exponent)
    torch.testing.assert_close(fast, plain, rtol=1e-14, atol=0)
    (g_fast,) = torch.autograd.grad(fast.sum(), x)
    (g_plain,) = torch.autograd.grad(plain.sum(), x)
    torch.testing.assert_close(g_fast, g_plain, rtol=1e-13, atol=0)
