"""MONETA's memory rule: the pieces shared by the chunkwise, one-token and reference paths.

Per head the memory is a 2-layer MLP  M(x) = x + LN(W1 · gelu(W2 · x))  with
W1 (d_h x m) and W2 (m x d_h), m = expansion * d_h. Its weights are never stored directly:
MONETA keeps accumulators A1, A2 and reads W = A / max(||A||_q, floor)^(q-2)  (docs/model.md, "The memory rule").

Chunk semantics (docs/model.md, "Chunks: the dual form"): every token of a chunk takes its inner gradient at the
anchor (the weights at the chunk start), the accumulators decay by alpha and step by -eta * grad,
and the l_q normaliser is frozen inside the chunk and recomputed at the chunk end.

Everything here is plain tensor math on (..., tokens, features) tensors. Gates come either
per head, shape (..., b), or channel-wise over the d_h axis, shape (..., b, d_h): a channel-wise
gate scales the d_h-axis of both matrices (the rows of A1, which are outputs, and the columns of
A2, which are inputs), so both reads stay cheap b x b contractions (the axis is our choice, the
paper does not say).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RuleConfig:
    """The fixed hyperparameters of the inner rule (outer parameters travel separately)."""

    p: float = 3.0  # l_p attentional bias
    q: float = 4.0  # l_q retention
    chunk_size: int = 64
    lq_floor: float = 0.01  # floor tau on ||A||_q before the power (configuration.py says why 0.01)
    lq_norm: str = "inverse"  # the paper's W = A / ||A||_q^(q-2), or "scale_free": see lq_scale
    ln_eps: float = 1e-5  # LayerNorm inside the memory
    smooth_lp: bool | None = None  # None: exact gradient for p >= 2, smooth surrogate for p < 2
    sign_sharpness: float = 10.0  # sign(e) ~ tanh(a e) in the surrogate
    abs_eps: float = 1e-6  # |e| ~ sqrt(e^2 + eps) in the surrogate
    inner_grad_clamp: float | None = None  # soft clamp on each token's error-gradient norm
    detach_state_every: int = 0  # tokens; truncated BPTT inside the op (0 = never)
    checkpoint_group: int = 0  # chunks per outer checkpoint (two-level recompute); 0 or 1 = per chunk only
    # False: the inner loop writes the output matrix only; the input matrix W2 = s(A2) A2 keeps its initial
    # value, a feature map of the keys learned by the outer loop (configuration.py, memory_update_input).
    update_input: bool = True

    @property
    def uses_surrogate(self) -> bool:
        return self.p < 2 if self.smooth_lp is None else self.smooth_lp


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


LQ_NORMS = ("inverse", "scale_free")


def lq_scale(acc: torch.Tensor, rule: RuleConfig) -> torch.Tensor:
    """The l_q normaliser s per matrix (the last two dims), shape (..., 1, 1); the memory reads W = s A.

    "inverse" (the paper's Eq. 24-25): s = 1 / max(||A||_q, floor)^(q-2). For q > 3 it inverts scale,
    ||W||_q = ||A||_q^(3-q): a commit that grows the accumulator shrinks the memory.
    "scale_free": s = (||A||_2 / ||A||_q)^(q-2): a function of A's shape only, from 1 on a one-hot A to
    n^((1/2 - 1/q)(q-2)) on a flat |A| of n entries (sqrt(n) at q = 4; sqrt(n / 3) on a Gaussian A), so W is
    1-homogeneous in A as with q = 2, a peaky accumulator is read smaller than a spread one, and no floor
    is needed. It binds across chunk commits where "inverse" does not, and costs the language model
    (docs/model.md, "The memory rule"; bench/RESULTS.md, "Memory across chunk commits").
    """
    if rule.q == 2:
        return torch.ones_like(acc[..., :1, :1])
    # ||A||_q = m * ||A / m||_q with m = max|A|: sum |A|^q in fp32 underflows to 0 once the entries
    # fall below ~1e-10 (and overflows above ~1e9), and the backward of x^(1/q) at 0 is inf, which
    # times the floor's zero gradient made NaN (seen in training). Scaled, the sum is
    # >= 1, so neither happens. The norm is 1-homogeneous, so holding m constant (detached) leaves
    # both the value and the gradient exact; m is rounded to a power of two so that the scaling itself
    # is exact and in the normal range the result is the unscaled formula's up to rounding.
    peak = acc.detach().abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(acc.dtype).tiny)
    peak = torch.exp2(torch.floor(torch.log2(peak)))
    # The largest |A / peak| is in [1, 2), so both power sums are >= 1 and clamping them at 1 changes nothing,
    # except for an all-zero A (a head whose accumulators underflowed): finite gradients instead of 0/0 or 0 * inf.
    scaled = acc / peak
    scaled_norm = abs_pow(scaled, rule.q).sum(dim=(-2, -1), keepdim=True).clamp_min(1.0).pow(1.0 / rule.q)
    if rule.lq_norm == "scale_free":
        scaled_l2 = (scaled * scaled).sum(dim=(-2, -1), keepdim=True).clamp_min(1.0).sqrt()
        return (scaled_l2 / scaled_norm).pow(rule.q - 2.0)
    return (peak * scaled_norm).clamp_min(rule.lq_floor).pow(-(rule.q - 2.0))


def abs_pow(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """|x|^exponent, by repeated multiplication for the small integer exponents.

    ATen's generic pow costs ~8x a multiply on the CPU (1.4 ms against 0.18 ms for |A|^4 of a
    (16, 256, 64) accumulator, and its backward is another generic pow); the l_q norm takes it
    twice per chunk, so this was ~20% of the chunk step (bench/RESULTS.md, speed).
    """
    if exponent == 2:
        return x * x
    if exponent == 3:
        return x * x * x.abs()
    if exponent == 4:
        square = x * x
        return square * square
    return x.abs().pow(exponent)


def lp_error_gradient(err: torch.Tensor, rule: RuleConfig) -> torch.Tensor:
    """d/de sum_i |e_i|^p.

    p >= 2: exact p * sign(e) * |e|^(p-1) (C^1; sign has zero derivative, which is correct here).
    p < 2 or smooth_lp: p * tanh(a e) * (e^2 + eps)^((p-1)/2), the paper's Remark 5 surrogate.
    """
    p = rule.p
    if rule.uses_surrogate:
        return p * torch.tanh(rule.sign_sharpness * err) * (err * err + rule.abs_eps).pow(0.5 * (p - 1.0))
    if p == 2:
        return 2.0 * err
    if p == 3:
        return 3.0 * err * err.abs()
    return p * torch.sign(err) * err.abs().pow(p - 1.0)


def soft_clamp_rows(grad: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Scale each row to norm limit * tanh(norm / limit): identity for small rows, bounded for large."""
    if limit is None:
        return grad
    norm = grad.norm(dim=-1, keepdim=True)
    factor = limit * torch.tanh(norm / limit) / norm.clamp_min(1e-12)
    return grad * torch.where(norm > 1e-12, factor, torch.ones_like(factor))


