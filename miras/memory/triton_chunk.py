"""The Triton path of the memory: every chunk of one (row, head) in one program, forward and backward.

Same contract and numerics as the torch path (chunkwise.py + chunk_backward.py; the formulas are the
ones in chunk_backward.py's docstring), for per-head gates without the inner gradient clamp. This
module imports triton; the dispatcher (dispatch.py) imports it only when the Triton path is chosen.

Tiling, and why
---------------
One program per (row, head), looping over the row's chunks: the recurrence is sequential in the
chunks, and one launch for the whole sequence replaces the torch path's ~100 small kernels per
chunk (launches, not FLOPs, bound the torch path on a GPU). The state of a head is A1 (d_h x m) and
A2 (m x d_h), m = 4 d_h: 72 KiB (d_h = 48) to 512 KiB (d_h = 128) in fp32, more than one program's
registers or shared memory hold. So the state lives in global memory (L2-resident at these sizes)
and each pass over it streams column tiles of A1 with the matching row tiles of A2, BLOCK_M = 64 of
the m hidden units at a time (`_tile_offsets`); everything else of a chunk stays in registers: the chunk's
(b, d_h) inputs and their anchor-side tensors, and the (b, b) decay, score and gradient matrices.
Only the m axis is tiled because it is the only one that never needs a whole-axis reduction before
the tile's work can continue: LayerNorm and the l_p error need whole d_h rows, the decay whole
chunk rows and columns, while the m axis only adds into (b, d_h) and (b, b) accumulators. d_h,
m and the chunk are padded to powers of two (>= 16, tl.dot's minimum) with masked loads.

Forward, per chunk: an anchor pass over the m tiles (h = s2 k A2^T, z += gelu(h) A1^T), LayerNorm,
the l_p error and its LayerNorm backward (gz) in registers; then one pass that recomputes h (cheaper
than keeping (b, m) tensors), forms gh, the read's hq, gelu(hq), its (b, b) and (b, d_h)
accumulators, and commits the next state tile by tile; then the l_q normalisers of the new state
(a max pass and a power-sum pass, rule.lq_scale's arithmetic with its power-of-two peak). Each
chunk-start state is stored (the backward reads it), or, without autograd, two slots alternate.
With a fixed input matrix (rule.update_input False, the UPDATE_INPUT constexpr) the read's hq is s2 q A2^T
alone, A2 is copied unchanged at each commit, and the backward drops every term through gh.

Backward, per chunk from the last: recompute the anchor (pass A) and the read (pass B, which also
takes the commit's reductions against the incoming state gradient); pass C forms every (b, m) tile
gradient that does not wait for a whole-row quantity, updates the state gradient tile and parks the
two unfinished (b, m) gradients in a per-program scratch; the LayerNorm and l_p backward of the
anchor run in registers; pass D finishes the parked tiles and the A1 normaliser's gradient; pass E
adds the A2 normaliser's gradient (its scalar is complete only after pass D). The state gradient
is one (d_h x m, m x d_h) buffer per program, updated in place tile by tile.

Parallelism is the grid, B * H programs: fewer than the GPU's SMs leave SMs idle (an H100 has 132:
batch >= 8 at 16 heads fills it). Splitting m across programs would need a grid-wide reduction
per pass; the read half of a chunk could run over (row, head, chunk) in a separate launch from the
stored states. Both are for after a GPU has measured this one.

Precision: the state, its gradient and every accumulator are in the input dtype (fp32; fp64 in the
tests); matmul inputs follow torch's float32 matmul precision (`tf32` unless it is "highest"),
like the torch path's matmuls on the same GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .rule import RuleConfig

# Per chunk-start state, the l_q statistics the backward reads: (peak, n_q, n_2) of A1, then of A2.
STATS = tl.constexpr(6)

# ----------------------------------------------------------------------------------------------
# Elementwise pieces. A Python float meeting a tensor takes the tensor's dtype (Triton's weak typing),
# so the constants below are exact in fp64 too.


@triton.jit
def _pow(x, E: tl.constexpr):
    """x ** E for x >= 0: multiplications for E in 1..4 (as rule.abs_pow), exp2/log2 otherwise."""
    if E == 1.0:
        out = x
    elif E == 2.0:
        out = x * x
    elif E == 3.0:
        out = x * x * x
    elif E == 4.0:
        sq = x * x
        out = sq * sq
    else:
        positive = x > 0
        out = tl.where(positive, tl.exp2(E * tl.log2(tl.where(positive, x, 1.0))), 0.0)
    return out


@triton.jit
def _tanh(x):
    t = tl.exp(-2.0 * tl.abs(x))
    mag = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -mag, mag)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    """d gelu / dx, as ATen's gelu_backward (exact erf form)."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327


@triton.jit
def _gelu_second(x):
    """gelu''(x) = phi(x) (2 - x^2), x^2 capped at 170 inside exp as chunk_backward.py."""
    sq = x * x
    return tl.exp(tl.minimum(sq, 170.0) * -0.5) * 0.3989422804014327 * (2.0 - sq)


@triton.jit
def _lp_grad(e, P: tl.constexpr, SURROGATE: tl.constexpr, SHARP: tl.constexpr, ABS_EPS: tl.constexpr):
    """d/de sum |e|^p (rule.lp_error_gradient)."""
    if SURROGATE:
        out = P * _tanh(SHARP * e) * _pow(e * e + ABS_EPS, 0.5 * (P - 1.0))
    elif P == 2.0:
        out = 2.0 * e
    elif P == 3.0:
        out = 3.0 * e * tl.abs(e)
    else:
        out = P * _sign(e) * _pow(tl.abs(e), P - 1.0)
    return out


@triton.jit
def _lp_grad_derivative(e, P: tl.constexpr, SURROGATE: tl.constexpr, SHARP: tl.constexpr, ABS_EPS: tl.constexpr):
    """d f(e) / de for f = _lp_grad (chunk_backward._lp_error_derivative)."""
    if SURROGATE:
        base = e * e + ABS_EPS
        t = _tanh(SHARP * e)
        d_sign = SHARP * (1.0 - t * t) * _pow(base, 0.5 * (P - 1.0))
        out = P * (d_sign + t * (P - 1.0) * e * _pow(base, 0.5 * (P - 3.0)))
    elif P == 2.0:
        out = tl.full(e.shape, 2.0, e.dtype)
    elif P == 3.0:
        out = 6.0 * tl.abs(e)
    else:
        out = P * (P - 1.0) * _pow(tl.abs(e), P - 2.0)
    return out


@triton.jit
def _sqrt(x):
    """IEEE-rounded square root (tl.sqrt is the fast approximation in fp32)."""
    if x.dtype == tl.float64:
        out = tl.sqrt(x)
    else:
        out = tl.sqrt_rn(x)
    return out


