"""The decoding path: one token at a time, with the same chunk semantics as the training path.

A token joins the open chunk: its inner gradient is taken at the chunk's anchor, its read is the
dual form over the open chunk (at most `chunk_size` tokens), and when the chunk fills up it is
committed exactly as the chunkwise path commits it. So decoding reproduces the full forward, and
each token costs O(chunk * (d_h + m) + d_h * m) per head whatever the context length.
"""

from __future__ import annotations

import torch

from .chunkwise import _compute_dtype
from .rule import (
    AnchorGradients,
    RuleConfig,
    anchor_gradients,
    committed_accumulators,
    decay_weights,
    dual_form_read,
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
) -> tuple[torch.Tensor, MemoryState]:
    """Read and update for one new token per row. Shapes as chunkwise_memory with T = 1."""
    dtype = _compute_dtype(q)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v, eta, log_alpha, gamma, beta = (t.to(dtype) for t in (q, k, v, eta, log_alpha, gamma, beta))
        return _memory_step(q, k, v, eta, log_alpha, state, gamma[None, :, None, :], beta[None, :, None, :], rule, mask)


def _memory_step(q, k, v, eta, log_alpha, state, gamma, beta, rule, mask):
    b = rule.chunk_size
    channelwise = eta.dim() == 4
    a1, a2 = state.a1.to(q.dtype), state.a2.to(q.dtype)
    if state.scale1 is None:
        scale1, scale2 = lq_scale(a1, rule), lq_scale(a2, rule)
    else:  # the anchor has not moved since the normalisers were taken
        scale1, scale2 = state.scale1.to(q.dtype), state.scale2.to(q.dtype)
    if state.buffer_act is None:
        buffer_k, buffer_v = state.buffer_k.to(q.dtype), state.buffer_v.to(q.dtype)
        cached = anchor_gradients(buffer_k, buffer_v, a1, a2, gamma, beta, rule, scale1, scale2)
    else:
        cached = AnchorGradients(state.buffer_act, state.buffer_gz, state.buffer_gh)
    new = anchor_gradients(k, v, a1, a2, gamma, beta, rule, scale1, scale2)

    advance = torch.ones_like(state.buffer_len, dtype=torch.bool) if mask is None else mask[:, -1].to(torch.bool)
    slot = (torch.arange(b, device=q.device)[None, :] == state.buffer_len[:, None]) & advance[:, None]  # (B, b)

    def put(buffer, value):
        where = slot[:, None, :, None] if buffer.dim() == 4 else slot[:, None, :]
        return torch.where(where, value.to(buffer.dtype), buffer)

    buffer_k, buffer_v = put(state.buffer_k, k), put(state.buffer_v, v)
    buffer_eta, buffer_log_alpha = put(state.buffer_eta, eta), put(state.buffer_log_alpha, log_alpha)
    grads = AnchorGradients(put(cached.act, new.act), put(cached.gz, new.gz), put(cached.gh, new.gh))

    # The new token sits at the last filled slot; empty slots after it have log_alpha = 0 and
    # eta = 0, so the query's cumulative decay is the buffer's total and they weigh nothing.
    cumulative = buffer_log_alpha.cumsum(dim=2)
    query_cumulative = cumulative[:, :, -1:]
    causal = torch.ones(1, b, dtype=torch.bool, device=q.device)
    weights = decay_weights(query_cumulative, cumulative, buffer_eta, causal, channelwise)
    y = dual_form_read(q, a1, a2, scale1, scale2, buffer_k, grads, weights, query_cumulative.exp(), gamma, beta, rule)
    if mask is not None:
        y = y * advance[:, None, None, None]

    buffer_len = state.buffer_len + advance.long()
    full = buffer_len == b
    if bool(full.any()):
        new_a1, new_a2 = committed_accumulators(
            a1, a2, buffer_k, grads, weights[:, :, 0], query_cumulative[:, :, 0].exp()
        )
        keep = full[:, None, None, None]
        a1, a2 = torch.where(keep, new_a1, a1), torch.where(keep, new_a2, a2)
        scale1, scale2 = lq_scale(a1, rule), lq_scale(a2, rule)  # rows that did not commit: the same values
        reset = full[:, None, None, None]
        reset_gate = full[:, None, None] if buffer_eta.dim() == 3 else reset
        buffer_k, buffer_v, buffer_act, buffer_gz, buffer_gh = (
            t.masked_fill(reset, 0.0) for t in (buffer_k, buffer_v, grads.act, grads.gz, grads.gh)
        )
        grads = AnchorGradients(buffer_act, buffer_gz, buffer_gh)
        buffer_eta = buffer_eta.masked_fill(reset_gate, 0.0)
        buffer_log_alpha = buffer_log_alpha.masked_fill(reset_gate, 0.0)
        buffer_len = buffer_len.masked_fill(full, 0)
        # Rows that committed have a new anchor; their (empty) cached gradients are stale but
        # weigh nothing (eta = 0) until a token overwrites the slot.
    new_state = MemoryState(
        a1, a2, buffer_k, buffer_v, buffer_eta, buffer_log_alpha, buffer_len, grads.act, grads.gz, grads.gh,
        scale1, scale2,
    )  # fmt: skip
    return y, new_state
