"""MonetaConfig and the model-size presets.

Choices the paper leaves open, decided once here (docs/model.md, "Model choices"):
- per-head memory (d_h = hidden_size / num_heads), a 2-layer MLP of width mem_expansion * d_h,
  exact GELU, residual + LayerNorm with per-head affine parameters learned by the outer loop;
- the memory's form (bench/RESULTS.md, "Memory defaults": the default form learns the passkey and binds recall,
  the paper's form binds recall only; on 4K-byte documents the default form draws on ~100 tokens after 450
  training steps, on up to ~1K after 1500, and lowers the loss at 512-4096 by 0.06-0.08 bits per byte after 3000,
  "Long documents"):
  - the inner loop writes only the memory's output matrix (`memory_update_input` False): the input matrix
    W2 = s(A2_0) A2_0 is a feature map of the keys learned by the outer loop. The paper writes both (True), and
    then each write to W2 changes the features through which every earlier write to W1 is read, an
    interference that grows with the square of the write size and keeps the passkey from binding;
  - the l_q normaliser per matrix per head, frozen inside a chunk (docs/model.md, "The memory rule"):
    `lq_norm="scale_free"`, W = s A with s = (||A||_2 / ||A||_q)^(q-2), a function of the accumulator's shape
    only, so the memory is 1-homogeneous in A and a write's size relative to the memory shrinks as the
    memory fills; the paper's W = A / ||A||_q^(q-2) ("inverse") gives ||W||_4 = 1 / ||A||_4 at q = 4, so
    each chunk commit rescales the memory against what its writes did, and recall across a commit fails;
  - retention alpha from 0.9999 (`alpha_init`, a horizon of ~10K tokens): with the scale-free normaliser a
    memory that decays faster shrinks, and the gradient through its recurrence grows as 1 / ||A||^2 (norms of
    1e5-1e8 at 4096 tokens at alpha 0.99, 3-4 at 0.9999); the paper's form keeps 0.99;
- truncated BPTT every 1024 tokens (`detach_state_every`, a multiple of the chunk; 0 = full backprop, the paper's):
  the forward is unchanged, the gradient crosses at most 1024 tokens of the chunk recurrence. On 4K-byte windows
  the outer loop teaches some heads token-dependent forgetting (retention 0.7-0.9 per chunk while alpha's bias
  stays at 0.9999), their accumulators decay between large writes, and the gradient grows 2-10x crossing each
  chunk where the accumulator is small: norms of 1e3 by step ~750, 1e6 by step 3000, and a run that falls behind
  its memory-off twin. Cut at 1024 tokens the same spike's gradient norm is 1.7 (3,443 uncut), and over 3000
  steps both seeds' memories pay (bench/RESULTS.md, "Long documents");
- gates: eta_t = eta_max * sigmoid(.), alpha_t = sigmoid(.) kept in log space; per-head scalars by
  default, channel-wise over d_h through a rank-`gate_rank` projection with `channelwise_gates`;
  biases start alpha at `alpha_init` and eta log-spaced over the heads around `eta_init`;
- writes of eta 0.03-1.5 out of a maximum of 3 (`eta_init` 0.3, spread 10 over a layer's heads) into a
  memory at full LayerNorm gain (`memory_gain_init` 1), a read gain apart from it of 0.01-0.1 in the same
  head order (`memory_read_gain_init` 0.03, spread 3.162; 0.1-1 in the paper's form, where a read that
  averages a whole 4K window at full strength costs the language model ~0.1 bits per byte), and each head's
  value RMS-normalised (`value_norm`). With the earlier weak writes (eta 0.001-0.1, gain 0.1) recall settled
  at the bag of values; with the read's strength tied to the memory's own gain recall bound but the
  language model paid 0.06 bits per byte at step 200;
- the initial memory A_0 is learned, drawn so that ||A_0||_q = 1 in expectation (W_0 = A_0 with the
  inverse normaliser, ~sqrt(n / 3) A_0 for n entries with the scale-free one), the output matrix's times
  `memory_out_init_scale` (1), the input matrix's times `memory_in_init_scale` (1);
- the inverse normaliser's floor `lq_floor` 0.01 (1% of ||A_0||_q): with q = 4 that memory is A / ||A||^2, so a
  head that learns to forget everything (alpha ~ 0.02) reaches ||A|| ~ 1e-16 and is read at the cap
  1 / floor^2; at a floor of 1e-6 (the earlier default) that cap, 1e12, overflowed fp32 in the memory's
  LayerNorm and the training step's gradient was NaN. Where no head reaches the floor nothing changes
  (recall and language-model runs gave the same numbers to the last digit). The scale-free normaliser
  does not depend on the accumulator's size and needs no floor;
- head size: hidden_size / num_heads, 64 for xs (4 heads) and the paper's 16 heads above it (48,
  64, 96, 128 for s, m, l, xl); below d_h = 32 binding is a lottery (bench/RESULTS.md);
- no positional encoding (the causal conv and the recurrence give order), SiLU after the conv,
  SiLU output gate, tied input/output embeddings, RMSNorm pre-norm blocks with a SwiGLU MLP.

`memory_impl` picks what runs the memory's chunk sequence, not what it computes: "torch" (the
reference), "triton" (fused kernels, `pip install 'miras[triton]'`; per-head gates without
inner_grad_clamp, else the torch path with a warning), "compiled" (the torch path's steps through
torch.compile) or "auto" (compiled inside a compiled model, else the torch path: the Triton path has not
yet been measured on a GPU). miras/memory/dispatch.py has the rules.
"""

