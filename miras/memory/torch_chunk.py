"""The torch path of the memory: a segment's whole chunk sequence, forward and hand-written backward.

Only the accumulators recur. Chunk n's l_q normalisers, anchor gradients and commit need chunk n-1's
state, but its reads feed nothing later, and in the backward only the state gradient recurs. So each
direction is split into a sequential part of small per-chunk ops and batched parts in which the chunk
index joins the batch dimensions of every op (large matmuls instead of one small one per chunk):

    forward   per chunk   l_q normalisers of the anchor, anchor gradients, commit
              batched     decays of the gates; the dual-form reads of every chunk from its anchor
    backward  per group of chunks, from the last:
              batched     anchor gradients and reads again (from the anchors), the reads' backward
              per chunk   the state gradient through the commit, the anchor gradients and the normalisers
              batched     the gates' backward, the gradients' reductions

With a fixed input matrix (rule.update_input False, the model's default) only A1 recurs: s2, h and gelu(h)
of a group's chunks are one batched product before its chunk loop, one A2 state is kept, and A2's gradient
is summed batched after the group's per-chunk backward.

Forward, per head, with s = l_q normalisers frozen at the anchor (A1, A2), D[t, j] the decay weights
and Q_t = exp(c_t) the query decays (rule.py has the same formulas with autograd):

    anchor:  h = s2 k A2^T   act = gelu(h)   z = s1 act A1^T   u = LN(z)   e = k + u - v
             g = gamma f(e)  gz = LN'(g)     gh = gelu'(h) * (s1 gz A1)       (f = d l_p / d e)
    read:    hq = s2 (Q q A2^T - (D * q k^T) gh)   aq = gelu(hq)
             zq = s1 (Q aq A1^T - (D * aq act^T) gz)   y = q + LN(zq)
    commit:  A2' = Q_b A2 - gh^T (k * D[b])   A1' = Q_b A1 - (gz * D[b])^T act

What the backward gets from the forward is one decision, `save_all`:
- False: each chunk's anchor state, B*H*N*2*d_h*m floats (what the Triton path keeps too), and its l_q
  normalisers (4 numbers per matrix, head and chunk: recomputing them is a pass over the anchor); the
  backward recomputes the rest, batched over a group of chunks. With rule.checkpoint_group = G > 1
  only every G-th state is kept and the backward first re-runs a group's per-chunk part.
  With a fixed input matrix (and no checkpoint_group) it also keeps the reads' small products, z, aq A1^T,
  zq and aq act^T (3d_h + b floats per token and head, a quarter of what save_all keeps): the backward
  recomputes only the input features h = s2 k A2^T and hq = s2 q A2^T, two of the seven products.
- True: also what the backward would recompute (h, z, gz A1 s1, hq, aq A1^T, zq, aq act^T: 3m + 3d_h + b
  floats per token and head), so it recomputes nothing. For callers that run the forward again before
  the backward anyway (block activation checkpointing): the forward then runs twice per step, not three
  times. checkpoint_group does not apply.

`compiled` runs every piece through torch.compile: the per-chunk steps as one small graph each
(shapes of one chunk), the batched parts one graph per group shape; the Python loop over chunks
stays outside (a graph of the whole loop would grow with the sequence, and so would its compile).

The op is registered as `torch.ops.miras.chunk_memory` with its backward, so `torch.compile` of a
model sees one node and never traces (or breaks its graph) inside it.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .rule import LQ_NORMS, RuleConfig, abs_pow, add_matmul, decay_matrix, lp_error_gradient

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# Token rows (batch * tokens) per group of the batched parts: large enough that every batched matmul is
# big (B * H * chunks of them), small enough that a group's (rows, m) temporaries stay a few MiB per head.
GROUP_ROWS = 2048


def _bt(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _chunks_matmul(x: Tensor, w: Tensor) -> Tensor:
    """x (G, ..., r, c) @ w for a group's chunks, w either one matrix per chunk (G, ..., c, n) or one shared by all
    (..., c, n): a fixed input matrix.

    A shared w is multiplied chunk by chunk into slices of the output: matmul would broadcast it into a G-fold
    copy first (8 MiB per product at batch 4, a group of 8 chunks and 4 heads of width 256), which took as long as
    the product itself. Compiled, the plain product: the compiler plans its own loops.
    """
    if w.dim() == x.dim() or torch.compiler.is_compiling():
        return x @ w
    out = x.new_empty(*x.shape[:-1], w.shape[-1])
    w3 = w.expand(*x.shape[1:-2], *w.shape[-2:]).reshape(-1, *w.shape[-2:])  # one copy if w was broadcast
    for i in range(x.shape[0]):
        torch.bmm(x[i].reshape(-1, *x.shape[-2:]), w3, out=out[i].view(-1, *out.shape[-2:]))
    return out


def _add_chunk_sum(acc: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """acc + sum over a group's chunks g of x[g]^T @ y[g], for x (G, ..., r, m) and y (G, ..., r, d): A shared
    matrix's gradient, accumulated one product per chunk instead of G products and their sum. acc must be a
    temporary of the caller's (it is added to in place outside torch.compile)."""
    if torch.compiler.is_compiling():
        return acc + (_bt(x) @ y).sum(0)
    acc3 = acc.view(-1, *acc.shape[-2:])
    for i in range(x.shape[0]):
        acc3.baddbmm_(_bt(x[i].reshape(-1, *x.shape[-2:])), y[i].reshape(-1, *y.shape[-2:]))
    return acc


# ----------------------------------------------------------------------------------------------
# Pieces, on tensors with any leading batch dimensions (one chunk: (B, H, ...); a group: (G, B, H, ...))


