"""MONETA as a transformers model: mixer, block, MonetaModel, MonetaForCausalLM, MonetaCache.

Read top to bottom: norms and MLP, the cache, the mixer (projections -> causal conv -> gates ->
memory -> gated per-head norm -> output), the block, then the pretrained wrappers. The memory
math itself lives in miras.memory; this file only wires it into modules.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration import MonetaConfig
from .memory import MemoryState, RuleConfig, chunkwise_memory, memory_step

# transformers 5.24 renamed `past_key_values` to `cache` (the old name goes in 5.40); older 5.x use
# `past_key_values`. Both names are accepted everywhere and outputs carry both.


def _head_spread(heads: int, spread: float) -> torch.Tensor:
    """Per-head factors log-spaced over [1 / spread, spread] (all 1 for one head), in float64."""
    if heads == 1:
        return torch.ones(1, dtype=torch.float64)
    return torch.logspace(-1.0, 1.0, heads, dtype=torch.float64).pow(math.log10(spread))


def identity_memory(heads: int, head_dim: int, width: int, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial accumulators (A1, A2) with W1 gelu(W2 x) = x exactly, so that M_0(x) = x + LN(x).

    gelu(t) - gelu(-t) = t for every t, so W2 = a [Q; -Q] and W1 = [Q^T, -Q^T] / a pass x through
    the hidden layer unchanged whatever the scale a, with Q (width/2, d_h) a random matrix with
    orthonormal columns (orthonormal rows when width/2 < d_h: the identity on a random subspace);
    each head draws its own Q. Each matrix is scaled to ||A||_q = 1 (W_0 = A_0 under the inverse
    normaliser, a multiple of it under the scale-free one; the LayerNorm makes the read blind to the
    product of the scales). Why: the initial read is then the query
    itself, the local context the language model learns first, whatever the memory's gain, where
    a random A_0 made it a random function of the query that drowned that context.
    """
    half = width // 2
    a1 = torch.zeros(heads, head_dim, width, dtype=torch.float64)
    a2 = torch.zeros(heads, width, head_dim, dtype=torch.float64)
    for head in range(heads):
        basis, _ = torch.linalg.qr(torch.randn(max(half, head_dim), min(half, head_dim), dtype=torch.float64))
        frame = basis if half >= head_dim else basis.T  # (half, d_h)
        a2[head, :half], a2[head, half : 2 * half] = frame, -frame
        a1[head, :, :half], a1[head, :, half : 2 * half] = frame.T, -frame.T
    for acc in (a1, a2):
        acc /= acc.abs().pow(q).sum(dim=(-2, -1), keepdim=True).pow(1.0 / q)
    return a1.float(), a2.float()


class MonetaRMSNorm(nn.Module):
    def __init__(self, shape, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)