@triton.jit
def _pow2_floor(x):
    """The largest power of two <= x for normal x > 0, from the exponent bits (exact, as exp2(floor(log2)))."""
    if x.dtype == tl.float64:
        out = (x.to(tl.int64, bitcast=True) & 0x7FF0000000000000).to(tl.float64, bitcast=True)
    else:
        out = (x.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return out


# ----------------------------------------------------------------------------------------------
# Row-wise LayerNorm over the (masked) d_h axis


@triton.jit
def _ln_stats(z, dmask, D: tl.constexpr, LN_EPS: tl.constexpr):
    mean = tl.sum(z, 1) / D
    centred = tl.where(dmask[None, :], z - mean[:, None], 0.0)
    std = _sqrt(tl.sum(centred * centred, 1) / D + LN_EPS)
    return centred / std[:, None], std


@triton.jit
def _ln_input_grad(d, z_hat, std, dmask, D: tl.constexpr):
    """Through z_hat = (z - mean) / std(z): d z from d z_hat (also the map g -> gz, it is self-adjoint)."""
    out = (d - (tl.sum(d, 1) / D)[:, None] - z_hat * (tl.sum(d * z_hat, 1) / D)[:, None]) / std[:, None]
    return tl.where(dmask[None, :], out, 0.0)


# ----------------------------------------------------------------------------------------------
# Chunk inputs, decays, state tiles, l_q statistics


@triton.jit
def _load_rows(ptr, t0, rows, rmask, dcols, dmask, D: tl.constexpr):
    return tl.load(ptr + (t0 + rows)[:, None] * D + dcols[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, value, t0, rows, rmask, dcols, dmask, D: tl.constexpr):
    tl.store(ptr + (t0 + rows)[:, None] * D + dcols[None, :], value, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _decays(log_alpha, eta, rows, CHUNK: tl.constexpr):
    """c = cumsum(log alpha); E[t, j] = exp(c_t - c_j) for j <= t (floored, rule.decay_matrix); D = E * eta_j.

    Also Q_t = exp(c_t), the last row of D and Q_b. Rows past the chunk are no-ops (eta = 0, log alpha = 0),
    so the last padded row equals the chunk's last row; it is taken by index all the same.
    """
    c = tl.cumsum(log_alpha, 0)
    causal = rows[:, None] >= rows[None, :]
    if c.dtype == tl.float64:
        floor = 0.9 * -708.3964185322641  # 0.9 log(tiny) in fp64
    else:
        floor = 0.9 * -87.33654475055310898657  # in fp32
    diff = tl.maximum(tl.where(causal, c[:, None] - c[None, :], floor), floor)
    decay = tl.where(causal, tl.exp(diff), 0.0)
    weights = decay * eta[None, :]
    query_decay = tl.exp(c)
    is_last = rows == CHUNK - 1
    last_w = tl.sum(tl.where(is_last[:, None], weights, 0.0), 0)
    total_decay = tl.sum(tl.where(is_last, query_decay, 0.0), 0)
    return decay, weights, query_decay, last_w, total_decay


@triton.jit
def _tile_offsets(j, dcols, dmask, D: tl.constexpr, M: tl.constexpr, BM: tl.constexpr):
    """Offsets and masks of columns [j, j + BM) of A1 (d_h x m) and the same rows of A2 (m x d_h)."""
    mcols = j + tl.arange(0, BM)
    mmask = mcols < M
    off1 = dcols[:, None] * M + mcols[None, :]
    mask1 = dmask[:, None] & mmask[None, :]
    off2 = mcols[:, None] * D + dcols[None, :]
    mask2 = mmask[:, None] & dmask[None, :]
    return off1, mask1, off2, mask2


@triton.jit
def _peak_and_norm(ptr, dcols, dmask, D: tl.constexpr, M: tl.constexpr, BM: tl.constexpr, Q: tl.constexpr,
                   SECOND: tl.constexpr):  # fmt: skip
    """(peak, ||A / peak||_q, ||A / peak||_2) of the matrix at ptr, peak = the power of two below max |A|
    (rule.lq_scale).

    SECOND: the matrix is A2 (m x d_h), else A1 (d_h x m). Two passes, max then the power sums.
    """
    biggest = tl.full([], 0.0, ptr.dtype.element_ty)
    for j in range(0, M, BM):
        off1, mask1, off2, mask2 = _tile_offsets(j, dcols, dmask, D, M, BM)
        if SECOND:
            a = tl.load(ptr + off2, mask=mask2, other=0.0)
        else:
            a = tl.load(ptr + off1, mask=mask1, other=0.0)
        biggest = tl.maximum(biggest, tl.max(tl.max(tl.abs(a), 1), 0))
    if biggest.dtype == tl.float64:
        tiny = tl.full([], 2.2250738585072014e-308, tl.float64)
    else:
        tiny = tl.full([], 1.1754943508222875e-38, tl.float32)
    peak = _pow2_floor(tl.maximum(biggest, tiny))
    total = tl.full([], 0.0, ptr.dtype.element_ty)
    squares = tl.full([], 0.0, ptr.dtype.element_ty)
    for j in range(0, M, BM):
        off1, mask1, off2, mask2 = _tile_offsets(j, dcols, dmask, D, M, BM)
        if SECOND:
            a = tl.load(ptr + off2, mask=mask2, other=0.0)
        else:
            a = tl.load(ptr + off1, mask=mask1, other=0.0)
        scaled = a / peak
        total += tl.sum(tl.sum(_pow(tl.abs(scaled), Q), 1), 0)
        squares += tl.sum(tl.sum(scaled * scaled, 1), 0)
    # both sums are >= 1 unless A is all zero (rule.lq_scale): the clamps only keep that case finite
    return peak, _pow(tl.maximum(total, 1.0), 1.0 / Q), tl.sqrt(tl.maximum(squares, 1.0))


@triton.jit
def _store_stats(ptr, peak1, norm1, l2_1, peak2, norm2, l2_2):
    tl.store(ptr + 0, peak1)
    tl.store(ptr + 1, norm1)
    tl.store(ptr + 2, l2_1)
    tl.store(ptr + 3, peak2)
    tl.store(ptr + 4, norm2)
    tl.store(ptr + 5, l2_2)


@triton.jit
def _lq_scale(peak, scaled_norm, scaled_l2, Q: tl.constexpr, LQ_FLOOR: tl.constexpr, SCALE_FREE: tl.constexpr):
    """The normaliser s (rule.lq_scale): 1 / max(||A||_q, floor)^(q-2), or (n_2 / n_q)^(q-2) scale-free."""
    if SCALE_FREE:
        return _pow(scaled_l2 / scaled_norm, Q - 2.0)
    return 1.0 / _pow(tl.maximum(peak * scaled_norm, LQ_FLOOR), Q - 2.0)


@triton.jit
def _lq_coefficients(d_scale, scale, peak, scaled_norm, scaled_l2, Q: tl.constexpr, LQ_FLOOR: tl.constexpr,
                     SCALE_FREE: tl.constexpr):  # fmt: skip
    """dA = c_dir * a |a|^(q-2) + c_lin * a, a = A / peak, carries ds into A (torch_chunk._lq_backward)."""
    if SCALE_FREE:
        factor = d_scale * (Q - 2.0) * scale / peak
        c_dir = -factor / _pow(scaled_norm, Q)
        return c_dir, factor / (scaled_l2 * scaled_l2)
    norm = peak * scaled_norm
    clamped = tl.maximum(norm, LQ_FLOOR)
    d_norm = tl.where(norm >= LQ_FLOOR, d_scale * (-(Q - 2.0)) * scale / clamped, 0.0)
    return d_norm / _pow(scaled_norm, Q - 1.0), tl.zeros_like(d_norm)


# ----------------------------------------------------------------------------------------------
# The anchor: inner forward and hand-written inner backward of l_p(M(k; W), v)


@triton.jit
def _anchor(k, v, ks, s1, gamma, beta, st1, st2, dcols, dmask,
            BT: tl.constexpr, BD: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
            P: tl.constexpr, SURROGATE: tl.constexpr, SHARP: tl.constexpr, ABS_EPS: tl.constexpr,
            LN_EPS: tl.constexpr, PRECISION: tl.constexpr, DT: tl.constexpr):  # fmt: skip
    """Pass over the m tiles: z = act A1^T; then LayerNorm, the l_p error and gz in registers."""
    z_raw = tl.zeros([BT, BD], ks.dtype)
    for j in range(0, M, BM):
        off1, mask1, off2, mask2 = _tile_offsets(j, dcols, dmask, D, M, BM)
        a1 = tl.load(st1 + off1, mask=mask1, other=0.0)
        a2 = tl.load(st2 + off2, mask=mask2, other=0.0)
        act = _gelu(tl.dot(ks, tl.trans(a2), input_precision=PRECISION, out_dtype=DT))
        z_raw = tl.dot(act, tl.trans(a1), z_raw, input_precision=PRECISION, out_dtype=DT)
    z_hat, std = _ln_stats(z_raw * s1, dmask, D, LN_EPS)
    err = k + gamma[None, :] * z_hat + beta[None, :] - v
    f_err = _lp_grad(err, P, SURROGATE, SHARP, ABS_EPS)
    g = gamma[None, :] * f_err
    gz = _ln_input_grad(g, z_hat, std, dmask, D)
    return z_raw, z_hat, std, err, f_err, g, gz


@triton.jit
def _tile_forward(ks, gzs, qs, p_neg, a1, a2, PRECISION: tl.constexpr, DT: tl.constexpr):
    """One m tile of the anchor and the read: h, act, gz_w = s1 gz A1, gh, hq, aq."""
    h = tl.dot(ks, tl.trans(a2), input_precision=PRECISION, out_dtype=DT)
    act = _gelu(h)
    gz_w = tl.dot(gzs, a1, input_precision=PRECISION, out_dtype=DT)
    gh = gz_w * _gelu_grad(h)
    hq = tl.dot(qs, tl.trans(a2), input_precision=PRECISION, out_dtype=DT)
    hq = tl.dot(p_neg, gh, hq, input_precision=PRECISION, out_dtype=DT)
    return h, act, gz_w, gh, hq, _gelu(hq)


@triton.jit
def _program(len_ptr, gamma_ptr, beta_ptr, H: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
             BT: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """This program's (row, head): its index, the row's token count, index vectors, the LayerNorm affine."""
    pid = tl.program_id(0).to(tl.int64)
    head = pid % H
    row_len = tl.load(len_ptr + pid // H)
    rows = tl.arange(0, BT)
    dcols = tl.arange(0, BD)
    dmask = dcols < D
    gamma = tl.load(gamma_ptr + head * D + dcols, mask=dmask, other=0.0)
    beta = tl.load(beta_ptr + head * D + dcols, mask=dmask, other=0.0)
    return pid, row_len, rows, rows < CHUNK, dcols, dmask, gamma, beta


@triton.jit
def _chunk_start(q_ptr, k_ptr, v_ptr, eta_ptr, la_ptr, seq, gates, n, rows, rmask, dcols, dmask,
                 s1, s2, gamma, beta, cur1, cur2,
                 BT: tl.constexpr, BD: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
                 CHUNK: tl.constexpr, P: tl.constexpr, SURROGATE: tl.constexpr, SHARP: tl.constexpr,
                 ABS_EPS: tl.constexpr, LN_EPS: tl.constexpr, UPDATE_INPUT: tl.constexpr, PRECISION: tl.constexpr,
                 DT: tl.constexpr):  # fmt: skip
    """Chunk n's inputs, decays and anchor (pass A), and the (b, *) operands every tile pass uses."""
    t0 = n * CHUNK
    q = _load_rows(q_ptr + seq, t0, rows, rmask, dcols, dmask, D)
    k = _load_rows(k_ptr + seq, t0, rows, rmask, dcols, dmask, D)
    v = _load_rows(v_ptr + seq, t0, rows, rmask, dcols, dmask, D)
    eta = tl.load(eta_ptr + gates + t0 + rows, mask=rmask, other=0.0)
    log_alpha = tl.load(la_ptr + gates + t0 + rows, mask=rmask, other=0.0)
    decay, weights, query_decay, last_w, total_decay = _decays(log_alpha, eta, rows, CHUNK)
    ks = k * s2
    z_raw, z_hat, std, err, f_err, g, gz = _anchor(
        k, v, ks, s1, gamma, beta, cur1, cur2, dcols, dmask,
        BT, BD, D, M, BM, P, SURROGATE, SHARP, ABS_EPS, LN_EPS, PRECISION, DT,
    )  # fmt: skip
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=DT)
    if UPDATE_INPUT:
        qs = q * (query_decay * s2)[:, None]
        p_neg = weights * -s2 * scores
    else:  # hq = s2 q A2^T: the input matrix neither decays nor takes writes
        qs = q * s2
        p_neg = tl.zeros([BT, BT], q.dtype)
    minus_w = -last_w[:, None]
    return (t0, q, k, decay, weights, query_decay, last_w, total_decay, ks, z_raw, z_hat, std, err, f_err, g, gz,
            gz * s1, qs, scores, p_neg, minus_w)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, eta_ptr, la_ptr, gamma_ptr, beta_ptr, len_ptr,
    a1_in, a2_in, y_ptr, st1_ptr, st2_ptr, stat_ptr,
    L, c0, c1, NS,
    H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, CHUNK: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    P: tl.constexpr, Q: tl.constexpr, SURROGATE: tl.constexpr, SHARP: tl.constexpr, ABS_EPS: tl.constexpr,
    LN_EPS: tl.constexpr, LQ_FLOOR: tl.constexpr, SCALE_FREE: tl.constexpr, UPDATE_INPUT: tl.constexpr,
    SAVE: tl.constexpr, WRITE_Y: tl.constexpr, PRECISION: tl.constexpr, DT: tl.constexpr,
):  # fmt: skip
    """Chunks [c0, c1) of one (row, head); state slots: chunk-start states (SAVE) or two alternating."""
    pid, row_len, rows, rmask, dcols, dmask, gamma, beta = _program(len_ptr, gamma_ptr, beta_ptr, H, D, CHUNK, BT, BD)
    seq = pid * L * D
    gates = pid * L
    state_size = D * M
    st1 = st1_ptr + pid * NS * state_size
    st2 = st2_ptr + pid * NS * state_size

    # The incoming state into slot 0, and its l_q statistics.
    for j in range(0, M, BM):
        off1, mask1, off2, mask2 = _tile_offsets(j, dcols, dmask, D, M, BM)
        tl.store(st1 + off1, tl.load(a1_in + pid * state_size + off1, mask=mask1), mask=mask1)
        tl.store(st2 + off2, tl.load(a2_in + pid * state_size + off2, mask=mask2), mask=mask2)
    tl.debug_barrier()
    one = tl.full([], 1.0, gamma.dtype)
    peak1, norm1, l2_1, peak2, norm2, l2_2 = one, one, one, one, one, one
    if Q != 2.0:
        peak1, norm1, l2_1 = _peak_and_norm(st1, dcols, dmask, D, M, BM, Q, False)
        peak2, norm2, l2_2 = _peak_and_norm(st2, dcols, dmask, D, M, BM, Q, True)

    for n in range(c0, c1):
        i = n - c0
        if SAVE:
            cur = i
            nxt = i + 1
        else:
            cur = i % 2
            nxt = (i + 1) % 2
        cur1 = st1 + cur * state_size
        cur2 = st2 + cur * state_size
        nxt1 = st1 + nxt * state_size
        nxt2 = st2 + nxt * state_size
        if Q != 2.0:
            s1 = _lq_scale(peak1, norm1, l2_1, Q, LQ_FLOOR, SCALE_FREE)
            s2 = _lq_scale(peak2, norm2, l2_2, Q, LQ_FLOOR, SCALE_FREE)
            if SAVE:
                _store_stats(stat_ptr + (pid * NS + cur) * STATS, peak1, norm1, l2_1, peak2, norm2, l2_2)
        else:
            s1, s2 = one, one

        (t0, q, k, decay, weights, query_decay, last_w, total_decay, ks, z_raw, z_hat, std, err, f_err, g, gz,
         gzs, qs, scores, p_neg, minus_w) = _chunk_start(
            q_ptr, k_ptr, v_ptr, eta_ptr, la_ptr, seq, gates, n, rows, rmask, dcols, dmask, s1, s2, gamma, beta,
            cur1, cur2, BT, BD, D, M, BM, CHUNK, P, SURROGATE, SHARP, ABS_EPS, LN_EPS, UPDATE_INPUT, PRECISION, DT,
        )  # fmt: skip
        full = (n + 1) * CHUNK <= row_len
        k_w = k * minus_w
        gz_w_commit = gz * minus_w
        s_aa = tl.zeros([BT, BT], q.dtype)
        a_q = tl.zeros([BT, BD], q.dtype)
        for j in range(0, M, BM):
            off1, mask1, off2, mask2 = _tile_offsets(j, dcols, dmask, D, M, BM)
            a1 = tl.load(cur1 + off1, mask=mask1, other=0.0)
            a2 = tl.load(cur2 + off2, mask=mask2, other=0.0)
            h, act, gz_w, gh, hq, aq = _tile_forward(ks, gzs, qs, p_neg, a1, a2, PRECISION, DT)
            if WRITE_Y:
                s_aa = tl.dot(aq, tl.trans(act), s_aa, input_precision=PRECISION, out_dtype=DT)
                a_q = tl.dot(aq, tl.trans(a1), a_q, input_precision=PRECISION, out_dtype=DT)
            # commit: A' = Q_b A - grad^T (x * D[b]); rows whose chunk is not full keep their anchor
            new1 = tl.dot(tl.trans(gz_w_commit), act, a1 * total_decay, input_precision=PRECISION, out_dtype=DT)
            tl.store(nxt1 + off1, tl.where(full, new1, a1), mask=mask1)
            if UPDATE_INPUT:
                new2 = tl.dot(tl.trans(gh), k_w, a2 * total_decay, input_precision=PRECISION, out_dtype=DT)
                tl.store(nxt2 + off2, tl.where(full, new2, a2), mask=mask2)
            else:
                tl.store(nxt2 + off2, a2, mask=mask2)
        if WRITE_Y:
            r_neg = weights * -s1 * s_aa
            zq = tl.dot(r_neg, gz, a_q * (query_decay * s1)[:, None], input_precision=PRECISION, out_dtype=DT)
            zq_hat, _ = _ln_stats(zq, dmask, D, LN_EPS)
            y = q + gamma[None, :] * zq_hat + beta[None, :]
            _store_rows(y_ptr + seq, y, t0, rows, rmask, dcols, dmask, D)
        tl.debug_barrier()
        if Q != 2.0:
            peak1, norm1, l2_1 = _peak_and_norm(nxt1, dcols, dmask, D, M, BM, Q, False)
            peak2, norm2, l2_2 = _peak_and_norm(nxt2, dcols, dmask, D, M, BM, Q, True)
    if SAVE and Q != 2.0:  # the final state's statistics complete the table (unused by the backward)
        last = c1 - c0
        _store_stats(stat_ptr + (pid * NS + last) * STATS, peak1, norm1, l2_1, peak2, norm2, l2_2)


# ----------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _backward_kernel(
    q_ptr, k_ptr, v_ptr, eta_ptr, la_ptr, gamma_ptr, beta_ptr, len_ptr, dy_ptr,
    st1_ptr, st2_ptr, stat_ptr, da1_ptr, da2_ptr,
    dq_ptr, dk_ptr, dv_ptr, deta_ptr, dla_ptr, dgamma_ptr, dbeta_ptr, scratch_ptr,
    L, c0, c1, NS, DETACH_EVERY,
    H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, CHUNK: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    P: tl.constexpr, Q: tl.constexpr, SURROGATE: tl.constexpr, SHARP: tl.constexpr, ABS_EPS: tl.constexpr,
    LN_EPS: tl.constexpr, LQ_FLOOR: tl.constexpr, SCALE_FREE: tl.constexpr, UPDATE_INPUT: tl.constexpr,
    PRECISION: tl.constexpr, DT: tl.constexpr,
):  # fmt: skip
    """Chunks [c0, c1) from the last. da1/da2 hold the gradient of the state after chunk c1 - 1 on entry
    and of the state at chunk c0 on exit; dgamma/dbeta are accumulated into."""
    pid, row_len, rows, rmask, dcols, dmask, gamma, beta = _program(len_ptr, gamma_ptr, beta_ptr, H, D, CHUNK, BT, BD)
    seq = pid * L * D
    gates = pid * L
    state_size = D * M
    da1 = da1_ptr + pid * state_size
    da2 = da2_ptr + pid * state_size
    # (b, m) scratch: the two (b, m) gradients pass C leaves for pass D, stored (BT, M) row-major.
    park_act = scratch_ptr + pid * 2 * BT * M
    park_h = park_act + BT * M
    d_gamma = tl.zeros([BD], gamma.dtype)
    d_beta = tl.zeros([BD], gamma.dtype)
    one = tl.full([], 1.0, gamma.dtype)
    inv_d = one / D

    for back in range(0, c1 - c0):
        n = c1 - 1 - back
        i = n - c0
        cur1 = st1_ptr + (pid * NS + i) * state_size
        cur2 = st2_ptr + (pid * NS + i) * state_size
        if Q != 2.0:
            row = stat_ptr + (pid * NS + i) * STATS
            peak1, norm1, l2_1 = tl.load(row + 0), tl.load(row + 1), tl.load(row + 2)
            peak2, norm2, l2_2 = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)
            s1 = _lq_scale(peak1, norm1, l2_1, Q, LQ_FLOOR, SCALE_FREE)
            s2 = _lq_scale(peak2, norm2, l2_2, Q, LQ_FLOOR, SCALE_FREE)
        else:
            s1, s2 = one, one

        # ---- pass A: the anchor ----
        (t0, q, k, decay, weights, query_decay, last_w, total_decay, ks, z_raw, z_hat, std, err, f_err, g, gz,
         gzs, qs, scores, p_neg, minus_w) = _chunk_start(
            q_ptr, k_ptr, v_ptr, eta_ptr, la_ptr, seq, gates, n, rows, rmask, dcols, dmask, s1, s2, gamma, beta,
            cur1, cur2, BT, BD, D, M, BM, CHUNK, P, SURROGATE, SHARP, ABS_EPS, LN_EPS, UPDATE_INPUT, PRECISION, DT,
        )  # fmt: skip
        dy = _load_rows(dy_ptr + seq, t0, rows, rmask, dcols, dmask, D)
        full = (n + 1) * CHUNK <= row_len
        keep = tl.where(full, one, 0.0)  # the commit's share of the incoming state gradient
        through = tl.where(full, total_decay, one)  # d A_in from d A_out, elementwise
        k_w = k * minus_w
        gz_wt = gz * minus_w

        # ---- pass B: the read's accumulators; the commit's reductions against dA_out ----
        s_aa = tl.zeros([BT, BT], q.dtype)
        a_q = tl.zeros([BT, BD], q.dtype)
        d_kw = tl.zeros([BT, BD], q.dtype)
        d_gzw = tl.zeros([BT, BD], q.dtype)
        d_total = tl.full([], 0.0, q.dtype)
        for j in range(0, M, BM):
            off1, mask1, off2, mask2 = _tile_offsets(j, dcols, dmask, D, M, BM)
            a1 = tl.load(cur1 + off1, mask=mask1, other=0.0)
            a2 = tl.load(cur2 + off2, mask=mask2, other=0.0)
            g1 = tl.load(da1 + off1, mask=mask1, other=0.0) * keep
            g2 = tl.load(da2 + off2, mask=mask2, other=0.0) * keep
            h, act, gz_w, gh, hq, aq = _tile_forward(ks, gzs, qs, p_neg, a1, a2, PRECISION, DT)
            s_aa = tl.dot(aq, tl.trans(act), s_aa, input_precision=PRECISION, out_dtype=DT)
            a_q = tl.dot(aq, tl.trans(a1), a_q, input_precision=PRECISION, out_dtype=DT)
            d_gzw = tl.dot(act, tl.trans(g1), d_gzw, input_precision=PRECISION, out_dtype=DT)
            d_total += tl.sum(tl.sum(g1 * a1, 1), 0)
            if UPDATE_INPUT:
                d_kw = tl.dot(gh, g2, d_kw, input_precision=PRECISION, out_dtype=DT)
                d_total += tl.sum(tl.sum(g2 * a2, 1), 0)
        r_neg = weights * -s1 * s_aa
        zq = tl.dot(r_neg, gz, a_q * (query_decay * s1)[:, None], input_precision=PRECISION, out_dtype=DT)
        zq_hat, std_q = _ln_stats(zq, dmask, D, LN_EPS)

        # ---- the commit ----
        dk = d_kw * minus_w
        d_gz = d_gzw * minus_w
        d_last_w = -(tl.sum(d_kw * k, 1) + tl.sum(d_gzw * gz, 1))

        # ---- the read: y = q + LN(zq) ----
        d_gamma += tl.sum(dy * zq_hat, 0)
        d_beta += tl.sum(dy, 0)
        d_zq = _ln_input_grad(gamma[None, :] * dy, zq_hat, std_q, dmask, D)
        d_aq_out = d_zq * (query_decay * s1)[:, None]
        row = tl.sum(d_zq * a_q, 1)
        d_qd = row * s1
        d_s1 = tl.sum(row * query_decay, 0)
        d_r = tl.dot(d_zq, tl.trans(gz), input_precision=PRECISION, out_dtype=DT)
        d_gz = tl.dot(tl.trans(r_neg), d_zq, d_gz, input_precision=PRECISION, out_dtype=DT)
        d_weighted = d_r * weights
        d_weights = d_r * -s1 * s_aa
        d_s1 -= tl.sum(tl.sum(d_weighted * s_aa, 1), 0)
        d_saa = d_weighted * -s1

        # ---- pass C: (b, m) tile gradients; the state gradient's read and commit terms ----
        tl.debug_barrier()  # pass B's reads of the state gradient come before pass C overwrites it
        d_p = tl.zeros([BT, BT], q.dtype)
        d_qs = tl.zeros([BT, BD], q.dtype)
        d_gzs = tl.zeros([BT, BD], q.dtype)
        for j in range(0, M, BM):
            off1, mask1, off2, mask2 = _tile_offsets(j, dcols, dmask, D, M, BM)
            mcols = j + tl.arange(0, BM)
            park = rows[:, None] * M + mcols[None, :]
            park_mask = mcols[None, :] < M
            a1 = tl.load(cur1 + off1, mask=mask1, other=0.0)
            a2 = tl.load(cur2 + off2, mask=mask2, other=0.0)
            g1_out = tl.load(da1 + off1, mask=mask1, other=0.0)
            g2_out = tl.load(da2 + off2, mask=mask2, other=0.0)
            h, act, gz_w, gh, hq, aq = _tile_forward(ks, gzs, qs, p_neg, a1, a2, PRECISION, DT)
            d_act = tl.dot(gz_wt, g1_out * keep, input_precision=PRECISION, out_dtype=DT)
            d_aq = tl.dot(d_aq_out, a1, input_precision=PRECISION, out_dtype=DT)
            d_aq = tl.dot(d_saa, act, d_aq, input_precision=PRECISION, out_dtype=DT)
            new1 = tl.dot(tl.trans(d_aq_out), aq, g1_out * through, input_precision=PRECISION, out_dtype=DT)
            d_act = tl.dot(tl.trans(d_saa), aq, d_act, input_precision=PRECISION, out_dtype=DT)
            d_hq = d_aq * _gelu_grad(hq)
            d_qs = tl.dot(d_hq, a2, d_qs, input_precision=PRECISION, out_dtype=DT)
            if UPDATE_INPUT:
                d_gh = tl.dot(k_w, tl.trans(g2_out * keep), input_precision=PRECISION, out_dtype=DT)
                d_p = tl.dot(d_hq, tl.trans(gh), d_p, input_precision=PRECISION, out_dtype=DT)
                d_gh = tl.dot(tl.trans(p_neg), d_hq, d_gh, input_precision=PRECISION, out_dtype=DT)
                new2 = tl.dot(tl.trans(d_hq), qs, g2_out * through, input_precision=PRECISION, out_dtype=DT)
                # the anchor's gh = gelu'(h) * gz_w, differentiated in gz_w and in h
                d_gzw_full = d_gh * _gelu_grad(h)
                d_h = d_gh * gz_w * _gelu_second(h)
                d_gzs = tl.dot(d_gzw_full, tl.trans(a1), d_gzs, input_precision=PRECISION, out_dtype=DT)
                new1 = tl.dot(tl.trans(gzs), d_gzw_full, new1, input_precision=PRECISION, out_dtype=DT)
            else:  # A2 passes every chunk unchanged; gh is used nowhere
                new2 = tl.dot(tl.trans(d_hq), qs, g2_out, input_precision=PRECISION, out_dtype=DT)
                d_h = tl.zeros([BT, BM], q.dtype)
            tl.store(da1 + off1, new1, mask=mask1)
            tl.store(da2 + off2, new2, mask=mask2)
            tl.store(park_act + park, d_act, mask=park_mask)
            tl.store(park_h + park, d_h, mask=park_mask)
        if UPDATE_INPUT:
            d_weighted = d_p * weights
            d_weights += d_p * -s2 * scores
            d_s2 = -tl.sum(tl.sum(d_weighted * scores, 1), 0)
            d_scores = d_weighted * -s2
            dq = dy + d_qs * (query_decay * s2)[:, None]
            row = tl.sum(d_qs * q, 1)
            d_qd += row * s2
            d_s2 += tl.sum(row * query_decay, 0)
            dq = tl.dot(d_scores, k, dq, input_precision=PRECISION, out_dtype=DT)
            dk = tl.dot(tl.trans(d_scores), q, dk, input_precision=PRECISION, out_dtype=DT)
        else:  # hq = s2 q A2^T
            dq = dy + d_qs * s2
            d_s2 = tl.sum(tl.sum(d_qs * q, 1), 0)

        # ---- the anchor's LayerNorm and l_p backward, in registers ----
        d_gz += d_gzs * s1
        d_s1 += tl.sum(tl.sum(d_gzs * gz, 1), 0)
        r = d_gz / std[:, None]
        d_g = _ln_input_grad(d_gz, z_hat, std, dmask, D)
        d_zhat = -(tl.sum(g * z_hat, 1) * inv_d)[:, None] * r - (tl.sum(r * z_hat, 1) * inv_d)[:, None] * g
        d_std = -tl.sum(d_gz * gz, 1) / std
        d_gamma += tl.sum(d_g * f_err, 0)
        d_err = gamma[None, :] * d_g * _lp_grad_derivative(err, P, SURROGATE, SHARP, ABS_EPS)
        dk += d_err
        dv = -d_err
        d_gamma += tl.sum(d_err * z_hat, 0)
        d_beta += tl.sum(d_err, 0)
        d_zhat += gamma[None, :] * d_err
        d_z = _ln_input_grad(d_zhat, z_hat, std, dmask, D) + (d_std * inv_d)[:, None] * z_hat
        d_s1 += tl.sum(tl.sum(d_z * z_raw, 1), 0)
        d_zr = d_z * s1
        if Q != 2.0:
            s1_dir, s1_lin = _lq_coefficients(d_s1, s1, peak1, norm1, l2_1, Q, LQ_FLOOR, SCALE_FREE)
        tl.debug_barrier()

        # ---- pass D: finish the parked tiles; the A1 normaliser ----
        d_ks = tl.zeros([BT, BD], q.dtype)
        for j in range(0, M, BM):
            off1, mask1, off2, mask2 = _tile_offsets(j, dcols, dmask, D, M, BM)
            mcols = j + tl.arange(0, BM)
            park = rows[:, None] * M + mcols[None, :]
            park_mask = mcols[None, :] < M
            a1 = tl.load(cur1 + off1, mask=mask1, other=0.0)
            a2 = tl.load(cur2 + off2, mask=mask2, other=0.0)
            h = tl.dot(ks, tl.trans(a2), input_precision=PRECISION, out_dtype=DT)
            act = _gelu(h)
            d_act = tl.load(park_act + park, mask=park_mask, other=0.0)
            d_act = tl.dot(d_zr, a1, d_act, input_precision=PRECISION, out_dtype=DT)
            d_h = tl.load(park_h + park, mask=park_mask, other=0.0) + d_act * _gelu_grad(h)
            d_ks = tl.dot(d_h, a2, d_ks, input_precision=PRECISION, out_dtype=DT)
            new1 = tl.load(da1 + off1, mask=mask1, other=0.0)
            new1 = tl.dot(tl.trans(d_zr), act, new1, input_precision=PRECISION, out_dtype=DT)
            if Q != 2.0:
                scaled = a1 / peak1
                new1 += s1_dir * scaled * _pow(tl.abs(scaled), Q - 2.0) + s1_lin * scaled
            new2 = tl.load(da2 + off2, mask=mask2, other=0.0)
            new2 = tl.dot(tl.trans(d_h), ks, new2, input_precision=PRECISION, out_dtype=DT)
            tl.store(da1 + off1, new1, mask=mask1)
            tl.store(da2 + off2, new2, mask=mask2)
        dk += d_ks * s2
        d_s2 += tl.sum(tl.sum(d_ks * k, 1), 0)
        tl.debug_barrier()

        # ---- pass E: the A2 normaliser; the truncated-BPTT cut ----
        cut = (DETACH_EVERY > 0) & (n > 0) & ((n * CHUNK) % tl.maximum(DETACH_EVERY, 1) == 0)
        if Q != 2.0:
            s2_dir, s2_lin = _lq_coefficients(d_s2, s2, peak2, norm2, l2_2, Q, LQ_FLOOR, SCALE_FREE)
            for j in range(0, M, BM):
                off1, mask1, off2, mask2 = _tile_offsets(j, dcols, dmask, D, M, BM)
                a2 = tl.load(cur2 + off2, mask=mask2, other=0.0)
                scaled = a2 / peak2
                new2 = tl.load(da2 + off2, mask=mask2, other=0.0)
                new2 += s2_dir * scaled * _pow(tl.abs(scaled), Q - 2.0) + s2_lin * scaled
                tl.store(da2 + off2, new2, mask=mask2)
        if cut:
            tl.debug_barrier()
            for j in range(0, M, BM):
                off1, mask1, off2, mask2 = _tile_offsets(j, dcols, dmask, D, M, BM)
                tl.store(da1 + off1, tl.zeros([BD, BM], q.dtype), mask=mask1)
                tl.store(da2 + off2, tl.zeros([BM, BD], q.dtype), mask=mask2)
        tl.debug_barrier()

        # ---- decays: D[t, j] = exp(c_t - c_j) eta_j, Q_t = exp(c_t), c = cumsum(log alpha) ----
        is_last = rows == CHUNK - 1
        d_weights += tl.where(is_last[:, None], d_last_w[None, :], 0.0)
        d_qd += tl.where(is_last, d_total, 0.0)
        d_eta = tl.sum(d_weights * decay, 0)
        weighted = d_weights * weights
        d_cum = d_qd * query_decay + tl.sum(weighted, 1) - tl.sum(weighted, 0)
        d_log_alpha = tl.sum(d_cum, 0) - tl.cumsum(d_cum, 0) + d_cum  # the reverse cumulative sum

        _store_rows(dq_ptr + seq, dq, t0, rows, rmask, dcols, dmask, D)
        _store_rows(dk_ptr + seq, dk, t0, rows, rmask, dcols, dmask, D)
        _store_rows(dv_ptr + seq, dv, t0, rows, rmask, dcols, dmask, D)
        tl.store(deta_ptr + gates + t0 + rows, d_eta, mask=rmask)
        tl.store(dla_ptr + gates + t0 + rows, d_log_alpha, mask=rmask)

    g_off = pid * D + dcols
    tl.store(dgamma_ptr + g_off, tl.load(dgamma_ptr + g_off, mask=dmask, other=0.0) + d_gamma, mask=dmask)
    tl.store(dbeta_ptr + g_off, tl.load(dbeta_ptr + g_off, mask=dmask, other=0.0) + d_beta, mask=dmask)


# ----------------------------------------------------------------------------------------------
# Host side


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def _matmul_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 follows torch's float32 matmul setting (TF32 unless "highest")."""
    if dtype == torch.float64 or torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


@dataclass(frozen=True)
class Tiles:
    """Launch shape of both kernels: hidden units per m tile, warps per program, pipeline stages.

    Untuned: no GPU has run these kernels yet. num_stages = 1 keeps shared memory to the dot operands
    (the state tiles come from L2; pipelining their loads is for after a measurement).
    """

    block_m: int = 64
    num_warps: int = 8
    num_stages: int = 1


def _tile_candidates(head_dim: int, width: int) -> list[Tiles]:
    """Largest first; the next is tried when a launch runs out of registers or shared memory."""
    block = min(64, _pow2(width))
    first = Tiles(block, 8 if _pow2(head_dim) >= 64 else 4, 1)
    return [first] + [Tiles(smaller, 4, 1) for smaller in (32, 16) if smaller < block]


# (kernel, its constexpr arguments) -> the Tiles that launched: the fallback search runs once per shape.
_LAUNCHED: dict[tuple, Tiles] = {}


def _launch(name: str, kernel, grid: tuple, args: tuple, meta: dict, tiles: Tiles | None) -> None:
    """kernel[grid](*args) with the given tiles, or the largest candidate that fits this GPU."""
    key = (name, tuple(sorted(meta.items())))
    if tiles is not None:
        options = [tiles]
    elif key in _LAUNCHED:
        options = [_LAUNCHED[key]]
    else:
        options = _tile_candidates(meta["D"], meta["M"])
    for index, option in enumerate(options):
        block_m = max(16, min(option.block_m, _pow2(meta["M"])))
        try:
            kernel[grid](*args, BM=block_m, num_warps=option.num_warps, num_stages=option.num_stages, **meta)
        except OutOfResources:
            if index == len(options) - 1:
                raise
            continue
        _LAUNCHED[key] = option
        return


def _meta(rule: RuleConfig, head_dim: int, width: int, heads: int, dtype: torch.dtype) -> dict:
    """The constexpr arguments shared by both kernels."""
    return dict(
        H=heads,
        D=head_dim,
        M=width,
        CHUNK=rule.chunk_size,
        BT=_pow2(rule.chunk_size),
        BD=_pow2(head_dim),
        P=float(rule.p),
        Q=float(rule.q),
        SURROGATE=bool(rule.uses_surrogate),
        SHARP=float(rule.sign_sharpness),
        ABS_EPS=float(rule.abs_eps),
        LN_EPS=float(rule.ln_eps),
        LQ_FLOOR=float(rule.lq_floor),
        SCALE_FREE=rule.lq_norm == "scale_free",
        UPDATE_INPUT=bool(rule.update_input),
        PRECISION=_matmul_precision(dtype),
        DT=tl.float64 if dtype == torch.float64 else tl.float32,  # tl.dot's accumulator (explicit for Triton < 3.6)
    )


def _forward(inputs, a1, a2, chunks, rule: RuleConfig, save: bool, write_y: bool, y=None, tiles=None):
    """Run chunks [c0, c1) from the state (a1, a2); returns (y, states1, states2, stats, final slot)."""
    q, k, v, eta, log_alpha, gamma, beta, lengths = inputs
    batch, heads, length, head_dim = q.shape
    width = a1.shape[-1]
    c0, c1 = chunks
    slots = (c1 - c0 + 1) if save else 2
    st1 = q.new_empty(batch, heads, slots, head_dim, width)
    st2 = q.new_empty(batch, heads, slots, width, head_dim)
    stats = q.new_ones(batch, heads, slots, STATS.value)
    if y is None:
        y = torch.zeros_like(q)
    args = (
        q, k, v, eta, log_alpha, gamma, beta, lengths, a1.contiguous(), a2.contiguous(), y, st1, st2, stats,
        length, c0, c1, slots,
    )  # fmt: skip
    meta = dict(_meta(rule, head_dim, width, heads, q.dtype), SAVE=save, WRITE_Y=write_y)
    _launch("forward", _forward_kernel, (batch * heads,), args, meta, tiles)
    return y, st1, st2, stats, (c1 - c0) if save else (c1 - c0) % 2


def _backward(inputs, dy, states, da1, da2, d_gamma, d_beta, grads, chunks, rule: RuleConfig, tiles=None) -> None:
    """Chunks [c0, c1) of the backward; da1, da2 in/out; d_gamma, d_beta (B, H, d_h) accumulated into."""
    q, k, v, eta, log_alpha, gamma, beta, lengths = inputs
    st1, st2, stats = states
    batch, heads, length, head_dim = q.shape
    width = st1.shape[-1]
    meta = _meta(rule, head_dim, width, heads, q.dtype)
    scratch = q.new_empty(batch * heads, 2, meta["BT"], width)
    args = (
        q, k, v, eta, log_alpha, gamma, beta, lengths, dy, st1, st2, stats, da1, da2,
        *grads, d_gamma, d_beta, scratch,
        length, chunks[0], chunks[1], st1.shape[2], rule.detach_state_every,
    )  # fmt: skip
    _launch("backward", _backward_kernel, (batch * heads,), args, meta, tiles)


def _forward_groups(inputs, a1, a2, rule: RuleConfig, save: bool, tiles: Tiles | None):
    """The whole chunk sequence; returns y, the final state and what the backward needs.

    One launch, keeping every chunk-start state when `save`; with rule.checkpoint_group = G > 1 one
    launch per G chunks, keeping only each group's start (the backward recomputes the group's states).
    """
    num_chunks = inputs[0].shape[2] // rule.chunk_size
    group = rule.checkpoint_group if rule.checkpoint_group > 1 else num_chunks
    y, starts, chunk_states = None, [], None
    for c0 in range(0, num_chunks, group):
        c1 = min(c0 + group, num_chunks)
        keep_all = save and group >= num_chunks
        y, st1, st2, stats, last = _forward(inputs, a1, a2, (c0, c1), rule, keep_all, True, y, tiles)
        starts.append((a1, a2))
        if save and group >= num_chunks:
            chunk_states = (st1, st2, stats)
        # a copy: a view would keep the whole slot buffer alive (the group's two slots, or every chunk's)
        a1, a2 = st1[:, :, last].clone(), st2[:, :, last].clone()
    return y, a1, a2, group, starts, chunk_states


class TritonMemory(torch.autograd.Function):
    """y, final (a1, a2) of the chunk sequence; inputs as chunkwise_memory's after compaction and padding.

    q, k, v: (B, H, N*b, d_h); eta, log_alpha: (B, H, N*b); a1: (B, H, d_h, m); a2: (B, H, m, d_h);
    gamma, beta: (H, d_h); lengths: (B,) int64 tokens per row (chunk n commits where (n+1)*b <= length).
    """

    @staticmethod
    def forward(ctx, q, k, v, eta, log_alpha, a1, a2, gamma, beta, lengths, rule: RuleConfig, tiles: Tiles | None):
        inputs = tuple(t.contiguous() for t in (q, k, v, eta, log_alpha, gamma, beta)) + (lengths,)
        y, a1_end, a2_end, group, starts, chunk_states = _forward_groups(inputs, a1, a2, rule, True, tiles)
        ctx.rule, ctx.group, ctx.groups, ctx.tiles = rule, group, len(starts), tiles
        ctx.a_shapes = (a1.shape, a2.shape)
        saved = [t for pair in starts for t in pair]
        ctx.save_for_backward(*inputs, *saved, *(chunk_states or ()))
        return y, a1_end, a2_end

    @staticmethod
    def backward(ctx, dy, da1_out, da2_out):
        rule, group = ctx.rule, ctx.group
        saved = ctx.saved_tensors
        inputs, rest = saved[:8], saved[8:]
        starts = [(rest[2 * i], rest[2 * i + 1]) for i in range(ctx.groups)]
        q = inputs[0]
        batch, heads, _, head_dim = q.shape
        num_chunks = q.shape[2] // rule.chunk_size
        # The state gradient is updated in place by the kernel: fresh contiguous buffers.
        da1 = da1_out.contiguous().clone()
        da2 = da2_out.contiguous().clone()
        d_gamma = q.new_zeros(batch, heads, head_dim)
        d_beta = q.new_zeros(batch, heads, head_dim)
        grads = tuple(torch.zeros_like(t) for t in inputs[:5])
        dy = dy.contiguous()
        for index in reversed(range(ctx.groups)):
            c0 = index * group
            c1 = min(c0 + group, num_chunks)
            if ctx.groups == 1:
                states = rest[2:5]
            else:  # two-level recompute: this group's chunk states, from its saved start
                _, *states, _ = _forward(inputs, *starts[index], (c0, c1), rule, True, False, tiles=ctx.tiles)
            _backward(inputs, dy, states, da1, da2, d_gamma, d_beta, grads, (c0, c1), rule, ctx.tiles)
        return (*grads, da1, da2, d_gamma.sum(0), d_beta.sum(0), None, None, None)


def triton_memory(q, k, v, eta, log_alpha, a1, a2, gamma, beta, lengths, rule: RuleConfig, tiles: Tiles | None = None):
    """Reads (B, H, N*b, d_h) and the final accumulators of the padded chunk sequence (see TritonMemory).

    tiles: a launch shape to use (benchmarks); default: the largest candidate that fits the GPU.
    """
    if lengths is None:
        lengths = torch.full((q.shape[0],), q.shape[2], dtype=torch.long, device=q.device)
    lengths = lengths.to(torch.long).contiguous()
    tensors = (q, k, v, eta, log_alpha, a1, a2, gamma, beta)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return TritonMemory.apply(*tensors, lengths, rule, tiles)
    inputs = tuple(t.contiguous() for t in (q, k, v, eta, log_alpha, gamma, beta)) + (lengths,)
    y, a1, a2, *_ = _forward_groups(inputs, a1, a2, rule, False, tiles)
    return y, a1, a2


__all__ = ["Tiles", "TritonMemory", "triton_memory"]