def _lq_forward(acc: Tensor, rule: RuleConfig):
    """The normaliser s per matrix (rule.lq_scale), with the power-of-two peak and scaled norms its backward needs.

    The arithmetic of rule.lq_scale: |A / peak|^q neither underflows nor overflows in fp32.
    Returns (s, peak, ||A / peak||_q, ||A / peak||_2); the last is 1 for the "inverse" normaliser.
    """
    if rule.q == 2:
        one = torch.ones_like(acc[..., :1, :1])
        return one, one, one, one
    # |A|'s peak as abs then amax over the flattened matrix: ATen's aminmax, one pass, is not vectorised on the CPU
    # and took 1.09 ms for a (4, 4, 64, 256) accumulator against 0.04 ms for these two (one thread).
    peak = acc.flatten(-2).abs().amax(dim=-1, keepdim=True).unsqueeze(-1).clamp_min(torch.finfo(acc.dtype).tiny)
    peak = torch.exp2(torch.floor(torch.log2(peak)))
    scaled = acc * peak.reciprocal()  # exact: peak is a power of two
    if rule.q == 4:  # ||a||_4^4 = <a^2, a^2>: one product over the squares, which ||a||_2 sums too
        square = scaled * scaled
        flat = square.flatten(-2)
        power_sum = flat.unsqueeze(-2) @ flat.unsqueeze(-1)
        square_sum = flat.sum(dim=-1, keepdim=True).unsqueeze(-1)
    else:
        power_sum = abs_pow(scaled, rule.q).sum(dim=(-2, -1), keepdim=True)
        square_sum = (scaled * scaled).sum(dim=(-2, -1), keepdim=True)
    scaled_norm = power_sum.clamp_min(1.0).pow(1.0 / rule.q)
    if rule.lq_norm == "scale_free":
        scaled_l2 = square_sum.clamp_min(1.0).sqrt()
        return (scaled_l2 / scaled_norm).pow(rule.q - 2.0), peak, scaled_norm, scaled_l2
    scale = (peak * scaled_norm).clamp_min(rule.lq_floor).pow(-(rule.q - 2.0))
    return scale, peak, scaled_norm, torch.ones_like(scale)


def _lq_backward(
    acc: Tensor, d_scale: Tensor, scale: Tensor, peak: Tensor, scaled_norm: Tensor, scaled_l2: Tensor, rule: RuleConfig
):
    """dA from ds (q > 2), with a = A / peak, n_q = ||a||_q, n_2 = ||a||_2.

    "inverse": ds/dN = -(q-2) s / N above the floor, 0 below; dN/dA = sign(A)|A|^(q-1) / N^(q-1).
    "scale_free": s = (n_2 / n_q)^(q-2), ds/dA = (q-2) s / peak * (a / n_2^2 - sign(a)|a|^(q-1) / n_q^q).
    """
    scaled = acc * peak.reciprocal()  # exact: peak is a power of two
    if rule.lq_norm == "scale_free":
        factor = d_scale * (rule.q - 2.0) * scale / peak
        linear, cubic = factor / scaled_l2.pow(2), -factor / scaled_norm.pow(rule.q)
    else:
        norm = peak * scaled_norm
        d_norm = d_scale * (-(rule.q - 2.0)) * scale / norm.clamp_min(rule.lq_floor) * (norm >= rule.lq_floor)
        linear, cubic = None, d_norm / scaled_norm.pow(rule.q - 1.0)
    if rule.q == 4:  # a (linear + cubic a^2): four passes over A, where the general form below takes seven
        square = scaled * scaled
        return scaled * (square * cubic if linear is None else torch.addcmul(linear, square, cubic))
    direction = scaled * scaled.abs() if rule.q == 3 else scaled * abs_pow(scaled, rule.q - 2.0)
    return direction * cubic if linear is None else scaled * linear + direction * cubic


def _layer_norm_stats(z: Tensor, eps: float):
    centred = z - z.mean(dim=-1, keepdim=True)
    std = ((centred * centred).mean(dim=-1, keepdim=True) + eps).sqrt()
    return centred / std, std


def _layer_norm_input_grad(d_hat: Tensor, z_hat: Tensor, std: Tensor) -> Tensor:
    """Gradient through z_hat = (z - mean) / std(z) given d z_hat (self-adjoint: also the map g -> gz)."""
    return (d_hat - d_hat.mean(dim=-1, keepdim=True) - z_hat * (d_hat * z_hat).mean(dim=-1, keepdim=True)) / std


def _lp_error_derivative(err: Tensor, rule: RuleConfig) -> Tensor:
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


def _inner_error(z_raw, s1, k, v, gamma, beta, rule: RuleConfig):
    """LayerNorm of the anchor's output, the l_p error and its gradient back through the LayerNorm (gz)."""
    z_hat, std = _layer_norm_stats(z_raw * s1, rule.ln_eps)
    err = k + gamma * z_hat + beta - v
    f_err = lp_error_gradient(err, rule)
    g = gamma * f_err
    return z_hat, std, err, f_err, g, _layer_norm_input_grad(g, z_hat, std)


def _gates(log_alpha: Tensor, eta: Tensor, causal: Tensor):
    """decay E[t, j] = exp(c_t - c_j) (causal), weights D = E * eta_j, query decays Q_t = exp(c_t)."""
    cumulative = log_alpha.cumsum(dim=-1)
    decay = decay_matrix(cumulative, cumulative, causal, channelwise=False)
    return decay, decay * eta.unsqueeze(-2), cumulative.exp()


def _forward_step(a1, a2, k, v, last_w, total, full, gamma, beta, rule: RuleConfig):
    """One chunk's sequential part: its normalisers, anchor gradients and the committed state.

    Returns the next state and what the reads (and a kept backward) need: the anchor's normalisers (_pack_norms),
    h, z (unscaled), gz A1 s1, act, gz, gh.
    """
    lq1, lq2 = _lq_forward(a1, rule), _lq_forward(a2, rule)
    s1, s2 = lq1[0], lq2[0]
    h = (k * s2) @ _bt(a2)
    act = F.gelu(h)
    z_raw = act @ _bt(a1)
    gz = _inner_error(z_raw, s1, k, v, gamma, beta, rule)[-1]
    gz_w = (gz * s1) @ a1
    gh = torch.ops.aten.gelu_backward(gz_w, h)
    minus_w = -last_w.unsqueeze(-1)
    decay = total[..., None, None]
    new_a2 = add_matmul(decay * a2, _bt(gh), k * minus_w)
    new_a1 = add_matmul(decay * a1, _bt(gz * minus_w), act)
    if full is not None:  # rows whose chunk is not full keep their anchor (the chunk stays open)
        keep = full[:, None, None, None]
        new_a1, new_a2 = torch.where(keep, new_a1, a1), torch.where(keep, new_a2, a2)
    return new_a1, new_a2, _pack_norms(lq1), _pack_norms(lq2), h, z_raw, gz_w, act, gz, gh


def _pack_norms(lq) -> Tensor:
    """_lq_forward's four (..., 1, 1) tensors as one (..., 1, 4): what the backward needs of an anchor's normaliser,
    kept by the forward instead of recomputed from the anchor (eight passes over a state-sized tensor per chunk)."""
    return torch.cat(lq, dim=-1)


def _unpack_norms(packed: Tensor):
    """(s, peak, ||A / peak||_q, ||A / peak||_2), each (..., 1, 1), from _pack_norms."""
    return tuple(packed[..., j : j + 1] for j in range(4))