class MonetaMLP(nn.Module):
    """SwiGLU feed-forward, as Llama."""

    def __init__(self, config: MonetaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _ShiftedSum(torch.autograd.Function):
    """out[:, t] = sum_i w[:, i] * x[:, t + i] on the channels-last layout: x (B, L, C) contiguous, w (C, K).

    A depthwise conv as K multiply-adds of shifted views, with a hand-written backward: on the CPU ATen's depthwise
    convolution takes ~95 ms forward and ~100 ms backward for one layer's (4, 768, 2051) input, against ~26 and
    ~95 ms here (bench/RESULTS.md, training speed). The weight's gradient sums in fp32 under bf16/fp16.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        taps = weight.shape[1]
        length = x.shape[1] - taps + 1
        out = x[:, :length] * weight[:, 0]
        for i in range(1, taps):
            out.addcmul_(x[:, i : i + length], weight[:, i])
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        taps, length = weight.shape[1], grad.shape[1]
        dx = dw = None
        total = torch.promote_types(grad.dtype, torch.float32)
        if torch.compiler.is_compiling():  # plain ops: the compiler plans the buffers (and Dynamo takes no `out=` view)
            if ctx.needs_input_grad[0]:
                dx = torch.zeros_like(x)
                for i in range(taps):
                    dx[:, i : i + length].addcmul_(grad, weight[:, i])
            if ctx.needs_input_grad[1]:
                dw = torch.stack([(grad * x[:, i : i + length]).sum((0, 1), dtype=total) for i in range(taps)], dim=-1)
                dw = dw.to(weight.dtype)
            return dx, dw
        # Eager, the first tap writes dx and the others add to it (no zero-filled (B, L, C) pass first, only its
        # tail), and one buffer takes every tap's product for dw instead of a fresh (B, L, C) tensor per tap.
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            torch.mul(grad, weight[:, 0], out=dx[:, :length])
            dx[:, length:].zero_()
            for i in range(1, taps):
                dx[:, i : i + length].addcmul_(grad, weight[:, i])
        if ctx.needs_input_grad[1]:
            product, taps_grad = torch.empty_like(grad), []
            for i in range(taps):  # each product summed before the next overwrites it
                taps_grad.append(torch.mul(grad, x[:, i : i + length], out=product).sum((0, 1), dtype=total))
            dw = torch.stack(taps_grad, dim=-1).to(weight.dtype)
        return dx, dw


class CausalDepthwiseConv1d(nn.Conv1d):
    """The mixer's depthwise conv (an nn.Conv1d: same weight, state dict and hooks), computed as shifted
    multiply-adds instead of ATen's convolution kernel (_ShiftedSum): fastest on a channels-last input, a (B, C, L)
    view of a contiguous (B, L, C) tensor, which the mixer passes. For one output step, the decoding case, it is a
    product and a sum over the kernel: the convolution kernel's dispatch there costs ~10x the arithmetic (0.1 ms
    against 0.01 ms per call on the CPU). Padded, strided or dilated convs go to the kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = self.padding == (0,) and self.stride == (1,) and self.dilation == (1,)
        if not (plain and self.groups == self.in_channels == self.out_channels):
            return super().forward(x)
        weight = self.weight.squeeze(1).to(x.dtype)
        if x.shape[-1] == self.kernel_size[0]:
            out = (x * weight).sum(-1, keepdim=True)
            return out if self.bias is None else out + self.bias[:, None]
        out = _ShiftedSum.apply(x.transpose(1, 2).contiguous(), weight)  # (B, L - K + 1, C)
        if self.bias is not None:
            out = out + self.bias
        return out.transpose(1, 2)


class MonetaCache(Cache):
    """Each layer's recurrent state: the conv tail and the memory state (accumulators + open chunk).

    Its size does not grow with the context: a new token costs the same whatever came before.
    """

    def __init__(self, num_layers: int):
        super().__init__(layers=[])
        self.conv_states: list[torch.Tensor | None] = [None] * num_layers
        self.memory_states: list[MemoryState | None] = [None] * num_layers
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.memory_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False  # a recurrent state cannot be rolled back

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("MonetaCache holds a recurrent state and cannot be cropped")

    def reset(self) -> None:
        self.conv_states = [None] * len(self)
        self.memory_states = [None] * len(self)
        self.seen_tokens = 0

    def _map_batch(self, fn) -> None:
        self.conv_states = [None if c is None else fn(c) for c in self.conv_states]
        self.memory_states = [None if m is None else m.map_tensors(fn) for m in self.memory_states]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))


