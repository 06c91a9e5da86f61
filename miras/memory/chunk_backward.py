"""One chunk step with a hand-written backward: the training path's outer gradient without autograd inside.

`chunk_step` under activation checkpointing pays for autograd twice per chunk: the recompute
records a graph of ~150 small ops, and the backward replays it through generic derivative
formulas (each scalar multiply, LayerNorm statistic and GELU'' its own pass over a (b, m) tensor).
`ChunkStep` keeps the same contract (only the chunk's inputs are saved; the backward recomputes
the chunk) but its backward is the chain rule written out once, sharing intermediates and
accumulating matmul products in place (baddbmm).

Forward, per head, with s = l_q normalisers frozen at the anchor (A1, A2), D[t, j] the decay
weights and Q_t = exp(c_t) the query decays (rule.py has the same formulas with autograd):

    anchor:  h = s2 k A2^T   act = gelu(h)   z = s1 act A1^T   u = LN(z)   e = k + u - v
             g = gamma f(e)  gz = LN'(g)     gh = gelu'(h) * (s1 gz A1)       (f = d l_p / d e)
    read:    hq = s2 (Q q A2^T - (D * q k^T) gh)   aq = gelu(hq)
             zq = s1 (Q aq A1^T - (D * aq act^T) gz)   y = q + LN(zq)
    commit:  A2' = Q_b A2 - gh^T (k * D[b])   A1' = Q_b A1 - (gz * D[b])^T act

Supports per-head gates without the inner gradient clamp (the defaults); chunkwise.py falls back
to autograd for channel-wise gates and `inner_grad_clamp`. Tests compare both against each other
and against the token-by-token reference in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .rule import RuleConfig, abs_pow, add_matmul, chunk_step, decay_matrix, lp_error_gradient

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# What ChunkStep runs: eager by default, torch.compile'd ones after compile_functions().
_IMPLEMENTATION = {}


def compile_functions(enabled: bool = True) -> None:
    """Run ChunkStep's forward and backward through torch.compile (fuses their elementwise passes)."""
    if enabled:
        _IMPLEMENTATION["forward"] = torch.compile(chunk_step, dynamic=False)
        _IMPLEMENTATION["backward"] = torch.compile(_chunk_backward, dynamic=False)
    else:
        _IMPLEMENTATION.clear()


def supports(rule: RuleConfig, channelwise: bool) -> bool:
    """Whether ChunkStep covers this rule (otherwise the caller checkpoints chunk_step)."""
    return not channelwise and rule.inner_grad_clamp is None


class ChunkStep(torch.autograd.Function):
    """chunk_step(a1, a2, q, k, v, eta, log_alpha, gamma, beta, full, causal, rule) with a hand-written backward."""

    @staticmethod
    def forward(ctx, a1, a2, q, k, v, eta, log_alpha, gamma, beta, full, causal, rule):
        ctx.save_for_backward(a1, a2, q, k, v, eta, log_alpha, gamma, beta)
        ctx.full, ctx.causal, ctx.rule = full, causal, rule
        forward = _IMPLEMENTATION.get("forward", chunk_step)
        return forward(a1, a2, q, k, v, eta, log_alpha, gamma, beta, full, causal, rule)

    @staticmethod
    def backward(ctx, dy, da1_out, da2_out):
        a1, a2, q, k, v, eta, log_alpha, gamma, beta = ctx.saved_tensors
        backward = _IMPLEMENTATION.get("backward", _chunk_backward)
        grads = backward(a1, a2, q, k, v, eta, log_alpha, gamma, beta, ctx.full, ctx.causal, ctx.rule,
                         dy, da1_out, da2_out)  # fmt: skip
        return (*grads, None, None, None)


