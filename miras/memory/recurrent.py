"""The decoding path: one token at a time, with the same chunk semantics as the training path.

A token's inner gradient is taken at its chunk's anchor, as in the chunkwise path; the state also
carries the running accumulators A_t = alpha_t A_{t-1} - eta_t grad_t of the open chunk, and the
token reads M(q; s * A_t) from them directly (the primal form of the chunkwise path's dual-form read,
the same sum in another order). When the chunk fills, A_t is the committed state and becomes the
next anchor, so decoding reproduces the full forward. A token costs O(d_h * m) per head whatever the
context: three products with the anchor (its gradient), two with A_t (its read) and two rank-1
updates.

No host sync inside a compiled graph: there the commit (new anchor and its l_q normalisers) is
computed at every token and kept where a row's chunk filled; run eagerly, it is computed only when
some row's chunk fills (a host check of buffer_len, free on the CPU). impl="compiled" runs the step
through torch.compile (one graph per batch size).
"""

from __future__ import annotations

from functools import cache

import torch

from .chunkwise import _compute_dtype
from .rule import (
    RuleConfig,
    add_matmul,
    anchor_gradients,
    committed_accumulators,
    decay_weights,
    gelu,
    layer_norm,
    lq_scale,
)
from .state import MemoryState


def memory_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    log_alpha: torch.Tensor,
    state: MemoryState,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    rule: RuleConfig,
    mask: torch.Tensor | None = None,
    impl: str = "torch",
) -> tuple[torch.Tensor, MemoryState]:
    """Read and update for one new token per row. Shapes as chunkwise_memory with T = 1.

    impl: "compiled" runs the step through torch.compile; any other value runs it eagerly (the Triton
    kernels are for whole chunk sequences).
    """
    dtype = _compute_dtype(q)
    step = _compiled_step() if impl == "compiled" and not torch.compiler.is_compiling() else _memory_step
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v, eta, log_alpha, gamma, beta = (t.to(dtype) for t in (q, k, v, eta, log_alpha, gamma, beta))
        return step(q, k, v, eta, log_alpha, state, gamma[None, :, None, :], beta[None, :, None, :], rule, mask)


@cache
def _compiled_step():
    return torch.compile(_memory_step, dynamic=False, fullgraph=True)


def running_accumulators(state: MemoryState, a1, a2, scale1, scale2, gamma, beta, rule: RuleConfig):
    """A_t after the open chunk's tokens, from the anchor and the buffer (for a state the chunkwise path left).

    Empty slots hold eta = 0 and log_alpha = 0: they neither decay nor write.
    """
    buffer_k, buffer_v = state.buffer_k.to(a1.dtype), state.buffer_v.to(a1.dtype)
    grads = anchor_gradients(buffer_k, buffer_v, a1, a2, gamma, beta, rule, scale1, scale2)
    cumulative = state.buffer_log_alpha.to(a1.dtype).cumsum(dim=2)
    last = cumulative[:, :, -1:]
    channelwise = state.buffer_eta.dim() == 4
    causal = torch.ones(1, rule.chunk_size, dtype=torch.bool, device=a1.device)
    weights = decay_weights(last, cumulative, state.buffer_eta.to(a1.dtype), causal, channelwise)
    return committed_accumulators(a1, a2, buffer_k, grads, weights[:, :, 0], last[:, :, 0].exp(), rule.update_input)


def _memory_step(q, k, v, eta, log_alpha, state, gamma, beta, rule, mask):
    b = rule.chunk_size
    channelwise = eta.dim() == 4
    a1, a2 = state.a1.to(q.dtype), state.a2.to(q.dtype)
    if state.scale1 is None:
        scale1, scale2 = lq_scale(a1, rule), lq_scale(a2, rule)
    else:  # the anchor has not moved since the normalisers were taken
        scale1, scale2 = state.scale1.to(q.dtype), state.scale2.to(q.dtype)
    if state.run_a1 is None:
        run1, run2 = running_accumulators(state, a1, a2, scale1, scale2, gamma, beta, rule)
    else:
        run1, run2 = state.run_a1.to(q.dtype), state.run_a2.to(q.dtype)

    advance = None if mask is None else mask[:, -1].to(torch.bool)
    if advance is not None:  # a padded token is a no-op: it neither decays (alpha = 1) nor writes (eta = 0)
        gate = advance[:, None, None, None] if channelwise else advance[:, None, None]
        eta, log_alpha = eta * gate, log_alpha * gate
    grads = anchor_gradients(k, v, a1, a2, gamma, beta, rule, scale1, scale2)
    alpha = log_alpha.exp()
    if channelwise:  # over d_h: the rows of A1 (outputs) and the columns of A2 (inputs)
        run1 = alpha.transpose(-1, -2) * run1 - (grads.gz * eta).transpose(-1, -2) @ grads.act
        if rule.update_input:
            run2 = run2 * alpha - grads.gh.transpose(-1, -2) @ (k * eta)
    else:  # the decayed copy is a temporary, so (without autograd) the rank-1 step accumulates into it in place
        run1 = add_matmul(alpha[..., None] * run1, (grads.gz * -eta[..., None]).transpose(-1, -2), grads.act)
        if rule.update_input:
            run2 = add_matmul(alpha[..., None] * run2, grads.gh.transpose(-1, -2), k * -eta[..., None])
    act_q = gelu((q * scale2) @ run2.transpose(-1, -2))
    u, _, _ = layer_norm((act_q @ run1.transpose(-1, -2)) * scale1, gamma, beta, rule.ln_eps)
    y = q + u

    slot = torch.arange(b, device=q.device)[None, :] == state.buffer_len[:, None]  # (B, b)
    if advance is not None:
        slot = slot & advance[:, None]
        y = y * advance[:, None, None, None]

    def put(buffer, value):
        where = slot[:, None, :, None] if buffer.dim() == 4 else slot[:, None, :]
        return torch.where(where, value.to(buffer.dtype), buffer)

    buffer_k, buffer_v = put(state.buffer_k, k), put(state.buffer_v, v)
    buffer_eta, buffer_log_alpha = put(state.buffer_eta, eta), put(state.buffer_log_alpha, log_alpha)
    buffer_len = state.buffer_len + (1 if advance is None else advance.long())
    full = buffer_len == b
    # A compiled graph computes the commit every token (no host sync); eager code only when a chunk fills.
    if torch.compiler.is_compiling() or bool(full.any()):
        keep = full[:, None, None, None]
        a1, a2 = torch.where(keep, run1, a1), torch.where(keep, run2, a2)
        scale1 = torch.where(keep, lq_scale(run1, rule), scale1)
        scale2 = torch.where(keep, lq_scale(run2, rule), scale2)
        keep_gate = full[:, None, None] if buffer_eta.dim() == 3 else keep
        buffer_k, buffer_v = buffer_k.masked_fill(keep, 0.0), buffer_v.masked_fill(keep, 0.0)
        buffer_eta = buffer_eta.masked_fill(keep_gate, 0.0)
        buffer_log_alpha = buffer_log_alpha.masked_fill(keep_gate, 0.0)
        buffer_len = buffer_len.masked_fill(full, 0)
    new_state = MemoryState(
        a1, a2, buffer_k, buffer_v, buffer_eta, buffer_log_alpha, buffer_len, run1, run2, scale1, scale2
    )
    return y, new_state