from __future__ import annotations

from .memory.dispatch import IMPLEMENTATIONS
from .memory.rule import LQ_NORMS

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5
    from transformers import PretrainedConfig as PreTrainedConfig

# name: (hidden_size, num_hidden_layers, num_heads, intermediate_size)
MODEL_SIZES: dict[str, tuple[int, int, int, int]] = {
    "xs": (256, 4, 4, 688),
    "s": (768, 12, 16, 2048),
    "m": (1024, 24, 16, 2816),
    "l": (1536, 24, 16, 4096),
    "xl": (2048, 24, 16, 5376),
}


# Truncated BPTT's default span (MonetaConfig.detach_state_every): the gradient through longer stretches of the
# memory's recurrence explodes once training has taught some heads to forget fast (bench/RESULTS.md, "Long documents").
DETACH_STATE_TOKENS = 1024

# Fields added after checkpoints were first saved, with the value that gives the earlier model. A
# saved config.json carries every field it knew (transformers writes them all), so an older file
# lacks exactly these, and must not pick up a newer default.
FIELDS_ADDED_LATER: dict[str, object] = {
    "value_norm": False,
    "value_norm_eps": 1e-6,
    "memory_init": "random",
    "spread_across_layers": False,
    "alpha_init_spread": 1.0,
    "memory_read_gain_init": None,
    "memory_read_gain_init_spread": 1.0,
    "lq_norm": "inverse",
    "memory_update_input": True,
}


