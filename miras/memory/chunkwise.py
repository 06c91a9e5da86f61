"""The training path: MONETA's memory over a whole sequence, chunk by chunk in the dual form.

Within a chunk every token's read is one batched contraction (no per-token weights); across
chunks the accumulators recur. The chunk sequence runs in torch_chunk.py (the hand-written forward
and backward, its reads and most of its backward batched over chunks), in triton_chunk.py's kernels,
or, for the rules the hand-written backward does not cover (channel-wise gates, inner_grad_clamp), as
`chunk_step` per chunk under activation checkpointing with autograd's backward (`_autograd_chunks`).

Sequences may start inside an open chunk (the state's buffer) and rows may have masked tokens.
Masked tokens do not advance a row's chunk position: the tokens of each row are compacted to
the front before chunking, so a left-padded row computes exactly what it computes alone.

No host sync: which of those steps run is decided from shapes and Python-level facts (a mask was
passed, the state's open chunk is known to be empty), never from tensor values, so the whole op
runs inside one compiled graph and never waits on a device.

`impl` chooses what runs the chunk sequence once it is compacted and padded (dispatch.py has the
rules); `keep_intermediates` what the backward gets from the forward (torch_chunk.py).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.checkpoint import checkpoint

from .dispatch import select_impl
from .rule import RuleConfig, chunk_step
from .state import MemoryState
from .torch_chunk import torch_memory


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # The inner loop runs in fp32 whatever the outer precision (docs/model.md, "Numerics"); fp64 stays fp64 for tests.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def handwritten_backward(rule: RuleConfig, channelwise: bool) -> bool:
    """Whether torch_chunk.py covers this rule (otherwise autograd differentiates chunk_step)."""
    return not channelwise and rule.inner_grad_clamp is None


def chunkwise_memory(
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
    keep_intermediates: bool = False,
) -> tuple[torch.Tensor, MemoryState]:
    """Memory reads for a segment and the state after it.

    q, k, v: (B, H, T, d_h); eta, log_alpha: (B, H, T) per-head or (B, H, T, d_h) channel-wise;
    gamma, beta: (H, d_h) LayerNorm affine of the memory; mask: (B, T) bool, False = padding.
    impl: "torch", "compiled", "triton" or "auto" (dispatch.py).
    keep_intermediates: the caller runs this forward again before its backward (block activation
    checkpointing), so the op keeps what its backward needs instead of recomputing it: the memory's
    forward then runs twice per training step, not three times. rule.checkpoint_group (the op's own
    recompute) applies only without it: one decision, not two stacked ones.
    Returns y (B, H, T, d_h) in the compute dtype (fp32, or fp64 for fp64 inputs) and the new state.
    """
    dtype = _compute_dtype(q)
    impl = select_impl(impl, q.device, rule, eta.dim() == 4)
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _chunkwise_memory(
            *(t.to(dtype) for t in (q, k, v, eta, log_alpha)), state, gamma.to(dtype), beta.to(dtype), rule, mask,
            impl, keep_intermediates,
        )  # fmt: skip


def _chunkwise_memory(q, k, v, eta, log_alpha, state, gamma, beta, rule, mask, impl="torch", keep=False):
    batch, heads, length, head_dim = q.shape
    b = rule.chunk_size
    channelwise = eta.dim() == 4
    if mask is not None:
        mask = mask.to(torch.bool)
        gate_mask = mask[:, None, :, None] if channelwise else mask[:, None, :]
        eta = eta * gate_mask
        log_alpha = log_alpha * gate_mask

    # 1. The open chunk of the incoming state goes first, its queries unused (unless it is known to be empty).
    valid = mask
    prefix = 0
    if not state.empty_buffer:
        prefix = b
        q = torch.cat([torch.zeros_like(state.buffer_k).to(q.dtype), q], dim=2)
        k = torch.cat([state.buffer_k.to(k.dtype), k], dim=2)
        v = torch.cat([state.buffer_v.to(v.dtype), v], dim=2)
        eta = torch.cat([state.buffer_eta.to(eta.dtype), eta], dim=2)
        log_alpha = torch.cat([state.buffer_log_alpha.to(log_alpha.dtype), log_alpha], dim=2)
        slots = torch.arange(b, device=q.device)[None, :] < state.buffer_len[:, None]
        valid = torch.cat([slots, mask if mask is not None else slots.new_ones(batch, length)], dim=1)

    # 2. Compact each row's valid tokens to the front, so chunk boundaries count real tokens only.
    total = length + prefix
    order = inverse = lengths = None
    if valid is not None:
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        inverse = torch.argsort(order, dim=1)
        lengths = valid.sum(dim=1)
        q, k, v, eta, log_alpha = (_gather_time(t, order) for t in (q, k, v, eta, log_alpha))

    # 3. Pad to whole chunks with no-op tokens (eta = 0, alpha = 1) and split once.
    num_chunks = -(-total // b)
    pad = num_chunks * b - total
    if lengths is None and pad:
        lengths = torch.full((batch,), total, device=q.device, dtype=torch.long)
    op_rule = rule
    short = _short_chunk(total, b) if impl != "triton" else b
    if short < b:
        # The whole segment is one open chunk: computing it padded to `short` instead of b is the same math
        # (the padding is causal no-ops after the last token, and an open chunk is never committed), at
        # short/b of the cost: a recall probe or a short prompt is 12 tokens, not 64. The state still
        # keeps b slots, so _finish gets the inputs padded to b.
        op_rule = dataclasses.replace(rule, chunk_size=short)
        q, k, v, eta, log_alpha = (_pad_time(t, short - total) for t in (q, k, v, eta, log_alpha))
        op_inputs = (q, k, v, eta, log_alpha)
        k, v, eta, log_alpha = (_pad_time(t, b - short) for t in (k, v, eta, log_alpha))
    else:
        if pad:
            q, k, v, eta, log_alpha = (_pad_time(t, pad) for t in (q, k, v, eta, log_alpha))
        op_inputs = (q, k, v, eta, log_alpha)
    a1, a2 = state.a1.to(q.dtype), state.a2.to(q.dtype)
    y, a1, a2 = _run_chunks(*op_inputs, a1, a2, gamma, beta, lengths, op_rule, impl, keep, channelwise)
    return _finish(y, a1, a2, k, v, eta, log_alpha, lengths, total, prefix, inverse, valid, num_chunks, rule)


def _short_chunk(total: int, b: int) -> int:
    """The chunk a segment of `total` tokens runs in when it is all one open chunk: total plus at least one
    no-op slot (so the chunk stays open), rounded up to 8; b when that is not shorter."""
    return min(b, (total // 8 + 1) * 8)


def _run_chunks(q, k, v, eta, log_alpha, a1, a2, gamma, beta, lengths, rule, impl, keep, channelwise):
    """Reads and final accumulators of the padded chunk sequence, by the implementation `impl` names."""
    num_chunks = q.shape[2] // rule.chunk_size
    if impl == "triton":
        from .triton_chunk import triton_memory  # imports triton: only when this path runs

        y, a1, a2 = triton_memory(q, k, v, eta, log_alpha, a1, a2, gamma, beta, lengths, rule)
    elif handwritten_backward(rule, channelwise):
        y, a1, a2 = torch_memory(q, k, v, eta, log_alpha, a1, a2, gamma, beta, lengths, rule, keep, impl == "compiled")
    else:
        y, a1, a2 = _autograd_chunks(q, k, v, eta, log_alpha, a1, a2, gamma, beta, lengths, rule, num_chunks)
    return y, a1, a2


def _autograd_chunks(q, k, v, eta, log_alpha, a1, a2, gamma, beta, lengths, rule, num_chunks):
    """The chunk loop with autograd's backward: each chunk_step under activation checkpointing.

    For the rules torch_chunk.py does not cover, and the reference its tests compare with. With
    rule.checkpoint_group = G > 1, two levels: only every group's first state is kept through the
    forward; the backward re-runs one group at a time (keeping its chunk states) and then each chunk.
    """
    b = rule.chunk_size
    chunks = [_split_chunks(t, num_chunks) for t in (q, k, v, eta, log_alpha)]
    causal = torch.ones(b, b, dtype=torch.bool, device=q.device).tril()
    gamma_b = gamma[None, :, None, :]
    beta_b = beta[None, :, None, :]
    use_checkpoint = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, eta, log_alpha, a1, a2, gamma, beta)
    )

    def run_chunks(a1, a2, first: int, stop: int):
        outputs = []
        for n in range(first, stop):
            if n and rule.detach_state_every and (n * b) % rule.detach_state_every == 0:
                a1, a2 = a1.detach(), a2.detach()  # truncated BPTT: outputs unchanged, gradients cut here
            full = None if lengths is None else (n + 1) * b <= lengths
            args = (a1, a2, *(c[n] for c in chunks), gamma_b, beta_b, full, causal, rule)
            if use_checkpoint:
                y, a1, a2 = checkpoint(chunk_step, *args, use_reentrant=False)
            else:
                y, a1, a2 = chunk_step(*args)
            outputs.append(y)
        return torch.cat(outputs, dim=2), a1, a2

    group = rule.checkpoint_group
    if use_checkpoint and group > 1:
        outputs = []
        for first in range(0, num_chunks, group):
            y, a1, a2 = checkpoint(run_chunks, a1, a2, first, min(first + group, num_chunks), use_reentrant=False)
            outputs.append(y)
        y = torch.cat(outputs, dim=2)
    else:
        y, a1, a2 = run_chunks(a1, a2, 0, num_chunks)
    return y, a1, a2


def _finish(y, a1, a2, k, v, eta, log_alpha, lengths, total, prefix, inverse, valid, num_chunks, rule):
    """The new state (accumulators and open chunk) and the reads in the caller's order."""
    batch = y.shape[0]
    b = rule.chunk_size

    # 4. The new open chunk: tokens after each row's last full chunk.
    row_len = lengths if lengths is not None else torch.full((batch,), total, device=y.device, dtype=torch.long)
    start = (row_len // b) * b
    slots = torch.arange(b, device=y.device)
    index = (start[:, None] + slots[None, :]).clamp_max(num_chunks * b - 1)
    buffer_len = row_len - start
    keep = slots[None, :] < buffer_len[:, None]
    buffers = []
    for t in (k, v, eta, log_alpha):
        taken = _gather_time(t, index)
        keep_b = keep[:, None, :, None] if taken.dim() == 4 else keep[:, None, :]
        buffers.append(taken * keep_b)
    # Known on the host: without compaction or padding every row ends on a chunk boundary.
    new_state = MemoryState(a1, a2, *buffers, buffer_len=buffer_len, empty_buffer=lengths is None)

    # 5. Outputs back in the caller's order, without the prefix; padding reads are zeroed.
    y = y[:, :, :total]
    if inverse is not None:
        y = _gather_time(y, inverse) * valid[:, None, :, None]
    return y[:, :, prefix:], new_state


def _split_chunks(t: torch.Tensor, num_chunks: int) -> tuple[torch.Tensor, ...]:
    """The chunks of a (B, H, T[, C]) tensor along time, each contiguous, split once.

    t.split(b, dim=2) would give views strided over the whole sequence: every matmul on them
    copies its operand first (measured: 32 copies per chunk step, a quarter of the memory op's time).
    One copy of the whole tensor up front, and unbind's backward is a single stack.
    """
    return t.unflatten(2, (num_chunks, -1)).movedim(2, 0).contiguous().unbind(0)


def _gather_time(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[b, h, index[b, i], ...] for (B, H, T[, C]) tensors and a (B, I) index."""
    idx = index[:, None, :]
    if t.dim() == 4:
        idx = idx[..., None].expand(t.shape[0], t.shape[1], index.shape[1], t.shape[3])
    else:
        idx = idx.expand(t.shape[0], t.shape[1], index.shape[1])
    return t.gather(2, idx)


def _pad_time(t: torch.Tensor, pad: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[2] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=2)
