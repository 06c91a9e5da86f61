"""The recurrent state of one MONETA memory layer, carried between segments and decoding steps."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class MemoryState:
    """Accumulators at the last chunk boundary plus the tokens of the chunk still open.

    a1: (B, H, d_h, m), a2: (B, H, m, d_h): accumulators at the anchor (the last committed boundary).
    buffer_*: the open chunk's tokens, `chunk_size` slots, the first `buffer_len[b]` of row b valid;
        empty slots hold eta = 0 and log_alpha = 0, which makes them no-ops in every formula.
    run_a1 / run_a2: the running accumulators A_t after the open chunk's tokens (like a1, a2), kept by
        the one-token decoding step, which reads from them and updates them by one rank-1 step per token;
        None when the state comes from the chunkwise path (the decoding step then derives them once).
    scale1 / scale2: the anchor's l_q normalisers 1 / ||A||_q^(q-2), (B, H, 1, 1), kept by the decoding
        step for the same reason (the norm changes only when a chunk commits); None: derive from a1, a2.
    empty_buffer: the open chunk is known to hold no token (a fresh state, or one whose every row ended on
        a chunk boundary). A host-side fact, not a tensor: chunkwise_memory skips the open chunk on it
        without reading buffer_len, which would be a host sync. False when unknown.
    """

    a1: torch.Tensor
    a2: torch.Tensor
    buffer_k: torch.Tensor  # (B, H, b, d_h)
    buffer_v: torch.Tensor  # (B, H, b, d_h)
    buffer_eta: torch.Tensor  # (B, H, b) or (B, H, b, d_h)
    buffer_log_alpha: torch.Tensor  # like buffer_eta
    buffer_len: torch.Tensor  # (B,) int64
    run_a1: torch.Tensor | None = None
    run_a2: torch.Tensor | None = None
    scale1: torch.Tensor | None = None
    scale2: torch.Tensor | None = None
    empty_buffer: bool = False

    @classmethod
    def initial(
        cls, a1_init: torch.Tensor, a2_init: torch.Tensor, batch_size: int, chunk_size: int, channelwise: bool
    ) -> MemoryState:
        """The state before any token: the learned initial accumulators (H, ...) broadcast over the batch."""
        heads, head_dim, _ = a1_init.shape
        a1 = a1_init.unsqueeze(0).expand(batch_size, *a1_init.shape)
        a2 = a2_init.unsqueeze(0).expand(batch_size, *a2_init.shape)
        kw = {"device": a1_init.device, "dtype": torch.float32 if a1_init.dtype != torch.float64 else torch.float64}
        gate_shape = (batch_size, heads, chunk_size) + ((head_dim,) if channelwise else ())
        return cls(
            a1=a1,
            a2=a2,
            buffer_k=torch.zeros(batch_size, heads, chunk_size, head_dim, **kw),
            buffer_v=torch.zeros(batch_size, heads, chunk_size, head_dim, **kw),
            buffer_eta=torch.zeros(gate_shape, **kw),
            buffer_log_alpha=torch.zeros(gate_shape, **kw),
            buffer_len=torch.zeros(batch_size, dtype=torch.long, device=a1_init.device),
            empty_buffer=True,
        )

    def map_tensors(self, fn) -> MemoryState:
        """A copy with fn applied to every tensor field (detach, index_select for beam search, ...)."""
        tensors = {f.name: fn(v) for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}
        return replace(self, **tensors)

    def detach(self) -> MemoryState:
        return self.map_tensors(torch.Tensor.detach)