def _input_features(k, a2, rule: RuleConfig):
    """A fixed input matrix (not rule.update_input): every anchor holds the same A2, so s2, h = s2 k A2^T and
    act = gelu(h) of many chunks come from one batched product instead of one per chunk in the sequential part."""
    s2 = _lq_forward(a2, rule)[0]
    h = _chunks_matmul(k * s2, _bt(a2))
    return s2, h, F.gelu(h)


def _forward_step_fixed(a1, act, k, v, last_w, total, full, gamma, beta, rule: RuleConfig):
    """_forward_step with a fixed input matrix: only A1 recurs (act from _input_features). Returns the next A1,
    the anchor's normalisers (_pack_norms), z (unscaled) and gz."""
    lq1 = _lq_forward(a1, rule)
    s1 = lq1[0]
    z_raw = act @ _bt(a1)
    gz = _inner_error(z_raw, s1, k, v, gamma, beta, rule)[-1]
    new_a1 = add_matmul(total[..., None, None] * a1, _bt(gz * -last_w.unsqueeze(-1)), act)
    if full is not None:  # rows whose chunk is not full keep their anchor (the chunk stays open)
        new_a1 = torch.where(full[:, None, None, None], new_a1, a1)
    return new_a1, _pack_norms(lq1), z_raw, gz


def _anchor_recompute(a1, a2, s1, s2, k, v, gamma, beta, rule: RuleConfig):
    """The anchor gradients' matmuls for many chunks at once from their anchors: h, z, gz A1 s1, and act = gelu(h)."""
    h = _chunks_matmul(k * s2, _bt(a2))
    act = F.gelu(h)
    z_raw = act @ _bt(a1)
    if not rule.update_input:  # gz A1 s1 feeds only gh, which a fixed input matrix does not use
        return h, z_raw, None, act
    gz = _inner_error(z_raw, s1, k, v, gamma, beta, rule)[-1]
    return h, z_raw, (gz * s1) @ a1, act


def _read(q, k, weights, query_decay, s1, s2, a1, a2, act, gz, gh, gamma, beta, rule: RuleConfig):
    """The dual-form reads of many chunks at once: y and what the backward needs (hq, aq A1^T, zq, aq act^T, aq)."""
    qd = query_decay.unsqueeze(-1)
    if rule.update_input:
        hq = add_matmul((q * (qd * s2)) @ _bt(a2), weights * -s2 * (q @ _bt(k)), gh)
    else:  # the input matrix neither decays nor takes writes
        hq = _chunks_matmul(q * s2, _bt(a2))
    aq = F.gelu(hq)
    s_aa = aq @ _bt(act)
    a_q = aq @ _bt(a1)
    zq = add_matmul(a_q * (qd * s1), weights * -s1 * s_aa, gz)
    zq_hat, _ = _layer_norm_stats(zq, rule.ln_eps)
    return q + gamma * zq_hat + beta, hq, a_q, zq, s_aa, aq


def _read_backward(
    dy, q, k, weights, query_decay, s1, s2, a1, a2, act, gz, gh, hq, a_q, zq, s_aa, gamma, rule, aq=None
):  # fmt: skip
    """The reads' backward for many chunks at once, from dy alone (nothing here waits for the state gradient).
    aq: gelu(hq) when the caller has it (a recompute of the reads), else computed here.

    Returns dq, dk (from q k^T), dA1, dA2 (through the anchors; with a fixed input matrix d hq instead, from which
    the caller sums A2's gradient over the chunks it counts), d gh, d gz, d act (to the anchor gradients), ds1, ds2,
    dD, dQ and the LayerNorm affine's gradients (summed over chunks and rows).
    """
    qd = query_decay.unsqueeze(-1)
    aq = F.gelu(hq) if aq is None else aq
    zq_hat, std_q = _layer_norm_stats(zq, rule.ln_eps)
    sum_rows = tuple(range(dy.dim() - 3)) + (dy.dim() - 2,)  # every dim but (H, d_h)
    d_gamma = (dy * zq_hat).sum(dim=sum_rows)
    d_beta = dy.sum(dim=sum_rows)
    d_zq = _layer_norm_input_grad(gamma * dy, zq_hat, std_q)
    # zq = a_q * (Q s1) + (D * -s1 * S_aa) gz
    d_aq_out = d_zq * (qd * s1)
    row = (d_zq * a_q).sum(-1)
    d_qd = row * s1[..., 0]
    d_s1 = (row * query_decay).sum(-1)[..., None, None]
    d_r = d_zq @ _bt(gz)
    d_gz = _bt(weights * -s1 * s_aa) @ d_zq
    d_weighted = d_r * weights
    d_weights = d_r * -s1 * s_aa
    d_s1 = d_s1 - (d_weighted * s_aa).sum(dim=(-2, -1), keepdim=True)
    d_saa = d_weighted * -s1
    # a_q = aq A1^T, S_aa = aq act^T
    d_aq = add_matmul(d_aq_out @ a1, d_saa, act)
    da1 = _bt(d_aq_out) @ aq
    d_act = _bt(d_saa) @ aq
    d_hq = torch.ops.aten.gelu_backward(d_aq, hq)
    d_qs = _chunks_matmul(d_hq, a2)
    row = (d_qs * q).sum(-1)
    if not rule.update_input:  # hq = (q s2) A2^T; A2's gradient d_hq^T (q s2) is summed over chunks by the caller
        d_s2 = row.sum(-1)[..., None, None]
        dq = dy + d_qs * s2
        return dq, torch.zeros_like(k), da1, d_hq, None, d_gz, d_act, d_s1, d_s2, d_weights, d_qd, \
            d_gamma, d_beta  # fmt: skip
    # hq = (q Q s2) A2^T + (D * -s2 * S) gh
    scores = q @ _bt(k)
    d_p = d_hq @ _bt(gh)
    d_gh = _bt(weights * -s2 * scores) @ d_hq
    d_weighted = d_p * weights
    d_weights = d_weights + d_p * -s2 * scores
    d_s2 = -(d_weighted * scores).sum(dim=(-2, -1), keepdim=True)
    d_scores = d_weighted * -s2
    da2 = _bt(d_hq) @ (q * (qd * s2))
    d_qd = d_qd + row * s2[..., 0]
    d_s2 = d_s2 + (row * query_decay).sum(-1)[..., None, None]
    dq = add_matmul(dy + d_qs * (qd * s2), d_scores, k)
    dk = _bt(d_scores) @ q
    return dq, dk, da1, da2, d_gh, d_gz, d_act, d_s1, d_s2, d_weights, d_qd, d_gamma, d_beta