class MonetaMixer(nn.Module):
    """The token mixer: MONETA's memory in place of attention (docs/model.md)."""

    def __init__(self, config: MonetaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.conv_size = config.conv_size
        self.channelwise = config.channelwise_gates
        self.eta_max = config.eta_max
        self.value_norm = config.value_norm
        self.value_norm_eps = config.value_norm_eps
        self.config = config  # config.memory_impl, read at each call: what runs the chunk sequence (memory/dispatch.py)
        d, heads, dh, width = config.hidden_size, config.num_heads, config.head_dim, config.memory_width
        self.qkv_proj = nn.Linear(d, 3 * d, bias=False)
        self.conv = CausalDepthwiseConv1d(3 * d, 3 * d, config.conv_size, groups=3 * d, bias=False)
        if self.channelwise:
            self.gate_down = nn.Linear(d, 2 * config.gate_rank, bias=False)
            self.eta_up = nn.Linear(config.gate_rank, d, bias=True)
            self.alpha_up = nn.Linear(config.gate_rank, d, bias=True)
        else:
            self.eta_alpha_proj = nn.Linear(d, 2 * heads, bias=True)  # not gate_proj: that is the MLP's
        # Memory: learned initial accumulators and the LayerNorm affine of M(x) = x + LN(W1 gelu(W2 x)).
        self.memory_a1 = nn.Parameter(torch.empty(heads, dh, width))
        self.memory_a2 = nn.Parameter(torch.empty(heads, width, dh))
        self.memory_ln_weight = nn.Parameter(torch.ones(heads, dh))
        self.memory_ln_bias = nn.Parameter(torch.zeros(heads, dh))
        # r in the read q + r (M(q) - q) (configuration.py, memory_read_gain_init); None in models saved before it.
        if config.memory_read_gain_init is None:
            self.register_parameter("memory_read_gain", None)
        else:
            self.memory_read_gain = nn.Parameter(torch.full((heads,), float(config.memory_read_gain_init)))
        self.out_norm = MonetaRMSNorm((heads, dh), config.norm_eps)
        self.out_gate_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.rule = RuleConfig(
            p=config.p,
            q=config.q,
            chunk_size=config.chunk_size,
            lq_floor=config.lq_floor,
            lq_norm=config.lq_norm,
            ln_eps=config.memory_ln_eps,
            smooth_lp=config.smooth_lp,
            sign_sharpness=config.sign_sharpness,
            abs_eps=config.abs_eps,
            inner_grad_clamp=config.inner_grad_clamp,
            detach_state_every=config.detach_state_every,
            checkpoint_group=config.memory_checkpoint_group,
            update_input=config.memory_update_input,
        )

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """eta in (0, eta_max) and log(alpha) < 0, as (B, H, T) or (B, H, T, d_h)."""
        batch, length, _ = x.shape
        if self.channelwise:
            low = self.gate_down(x).float()
            eta_logit, alpha_logit = (
                self.eta_up(low[..., : low.shape[-1] // 2]),
                self.alpha_up(low[..., low.shape[-1] // 2 :]),
            )
            shape = (batch, length, self.num_heads, self.head_dim)
            eta_logit, alpha_logit = (t.float().view(shape).permute(0, 2, 1, 3) for t in (eta_logit, alpha_logit))
        else:
            eta_logit, alpha_logit = self.eta_alpha_proj(x).float().transpose(1, 2).chunk(2, dim=1)
        return self.eta_max * torch.sigmoid(eta_logit), F.logsigmoid(alpha_logit)

    def _causal_conv(self, x: torch.Tensor, conv_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Depthwise causal conv over (B, T, C); the last conv_size-1 inputs are the state carried forward."""
        tail = self.conv_size - 1
        if conv_state is None:
            conv_state = x.new_zeros(x.shape[0], x.shape[2], tail)
        # Padded on the (B, T, C) layout and handed over as a (B, C, T) view of it: the conv's channels-last input.
        padded = torch.cat([conv_state.to(x.dtype).transpose(1, 2), x], dim=1).transpose(1, 2)
        out = self.conv(padded)  # through the module, so hooks, adapters and quantizers on it see the call
        # SiLU on the (B, T, C) layout: its backward on the transposed view is ~4x slower.
        # The carried tail is copied out: a view would keep the whole padded input alive in the cache, and its
        # strides would differ between a prefill and a decoding step (one more graph under torch.compile).
        return F.silu(out.transpose(1, 2).contiguous()), padded[..., padded.shape[-1] - tail :].contiguous()

    def _memory_inputs(self, x: torch.Tensor, mask: torch.Tensor | None, conv_state: torch.Tensor | None):
        """x (B, T, d) -> projection, conv, SiLU -> the memory's q, k (unit length), v (B, H, T, d_h) in fp32."""
        return self._conv_heads(self.qkv_proj(x), mask, conv_state)

    def _conv_heads(self, qkv: torch.Tensor, mask: torch.Tensor | None, conv_state: torch.Tensor | None):
        """The q/k/v projection (B, T, 3d) -> conv, SiLU -> q, k (unit length), v (B, H, T, d_h) in fp32."""
        batch, length, _ = qkv.shape
        if mask is not None:
            qkv = qkv * mask[..., None].to(qkv.dtype)  # padding enters neither the conv nor the memory
        qkv, new_conv_state = self._causal_conv(qkv, conv_state)
        q, k, v = (t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
        v = v.float()
        if self.value_norm:
            v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + self.value_norm_eps)
        return q, k, v, new_conv_state

    def _gated_output(self, y: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reads (B, H, T, d_h) -> read gain, per-head RMSNorm in fp32, times SiLU(out_gate_proj(x)): (B, T, d)."""
        if self.memory_read_gain is not None:
            y = q + self.memory_read_gain.to(y.dtype)[:, None, None] * (y - q)
        y = self.out_norm(y.transpose(1, 2)).to(x.dtype).reshape(x.shape)
        return y * F.silu(self.out_gate_proj(x))

    def read_memory(
        self,
        q,
        k,
        v,
        eta,
        log_alpha,
        state: MemoryState,
        mask: torch.Tensor | None,
        decoding: bool,
        keep_intermediates: bool = False,
    ):
        """Reads (B, H, T, d_h) and the new state: the one-token step when decoding, else the chunkwise path.

        keep_intermediates: the chunkwise path keeps what its backward needs (the block is checkpointed and this is
        its recompute, so the memory's forward runs twice per step, not three times).
        A method, so that a diagnostic can replace it on one model's mixers (miras.probes.memory_read_off).
        """
        args = (q, k, v, eta, log_alpha, state, self.memory_ln_weight, self.memory_ln_bias, self.rule)
        impl = self.config.memory_impl
        if decoding:
            return memory_step(*args, mask=mask, impl=impl)
        return chunkwise_memory(*args, mask=mask, impl=impl, keep_intermediates=keep_intermediates)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: MonetaCache | None, checkpointed: bool = False
    ) -> torch.Tensor:
        """checkpointed: the block runs this forward again before its backward (activation checkpointing)."""
        batch, length, _ = x.shape
        conv_state = cache.conv_states[self.layer_idx] if cache is not None else None
        # The stretches before and after the memory (conv, SiLU, norms, gains, gate) are recomputed in the backward
        # instead of keeping every intermediate: at 8K tokens ~80 MiB per layer (the conv's padded input, SiLU in
        # and out, the norms' inputs, the gate with its SiLU in and out) for the gate projection and some
        # elementwise work done twice. The q/k/v projection's output (24 MiB per layer at 8K) is kept: its product
        # is the largest of the recompute. Under block checkpointing the whole block is recomputed anyway.
        recompute = torch.is_grad_enabled() and not checkpointed
        if recompute:
            qkv = self.qkv_proj(x)
            q, k, v, new_conv_state = checkpoint(self._conv_heads, qkv, mask, conv_state, use_reentrant=False)
        else:
            q, k, v, new_conv_state = self._memory_inputs(x, mask, conv_state)
        eta, log_alpha = self._gates(x)

        state = cache.memory_states[self.layer_idx] if cache is not None else None
        if state is None:
            state = MemoryState.initial(self.memory_a1, self.memory_a2, batch, self.rule.chunk_size, self.channelwise)
        decoding = length == 1 and cache is not None and not torch.is_grad_enabled()
        y, new_state = self.read_memory(q, k, v, eta, log_alpha, state, mask, decoding, checkpointed)
        if cache is not None:
            cache.conv_states[self.layer_idx] = new_conv_state
            cache.memory_states[self.layer_idx] = new_state
        if recompute:
            return self.o_proj(checkpoint(self._gated_output, y, q, x, use_reentrant=False))
        return self.o_proj(self._gated_output(y, q, x))


class MonetaBlock(GradientCheckpointingLayer):
    """Pre-norm Llama block with the MONETA mixer in place of attention."""

    def __init__(self, config: MonetaConfig, layer_idx: int):
        super().__init__()
        self.mixer_norm = MonetaRMSNorm(config.hidden_size, config.norm_eps)
        self.mixer = MonetaMixer(config, layer_idx)
        self.mlp_norm = MonetaRMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MonetaMLP(config)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None, cache: MonetaCache | None = None):
        # As GradientCheckpointingLayer decides: this forward runs again in the backward.
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        hidden_states = hidden_states + self.mixer(self.mixer_norm(hidden_states), mask, cache, checkpointed)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


# Parameter names of earlier versions -> today's, as from_pretrained's key_mapping (regex -> replacement): the
# mixer's eta/alpha gate projection was `gate_proj`, the name the MLP's gate also has.
LEGACY_KEYS: dict[str, str] = {r"mixer\.gate_proj\.": "mixer.eta_alpha_proj."}


def current_parameter_name(name: str) -> str:
    """A parameter name as an earlier version saved it -> today's (the optimizer state is keyed by these)."""
    for pattern, replacement in LEGACY_KEYS.items():
        name = re.sub(pattern, replacement, name)
    return name


class MonetaPreTrainedModel(PreTrainedModel):
    config_class = MonetaConfig
    config: MonetaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MonetaBlock"]
    _is_stateful = True
    _supports_sdpa = False

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # MonetaCache holds recurrent state, not keys and values

    @classmethod
    def from_pretrained(cls, *args, key_mapping: dict[str, str] | None = None, **kwargs):
        """As PreTrainedModel.from_pretrained; weights saved under earlier parameter names load under today's."""
        return super().from_pretrained(*args, key_mapping={**LEGACY_KEYS, **(key_mapping or {})}, **kwargs)

    def save_pretrained(self, save_directory, *args, safe_serialization: bool = True, **kwargs) -> None:
        """As PreTrainedModel.save_pretrained, plus the modeling code and `auto_map` (miras.remote_code), so the
        folder loads with trust_remote_code=True where miras is not installed. Safetensors only."""
        if not safe_serialization:
            raise ValueError(
                "save_pretrained(safe_serialization=False): MONETA checkpoints are written as safetensors only "
                "(pickled .bin weights are not supported); leave safe_serialization at True"
            )
        super().save_pretrained(save_directory, *args, **kwargs)
        from .remote_code import write_model_code  # (a no-op in a copy loaded as remote code: transformers saved it)

        write_model_code(save_directory)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        config = self.config
        std = config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Conv1d):
            # PyTorch's default conv init (uniform in +-1/sqrt(kernel)), as fla's short convolutions:
            # every tap starts equally strong, so keys can draw on the previous tokens from the start.
            bound = 1.0 / math.sqrt(module.weight.shape[-1])
            init.uniform_(module.weight, -bound, bound)
        elif isinstance(module, MonetaRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MonetaMixer):
            if config.memory_init == "identity":
                a1, a2 = identity_memory(module.num_heads, module.head_dim, config.memory_width, config.q)
                init.copy_(module.memory_a1, a1 * config.memory_out_init_scale)
                init.copy_(module.memory_a2, a2 * config.memory_in_init_scale)
            else:
                # ||A_0||_q = 1 in expectation: sum |a|^q = N * E|a|^q with E|a|^4 = 3 sigma^4 for a normal,
                # so W_0 = A_0 / ||A_0||_q^(q-2) = A_0 and the first reads are neither inflated nor squashed.
                count = module.memory_a1[0].numel()
                sigma = (1.0 / (3.0 * count)) ** 0.25
                init.normal_(module.memory_a1, mean=0.0, std=sigma * config.memory_out_init_scale)
                init.normal_(module.memory_a2, mean=0.0, std=sigma * config.memory_in_init_scale)
            # Heads start at different inner learning rates and read gains (the memory's own gain and the
            # mixer's read gain r), each log-spaced over [init / spread, init * spread] in the same head
            # order: the best write strength depends on scales the outer loop is still learning, and a
            # strong read helps recall but drowns the local context a language model learns first, so each
            # layer starts with a range to choose from (bench/RESULTS.md, recall and language-model quality).
            heads = module.num_heads
            if config.spread_across_layers:
                # One log-spaced range over every head of the model, in (layer, head) order: early
                # layers start weak, the last ones strong.
                total = config.num_hidden_layers * heads
                first = module.layer_idx * heads

                def spread(factor: float) -> torch.Tensor:
                    return _head_spread(total, factor)[first : first + heads]
            else:

                def spread(factor: float) -> torch.Tensor:
                    return _head_spread(heads, factor)

            gains = config.memory_gain_init * spread(config.memory_gain_init_spread)
            init.copy_(module.memory_ln_weight, gains.float()[:, None].expand(heads, module.head_dim))
            init.zeros_(module.memory_ln_bias)
            if module.memory_read_gain is not None:
                reads = config.memory_read_gain_init * spread(config.memory_read_gain_init_spread)
                init.copy_(module.memory_read_gain, reads.float())
            etas = (config.eta_init * spread(config.eta_init_spread)).clamp(max=0.5 * config.eta_max)
            eta_bias = (-torch.log(config.eta_max / etas - 1.0)).float()  # eta_max * sigmoid(bias) = eta
            # Forgetting rates 1 - alpha log-spaced the other way round: the weakest writers forget fastest
            # (a local memory), the strongest keep the longest (alpha_init_spread; 1 = alpha_init everywhere).
            forget = (1.0 - config.alpha_init) / spread(config.alpha_init_spread)
            alpha_bias = torch.log((1.0 - forget) / forget).float()  # sigmoid(bias) = alpha
            if module.channelwise:
                init.copy_(module.eta_up.bias, eta_bias.repeat_interleave(module.head_dim))
                init.copy_(module.alpha_up.bias, alpha_bias.repeat_interleave(module.head_dim))
            else:
                init.copy_(module.eta_alpha_proj.bias[:heads], eta_bias)
                init.copy_(module.eta_alpha_proj.bias[heads:], alpha_bias)
        if isinstance(module, (MonetaMLP, MonetaMixer)):
            # GPT-2 style: residual-branch outputs scaled by 1/sqrt(2 * layers).
            out = module.down_proj if isinstance(module, MonetaMLP) else module.o_proj
            init.normal_(out.weight, mean=0.0, std=std / math.sqrt(2 * config.num_hidden_layers))


# transformers 5.24 renamed `past_key_values` to `cache` (the old name goes in 5.40). The installed
# version decides the name of the output field; inputs accept both names.
CACHE_FIELD = (
    "cache"
    if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)


def _output_class(name: str, first_fields: list[tuple]) -> type[ModelOutput]:
    fields = first_fields + [
        (CACHE_FIELD, MonetaCache | None, None),
        ("hidden_states", tuple | None, None),
    ]
    annotations = {field[0]: field[1] for field in fields}
    namespace = {"__annotations__": annotations, **{field[0]: field[2] for field in fields}}
    return dataclass(type(name, (ModelOutput,), namespace))


MonetaModelOutput = _output_class("MonetaModelOutput", [("last_hidden_state", torch.Tensor | None, None)])
MonetaCausalLMOutput = _output_class(
    "MonetaCausalLMOutput", [("loss", torch.Tensor | None, None), ("logits", torch.Tensor | None, None)]
)


def _cache_outputs(cache: MonetaCache | None) -> dict:
    return {} if cache is None else {CACHE_FIELD: cache}


class MonetaModel(MonetaPreTrainedModel):
    def __init__(self, config: MonetaConfig):
        super().__init__(config)
        # No padding_idx: it would freeze the row of pad_token_id, which older tokenizers share with end-of-text.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MonetaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = MonetaRMSNorm(config.hidden_size, config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: MonetaCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: MonetaCache | None = None,
        **kwargs,
    ) -> MonetaModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = MonetaCache(self.config.num_hidden_layers)
        # A cache passed in is always carried forward (segments, TBPTT), whatever use_cache says.

        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be 2-D (batch, length), got shape {tuple(attention_mask.shape)}")
            mask = attention_mask[:, -length:].to(torch.bool)  # generate passes the mask of the whole sequence
            if not torch.compiler.is_compiling() and bool(mask.all()):  # a host check: eager only
                mask = None

        hidden = inputs_embeds
        all_hidden = (hidden,) if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, mask=mask, cache=cache)
            if output_hidden_states:
                all_hidden += (hidden,)
        hidden = self.norm(hidden)
        if cache is not None:
            cache.seen_tokens += length
        return MonetaModelOutput(last_hidden_state=hidden, hidden_states=all_hidden, **_cache_outputs(cache))


class MonetaForCausalLM(MonetaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MonetaConfig):
        super().__init__(config)
        self.model = MonetaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: MonetaCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: MonetaCache | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> MonetaCausalLMOutput:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache if cache is not None else past_key_values,
            use_cache=use_cache,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        cache_out = getattr(outputs, CACHE_FIELD)
        return MonetaCausalLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **_cache_outputs(cache_out)
        )

    def prepare_inputs_for_generation(
        self, input_ids, attention_mask=None, inputs_embeds=None, use_cache=True, **kwargs
    ):
        """Feed only what the cache has not seen; the mask covers the whole sequence.

        How many tokens are new comes from generate itself (`next_sequence_length` from transformers
        5.24, `cache_position` before), else from the mask's length: never from input_ids alone, which
        lacks what came in as embeddings (a prompt given as inputs_embeds, PEFT's virtual tokens).
        """
        cache = kwargs.pop("cache", None) or kwargs.pop("past_key_values", None)
        new_tokens = kwargs.pop("next_sequence_length", None)
        cache_position = kwargs.pop("cache_position", None)
        if new_tokens is None and cache_position is not None:
            new_tokens = cache_position.shape[-1]
        kwargs.pop("position_ids", None)
        model_inputs = {"attention_mask": attention_mask, "use_cache": use_cache}
        seen = cache.get_seq_length() if cache is not None else 0
        if seen > 0:
            if new_tokens is None:
                total = attention_mask.shape[1] if attention_mask is not None else input_ids.shape[1]
                new_tokens = max(1, total - seen)
            model_inputs["input_ids"] = input_ids[:, input_ids.shape[1] - new_tokens :]
            # Under both names: wrappers that read the inputs (PEFT's prompt learning) still look for
            # past_key_values, and would otherwise inject their virtual tokens again at every step.
            model_inputs["cache"] = model_inputs["past_key_values"] = cache
        elif inputs_embeds is not None:
            model_inputs["inputs_embeds"] = inputs_embeds
        else:
            model_inputs["input_ids"] = input_ids
        for key, value in kwargs.items():
            if key not in model_inputs and key not in ("is_first_iteration",):
                model_inputs[key] = value
        return model_inputs