def layer_norm(z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float):
    """LayerNorm over the last dim with per-head affine (gamma, beta broadcast as (..., 1, d_h))."""
    mean = z.mean(dim=-1, keepdim=True)
    centred = z - mean
    std = (centred.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()
    z_hat = centred / std
    return gamma * z_hat + beta, z_hat, std


@dataclass
class AnchorGradients:
    """Per-token inner gradients at the anchor weights: grad W1_t = gz_t (x) act_t, grad W2_t = gh_t (x) k_t."""

    act: torch.Tensor  # gelu(W2 k), (..., b, m)
    gz: torch.Tensor  # error vector of W1's output, (..., b, d_h)
    gh: torch.Tensor  # error vector of W2's output, (..., b, m)


def anchor_gradients(k, v, w1, w2, gamma, beta, rule: RuleConfig, scale1=None, scale2=None) -> AnchorGradients:
    """The hand-written inner backward of l_p(M(k; W), v), batched over tokens (docs/model.md, "The memory rule").

    w1, w2: the weights; or the accumulators with their l_q normalisers passed as scale1, scale2,
    which is cheaper: the scalar then multiplies (b, d_h) tensors instead of a (d_h, m) matrix.
    """
    h = (k if scale2 is None else k * scale2) @ w2.transpose(-1, -2)
    act = gelu(h)
    z = act @ w1.transpose(-1, -2)
    if scale1 is not None:
        z = z * scale1
    u, z_hat, std = layer_norm(z, gamma, beta, rule.ln_eps)
    err = k + u - v
    ge = soft_clamp_rows(lp_error_gradient(err, rule), rule.inner_grad_clamp)
    g = gamma * ge
    gz = (g - g.mean(dim=-1, keepdim=True) - z_hat * (g * z_hat).mean(dim=-1, keepdim=True)) / std
    # gelu'(h) * (gz W1) in ATen's fused kernel, which autograd differentiates again (gelu_double_backward):
    # 7x faster on the CPU than spelling out Phi(h) + h phi(h) elementwise (bench/RESULTS.md, profile).
    gh = torch.ops.aten.gelu_backward((gz if scale1 is None else gz * scale1) @ w1, h)
    return AnchorGradients(act=act, gz=gz, gh=gh)


def decay_weights(cum_q: torch.Tensor, cum_k: torch.Tensor, eta: torch.Tensor, causal: torch.Tensor, channelwise: bool):
    """D[t, j] = exp(c_t - c_j) * eta_j where causal[t, j], else 0, from log-space cumulative decays.

    Per head: cum_q (..., t), cum_k and eta (..., j) -> (..., t, j).
    Channel-wise: cum_q (..., t, d_h), cum_k and eta (..., j, d_h) -> (..., t, j, d_h).
    """
    return decay_matrix(cum_q, cum_k, causal, channelwise) * eta.unsqueeze(-3 if channelwise else -2)


def decay_matrix(cum_q: torch.Tensor, cum_k: torch.Tensor, causal: torch.Tensor, channelwise: bool) -> torch.Tensor:
    """exp(c_t - c_j) where causal[t, j], else 0 (decay_weights without eta).

    The mask is applied before exp, so a large positive exponent above the diagonal never appears.
    Exponents are floored at 0.9 log(tiny): exp of -inf or of anything near or below the subnormal
    range takes the CPU's slow scalar path (measured 2-30 ms against ~0.1 ms for 262k elements), and
    the floor only moves values below ~1e-34 (fp32; ~1e-277 in fp64) up to that bound.
    """
    if channelwise:
        diff = cum_q.unsqueeze(-2) - cum_k.unsqueeze(-3)
        upper = ~causal.unsqueeze(-1)
    else:
        diff = cum_q.unsqueeze(-1) - cum_k.unsqueeze(-2)
        upper = ~causal
    floor = 0.9 * math.log(torch.finfo(diff.dtype).tiny)
    return torch.exp(diff.masked_fill(upper, floor).clamp_min(floor)).masked_fill(upper, 0.0)


def dual_form_read(
    queries: torch.Tensor,
    anchor_a1: torch.Tensor,
    anchor_a2: torch.Tensor,
    scale1: torch.Tensor,
    scale2: torch.Tensor,
    keys: torch.Tensor,
    grads: AnchorGradients,
    weights: torch.Tensor,
    query_decay: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    rule: RuleConfig,
) -> torch.Tensor:
    """Read M(q_t; W_t) for each query without materialising per-token weights (docs/model.md, "Chunks: the dual form").

    W_t = s * (decay_t * A_anchor - sum_{j<=t} D[t,j] * grad_j), s frozen at the anchor.
    weights: D, (..., t, j) per head or (..., t, j, d_h) channel-wise. query_decay: exp(c_t),
    (..., t) or (..., t, d_h).
    """
    channelwise = weights.dim() == queries.dim() + 1
    if channelwise:
        # A2 is gated on its input (d_h) axis: the decay scales q, D enters the q.k contraction.
        if rule.update_input:
            qk = torch.einsum("...tc,...jc,...tjc->...tj", queries, keys, weights)
            h = scale2 * ((queries * query_decay) @ anchor_a2.transpose(-1, -2) - qk @ grads.gh)
        else:  # the input matrix neither decays nor takes writes
            h = scale2 * (queries @ anchor_a2.transpose(-1, -2))
        act_q = gelu(h)
        # A1 is gated on its output (d_h) axis: each output channel has its own decay.
        aa = act_q @ grads.act.transpose(-1, -2)
        z = scale1 * (
            query_decay * (act_q @ anchor_a1.transpose(-1, -2))
            - torch.einsum("...tj,...tjc,...jc->...tc", aa, weights, grads.gz)
        )
    else:
        # The scalars and the minus sign go onto the smallest operand ((b, d_h) or (b, b), not
        # (b, m)), and the sum rides in the matmul (baddbmm): fewer full passes over (b, m) tensors.
        decay = query_decay.unsqueeze(-1)
        if rule.update_input:
            h = add_matmul(
                (queries * (decay * scale2)) @ anchor_a2.transpose(-1, -2),
                weights * -scale2 * (queries @ keys.transpose(-1, -2)),
                grads.gh,
            )
        else:  # the input matrix neither decays nor takes writes
            h = (queries * scale2) @ anchor_a2.transpose(-1, -2)
        act_q = gelu(h)
        z = add_matmul(
            (act_q @ anchor_a1.transpose(-1, -2)) * (decay * scale1),
            weights * -scale1 * (act_q @ grads.act.transpose(-1, -2)),
            grads.gz,
        )
    u, _, _ = layer_norm(z, gamma, beta, rule.ln_eps)
    return queries + u


def committed_accumulators(
    anchor_a1, anchor_a2, keys, grads: AnchorGradients, last_weights, total_decay, update_input: bool = True
):
    """Accumulators at the chunk end: A = decay_b * A_anchor - sum_j D[b, j] * grad_j (A2 unchanged
    when not update_input).

    last_weights: D[b, :], (..., j) or (..., j, d_h); total_decay: exp(c_b), (...) or (..., d_h).
    """
    a2 = anchor_a2
    if last_weights.dim() == keys.dim():  # channel-wise over d_h
        if update_input:
            a2 = anchor_a2 * total_decay.unsqueeze(-2) - grads.gh.transpose(-1, -2) @ (keys * last_weights)
        a1 = anchor_a1 * total_decay.unsqueeze(-1) - (grads.gz * last_weights).transpose(-1, -2) @ grads.act
    else:
        decay = total_decay[..., None, None]
        minus_w = -last_weights.unsqueeze(-1)
        if update_input:
            a2 = add_matmul(decay * anchor_a2, grads.gh.transpose(-1, -2), keys * minus_w)
        a1 = add_matmul(decay * anchor_a1, (grads.gz * minus_w).transpose(-1, -2), grads.act)
    return a1, a2


def add_matmul(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x + a @ b, the sum fused into the batched matmul (baddbmm) where the batch shapes agree.

    x must be a temporary of the caller's: without autograd recording (the hand-written backward,
    a no-grad forward) the product is accumulated into x in place, which saves baddbmm's copy of x.
    alpha and beta stay 1: any other value costs baddbmm's backward a full extra multiply.
    """
    batch = x.shape[:-2]
    if x.dim() < 3 or a.shape[:-2] != batch or b.shape[:-2] != batch:
        return x + a @ b
    x3, a3, b3 = (t.reshape(-1, *t.shape[-2:]) for t in (x, a, b))
    if not torch.is_grad_enabled() and x.is_contiguous():
        return x3.baddbmm_(a3, b3).view(x.shape)
    return torch.baddbmm(x3, a3, b3).view(x.shape)


def chunk_step(a1, a2, q, k, v, eta, log_alpha, gamma, beta, full, causal, rule: RuleConfig):
    """One chunk: reads for its queries and the accumulators at its end.

    full: (B,) bool or None; rows whose chunk is not full keep their anchor (their open chunk is
    returned as a buffer by the caller instead of being committed).
    """
    channelwise = eta.dim() == q.dim()
    scale1, scale2 = lq_scale(a1, rule), lq_scale(a2, rule)
    grads = anchor_gradients(k, v, a1, a2, gamma, beta, rule, scale1, scale2)
    cumulative = log_alpha.cumsum(dim=2)
    weights = decay_weights(cumulative, cumulative, eta, causal, channelwise)
    query_decay = cumulative.exp()
    y = dual_form_read(q, a1, a2, scale1, scale2, k, grads, weights, query_decay, gamma, beta, rule)
    last_weights = weights[:, :, -1]
    total_decay = query_decay[:, :, -1]
    new_a1, new_a2 = committed_accumulators(a1, a2, k, grads, last_weights, total_decay, rule.update_input)
    if full is not None:
        keep = full[:, None, None, None]
        new_a1 = torch.where(keep, new_a1, a1)
        new_a2 = torch.where(keep, new_a2, a2)
    return y, new_a1, new_a2