def _anchor_derived(k, v, s1, s2, h, z_raw, gz_w, gamma, beta, rule: RuleConfig, act=None):
    """Everything of the anchor gradients the per-chunk backward needs, elementwise from h, z and gz A1 s1 (and
    act = gelu(h) when the caller has it)."""
    act = F.gelu(h) if act is None else act
    z_hat, std, err, f_err, g, gz = _inner_error(z_raw, s1, k, v, gamma, beta, rule)
    g_zhat = (g * z_hat).mean(dim=-1, keepdim=True)
    err_slope = gamma * _lp_error_derivative(err, rule)
    if gz_w is None:  # a fixed input matrix: no gh, and nothing differentiates it
        return act, gz, None, None, z_hat, std, g, g_zhat, err_slope, f_err
    gh = torch.ops.aten.gelu_backward(gz_w, h)
    # gelu''(h) = phi(h) (2 - h^2); h^2 is capped at 170 so that exp stays out of its slow subnormal path
    # (see decay_matrix): beyond it the term is below 1e-35. Times gz A1 s1: d h from d gh in one multiply.
    h_sq = h * h
    gelu2 = gz_w * (torch.exp(h_sq.clamp_max(170.0) * -0.5) * _INV_SQRT_2PI) * (2.0 - h_sq)
    return act, gz, gh, gelu2, z_hat, std, g, g_zhat, err_slope, f_err


def _backward_step(
    da1_out, da2_out, a1, a2, lq1, lq2, k, last_w, total, full, h, z_raw, act, gz, gh, gelu2,
    z_hat, std, g, g_zhat, err_slope, d_gh, d_gz, d_act, da1_read, da2_read, d_s1, d_s2, gamma, rule: RuleConfig,
):  # fmt: skip
    """One chunk's state gradient: through its commit, anchor gradients and normalisers, back to its anchor.

    da*_out: the gradient of the state after the chunk; d_gh, d_gz, d_act, da*_read, d_s*: what the reads'
    backward sent to this chunk's anchor-side tensors. Returns the gradient of the anchor and the chunk's
    contributions to dk, d error (dv = -d error), dg (for gamma), dD[b] and dQ_b. lq1, lq2: the anchor's
    normalisers with their peaks and scaled norms (_lq_forward).
    """
    s1, s2 = lq1[0], lq2[0]
    da1, d_act, d_gz, d_last_w, d_total = _commit1_backward(da1_out, a1, act, gz, last_w, total, full, d_act, d_gz,
                                                            da1_read)  # fmt: skip
    # commit: A2' = Q_b A2 - gh^T (k * D[b])
    keep = None if full is None else full[:, None, None, None]
    da2_keep = da2_out if keep is None else da2_out * keep
    minus_w = -last_w.unsqueeze(-1)
    decay = total[..., None, None]
    d_total = d_total + (da2_keep * a2).sum(dim=(-2, -1))
    d_gh = add_matmul(d_gh, k * minus_w, _bt(da2_keep))
    d_kw = gh @ da2_keep
    dk = d_kw * minus_w
    d_last_w = d_last_w - (d_kw * k).sum(-1)
    da2 = da2_keep * decay + da2_read
    if keep is not None:
        da2 = da2 + da2_out * ~keep
    # anchor: gh = gelu'(h) * (gz s1 A1), h = s2 k A2^T, z = act A1^T
    d_gzw_full = torch.ops.aten.gelu_backward(d_gh, h)
    d_h = d_gh * gelu2
    d_gzs = d_gzw_full @ _bt(a1)
    da1 = add_matmul(da1, _bt(gz * s1), d_gzw_full)
    d_gz = d_gz + d_gzs * s1
    d_s1 = d_s1 + (d_gzs * gz).sum(dim=(-2, -1), keepdim=True)
    # gz = LN'(g) as a function of g, z_hat and std
    d_err, d_g, d_zr, d_s1 = _inner_error_backward(d_gz, z_raw, z_hat, std, g, gz, g_zhat, err_slope, d_s1, s1,
                                                   gamma)  # fmt: skip
    d_act = add_matmul(d_act, d_zr, a1)
    da1 = add_matmul(da1, _bt(d_zr), act)
    d_h = d_h + torch.ops.aten.gelu_backward(d_act, h)
    d_ks = d_h @ a2
    ks = k * s2
    da2 = add_matmul(da2, _bt(d_h), ks)
    dk = dk + d_err + d_ks * s2
    d_s2 = d_s2 + (d_ks * k).sum(dim=(-2, -1), keepdim=True)
    if rule.q != 2:
        da1 = da1 + _lq_backward(a1, d_s1, *lq1, rule)
        da2 = da2 + _lq_backward(a2, d_s2, *lq2, rule)
    return da1, da2, dk, d_err, d_g, d_last_w, d_total


def _backward_step_fixed(
    da1_out, a1, lq1, last_w, total, full, z_raw, act, gz, z_hat, std, g, g_zhat, err_slope, d_gz, d_act, da1_read,
    d_s1, gamma, rule: RuleConfig,
):  # fmt: skip
    """_backward_step with a fixed input matrix: only the A1 state gradient recurs. Returns dA1 at the anchor, the
    chunk's full d act (memory_backward takes it through h = s2 k A2^T for all chunks at once), d error, dg,
    dD[b] and dQ_b."""
    s1 = lq1[0]
    da1, d_act, d_gz, d_last_w, d_total = _commit1_backward(da1_out, a1, act, gz, last_w, total, full, d_act, d_gz,
                                                            da1_read)  # fmt: skip
    d_err, d_g, d_zr, d_s1 = _inner_error_backward(d_gz, z_raw, z_hat, std, g, gz, g_zhat, err_slope, d_s1, s1,
                                                   gamma)  # fmt: skip
    d_act = add_matmul(d_act, d_zr, a1)
    da1 = add_matmul(da1, _bt(d_zr), act)
    if rule.q != 2:
        da1 = da1 + _lq_backward(a1, d_s1, *lq1, rule)
    return da1, d_act, d_err, d_g, d_last_w, d_total


def _commit1_backward(da1_out, a1, act, gz, last_w, total, full, d_act, d_gz, da1_read):
    """Through the commit A1' = Q_b A1 - (gz * D[b])^T act (rows whose chunk is not full keep A1): dA1 so far,
    d act and d gz with this path added, dD[b] and dQ_b."""
    keep = None if full is None else full[:, None, None, None]
    da1_keep = da1_out if keep is None else da1_out * keep
    minus_w = -last_w.unsqueeze(-1)
    d_total = (da1_keep * a1).sum(dim=(-2, -1))
    d_gzw = act @ _bt(da1_keep)
    d_act = add_matmul(d_act, gz * minus_w, da1_keep)
    d_gz = d_gz + d_gzw * minus_w
    d_last_w = -(d_gzw * gz).sum(-1)
    da1 = da1_keep * total[..., None, None] + da1_read
    if keep is not None:  # rows that kept their anchor pass the gradient straight through
        da1 = da1 + da1_out * ~keep
    return da1, d_act, d_gz, d_last_w, d_total


