"""MONETA against a Llama of the same shape: training and decoding speed, memory, the mixer alone.

CPU, fp32, all cores, both models side by side in one process (peak memory: one fresh subprocess
per measurement). Reference shape: d=256, 4 layers, 4 heads (d_h=64), FFN 688, vocab 4096, MONETA
chunk 64. Sections (``--sections``, all by default):

  train   training step (forward + backward + AdamW) tokens/s at fixed tokens per step, the
          MONETA/Llama ratio and the MFU of both against a measured fp32 matmul peak
  memory  peak training RSS at batch 1 above the RSS after building model and optimizer
  mixer   one MonetaMixer forward+backward, chunkwise vs an exact per-token recurrence written
          here (autograd inner gradient), and the earlier train.py's single-matrix block
  decode  single-token decoding tokens/s after a prefill, and the cache's bytes per token

Examples:
  python bench/bench_model.py --quick                       # seconds: tiny shapes, checks it runs
  python bench/bench_model.py --out bench/out/model.json    # the full benchmark
  python bench/bench_model.py --sections train --grad-checkpoint
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from dataclasses import fields, is_dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import miras
from miras.modeling import MonetaMixer
from miras.train.args import COMPILE_CHOICES
from miras.train.compiling import AUTO_COMPILE_MIN_STEPS, compile_decision, compile_for_training

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lm_quality import parse_overrides  # noqa: E402

SECTIONS = ("train", "memory", "mixer", "decode")
MEMORY_CHECKPOINT_GROUP = 0  # MonetaConfig.memory_checkpoint_group, set by --memory-checkpoint-group
MEMORY_IMPL = "auto"  # MonetaConfig.memory_impl, set by --memory-impl
MODEL_OVERRIDES: dict = {}  # other MonetaConfig fields, set by --model-overrides
VOCAB, HIDDEN, LAYERS, HEADS, FFN, CHUNK = 4096, 256, 4, 4, 688, 64
MODELS = ("moneta", "llama")


# ----------------------------------------------------------------------------------------------
# Models and FLOPs


def moneta_config(chunk_size: int = CHUNK, layers: int = LAYERS) -> miras.MonetaConfig:
    return miras.MonetaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_heads=HEADS,
        intermediate_size=FFN,
        chunk_size=chunk_size,
        memory_checkpoint_group=MEMORY_CHECKPOINT_GROUP,
        memory_impl=MEMORY_IMPL,
        **MODEL_OVERRIDES,
    )


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


def build_model(kind: str, seed: int, grad_checkpoint: bool = False, compile_blocks: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "moneta":
        model = miras.MonetaForCausalLM(moneta_config())
    elif kind == "llama":
        model = LlamaForCausalLM(llama_config())
        assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    else:
        raise ValueError(f"unknown model {kind!r}: expected one of {MODELS}")
    model = model.float()
    if grad_checkpoint:  # block-level activation checkpointing (renamed in transformers 5.x)
        enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
        enable()
    if compile_blocks:  # MONETA as `miras train --compile`: one graph per block, the memory op in it; Llama alike
        for block in model.model.layers:
            compile_for_training(block)
    return model


def dense_params(model: nn.Module) -> int:
    """Parameters that act as per-token matmul weights (tied embeddings once, i.e. the LM head).

    MONETA's learned initial memories (memory_a1, memory_a2) are left out: the memory's per-token
    work, reads of the accumulators included, is counted by the memory term of train_flops_per_token.
    """
    return sum(p.numel() for name, p in model.named_parameters() if not name.endswith(("memory_a1", "memory_a2")))


def train_flops_per_token(kind: str, n_params: int, seq_len: int) -> float:
    """Model FLOPs of one trained token (forward + backward), recomputation not counted.

    Llama:  6 * N + 12 * L * T * d           (PaLM's attention term, QK^T and AV, fwd + bwd, no causal halving)
    MONETA: 6 * N + 3 * L * H * (56 * d_h^2 + 20 * b * d_h)
            56 d_h^2 + 20 b d_h is the forward memory cost per token per head (with
            m = 4 d_h, seven d_h x m matrix-vector products -- anchor forward W2 k and W1 act, the
            backward gz W1, the reads q A2 and act_q A1, the two outer-product updates -- plus the
            intra-chunk b x b products); backward ~2x forward gives the factor 3. The chunkwise op
            recomputes each chunk's forward in the backward (activation checkpointing); that
            recomputation is hardware FLOPs, not model FLOPs, and is not counted.
    """
    if kind == "llama":
        return 6.0 * n_params + 12.0 * LAYERS * seq_len * HIDDEN
    head_dim = HIDDEN // HEADS
    return 6.0 * n_params + 3.0 * LAYERS * HEADS * (56.0 * head_dim**2 + 20.0 * CHUNK * head_dim)


def calibrate_matmul(size: int, reps: int = 5) -> float:
    """Best-of-reps fp32 GFLOP/s of a size x size torch.mm with the current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e9


# ----------------------------------------------------------------------------------------------
# 1. Training step


def train_step(model: nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_training(kind: str, seq_len: int, batch: int, args, grad_checkpoint: bool) -> dict:
    compiled = args.compile_llama if kind == "llama" else args.compile_moneta
    model = build_model(kind, args.seed, grad_checkpoint, compiled)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    for _ in range(args.warmup):  # a compiled model compiles here
        train_step(model, ids, optimizer)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step(model, ids, optimizer)
        times.append(time.perf_counter() - start)
    n_params = dense_params(model)
    del model, optimizer
    gc.collect()
    step_s = statistics.median(times)
    tokens = batch * seq_len
    flops = train_flops_per_token(kind, n_params, seq_len) * tokens
    return {
        "step_s": step_s,
        "step_times_s": times,
        "warmup_s": warmup_s,
        "tokens_per_s": tokens / step_s,
        "model_gflop_per_step": flops / 1e9,
        "achieved_gflop_per_s": flops / step_s / 1e9,
        "mfu": flops / step_s / 1e9 / args.peak_gflops,
        "dense_params": n_params,
    }


def section_train(args) -> dict:
    rows = []
    for grad_checkpoint in (False, True) if args.grad_checkpoint else (False,):
        for seq_len in args.seq_lens:
            batch = max(1, args.tokens_per_step // seq_len)
            row = {"seq_len": seq_len, "batch": batch, "grad_checkpoint": grad_checkpoint}
            for kind in MODELS:
                row[kind] = time_training(kind, seq_len, batch, args, grad_checkpoint)
            row["ratio_moneta_over_llama"] = row["moneta"]["tokens_per_s"] / row["llama"]["tokens_per_s"]
            rows.append(row)
    print(f"\n### Training step (fwd + bwd + AdamW), {args.tokens_per_step} tokens/step, median of {args.steps}")
    print(f"fp32 matmul peak: {args.peak_gflops:.1f} GFLOP/s ({args.calib_size}^2 torch.mm, {args.threads} threads)\n")
    table(
        ["T", "batch", "ckpt", "MONETA tok/s", "Llama tok/s", "MONETA/Llama", "MONETA MFU", "Llama MFU", "warm-up s"],
        [
            [
                r["seq_len"],
                r["batch"],
                "yes" if r["grad_checkpoint"] else "no",
                f"{r['moneta']['tokens_per_s']:.0f}",
                f"{r['llama']['tokens_per_s']:.0f}",
                f"{r['ratio_moneta_over_llama']:.3f}",
                f"{100 * r['moneta']['mfu']:.1f}%",
                f"{100 * r['llama']['mfu']:.1f}%",
                f"{r['moneta']['warmup_s']:.1f} / {r['llama']['warmup_s']:.1f}",
            ]
            for r in rows
        ],
    )
    return {"peak_gflops": args.peak_gflops, "tokens_per_step": args.tokens_per_step, "rows": rows}


# ----------------------------------------------------------------------------------------------
# 2. Peak training memory (one fresh subprocess per measurement)


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far is the best available stand-in
        return peak_rss_bytes()


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the high-water mark, so the peak is the step's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # lifetime peak: only a fallback
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def peak_memory_worker(kind: str, seq_len: int, grad_checkpoint: bool, seed: int, compile_blocks: bool) -> dict:
    """Build model + AdamW, warm up, then one training step at batch 1.

    A warm-up step on one chunk (64 tokens) first allocates the AdamW moments and the libraries'
    lazy state (thread pools, kernel caches), so they count in the base, not in the step.
    extra = peak RSS during the step - RSS before it: activations, gradients and temporaries.
    compile_blocks: the blocks are compiled after the (eager) warm-up, so the measured step compiles them at its
    own shape first and its peak holds the compilation's too: a compiled run's highest step.
    """
    model = build_model(kind, seed, grad_checkpoint)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(seed)
    train_step(model, torch.randint(0, VOCAB, (1, min(seq_len, CHUNK)), generator=generator), optimizer)
    ids = torch.randint(0, VOCAB, (1, seq_len), generator=generator)
    if compile_blocks:
        for block in model.model.layers:
            compile_for_training(block)
    gc.collect()
    base = current_rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    train_step(model, ids, optimizer)
    elapsed = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {"base_rss": base, "peak_rss": peak, "extra": peak - base, "step_s": elapsed}


def run_peak_memory(kind: str, seq_len: int, grad_checkpoint: bool, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--_peak-memory-worker", kind, str(seq_len)]
    command += ["--threads", str(args.threads), "--seed", str(args.seed)]
    if grad_checkpoint:
        command.append("--grad-checkpoint")
    command += ["--memory-checkpoint-group", str(args.memory_checkpoint_group), "--memory-impl", args.memory_impl]
    command += ["--compile", "on" if args.compile_moneta else "off"]
    command += ["--model-overrides", *args.model_overrides]
    env = dict(os.environ)
    if args.malloc_mmap_threshold:
        # glibc then serves every allocation above the threshold with its own mmap and returns it on
        # free, so RSS follows the live tensors instead of the allocator's retained free lists.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory worker {kind} T={seq_len} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def section_memory(args) -> dict:
    """Each model's peak in `--memory-runs` fresh processes, the models alternating.

    glibc decides per process whether freed blocks go back to the system (its mmap threshold rises the first time
    a large mmapped block is freed, and blocks below it then stay in the heap), so the same step's peak RSS takes
    one of two levels ~20% apart, for both models. One process per model compares whichever levels they drew;
    the lowest of several is each model's live memory plus its steady fragmentation, the highest the other level.
    """
    rows = []
    for grad_checkpoint in (False, True) if args.grad_checkpoint else (False,):
        for seq_len in args.memory_seq_lens:
            row = {"seq_len": seq_len, "grad_checkpoint": grad_checkpoint}
            runs = {kind: [] for kind in MODELS}
            for _ in range(args.memory_runs):
                for kind in MODELS:
                    runs[kind].append(run_peak_memory(kind, seq_len, grad_checkpoint, args))
            for kind in MODELS:
                row[kind] = min(runs[kind], key=lambda run: run["extra"])
                row[kind]["extra_runs"] = [run["extra"] for run in runs[kind]]
            extras = {kind: row[kind]["extra_runs"] for kind in MODELS}
            row["ratio_moneta_over_llama"] = min(extras["moneta"]) / max(min(extras["llama"]), 1)
            row["ratio_highest"] = max(extras["moneta"]) / max(max(extras["llama"]), 1)
            rows.append(row)
    print("\n### Peak training memory at batch 1 (peak RSS in the step - RSS after model + AdamW state)\n")
    print(f"{args.memory_runs} fresh processes per model; lowest and highest peak of each, and their ratios\n")

    def spread(values):
        return mib(min(values)) if len(values) == 1 else f"{mib(min(values))}-{mib(max(values))}"

    table(
        ["T", "ckpt", "MONETA MiB", "Llama MiB", "MONETA/Llama lowest", "highest", "MONETA base MiB", "Llama base MiB"],
        [
            [
                r["seq_len"],
                "yes" if r["grad_checkpoint"] else "no",
                spread(r["moneta"]["extra_runs"]),
                spread(r["llama"]["extra_runs"]),
                f"{r['ratio_moneta_over_llama']:.2f}",
                f"{r['ratio_highest']:.2f}",
                mib(r["moneta"]["base_rss"]),
                mib(r["llama"]["base_rss"]),
            ]
            for r in rows
        ],
    )
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------
# 3. One mixer layer: chunkwise vs an exact per-token recurrence, and the earlier train.py's block


def build_mixer(seed: int, chunk_size: int = CHUNK) -> MonetaMixer:
    """A mixer initialised as in the model (post_init), taken out of a one-layer MONETA."""
    torch.manual_seed(seed)
    return miras.MonetaForCausalLM(moneta_config(chunk_size, layers=1)).model.layers[0].mixer.float()


def lq_scale(acc: torch.Tensor, q: float, floor: float) -> torch.Tensor:
    """1 / max(||A||_q, floor)^(q-2) per matrix, (..., 1, 1)."""
    norm = acc.abs().pow(q).sum(dim=(-2, -1), keepdim=True).pow(1.0 / q)
    return norm.clamp_min(floor).pow(-(q - 2.0))


def memory_mlp(x, w1, w2, gamma, beta, eps):
    """M(x; W) = x + LN(W1 gelu(W2 x)) for x (B, H, d_h), W1 (B, H, d_h, m), W2 (B, H, m, d_h)."""
    z = (w1 @ F.gelu((w2 @ x.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)).squeeze(-1)
    return x + F.layer_norm(z, z.shape[-1:], eps=eps) * gamma + beta


def per_token_memory(q, k, v, eta, alpha, a1, a2, gamma, beta, rule) -> torch.Tensor:
    """Exact per-token MONETA recurrence, no chunks; q, k, v (B, H, T, d_h), eta and alpha (B, H, T).

    For each token: W = A / ||A||_q^(q-2) at the current A_{t-1}; the inner gradient of
    sum |M(k_t; W) - v_t|^p w.r.t. W by autograd (create_graph, so the outer backward flows through
    it); A_t = alpha_t A_{t-1} - eta_t grad; read M(q_t; s_{t-1} A_t), the read keeping the previous
    normaliser as the model does at chunk size 1 (README "Chunks").
    """
    batch = q.shape[0]
    a1, a2 = a1.expand(batch, *a1.shape), a2.expand(batch, *a2.shape)
    gamma, beta = gamma[None], beta[None]
    outputs = []
    for t in range(q.shape[2]):
        s1, s2 = lq_scale(a1, rule.q, rule.lq_floor), lq_scale(a2, rule.q, rule.lq_floor)
        w1, w2 = s1 * a1, s2 * a2
        err = memory_mlp(k[:, :, t], w1, w2, gamma, beta, rule.ln_eps) - v[:, :, t]
        g1, g2 = torch.autograd.grad(err.abs().pow(rule.p).sum(), (w1, w2), create_graph=True)
        step, decay = eta[:, :, t, None, None], alpha[:, :, t, None, None]
        a1, a2 = decay * a1 - step * g1, decay * a2 - step * g2
        outputs.append(memory_mlp(q[:, :, t], s1 * a1, s2 * a2, gamma, beta, rule.ln_eps))
    return torch.stack(outputs, dim=2)


def per_token_mixer(mixer: MonetaMixer, x: torch.Tensor) -> torch.Tensor:
    """MonetaMixer.forward (no mask, no cache) with its chunkwise memory replaced by per_token_memory."""
    batch, length, d = x.shape
    heads, head_dim = mixer.num_heads, mixer.head_dim
    qkv, _ = mixer._causal_conv(mixer.qkv_proj(x), None)
    q, k, v = (t.view(batch, length, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    eta, log_alpha = mixer._gates(x)
    y = per_token_memory(
        q,
        k,
        v,
        eta,
        log_alpha.exp(),
        mixer.memory_a1,
        mixer.memory_a2,
        mixer.memory_ln_weight,
        mixer.memory_ln_bias,
        mixer.rule,
    )
    y = mixer.out_norm(y.transpose(1, 2)).reshape(batch, length, d)
    return mixer.o_proj(y * F.silu(mixer.out_gate_proj(x)))


class SeedBlock(nn.Module):
    """The earlier train.py's block: one head, one d x d linear memory, W = A / ||A||_4^2, token-by-token.

    e = W_{t-1} k - v; A_t = alpha A_{t-1} - eta * 3 e|e| k^T (the l_3 gradient, written out);
    read W_t q. Projections: fused q/k/v (q and k l2-normalised), scalar gates, output projection.
    """

    def __init__(self, d: int):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.gates = nn.Linear(d, 2)
        self.out = nn.Linear(d, d, bias=False)
        self.a0 = nn.Parameter(torch.randn(d, d) * (1.0 / (3.0 * d * d)) ** 0.25)  # ||A_0||_4 ~ 1
        with torch.no_grad():
            self.gates.bias.copy_(torch.tensor([math.log(0.01 / 0.99), math.log(0.99 / 0.01)]))

    @staticmethod
    def weights(acc: torch.Tensor) -> torch.Tensor:
        return acc / acc.pow(4).sum(dim=(-2, -1), keepdim=True).sqrt()  # A / ||A||_4^2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        eta_logit, alpha_logit = self.gates(x).unbind(-1)
        eta, alpha = torch.sigmoid(eta_logit), torch.sigmoid(alpha_logit)
        acc = self.a0.expand(x.shape[0], *self.a0.shape)
        outputs = []
        for t in range(x.shape[1]):
            k_t = k[:, t]
            err = (self.weights(acc) @ k_t.unsqueeze(-1)).squeeze(-1) - v[:, t]
            grad = (3.0 * err * err.abs()).unsqueeze(-1) * k_t.unsqueeze(-2)
            acc = alpha[:, t, None, None] * acc - eta[:, t, None, None] * grad
            outputs.append((self.weights(acc) @ q[:, t].unsqueeze(-1)).squeeze(-1))
        return self.out(torch.stack(outputs, dim=1))


def forward_backward_s(forward, module: nn.Module, seq_len: int, seed: int) -> float:
    """Seconds of one forward + backward of forward(x) at batch 1, x (1, seq_len, d) requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, seq_len, HIDDEN, generator=generator).requires_grad_(True)
    grad_out = torch.randn(1, seq_len, HIDDEN, generator=generator)
    module.zero_grad(set_to_none=True)
    start = time.perf_counter()
    forward(x).backward(grad_out)
    return time.perf_counter() - start


def time_sequential(forward, module, seq_len: int, prefix: int, budget_s: float, seed: int) -> dict:
    """Time a token loop at seq_len; if a prefix says it would take > budget_s, extrapolate the prefix linearly."""
    forward_backward_s(forward, module, min(4, seq_len), seed)  # warm-up
    measured = min(seq_len, prefix)
    seconds = forward_backward_s(forward, module, measured, seed)
    if measured < seq_len and seconds * seq_len / measured <= budget_s:
        measured, seconds = seq_len, forward_backward_s(forward, module, seq_len, seed)
    extrapolated = measured < seq_len
    total = seconds * seq_len / measured if extrapolated else seconds
    return {
        "seconds": total,
        "tokens_per_s": seq_len / total,
        "measured_tokens": measured,
        "extrapolated": extrapolated,
    }


def check_per_token_reference(seed: int, length: int = 16) -> float:
    """Max |difference| between per_token_mixer and MonetaMixer at chunk size 1 (the same recurrence)."""
    mixer = build_mixer(seed, chunk_size=1)
    x = torch.randn(1, length, HIDDEN, generator=torch.Generator().manual_seed(seed))
    reference = per_token_mixer(mixer, x).detach()  # needs autograd for its inner gradient
    with torch.no_grad():
        return float((mixer(x, None, None) - reference).abs().max())


def section_mixer(args) -> dict:
    check = check_per_token_reference(args.seed)
    mixer = build_mixer(args.seed)
    seed_block = SeedBlock(HIDDEN).float()
    rows = []
    for seq_len in args.mixer_seq_lens:
        forward_backward_s(lambda x: mixer(x, None, None), mixer, seq_len, args.seed)  # warm-up
        chunk_times = [
            forward_backward_s(lambda x: mixer(x, None, None), mixer, seq_len, args.seed) for _ in range(args.steps)
        ]
        chunk_s = statistics.median(chunk_times)
        token = time_sequential(
            lambda x: per_token_mixer(mixer, x), mixer, seq_len, args.per_token_prefix, args.per_token_budget, args.seed
        )
        seed_run = time_sequential(
            seed_block, seed_block, seq_len, args.per_token_prefix, args.per_token_budget, args.seed
        )
        rows.append(
            {
                "seq_len": seq_len,
                "chunkwise": {"seconds": chunk_s, "times_s": chunk_times, "tokens_per_s": seq_len / chunk_s},
                "per_token": token,
                "seed_block": seed_run,
                "speedup_chunkwise_over_per_token": token["seconds"] / chunk_s,
            }
        )
    print(f"\n### One mixer layer, forward + backward, batch 1, d={HIDDEN}, {HEADS} heads, chunk {CHUNK}\n")
    print(f"per-token reference vs MonetaMixer(chunk_size=1), T=16: max |diff| = {check:.2e}\n")

    def note(run):
        return f" (extrapolated from {run['measured_tokens']})" if run["extrapolated"] else ""

    table(
        ["T", "chunkwise tok/s", "per-token tok/s", "speedup", "earlier train.py block tok/s"],
        [
            [
                r["seq_len"],
                f"{r['chunkwise']['tokens_per_s']:.0f}",
                f"{r['per_token']['tokens_per_s']:.1f}{note(r['per_token'])}",
                f"{r['speedup_chunkwise_over_per_token']:.1f}x",
                f"{r['seed_block']['tokens_per_s']:.1f}{note(r['seed_block'])}",
            ]
            for r in rows
        ],
    )
    return {"per_token_check_max_abs_diff": check, "rows": rows}


# ----------------------------------------------------------------------------------------------
# 4. Decoding


def tensor_bytes(obj, seen: set | None = None) -> int:
    """Sum of numel * element_size over the tensors reachable from a cache object (each tensor once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (type, types.FunctionType, types.MethodType, types.ModuleType, nn.Module)):
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(item, seen) for item in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(item, seen) for item in obj.values())
    if is_dataclass(obj):
        return sum(tensor_bytes(getattr(obj, f.name), seen) for f in fields(obj))
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(item, seen) for item in vars(obj).values())
    return 0


def output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def time_decoding(kind: str, context: int, args) -> dict:
    model = build_model(kind, args.seed).eval()
    if args.compile == "on" and kind == "moneta":
        # Only when asked: `miras generate` decodes eagerly. The whole model, one graph per (batch, length) and state
        # layout: per-block graphs would recompile per layer (each block indexes the cache by its own layer) past
        # Dynamo's recompile limit.
        model = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, VOCAB, (1, context), generator=torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    output = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - start
    cache = output_cache(output)
    cache_bytes = tensor_bytes(cache)
    token = output.logits[:, -1:].argmax(-1)
    for _ in range(2):  # warm-up steps
        token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(args.decode_steps):
        token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    decode_s = time.perf_counter() - start
    result = {
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": context / prefill_s,
        "decode_s": decode_s,
        "decode_tokens_per_s": args.decode_steps / decode_s,
        "cache_bytes": cache_bytes,
        "cache_bytes_per_token": cache_bytes / context,
        "cache_bytes_after_decode": tensor_bytes(cache),
        "cache_seq_length_after_decode": int(cache.get_seq_length()),
    }
    del model, cache, output
    gc.collect()
    return result


def section_decode(args) -> dict:
    rows = []
    for context in args.decode_contexts:
        row = {"context": context}
        for kind in MODELS:
            row[kind] = time_decoding(kind, context, args)
        row["ratio_moneta_over_llama"] = row["moneta"]["decode_tokens_per_s"] / row["llama"]["decode_tokens_per_s"]
        rows.append(row)
    print(f"\n### Decoding, batch 1: prefill then {args.decode_steps} single-token steps (no_grad)\n")
    print("cache MiB = tensor bytes after the prefill, B/tok = that / context; MONETA's state grows once, to its")
    print("decoding size (the open chunk's cached inner gradients), shown as 'MONETA decoding'\n")
    table(
        [
            "context",
            "MONETA tok/s",
            "Llama tok/s",
            "MONETA/Llama",
            "MONETA cache",
            "MONETA decoding",
            "Llama cache",
            "MONETA B/tok",
            "Llama B/tok",
        ],
        [
            [
                r["context"],
                f"{r['moneta']['decode_tokens_per_s']:.1f}",
                f"{r['llama']['decode_tokens_per_s']:.1f}",
                f"{r['ratio_moneta_over_llama']:.2f}",
                mib(r["moneta"]["cache_bytes"]),
                mib(r["moneta"]["cache_bytes_after_decode"]),
                mib(r["llama"]["cache_bytes"]),
                f"{r['moneta']['cache_bytes_per_token']:.0f}",
                f"{r['llama']['cache_bytes_per_token']:.0f}",
            ]
            for r in rows
        ],
    )
    return {"decode_steps": args.decode_steps, "rows": rows}


# ----------------------------------------------------------------------------------------------
# Driver


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f}"


def table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    sys.stdout.flush()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 step: a seconds-long smoke run")
    parser.add_argument("--out", default="bench/out/model.json")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median); train and mixer sections")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--grad-checkpoint", action="store_true", help="also time with block-level checkpointing")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="on",
        default="auto",
        choices=list(COMPILE_CHOICES),
        help="MONETA compiled (fullgraph), each block for training and peak memory, the model for decoding (on "
        "only): auto (the default) as `miras train` decides for a long run (on the CPU: on where torch.compile "
        "works), on, off",
    )
    parser.add_argument(
        "--compile-llama", action="store_true", help="train: Llama's decoder layers compiled too, one graph each"
    )
    parser.add_argument("--memory-impl", default="auto", help="MONETA: MonetaConfig.memory_impl (torch, compiled, ...)")
    parser.add_argument("--memory-checkpoint-group", type=int, default=0, help="MONETA: chunks per outer checkpoint")
    parser.add_argument(
        "--model-overrides", nargs="*", default=[], metavar="KEY=VALUE",
        help="MONETA: other MonetaConfig fields, e.g. the paper's memory form: memory_update_input=true "
        "lq_norm=inverse alpha_init=0.99 memory_read_gain_init=0.3162",
    )  # fmt: skip
    parser.add_argument(
        "--malloc-mmap-threshold", type=int, default=0, help="memory: glibc mmap threshold (bytes) in the workers"
    )
    parser.add_argument(
        "--memory-runs", type=int, default=3, help="memory: fresh processes per model (lowest and highest reported)"
    )
    parser.add_argument("--calib-size", type=int, default=2048, help="matmul size for the fp32 peak")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--tokens-per-step", type=int, default=8192)
    parser.add_argument("--memory-seq-lens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--mixer-seq-lens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--per-token-prefix", type=int, default=256, help="tokens timed first in the token loops")
    parser.add_argument("--per-token-budget", type=float, default=60.0, help="seconds; beyond it, extrapolate")
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--_peak-memory-worker", nargs=2, metavar=("MODEL", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_runs < 1:
        parser.error(f"--memory-runs {args.memory_runs}: expected a count of processes >= 1")
    if args.quick:
        args.steps, args.warmup, args.calib_size, args.tokens_per_step = 1, 1, 512, 256
        args.seq_lens = args.memory_seq_lens = args.decode_contexts = [128]
        args.mixer_seq_lens = [64]
        args.per_token_prefix, args.per_token_budget, args.decode_steps = 16, 1.0, 4
        args.memory_runs = 1
    return args


def moneta_compiles(args) -> tuple[bool, str]:
    """--compile resolved as `miras train` resolves it for a long CPU run (the benchmark times such a run's steady
    steps), except that --quick, a seconds-long smoke run, stays eager unless told otherwise."""
    if args.compile == "auto" and args.quick:
        return False, "off (auto: --quick)"
    compiled, why = compile_decision(args.compile, "cpu", AUTO_COMPILE_MIN_STEPS, use_fsdp=False)
    if args.compile == "auto" and compiled:
        why = "on (auto: as `miras train` compiles a long CPU run; the warm-up step compiles, untimed)"
    return compiled, why


def main(argv=None) -> None:
    global MEMORY_CHECKPOINT_GROUP, MEMORY_IMPL, MODEL_OVERRIDES
    args = parse_args(argv)
    MEMORY_CHECKPOINT_GROUP, MEMORY_IMPL = args.memory_checkpoint_group, args.memory_impl
    MODEL_OVERRIDES = parse_overrides(args.model_overrides)
    torch.set_num_threads(args.threads)
    if args._peak_memory_worker:
        kind, seq_len = args._peak_memory_worker
        compile_blocks = args.compile == "on" and kind == "moneta"  # the parent resolved "auto" for the worker
        print(json.dumps(peak_memory_worker(kind, int(seq_len), args.grad_checkpoint, args.seed, compile_blocks)))
        return
    import transformers

    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "shape": {"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "ffn": FFN, "chunk": CHUNK},
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
    }
    args.compile_moneta, compile_why = moneta_compiles(args)
    results["moneta_compiled"] = args.compile_moneta
    print(f"# MONETA vs Llama (sdpa), fp32 CPU, {args.threads} threads, torch {torch.__version__}")
    print(f"MONETA compile: {compile_why}; Llama: {'compiled' if args.compile_llama else 'eager'}")
    print(f"d={HIDDEN}, {LAYERS} layers, {HEADS} heads, FFN {FFN}, vocab {VOCAB}, MONETA chunk {CHUNK}")
    for kind in MODELS:
        model = build_model(kind, args.seed)
        total = sum(p.numel() for p in model.parameters())
        results.setdefault("params", {})[kind] = {"total": total, "dense": dense_params(model)}
        print(f"{kind}: {total:,} parameters ({dense_params(model):,} counted in 6N)")
        del model
    runners = {"train": section_train, "memory": section_memory, "mixer": section_mixer, "decode": section_decode}
    for name in args.sections:
        if name == "train":
            args.peak_gflops = calibrate_matmul(args.calib_size)
        results[name] = runners[name](args)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))  # after every section, so a long run keeps partial results
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