def _default_intermediate_size(hidden_size: int) -> int:
    """Llama's 8/3 * d rounded up to a multiple of 256."""
    return -(-int(8 * hidden_size / 3) // 256) * 256


class MonetaConfig(PreTrainedConfig):
    model_type = "moneta"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_heads: int = 16,
        intermediate_size: int | None = None,
        mem_expansion: int = 4,
        p: float = 3.0,
        q: float = 4.0,
        chunk_size: int = 64,
        conv_size: int = 4,
        channelwise_gates: bool = False,
        gate_rank: int = 32,
        eta_max: float = 3.0,
        eta_init: float = 0.3,
        eta_init_spread: float = 10.0,
        alpha_init: float = 0.9999,
        alpha_init_spread: float = 1.0,
        lq_floor: float = 0.01,
        lq_norm: str = "scale_free",
        memory_update_input: bool = False,
        smooth_lp: bool | None = None,
        sign_sharpness: float = 10.0,
        abs_eps: float = 1e-6,
        inner_grad_clamp: float | None = None,
        memory_gain_init: float = 1.0,
        memory_gain_init_spread: float = 1.0,
        memory_read_gain_init: float | None = 0.03,
        memory_read_gain_init_spread: float = 3.162,
        memory_out_init_scale: float = 1.0,
        memory_in_init_scale: float = 1.0,
        memory_init: str = "random",
        spread_across_layers: bool = False,
        memory_ln_eps: float = 1e-5,
        value_norm: bool = True,
        value_norm_eps: float = 1e-6,
        detach_state_every: int | None = None,
        memory_checkpoint_group: int = 0,
        memory_impl: str = "auto",
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size or _default_intermediate_size(hidden_size)
        self.mem_expansion = mem_expansion
        self.p = p
        self.q = q
        self.chunk_size = chunk_size
        self.conv_size = conv_size
        self.channelwise_gates = channelwise_gates
        self.gate_rank = gate_rank
        self.eta_max = eta_max
        self.eta_init = eta_init
        self.eta_init_spread = eta_init_spread
        self.alpha_init = alpha_init
        self.alpha_init_spread = alpha_init_spread
        self.lq_floor = lq_floor
        self.lq_norm = lq_norm
        # Whether the inner loop writes the memory's input matrix too (the paper's MONETA: both W1 and W2 of
        # M(x) = x + LN(W1 gelu(W2 x)) are written), or only its output matrix W1, with W2 = s(A2_0) A2_0 a
        # feature map of the keys that the outer loop learns and the sequence never changes.
        self.memory_update_input = memory_update_input
        self.smooth_lp = smooth_lp
        self.sign_sharpness = sign_sharpness
        self.abs_eps = abs_eps
        self.inner_grad_clamp = inner_grad_clamp
        self.memory_gain_init = memory_gain_init
        self.memory_gain_init_spread = memory_gain_init_spread
        # A number r: the mixer's read becomes q + r (M(q) - q), r a learned gain per head starting there; None
        # (models saved before it existed): the read is M(q). It parts what the read adds to the mixer's output
        # from the memory's own LayerNorm gain, which also scales every write, so the memory can fit values at
        # full gain while most heads' reads start small: a strong read early on is what the language model
        # pays for, strong writes are not (bench/RESULTS.md, "Memory defaults").
        self.memory_read_gain_init = memory_read_gain_init
        # Read gains log-spaced over [r / spread, r * spread] across a layer's heads, in the head order of the
        # eta and memory-gain spreads (the strongest writer reads loudest); 1 = r everywhere.
        self.memory_read_gain_init_spread = memory_read_gain_init_spread
        # Scales the initial accumulator of the memory's output matrix (A1_0, W1 in
        # M(x) = x + LN(W1 gelu(W2 x))). The LayerNorm makes the read blind to W1's scale, but a write's
        # size next to the initial read goes as eta / scale^2 when q = 2 (W = A): a smaller W1_0 lets
        # the written pairs dominate the read (bench/RESULTS.md, associative recall). With q > 2 the l_q
        # normaliser cancels most of the scale (the reads exactly, the writes only for small gains).
        self.memory_out_init_scale = memory_out_init_scale
        # Scales the initial accumulator of the memory's input matrix (A2_0, W2). With the scale-free normaliser
        # W = s(A) A keeps the scale, and a Gaussian A_0 is read at ~sqrt(n / 3) times its size (37x at d_h 32):
        # both scales at 1 / 37 give the inverse normaliser's initial memory, with which one passkey run in six
        # retrieved whole keys within a chunk (bench/RESULTS.md, "The passkey inside one chunk"). With the
        # inverse normaliser a scale c reads as 1 / c.
        self.memory_in_init_scale = memory_in_init_scale
        # "identity": A_0 drawn so that the initial memory is M_0(x) = x + LN(x) (modeling.identity_memory);
        # "random": Gaussian A_0, a random function of the query at first.
        self.memory_init = memory_init
        # The heads' eta and gain spreads run over the whole model in (layer, head) order instead of
        # within each layer: early layers start with weak writes and reads, the last ones strong.
        self.spread_across_layers = spread_across_layers
        self.memory_ln_eps = memory_ln_eps
        # RMS-normalise each head's value before the memory, as q and k are L2-normalised: with p = 3
        # a write grows as |v|^2, so an unnormalised v is a second, unbounded write strength that the
        # outer loop inflates (|v| 0.5 -> 5-20 within a few hundred steps) until every token
        # overwrites the memory. Normalised, the write strength is eta's alone (bench/RESULTS.md, recall).
        self.value_norm = value_norm
        self.value_norm_eps = value_norm_eps
        # Truncated BPTT through the memory's chunk recurrence, in tokens (0 = never). None, the default: every
        # DETACH_STATE_TOKENS tokens, rounded down to a multiple of chunk_size (the module docstring says why).
        self.detach_state_every = (
            max(1, DETACH_STATE_TOKENS // chunk_size) * chunk_size
            if detach_state_every is None and isinstance(chunk_size, int) and chunk_size > 0
            else detach_state_every
        )
        # Chunks per outer checkpoint in the memory's backward (0 = one level: every chunk-boundary
        # state is kept). G > 1 keeps T / (chunk_size * G) + G states instead of T / chunk_size, for
        # one more forward of the memory: a memory/speed trade for long sequences (bench/RESULTS.md).
        self.memory_checkpoint_group = memory_checkpoint_group
        # What runs the memory's chunk sequence (same function either way): see the module docstring.
        self.memory_impl = memory_impl
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self._validate()
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> MonetaConfig:
        """A saved config; fields it predates take the value that reproduces the model it was saved from."""
        saved = dict(config_dict)
        for field, value in FIELDS_ADDED_LATER.items():
            saved.setdefault(field, value)
        return super().from_dict(saved, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def memory_width(self) -> int:
        return self.mem_expansion * self.head_dim

    def _validate(self) -> None:
        def need(ok: bool, field: str, accepted: str) -> None:
            if not ok:
                raise ValueError(f"MonetaConfig.{field}={getattr(self, field)!r} is invalid: expected {accepted}")

        def number(field: str) -> float:
            value = getattr(self, field)
            need(isinstance(value, (int, float)) and not isinstance(value, bool), field, "a number")
            return value

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "intermediate_size"):
            need(isinstance(getattr(self, field), int) and getattr(self, field) > 0, field, "a positive integer")
        need(self.hidden_size % self.num_heads == 0, "hidden_size", f"a multiple of num_heads={self.num_heads}")
        need(number("p") >= 1, "p", "a number >= 1 (l_p attentional bias; the paper uses 3)")
        need(number("q") >= 2, "q", "a number >= 2 (l_q retention; the paper uses 4)")
        need(isinstance(self.chunk_size, int) and self.chunk_size > 0, "chunk_size", "a positive integer (16 or 64)")
        need(isinstance(self.conv_size, int) and self.conv_size >= 1, "conv_size", "an integer >= 1")
        need(isinstance(self.mem_expansion, int) and self.mem_expansion >= 1, "mem_expansion", "an integer >= 1")
        need(
            isinstance(self.detach_state_every, int)
            and self.detach_state_every >= 0
            and self.detach_state_every % self.chunk_size == 0,
            "detach_state_every",
            f"0 (never) or a positive multiple of chunk_size={self.chunk_size}",
        )
        need(
            isinstance(self.memory_checkpoint_group, int) and self.memory_checkpoint_group >= 0,
            "memory_checkpoint_group",
            "an integer >= 0 (0 = keep every chunk-boundary state)",
        )
        need(self.memory_impl in IMPLEMENTATIONS, "memory_impl", f"one of {', '.join(IMPLEMENTATIONS)}")
        need(number("eta_max") > 0, "eta_max", "a number > 0")
        need(0 < number("eta_init") < self.eta_max, "eta_init", f"a number in (0, eta_max={self.eta_max})")
        need(number("eta_init_spread") >= 1, "eta_init_spread", "a number >= 1 (1 = every head starts at eta_init)")
        need(0 < number("alpha_init") < 1, "alpha_init", "a number in (0, 1)")
        need(
            number("alpha_init_spread") >= 1 and (1 - self.alpha_init) * self.alpha_init_spread < 1,
            "alpha_init_spread",
            f"a number >= 1 and below 1 / (1 - alpha_init) = {1 / (1 - self.alpha_init):g} (1 = alpha_init everywhere)",
        )
        need(number("lq_floor") > 0, "lq_floor", "a number > 0")
        need(self.lq_norm in LQ_NORMS, "lq_norm", f"one of {', '.join(LQ_NORMS)}")
        need(isinstance(self.memory_update_input, bool), "memory_update_input", "true or false")
        need(number("memory_gain_init") > 0, "memory_gain_init", "a number > 0")
        need(
            number("memory_gain_init_spread") >= 1,
            "memory_gain_init_spread",
            "a number >= 1 (1 = every head starts at memory_gain_init)",
        )
        need(
            self.memory_read_gain_init is None or number("memory_read_gain_init") > 0,
            "memory_read_gain_init",
            "None (no read gain) or a number > 0",
        )
        need(
            number("memory_read_gain_init_spread") >= 1,
            "memory_read_gain_init_spread",
            "a number >= 1 (1 = every head starts at memory_read_gain_init)",
        )
        need(isinstance(self.value_norm, bool), "value_norm", "true or false")
        need(self.memory_init in ("identity", "random"), "memory_init", "'identity' or 'random'")
        need(number("value_norm_eps") > 0, "value_norm_eps", "a number > 0")
        need(number("memory_out_init_scale") > 0, "memory_out_init_scale", "a number > 0 (1 = ||A1_0||_q = 1)")
        need(number("memory_in_init_scale") > 0, "memory_in_init_scale", "a number > 0 (1 = ||A2_0||_q = 1)")
        need(
            self.inner_grad_clamp is None or number("inner_grad_clamp") > 0, "inner_grad_clamp", "None or a number > 0"
        )

    @classmethod
    def from_size(cls, size: str, **overrides) -> MonetaConfig:
        """A preset by name (xs, s, m, l, xl); keyword arguments override any field."""
        if size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {size!r}: expected one of {', '.join(MODEL_SIZES)}")
        hidden, layers, heads, intermediate = MODEL_SIZES[size]
        fields = dict(hidden_size=hidden, num_hidden_layers=layers, num_heads=heads, intermediate_size=intermediate)
        fields.update(overrides)
        return cls(**fields)