def _inner_error_backward(d_gz, z_raw, z_hat, std, g, gz, g_zhat, err_slope, d_s1, s1, gamma):
    """From d gz back through gz = LN'(g), g = gamma f(e), e = k + LN(z s1) - v: d error, dg, d (z s1) s1 and ds1."""
    r = d_gz / std
    d_g = _layer_norm_input_grad(d_gz, z_hat, std)
    d_zhat = -g_zhat * r - (r * z_hat).mean(dim=-1, keepdim=True) * g
    d_std = -(d_gz * gz).sum(dim=-1, keepdim=True) / std
    d_err = err_slope * d_g
    d_zhat = d_zhat + gamma * d_err
    d_z = _layer_norm_input_grad(d_zhat, z_hat, std) + d_std * z_hat / z_hat.shape[-1]
    d_s1 = d_s1 + (d_z * z_raw).sum(dim=(-2, -1), keepdim=True)
    return d_err, d_g, d_z * s1, d_s1


def _gates_backward(d_weights, d_query_decay, decay, weights, query_decay, d_last_w, d_total):
    """d eta and d log alpha from dD and dQ (D[t, j] = exp(c_t - c_j) eta_j, Q_t = exp(c_t), c = cumsum log alpha)."""
    d_weights = torch.cat([d_weights[..., :-1, :], (d_weights[..., -1, :] + d_last_w).unsqueeze(-2)], dim=-2)
    d_query_decay = torch.cat([d_query_decay[..., :-1], (d_query_decay[..., -1] + d_total).unsqueeze(-1)], dim=-1)
    d_eta = (d_weights * decay).sum(dim=-2)
    weighted = d_weights * weights
    d_cum = d_query_decay * query_decay + weighted.sum(dim=-1) - weighted.sum(dim=-2)
    return d_eta, d_cum.flip(-1).cumsum(-1).flip(-1)


# ----------------------------------------------------------------------------------------------
# The chunk sequence


class _Steps:
    """The pieces that run: eager, or each through torch.compile (static shapes: one graph per shape)."""

    def __init__(self, compiled: bool):
        def wrap(fn):
            return torch.compile(fn, dynamic=False, fullgraph=True) if compiled else fn

        self.gates = wrap(_gates)
        self.lq_forward = wrap(_lq_forward)
        self.forward_step = wrap(_forward_step)
        self.input_features = wrap(_input_features)
        self.forward_step_fixed = wrap(_forward_step_fixed)
        self.backward_step_fixed = wrap(_backward_step_fixed)
        self.anchor_recompute = wrap(_anchor_recompute)
        self.anchor_derived = wrap(_anchor_derived)
        self.read = wrap(_read)
        self.read_backward = wrap(_read_backward)
        self.backward_step = wrap(_backward_step)
        self.gates_backward = wrap(_gates_backward)


@cache
def _steps(compiled: bool) -> _Steps:
    return _Steps(compiled)


def _chunk_major(t: Tensor, num_chunks: int) -> Tensor:
    """(B, H, N*b, ...) -> (N, B, H, b, ...), contiguous: every chunk's slice is one block of memory."""
    return t.unflatten(2, (num_chunks, -1)).movedim(2, 0).contiguous()


def _time_major(t: Tensor) -> Tensor:
    """(N, B, H, b, ...) -> (B, H, N*b, ...)."""
    return t.movedim(0, 2).flatten(2, 3)


def _keeps_products(rule: RuleConfig, save_all: bool) -> bool:
    """Whether a saving forward without save_all keeps the reads' small products (z, aq A1^T, zq, aq act^T)."""
    return not save_all and rule.checkpoint_group <= 1 and not rule.update_input