def _lq_scale_and_direction(acc: torch.Tensor, rule: RuleConfig):
    """s = max(||A||_q, floor)^-(q-2) and ds/dA as a function of the incoming ds (None for q = 2).

    Scaled by a power of two like rule.lq_scale, so |A|^q neither underflows nor overflows in fp32.
    """
    if rule.q == 2:
        return torch.ones_like(acc[..., :1, :1]), None
    peak = acc.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(acc.dtype).tiny)
    peak = torch.exp2(torch.floor(torch.log2(peak)))
    scaled = acc / peak
    scaled_norm = abs_pow(scaled, rule.q).sum(dim=(-2, -1), keepdim=True).pow(1.0 / rule.q)
    norm = peak * scaled_norm
    clamped = norm.clamp_min(rule.lq_floor)
    scale = clamped.pow(-(rule.q - 2.0))

    def backward(d_scale: torch.Tensor) -> torch.Tensor:
        # ds/dN = -(q-2) N^-(q-1) above the floor, 0 below; dN/dA = sign(A)|A|^(q-1) / N^(q-1).
        d_norm = d_scale * (-(rule.q - 2.0)) * scale / clamped * (norm >= rule.lq_floor)
        direction = scaled * abs_pow(scaled, rule.q - 2.0) if rule.q != 3 else scaled * scaled.abs()
        return (d_norm / scaled_norm.pow(rule.q - 1.0)) * direction

    return scale, backward


def _lp_error_derivative(err: torch.Tensor, rule: RuleConfig) -> torch.Tensor:
    """d f(e) / de for f = lp_error_gradient, elementwise."""
    p = rule.p
    if rule.uses_surrogate:
        a, eps = rule.sign_sharpness, rule.abs_eps
        base = err * err + eps
        tanh = torch.tanh(a * err)
        d_sign = a * (1.0 - tanh * tanh) * base.pow(0.5 * (p - 1.0))
        return p * (d_sign + tanh * (p - 1.0) * err * base.pow(0.5 * (p - 3.0)))
    if p == 2:
        return torch.full_like(err, 2.0)
    if p == 3:
        return 6.0 * err.abs()
    return p * (p - 1.0) * err.abs().pow(p - 2.0)


def _layer_norm_stats(z: torch.Tensor, eps: float):
    centred = z - z.mean(dim=-1, keepdim=True)
    std = ((centred * centred).mean(dim=-1, keepdim=True) + eps).sqrt()
    return centred / std, std


