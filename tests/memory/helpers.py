"""Random but well-conditioned memory inputs, shared by the memory tests."""

import torch
import torch.nn.functional as F

from miras.memory import MemoryState


def memory_inputs(batch=2, heads=2, length=23, head_dim=4, width=16, channelwise=False, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=dtype)

    gate_shape = (batch, heads, length) + ((head_dim,) if channelwise else ())
    return dict(
        q=F.normalize(randn(batch, heads, length, head_dim), dim=-1),
        k=F.normalize(randn(batch, heads, length, head_dim), dim=-1),
        v=randn(batch, heads, length, head_dim),
        eta=0.05 + 0.25 * rand(*gate_shape),
        log_alpha=torch.log(0.8 + 0.199 * rand(*gate_shape)),
        a1=0.3 * randn(heads, head_dim, width),
        a2=0.3 * randn(heads, width, head_dim),
        gamma=1 + 0.1 * randn(heads, head_dim),
        beta=0.1 * randn(heads, head_dim),
    )


def initial_state(x, chunk_size, channelwise=False):
    batch = x["q"].shape[0]
    return MemoryState.initial(x["a1"], x["a2"], batch, chunk_size, channelwise)


def time_slice(x, start, stop):
    """The per-token inputs of x restricted to [start, stop)."""
    return {name: x[name][:, :, start:stop] for name in ("q", "k", "v", "eta", "log_alpha")}