def _groups(num_chunks: int, batch: int, rule: RuleConfig, save_all: bool) -> list[tuple[int, int]]:
    """[c0, c1) of each group of chunks: rule.checkpoint_group of them when the states are kept per group."""
    if rule.checkpoint_group > 1 and not save_all:
        size = rule.checkpoint_group
    else:
        size = max(1, GROUP_ROWS // (batch * rule.chunk_size))
    return [(c0, min(c0 + size, num_chunks)) for c0 in range(0, num_chunks, size)]


def _full_chunks(lengths: Tensor | None, num_chunks: int, chunk_size: int) -> Tensor | None:
    """(N, B) bool: chunk n of row b commits ((n+1) b <= length); None: every chunk of every row does."""
    if lengths is None:
        return None
    ends = torch.arange(1, num_chunks + 1, device=lengths.device) * chunk_size
    return ends[:, None] <= lengths[None, :]


def _run_chunks(steps: _Steps, a1, a2, k, v, last_w, total, full, gamma, beta, rule, c0: int, c1: int):
    """The sequential part over chunks [c0, c1): the final state and, stacked over the chunks, their anchors
    and the forward step's outputs (packed normalisers of A1 and A2, s1, s2, h, z, gz A1 s1, act, gz, gh).

    With a fixed input matrix A2, s2, h and act come batched from _input_features before the loop; A2 and s2
    are returned once (they broadcast against the chunk axis), A2's normalisers, gz A1 s1 and gh as None.
    """
    outputs = []
    if not rule.update_input:
        s2, h, act = steps.input_features(k, a2, rule)
        for n in range(c0, c1):
            i = n - c0
            start = a1
            a1, *rest = steps.forward_step_fixed(
                a1, act[i], k[i], v[i], last_w[i], total[i], None if full is None else full[n], gamma, beta, rule
            )
            outputs.append((start, *rest))
        anchor1, norms1, z_raw, gz = (torch.stack(field) for field in zip(*outputs))
        return a1, a2, [anchor1, a2, norms1, None, norms1[..., :1], s2, h, z_raw, None, act, gz, None]
    for n in range(c0, c1):
        start = (a1, a2)
        a1, a2, *rest = steps.forward_step(
            a1, a2, k[n - c0], v[n - c0], last_w[n - c0], total[n - c0], None if full is None else full[n],
            gamma, beta, rule,
        )  # fmt: skip
        outputs.append((*start, *rest))
    anchor1, anchor2, norms1, norms2, *rest = (torch.stack(field) for field in zip(*outputs))
    return a1, a2, [anchor1, anchor2, norms1, norms2, norms1[..., :1], norms2[..., :1], *rest]


def memory_forward(q, k, v, eta, log_alpha, a1, a2, gamma, beta, lengths, rule: RuleConfig, save, save_all, compiled):
    """y (B, H, N*b, d_h), the final state and what the backward keeps: (states1, states2, norms1, norms2, kept);
    nothing kept unless `save` (no backward will run). norms*: each kept anchor's packed normalisers (_pack_norms),
    of every chunk when every anchor is kept (none under two-level recompute, which runs the chunks again)."""
    steps = _steps(compiled)
    batch, _, length, _ = q.shape
    b = rule.chunk_size
    num_chunks = length // b
    qc, kc, vc, ec, lc = (_chunk_major(t, num_chunks) for t in (q, k, v, eta, log_alpha))
    full = _full_chunks(lengths, num_chunks, b)
    causal = torch.ones(b, b, dtype=torch.bool, device=q.device).tril()
    gamma_b, beta_b = gamma[:, None, :], beta[:, None, :]
    groups = _groups(num_chunks, batch, rule, save_all)
    two_level = rule.checkpoint_group > 1 and not save_all
    slots = 0 if not save else len(groups) if two_level else num_chunks
    states1 = a1.new_empty(slots, *a1.shape)
    states2 = a2.new_empty(_input_slots(slots, rule), *a2.shape)
    norm_slots = 0 if two_level else slots
    norms1 = a1.new_empty(norm_slots, *a1.shape[:2], 1, 4)
    norms2 = a1.new_empty(norm_slots if rule.update_input else 0, *a1.shape[:2], 1, 4)
    ys, kept = [], []
    for index, (c0, c1) in enumerate(groups):
        _, weights, query_decay = steps.gates(lc[c0:c1], ec[c0:c1], causal)
        last_w, total = weights[..., -1, :], query_decay[..., -1]
        if save and two_level:
            states1[index] = a1
            if rule.update_input:
                states2[index] = a2
        a1, a2, fields = _run_chunks(steps, a1, a2, kc[c0:c1], vc[c0:c1], last_w, total, full, gamma_b, beta_b,
                                     rule, c0, c1)  # fmt: skip
        anchor1, anchor2, chunk_norms1, chunk_norms2, s1, s2, h, z_raw, gz_w, act, gz, gh = fields
        if save and not two_level:
            states1[c0:c1] = anchor1
            norms1[c0:c1] = chunk_norms1
            if rule.update_input:
                states2[c0:c1] = anchor2
                norms2[c0:c1] = chunk_norms2
        y, hq, a_q, zq, s_aa, _ = steps.read(
            qc[c0:c1], kc[c0:c1], weights, query_decay, s1, s2, anchor1, anchor2, act, gz, gh, gamma_b, beta_b, rule
        )
        ys.append(y)
        if save and save_all:
            kept.append((h, z_raw, h.new_empty(0) if gz_w is None else gz_w, hq, a_q, zq, s_aa))
        elif save and _keeps_products(rule, save_all):
            kept.append((z_raw, a_q, zq, s_aa))
    if save and not rule.update_input and len(states2):
        states2[0] = a2  # the input matrix every anchor holds
    y = _time_major(torch.cat(ys) if len(ys) > 1 else ys[0])
    kept = [torch.cat(field) for field in zip(*kept)]
    if not rule.update_input:  # A2 came through unchanged, and a custom op's output may not alias its input
        a2 = a2.clone()
    return y, a1, a2, states1, states2, norms1, norms2, kept


def _input_slots(slots: int, rule: RuleConfig) -> int:
    """States of A2 the forward keeps: one per kept A1 state, or the one A2 of a fixed input matrix."""
    return slots if rule.update_input else min(slots, 1)


def memory_backward(
    dy, da1, da2, q, k, v, eta, log_alpha, gamma, beta, lengths, states1, states2, norms1, norms2, kept,
    rule: RuleConfig, save_all, compiled,
):  # fmt: skip
    """Gradients of q, k, v, eta, log_alpha, the initial state and gamma, beta (memory_forward's inputs)."""
    steps = _steps(compiled)
    batch, heads, length, head_dim = q.shape
    b = rule.chunk_size
    num_chunks = length // b
    qc, kc, vc, ec, lc, dyc = (_chunk_major(t, num_chunks) for t in (q, k, v, eta, log_alpha, dy))
    full = _full_chunks(lengths, num_chunks, b)
    causal = torch.ones(b, b, dtype=torch.bool, device=q.device).tril()
    gamma_b, beta_b = gamma[:, None, :], beta[:, None, :]
    groups = _groups(num_chunks, batch, rule, save_all)
    two_level = rule.checkpoint_group > 1 and not save_all
    grads = [torch.empty_like(t) for t in (qc, kc, vc, ec, lc)]
    d_gamma, d_beta = torch.zeros_like(gamma), torch.zeros_like(beta)
    every = rule.detach_state_every
    fixed = not rule.update_input
    if fixed:
        # A fixed input matrix: A2 (its one kept state) is the same at every anchor, so its gradient is a sum over
        # the chunks, taken batched after each group's sequential part rather than carried through it. Truncated
        # BPTT detaches it with A1, so only chunks before the first cut (and dA2 of the output, if none) count.
        a2_fixed = states2[0]
        lq2_fixed = steps.lq_forward(a2_fixed, rule)
        first_cut = every // b if every else num_chunks
        da2_sum = da2.clone(memory_format=torch.contiguous_format) if first_cut >= num_chunks else torch.zeros_like(
            da2, memory_format=torch.contiguous_format
        )
        d_s2_sum = torch.zeros_like(lq2_fixed[0])
    for index, (c0, c1) in reversed(list(enumerate(groups))):
        qg, kg, vg = qc[c0:c1], kc[c0:c1], vc[c0:c1]
        decay, weights, query_decay = steps.gates(lc[c0:c1], ec[c0:c1], causal)
        last_w, total = weights[..., -1, :], query_decay[..., -1]
        if two_level:  # this group's anchors again, from its first state
            _, _, (anchor1, anchor2, chunk_norms1, chunk_norms2, _, _, h, z_raw, gz_w, act, *_) = _run_chunks(
                steps, states1[index], a2_fixed if fixed else states2[index], kg, vg, last_w, total, full, gamma_b,
                beta_b, rule, c0, c1,
            )  # fmt: skip
        else:
            anchor1, anchor2 = states1[c0:c1], a2_fixed if fixed else states2[c0:c1]
            chunk_norms1, chunk_norms2 = norms1[c0:c1], None if fixed else norms2[c0:c1]
        lq1, lq2 = _unpack_norms(chunk_norms1), lq2_fixed if fixed else _unpack_norms(chunk_norms2)
        s1, s2 = lq1[0], lq2[0]
        aq = None
        recompute_reads = not save_all
        if save_all:
            h, z_raw, gz_w, hq, a_q, zq, s_aa = (t[c0:c1] for t in kept)
            gz_w, act = None if fixed else gz_w, None
        elif _keeps_products(rule, save_all):  # only the input features again: A2 is every anchor's
            z_raw, a_q, zq, s_aa = (t[c0:c1] for t in kept)
            _, h, act = steps.input_features(kg, a2_fixed, rule)
            _, hq, aq = steps.input_features(qg, a2_fixed, rule)
            gz_w, recompute_reads = None, False
        elif not two_level:
            h, z_raw, gz_w, act = steps.anchor_recompute(anchor1, anchor2, s1, s2, kg, vg, gamma_b, beta_b, rule)
        act, gz, gh, gelu2, z_hat, std, g, g_zhat, err_slope, f_err = steps.anchor_derived(
            kg, vg, s1, s2, h, z_raw, gz_w, gamma_b, beta_b, rule, act=act
        )
        if recompute_reads:
            _, hq, a_q, zq, s_aa, aq = steps.read(
                qg, kg, weights, query_decay, s1, s2, anchor1, anchor2, act, gz, gh, gamma_b, beta_b, rule
            )
        dq, dk, da1_read, da2_read, d_gh, d_gz, d_act, d_s1, d_s2, d_weights, d_qd, d_gamma_read, d_beta_read = (
            steps.read_backward(dyc[c0:c1], qg, kg, weights, query_decay, s1, s2, anchor1, anchor2, act, gz, gh,
                                hq, a_q, zq, s_aa, gamma_b, rule, aq=aq)
        )  # fmt: skip
        per_chunk = []
        for n in reversed(range(c0, c1)):
            i = n - c0
            if fixed:
                da1, *rest = steps.backward_step_fixed(
                    da1, anchor1[i], tuple(t[i] for t in lq1), last_w[i], total[i], None if full is None else full[n],
                    z_raw[i], act[i], gz[i], z_hat[i], std[i], g[i], g_zhat[i], err_slope[i], d_gz[i], d_act[i],
                    da1_read[i], d_s1[i], gamma_b, rule,
                )  # fmt: skip
                per_chunk.append(rest)
                if n and every and (n * b) % every == 0:
                    da1 = torch.zeros_like(da1)
                continue
            da1, da2, *rest = steps.backward_step(
                da1, da2, anchor1[i], anchor2[i], tuple(t[i] for t in lq1), tuple(t[i] for t in lq2), kg[i],
                last_w[i], total[i], None if full is None else full[n], h[i], z_raw[i], act[i], gz[i], gh[i],
                gelu2[i], z_hat[i], std[i], g[i], g_zhat[i], err_slope[i], d_gh[i], d_gz[i], d_act[i],
                da1_read[i], da2_read[i], d_s1[i], d_s2[i], gamma_b, rule,
            )  # fmt: skip
            per_chunk.append(rest)
            if n and every and (n * b) % every == 0:  # truncated BPTT: the state entering chunk n was detached
                da1, da2 = torch.zeros_like(da1), torch.zeros_like(da2)
        if fixed:  # through h = s2 k A2^T, every chunk of the group at once
            d_act_full, d_err, d_g, d_last_w, d_total = (torch.stack(field[::-1]) for field in zip(*per_chunk))
            d_h = torch.ops.aten.gelu_backward(d_act_full, h)
            d_ks = _chunks_matmul(d_h, a2_fixed)
            dk_state = d_err + d_ks * s2
            counted = max(0, min(first_cut, c1) - c0)
            if counted:  # h = s2 k A2^T and hq = s2 q A2^T (da2_read: d hq, see _read_backward)
                da2_sum = _add_chunk_sum(da2_sum, d_h[:counted], kg[:counted] * s2)
                da2_sum = _add_chunk_sum(da2_sum, da2_read[:counted], qg[:counted] * s2)
                d_s2_sum = d_s2_sum + ((d_ks[:counted] * kg[:counted]).sum(dim=(-2, -1), keepdim=True)
                                       + d_s2[:counted]).sum(0)  # fmt: skip
        else:
            dk_state, d_err, d_g, d_last_w, d_total = (torch.stack(field[::-1]) for field in zip(*per_chunk))
        d_eta, d_log_alpha = steps.gates_backward(d_weights, d_qd, decay, weights, query_decay, d_last_w, d_total)
        rows = (0, 1, 3)  # (G, B, H, b, d_h): all but H and d_h
        d_gamma += d_gamma_read + (d_g * f_err + d_err * z_hat).sum(dim=rows)
        d_beta += d_beta_read + d_err.sum(dim=rows)
        for grad, value in zip(grads, (dq, dk + dk_state, -d_err, d_eta, d_log_alpha)):
            grad[c0:c1] = value
    if fixed:
        da2 = da2_sum if rule.q == 2 else da2_sum + _lq_backward(a2_fixed, d_s2_sum, *lq2_fixed, rule)
    dq, dk, dv, d_eta, d_log_alpha = (_time_major(t) for t in grads)
    return dq, dk, dv, d_eta, d_log_alpha, da1, da2, d_gamma, d_beta


# ----------------------------------------------------------------------------------------------
# The op: one node for torch.compile, with its backward


# The op's schema takes numbers, not a RuleConfig: the rule travels as a list of its fields (a traced graph reads
# them as constants) and the op rebuilds it, one object per distinct rule (the compiled steps guard on it).


def _rule_values(rule: RuleConfig) -> list[float]:
    """The rule as the op's list of numbers (smooth_lp: -1 for None, else 0 or 1)."""
    smooth = -1.0 if rule.smooth_lp is None else float(rule.smooth_lp)
    return [float(rule.p), float(rule.q), float(rule.chunk_size), float(rule.lq_floor), float(rule.ln_eps), smooth,
            float(rule.sign_sharpness), float(rule.abs_eps), float(rule.detach_state_every),
            float(rule.checkpoint_group), float(LQ_NORMS.index(rule.lq_norm)), float(rule.update_input)]  # fmt: skip


def _rule_from(values: list[float]) -> RuleConfig:
    return _rule(*values)


@cache
def _rule(
    p, q, chunk_size, lq_floor, ln_eps, smooth, sharpness, abs_eps, detach_every, group, lq_norm, update_input
) -> RuleConfig:
    return RuleConfig(
        p=p, q=q, chunk_size=int(chunk_size), lq_floor=lq_floor, ln_eps=ln_eps,
        smooth_lp=None if smooth < 0 else bool(smooth), sign_sharpness=sharpness, abs_eps=abs_eps,
        detach_state_every=int(detach_every), checkpoint_group=int(group), lq_norm=LQ_NORMS[int(lq_norm)],
        update_input=bool(update_input),
    )  # fmt: skip


def _kept_shapes(q: Tensor, a1: Tensor, rule: RuleConfig, save_all: bool) -> list[tuple[int, ...]]:
    """Shapes of what save_all keeps: h, z, gz A1 s1, hq, aq A1^T, zq, aq act^T (chunk-major); without it, z,
    aq A1^T, zq and aq act^T where _keeps_products, else nothing."""
    batch, heads, length, head_dim = q.shape
    b, width = rule.chunk_size, a1.shape[-1]
    lead = (length // b, batch, heads, b)
    if not save_all:
        return [lead + (n,) for n in (head_dim, head_dim, head_dim, b)] if _keeps_products(rule, save_all) else []
    shapes = [lead + (n,) for n in (width, head_dim, width, width, head_dim, head_dim, b)]
    if not rule.update_input:  # gz A1 s1 feeds only gh, which a fixed input matrix does not have
        shapes[2] = (0,)
    return shapes


@torch.library.custom_op("miras::chunk_memory", mutates_args=())
def _chunk_memory(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, log_alpha: Tensor, a1: Tensor, a2: Tensor, gamma: Tensor,
    beta: Tensor, lengths: Tensor | None, rule: list[float], save: bool, save_all: bool, compiled: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:  # fmt: skip
    with torch.no_grad():
        return memory_forward(q, k, v, eta, log_alpha, a1, a2, gamma, beta, lengths, _rule_from(rule), save,
                              save_all, compiled)  # fmt: skip


@_chunk_memory.register_fake
def _(q, k, v, eta, log_alpha, a1, a2, gamma, beta, lengths, rule, save, save_all, compiled):
    rule_config = _rule_from(rule)
    num_chunks = q.shape[2] // rule_config.chunk_size
    groups = _groups(num_chunks, q.shape[0], rule_config, save_all)
    two_level = rule_config.checkpoint_group > 1 and not save_all
    slots = 0 if not save else len(groups) if two_level else num_chunks
    kept = [q.new_empty(shape) for shape in _kept_shapes(q, a1, rule_config, save_all)] if save else []
    states = (a1.new_empty(slots, *a1.shape), a2.new_empty(_input_slots(slots, rule_config), *a2.shape))
    norm_slots = 0 if two_level else slots
    norms = (a1.new_empty(norm_slots, *a1.shape[:2], 1, 4),
             a1.new_empty(norm_slots if rule_config.update_input else 0, *a1.shape[:2], 1, 4))  # fmt: skip
    return q.new_empty(q.shape), a1.new_empty(a1.shape), a2.new_empty(a2.shape), *states, *norms, kept


@torch.library.custom_op("miras::chunk_memory_backward", mutates_args=())
def _chunk_memory_backward(
    dy: Tensor, da1: Tensor, da2: Tensor, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, log_alpha: Tensor,
    gamma: Tensor, beta: Tensor, lengths: Tensor | None, states1: Tensor, states2: Tensor, norms1: Tensor,
    norms2: Tensor, kept: list[Tensor], rule: list[float], save_all: bool, compiled: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    with torch.no_grad():
        return memory_backward(dy, da1, da2, q, k, v, eta, log_alpha, gamma, beta, lengths, states1, states2, norms1,
                               norms2, kept, _rule_from(rule), save_all, compiled)  # fmt: skip


@_chunk_memory_backward.register_fake
def _(dy, da1, da2, q, k, v, eta, log_alpha, gamma, beta, lengths, states1, states2, norms1, norms2, kept, rule,
      save_all, compiled):  # fmt: skip
    return tuple(t.new_empty(t.shape) for t in (q, k, v, eta, log_alpha, da1, da2, gamma, beta))


def _setup_context(ctx, inputs, output):
    q, k, v, eta, log_alpha, a1, a2, gamma, beta, lengths, rule, _, save_all, compiled = inputs
    ctx.final_state = ((a1.shape, a1.dtype), (a2.shape, a2.dtype))
    _, _, _, states1, states2, norms1, norms2, kept = output
    ctx.save_for_backward(q, k, v, eta, log_alpha, gamma, beta, lengths, states1, states2, norms1, norms2, *kept)
    ctx.options = (rule, save_all, compiled)
    # The kept states and products are outputs that nothing differentiates: materialised, their zero gradients
    # would be a (chunks, B, H, d_h, m) fill per layer and step (33 MiB at 8192 tokens, d_h 64, m 256).
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, da1, da2, *_):
    q, k, v, eta, log_alpha, gamma, beta, lengths, states1, states2, norms1, norms2, *kept = ctx.saved_tensors
    # Without materialised gradients an output that fed nothing differentiated comes as None: y (a model whose
    # loss ignores the read) or the final state (no one carries it on, the usual case in training).
    dy = torch.zeros_like(q) if dy is None else dy
    da1, da2 = (q.new_zeros(shape, dtype=dtype) if grad is None else grad
                for grad, (shape, dtype) in zip((da1, da2), ctx.final_state))  # fmt: skip
    grads = _chunk_memory_backward(
        dy, da1, da2, q, k, v, eta, log_alpha, gamma, beta, lengths, states1, states2, norms1, norms2, kept,
        *ctx.options,
    )
    return (*grads, None, None, None, None, None)


_chunk_memory.register_autograd(_backward, setup_context=_setup_context)


def torch_memory(
    q, k, v, eta, log_alpha, a1, a2, gamma, beta, lengths, rule: RuleConfig, save_all=False, compiled=False
):
    """Reads (B, H, N*b, d_h) and the final accumulators of the padded chunk sequence (per-head gates).

    Inputs as chunkwise_memory's after compaction and padding: q, k, v (B, H, N*b, d_h); eta, log_alpha
    (B, H, N*b); a1 (B, H, d_h, m), a2 (B, H, m, d_h); gamma, beta (H, d_h); lengths: (B,) tokens per row
    or None (all rows full). save_all and compiled: see the module docstring.
    """
    tensors = (q, k, v, eta, log_alpha, a1, a2, gamma, beta)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    y, a1, a2, *_ = _chunk_memory(*tensors, lengths, _rule_values(rule), save, save_all, compiled)
    return y, a1, a2