def _layer_norm_input_grad(d_hat: torch.Tensor, z_hat: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Gradient through z_hat = (z - mean) / std(z) given d z_hat (self-adjoint: also the map g -> gz)."""
    return (d_hat - d_hat.mean(dim=-1, keepdim=True) - z_hat * (d_hat * z_hat).mean(dim=-1, keepdim=True)) / std


def _gated_scores_backward(d_gated, weights, scale, scores, d_weights, d_scale):
    """Through gated = D * -s * S (the read's (b, b) matrices): updated dD and ds, and dS."""
    d_weighted = d_gated * weights
    d_weights = d_weights + d_gated * -scale * scores
    d_scale = d_scale - (d_weighted * scores).sum(dim=(-2, -1), keepdim=True)
    return d_weights, d_scale, d_weighted * -scale


def _decay_and_scale_backward(d_out, x, scale, query_decay, d_query_decay, d_scale):
    """Through out = x * (Q_t * s) (rows scaled by query decay and l_q scalar): updated dQ and ds."""
    row = (d_out * x).sum(-1)
    d_query_decay = d_query_decay + row * scale[..., 0]
    d_scale = d_scale + (row * query_decay).sum(-1)[..., None, None]
    return d_query_decay, d_scale


def _bt(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _chunk_backward(a1, a2, q, k, v, eta, log_alpha, gamma, beta, full, causal, rule, dy, da1_out, da2_out):
    # ---- recompute the forward's intermediates (no graph) ----
    s1, s1_backward = _lq_scale_and_direction(a1, rule)
    s2, s2_backward = _lq_scale_and_direction(a2, rule)
    cumulative = log_alpha.cumsum(dim=-1)
    decay = decay_matrix(cumulative, cumulative, causal, channelwise=False)  # E[t, j]; D = E * eta_j
    weights = decay * eta.unsqueeze(-2)
    query_decay = cumulative.exp()
    qd = query_decay.unsqueeze(-1)

    ks = k * s2
    h = ks @ _bt(a2)
    act = F.gelu(h)
    z_raw = act @ _bt(a1)
    z_hat, std = _layer_norm_stats(z_raw * s1, rule.ln_eps)
    err = k + gamma * z_hat + beta - v
    f_err = lp_error_gradient(err, rule)
    g = gamma * f_err
    gz = _layer_norm_input_grad(g, z_hat, std)
    gzs = gz * s1
    gz_w = gzs @ a1
    gh = torch.ops.aten.gelu_backward(gz_w, h)

    scores = q @ _bt(k)
    qs = q * (qd * s2)
    p_neg = weights * -s2 * scores
    hq = add_matmul(qs @ _bt(a2), p_neg, gh)
    aq = F.gelu(hq)
    s_aa = aq @ _bt(act)
    a_q = aq @ _bt(a1)
    r_neg = weights * -s1 * s_aa
    zq = add_matmul(a_q * (qd * s1), r_neg, gz)
    zq_hat, std_q = _layer_norm_stats(zq, rule.ln_eps)

    # ---- commit: A' = Q_b A - grad^T (x * D[b]) ----
    last_w = weights[..., -1, :]
    total_decay = query_decay[..., -1][..., None, None]
    da1_keep, da2_keep = da1_out, da2_out
    if full is not None:
        keep = full[:, None, None, None]
        da1_keep, da2_keep = da1_out * keep, da2_out * keep
    da1 = da1_keep * total_decay
    da2 = da2_keep * total_decay
    if full is not None:  # rows that kept their anchor pass the gradient straight through
        da1 = da1 + da1_out * ~keep
        da2 = da2 + da2_out * ~keep
    d_total = (da1_keep * a1).sum(dim=(-2, -1)) + (da2_keep * a2).sum(dim=(-2, -1))
    minus_w = -last_w.unsqueeze(-1)
    k_w = k * minus_w
    gz_wt = gz * minus_w
    d_gh = k_w @ da2_keep.transpose(-1, -2)  # (b, m)
    d_kw = gh @ da2_keep  # (b, d)
    d_gzw = act @ _bt(da1_keep)  # (b, d)
    d_act = gz_wt @ da1_keep  # (b, m)
    dk = d_kw * minus_w
    d_gz = d_gzw * minus_w
    d_last_w = -((d_kw * k).sum(-1) + (d_gzw * gz).sum(-1))

    # ---- read: y = q + LN(zq) ----
    dq = dy.clone()  # autograd materialises unused output gradients as zeros, so none is None
    d_gamma = torch.zeros_like(gamma)
    d_beta = torch.zeros_like(beta)
    d_s1 = torch.zeros_like(s1)
    d_s2 = torch.zeros_like(s2)
    d_qd = torch.zeros_like(query_decay)
    d_weights = torch.zeros_like(weights)
    d_gamma = d_gamma + (dy * zq_hat).sum(dim=(0, 2), keepdim=True)
    d_beta = d_beta + dy.sum(dim=(0, 2), keepdim=True)
    d_zq = _layer_norm_input_grad(gamma * dy, zq_hat, std_q)
    d_aq_out = d_zq * (qd * s1)  # d a_q
    d_qd, d_s1 = _decay_and_scale_backward(d_zq, a_q, s1, query_decay, d_qd, d_s1)
    d_r = d_zq @ _bt(gz)  # (b, b)
    d_gz = add_matmul(d_gz, _bt(r_neg), d_zq)
    d_weights, d_s1, d_saa = _gated_scores_backward(d_r, weights, s1, s_aa, d_weights, d_s1)
    d_aq = add_matmul(d_aq_out @ a1, d_saa, act)
    da1 = add_matmul(da1, _bt(d_aq_out), aq)
    d_act = add_matmul(d_act, _bt(d_saa), aq)
    d_hq = torch.ops.aten.gelu_backward(d_aq, hq)
    d_p = d_hq @ _bt(gh)  # (b, b)
    d_gh = add_matmul(d_gh, _bt(p_neg), d_hq)
    d_weights, d_s2, d_scores = _gated_scores_backward(d_p, weights, s2, scores, d_weights, d_s2)
    d_qs = d_hq @ a2
    da2 = add_matmul(da2, _bt(d_hq), qs)
    dq = dq + d_qs * (qd * s2)
    d_qd, d_s2 = _decay_and_scale_backward(d_qs, q, s2, query_decay, d_qd, d_s2)
    dq = add_matmul(dq, d_scores, k)
    dk = add_matmul(dk, _bt(d_scores), q)

    # ---- anchor: the inner backward, differentiated ----
    d_gzw_full = torch.ops.aten.gelu_backward(d_gh, h)  # d (s1 gz A1)
    # gelu''(h) = phi(h) (2 - h^2); h^2 is capped at 170 so that exp stays out of its slow subnormal
    # path (see decay_matrix): beyond it the term is below 1e-35.
    h_sq = h * h
    phi = torch.exp(h_sq.clamp_max(170.0) * -0.5) * _INV_SQRT_2PI
    d_h = d_gh * gz_w * phi * (2.0 - h_sq)
    d_gzs = d_gzw_full @ _bt(a1)
    da1 = add_matmul(da1, _bt(gzs), d_gzw_full)
    d_gz = d_gz + d_gzs * s1
    d_s1 = d_s1 + (d_gzs * gz).sum(dim=(-2, -1), keepdim=True)
    # gz = (g - mean g - z_hat mean(g z_hat)) / std, a function of g, z_hat and std
    r = d_gz / std
    d_g = _layer_norm_input_grad(d_gz, z_hat, std)
    d_zhat = -(g * z_hat).mean(dim=-1, keepdim=True) * r - (r * z_hat).mean(dim=-1, keepdim=True) * g
    d_std = -(d_gz * gz).sum(dim=-1, keepdim=True) / std
    d_gamma = d_gamma + (d_g * f_err).sum(dim=(0, 2), keepdim=True)
    d_err = gamma * d_g * _lp_error_derivative(err, rule)
    dk = dk + d_err
    dv = -d_err
    d_gamma = d_gamma + (d_err * z_hat).sum(dim=(0, 2), keepdim=True)
    d_beta = d_beta + d_err.sum(dim=(0, 2), keepdim=True)
    d_zhat = d_zhat + gamma * d_err
    d_z = _layer_norm_input_grad(d_zhat, z_hat, std) + d_std * z_hat / z_hat.shape[-1]
    d_s1 = d_s1 + (d_z * z_raw).sum(dim=(-2, -1), keepdim=True)
    d_zr = d_z * s1
    d_act = add_matmul(d_act, d_zr, a1)
    da1 = add_matmul(da1, _bt(d_zr), act)
    d_h = d_h + torch.ops.aten.gelu_backward(d_act, h)
    d_ks = d_h @ a2
    da2 = add_matmul(da2, _bt(d_h), ks)
    dk = dk + d_ks * s2
    d_s2 = d_s2 + (d_ks * k).sum(dim=(-2, -1), keepdim=True)

    # ---- the l_q normalisers ----
    if s1_backward is not None:
        da1 = da1 + s1_backward(d_s1)
        da2 = da2 + s2_backward(d_s2)

    # ---- decays: D[t, j] = exp(c_t - c_j) eta_j, Q_t = exp(c_t), c = cumsum(log_alpha) ----
    d_weights[..., -1, :] += d_last_w
    d_qd[..., -1] += d_total
    d_eta = (d_weights * decay).sum(dim=-2)
    weighted = d_weights * weights
    d_cum = d_qd * query_decay + weighted.sum(dim=-1) - weighted.sum(dim=-2)
    d_log_alpha = d_cum.flip(-1).cumsum(-1).flip(-1)
    return da1, da2, dq, dk, dv, d_eta, d_log_alpha, d_gamma, d_beta
