"""One GPU session's checks and numbers, written to one JSON (bench/gpu.sh runs it; see bench/README.md).

Sections, most important first; each runs in a subprocess with a hard timeout and the whole run
keeps to --deadline seconds (later sections are recorded as skipped when the time is spent):

  check    the Triton path against the torch path on the device: the memory op (outputs, final
           state, every input gradient; with a left-padded row and a partial chunk) at the head
           sizes of s and m, in fp32 with "highest" (IEEE) and "high" (TF32) matmul precision, and
           the size-s model's loss and gradients under bf16 autocast
  speed    training-step tokens/s, MFU and peak memory at T = 4096 under bf16 autocast (fp32
           weights, fused AdamW, TF32 on, as `miras train`), sizes s and m: MONETA with the Triton
           path, the torch path (eager), and the torch path with each block compiled (torch.compile), and a
           LlamaForCausalLM (sdpa) of the same width, depth, heads, FFN and vocab
  train    `miras train` on size s, 200 steps of synthetic:recall (no `datasets` needed), checks that
           the loss falls
  tiles    the memory op alone (forward + backward) at size-s shapes for a few launch shapes

MFU uses the same convention for both models (bench_model.py): Llama 6N + 12 L T d per token
(attention counted without the causal half), MONETA 6N + 3 L H (56 d_h^2 + 20 b d_h) (derived in
bench_model.train_flops_per_token), N without the embedding's second use and without the learned initial
memories; the peak is miras.metrics' bf16 dense table (989 TFLOP/s for H100/H200).

--device cpu --quick runs every section at tiny shapes on the CPU (Triton under TRITON_INTERPRET=1):
it checks the script, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = ("s", "m")
KINDS = ("triton", "llama", "torch", "compile")  # speed rows; "compile" is the slowest to start, so last
GOAL_RATIO, GOAL_MFU = 0.7, 0.25  # issue: MONETA size s at >= 0.7x Llama tokens/s and >= 25% MFU


# ----------------------------------------------------------------------------------------------
# Shapes and models


def moneta_config(size: str, quick: bool, memory_impl: str = "torch"):
    import miras

    if quick:  # two layers of 32-wide heads: every code path, seconds on the CPU
        return miras.MonetaConfig(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, num_heads=2, intermediate_size=128,
            chunk_size=16, memory_impl=memory_impl,
        )  # fmt: skip
    return miras.MonetaConfig.from_size(size, vocab_size=32000, memory_impl=memory_impl)


def llama_like(config, seq_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(llama)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def dense_params(model) -> int:
    """Per-token matmul weights: tied embeddings once (the LM head), MONETA's initial memories left out."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.endswith(("memory_a1", "memory_a2")))


def flops_per_token(kind: str, config, n_params: int, seq_len: int) -> float:
    layers, width = config.num_hidden_layers, config.hidden_size
    if kind == "llama":
        return 6.0 * n_params + 12.0 * layers * seq_len * width
    head_dim = config.head_dim
    return 6.0 * n_params + 3.0 * layers * config.num_heads * (56.0 * head_dim**2 + 20.0 * config.chunk_size * head_dim)


def memory_op_inputs(batch, heads, length, head_dim, width, device, seed=0):
    """Random inputs of the memory op at the scales the model produces (unit q, k; small eta; alpha near 1)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    sigma = (1.0 / (3.0 * head_dim * width)) ** 0.25  # ||A_0||_q = 1, as the model's initialisation

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    tensors = dict(
        q=F.normalize(randn(batch, heads, length, head_dim), dim=-1),
        k=F.normalize(randn(batch, heads, length, head_dim), dim=-1),
        v=randn(batch, heads, length, head_dim),
        eta=0.01 + 0.09 * torch.rand(batch, heads, length, generator=g),
        log_alpha=torch.log(0.95 + 0.049 * torch.rand(batch, heads, length, generator=g)),
        a1=sigma * randn(heads, head_dim, width),
        a2=sigma * randn(heads, width, head_dim),
        gamma=0.1 * (1 + 0.1 * randn(heads, head_dim)),
        beta=0.01 * randn(heads, head_dim),
    )
    return {name: t.to(device) for name, t in tensors.items()}


def run_memory_op(x, rule, impl, mask=None, probe_seed=1):
    """The memory op forward and backward: (y, final a1, a2, gradients of the 9 inputs), for a fixed loss."""
    import torch

    from miras.memory import MemoryState, chunkwise_memory

    names = ("q", "k", "v", "eta", "log_alpha", "a1", "a2", "gamma", "beta")
    leaves = {n: x[n].clone().requires_grad_() for n in names}
    batch = x["q"].shape[0]
    state = MemoryState.initial(leaves["a1"], leaves["a2"], batch, rule.chunk_size, channelwise=False)
    y, state = chunkwise_memory(
        *(leaves[n] for n in names[:5]), state, leaves["gamma"], leaves["beta"], rule, mask, impl=impl
    )
    g = torch.Generator().manual_seed(probe_seed)
    probes = [torch.randn(t.shape, generator=g).to(t.device) for t in (y, state.a1, state.a2)]
    loss = sum((t * p).sum() for t, p in zip((y, state.a1, state.a2), probes))
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return [t.detach() for t in (y, state.a1, state.a2, *grads)], ("y", "a1_final", "a2_final", *names)


def relative_errors(got, want, labels) -> dict[str, float]:
    """max |got - want| / max |want| per tensor."""
    return {
        label: float((g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-30))
        for label, g, w in zip(labels, got, want)
    }


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Workers (each runs in its own process; results are JSON lines appended to --_results)


class Worker:
    def __init__(self, spec: dict):
        import torch

        self.spec = spec
        self.quick = spec["quick"]
        self.device = torch.device(spec["device"])
        self.results_path = Path(spec["results"])
        self.deadline = spec["deadline"]  # time.time() after which the worker starts nothing new

    def emit(self, row: dict) -> None:
        with self.results_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    def time_left(self) -> float:
        return self.deadline - time.time()


def worker_check(w: Worker) -> None:
    """Triton against torch on the device: the memory op (IEEE and TF32 matmuls at size s, TF32 at m), the model.

    Each (head size, precision) compiles both kernels once; TF32 is what training runs (`miras train` turns
    it on), so those compiles also serve the speed rows and the training run.
    """
    import torch

    from miras.memory import RuleConfig

    rule = RuleConfig(chunk_size=16 if w.quick else 64)
    cases = [("s", 48, "highest"), ("s", 48, "high"), ("m", 64, "high")]
    if w.quick:
        cases = [("quick", 8, "highest"), ("quick", 8, "high")]
    heads, length = (2, 40) if w.quick else (16, 1000)  # 1000 = 15 chunks and a partial one
    for size, head_dim, precision in cases:
        if w.time_left() < 20:
            w.emit({"section": "check", "case": f"op {size} {precision}", "status": "skipped: deadline"})
            continue
        torch.set_float32_matmul_precision(precision)
        x = memory_op_inputs(2, heads, length, head_dim, 4 * head_dim, w.device)
        mask = torch.ones(2, length, dtype=torch.bool, device=w.device)
        mask[1, : length // 10] = False  # a left-padded row
        start = time.time()
        want, labels = run_memory_op(x, rule, "torch", mask)
        torch_s = time.time() - start
        start = time.time()
        got, _ = run_memory_op(x, rule, "triton", mask)
        synchronize(w.device)
        triton_s = time.time() - start  # the first call: compile (or the disk cache) included
        errors = relative_errors(got, want, labels)
        bound = 1e-3 if precision == "highest" else 5e-2
        w.emit({
            "section": "check", "case": f"op {size} {precision}", "head_dim": head_dim, "batch": 2,
            "heads": heads, "seq_len": length, "chunk_size": rule.chunk_size, "relative_errors": errors,
            "max_relative_error": max(errors.values()), "bound": bound,
            "passed": all(math.isfinite(e) and e < bound for e in errors.values()),
            "first_call_s": {"torch": torch_s, "triton": triton_s}, "status": "ok",
        })  # fmt: skip
    torch.set_float32_matmul_precision("high")  # as miras train (TF32 on)

    if w.time_left() < 30:
        w.emit({"section": "check", "case": "model s", "status": "skipped: deadline"})
        return
    import miras

    losses, grads = {}, {}
    length = 64 if w.quick else 1024
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        model = miras.MonetaForCausalLM(moneta_config("s", w.quick, impl)).to(w.device).train()
        ids = torch.randint(0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(1))
        ids = ids.to(w.device)
        with torch.autocast(w.device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses[impl] = float(loss)
        grads[impl] = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        del model
    cosine = float(torch.nn.functional.cosine_similarity(grads["torch"], grads["triton"], dim=0))
    norm_ratio = float(grads["triton"].norm() / grads["torch"].norm())
    loss_diff = abs(losses["torch"] - losses["triton"])
    w.emit({
        "section": "check", "case": "model s", "batch": 2, "seq_len": length, "precision": "bf16 autocast, TF32",
        "loss": losses, "loss_difference": loss_diff, "gradient_cosine": cosine, "gradient_norm_ratio": norm_ratio,
        "passed": loss_diff < 1e-2 and cosine > 0.99 and abs(norm_ratio - 1) < 0.05, "status": "ok",
    })  # fmt: skip


def worker_speed(w: Worker) -> None:
    """Training-step speed of the kinds in spec["kinds"] at one size, each after the previous is freed."""
    import torch

    size, seq_len, steps, warmup = w.spec["size"], w.spec["seq_len"], w.spec["steps"], w.spec["warmup"]
    torch.backends.cuda.matmul.allow_tf32 = True  # as miras train
    torch.backends.cudnn.allow_tf32 = True
    for kind in w.spec["kinds"]:
        batch = w.spec["batch"]
        row = {"section": "speed", "size": size, "kind": kind, "seq_len": seq_len}
        while True:
            if w.time_left() < w.spec["min_s"].get(kind, 30):
                w.emit({**row, "status": "skipped: deadline"})
                break
            row["batch"] = batch
            try:
                w.emit({**row, **time_training(w, kind, size, seq_len, batch, steps, warmup)})
                break
            except torch.cuda.OutOfMemoryError:
                w.emit({**row, "status": "oom"})
                if batch == 1:
                    break
                batch //= 2
            except Exception as error:  # a failed kind is a result; the others still run
                w.emit({**row, "status": f"error: {type(error).__name__}: {error}"[:2000],
                        "traceback": traceback.format_exc()[-4000:]})  # fmt: skip
                break
            finally:
                torch._dynamo.reset()  # the compiled kind's graphs go with its model
                gc.collect()
                if w.device.type == "cuda":
                    torch.cuda.empty_cache()


def time_training(w: Worker, kind: str, size: str, seq_len: int, batch: int, steps: int, warmup: int) -> dict:
    import torch

    import miras
    from miras.metrics import peak_tflops
    from miras.train.compiling import compile_for_training

    config = moneta_config(size, w.quick, "triton" if kind == "triton" else "torch")
    torch.manual_seed(0)
    if kind == "llama":
        model = llama_like(config, seq_len)
    else:
        model = miras.MonetaForCausalLM(config)
    model = model.to(w.device).train()
    if kind == "compile":  # as `miras train --compile`: each block one graph (compiled on the first warm-up step)
        for block in model.model.layers:
            compile_for_training(block)
    fused = w.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(w.device)

    def step() -> float:
        with torch.autocast(w.device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    start = time.time()
    for _ in range(warmup):
        step()
    synchronize(w.device)
    warmup_s = time.time() - start
    if kind == "triton":  # the kernels ran (no fallback to the torch path)
        from miras.memory import triton_chunk

        assert triton_chunk._LAUNCHED, "the Triton path did not launch"
        launched = {name: vars(tiles) for (name, _), tiles in triton_chunk._LAUNCHED.items()}
    else:
        launched = None
    if w.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(w.device)
    times, loss = [], math.nan
    for _ in range(steps):
        start = time.time()
        loss = step()
        synchronize(w.device)
        times.append(time.time() - start)
    step_s = statistics.median(times)
    n_params = dense_params(model)
    tokens_per_s = batch * seq_len / step_s
    per_token = flops_per_token("llama" if kind == "llama" else "moneta", config, n_params, seq_len)
    peak = peak_tflops(w.device, None)
    result = {
        "status": "ok",
        "steps": steps,
        "warmup_steps": warmup,
        "warmup_s": warmup_s,
        "step_s": step_s,
        "step_times_s": times,
        "tokens_per_s": tokens_per_s,
        "dense_params": n_params,
        "flops_per_token": per_token,
        "achieved_tflops": per_token * tokens_per_s / 1e12,
        "mfu": per_token * tokens_per_s / (peak * 1e12) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(w.device) / 2**30 if w.device.type == "cuda" else None,
        "loss": loss,
        "triton_tiles": launched,
    }
    return result


def worker_tiles(w: Worker) -> None:
    """The memory op alone, forward + backward, for a few launch shapes of the kernels (fp32 inputs, TF32)."""
    import torch

    from miras.memory import RuleConfig
    from miras.memory.triton_chunk import Tiles

    torch.set_float32_matmul_precision("high")
    rule = RuleConfig(chunk_size=16 if w.quick else 64)
    batch, heads, length, head_dim = (1, 2, 64, 8) if w.quick else (8, 16, 4096, 48)
    x = memory_op_inputs(batch, heads, length, head_dim, 4 * head_dim, w.device)
    for block_m, num_warps in ((64, 8), (64, 4), (32, 4), (32, 8)):
        row = {"section": "tiles", "batch": batch, "heads": heads, "seq_len": length, "head_dim": head_dim,
               "block_m": block_m, "num_warps": num_warps}  # fmt: skip
        if w.time_left() < 30:
            w.emit({**row, "status": "skipped: deadline"})
            continue
        tiles = Tiles(block_m=block_m, num_warps=num_warps)
        leaves = {n: x[n].clone().requires_grad_() for n in x}
        try:
            start = time.time()
            memory_op_with_tiles(leaves, batch, rule, tiles)
            synchronize(w.device)
            first = time.time() - start
            times = []
            for _ in range(3):
                start = time.time()
                memory_op_with_tiles(leaves, batch, rule, tiles)
                synchronize(w.device)
                times.append(time.time() - start)
            w.emit({**row, "status": "ok", "first_call_s": first, "fwd_bwd_s": statistics.median(times)})
        except Exception as error:
            w.emit({**row, "status": f"error: {type(error).__name__}: {error}"[:2000]})


def memory_op_with_tiles(leaves: dict, batch: int, rule, tiles) -> None:
    from miras.memory.triton_chunk import triton_memory

    per_token = (leaves[n] for n in ("q", "k", "v", "eta", "log_alpha"))
    a1 = leaves["a1"].expand(batch, *leaves["a1"].shape)
    a2 = leaves["a2"].expand(batch, *leaves["a2"].shape)
    y, f1, f2 = triton_memory(*per_token, a1, a2, leaves["gamma"], leaves["beta"], None, rule, tiles)
    (y.sum() + f1.sum() + f2.sum()).backward()


WORKERS = {"check": worker_check, "speed": worker_speed, "tiles": worker_tiles}


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    w = Worker(spec)
    try:
        WORKERS[spec["worker"]](w)
    except Exception as error:
        w.emit({"section": spec["worker"], "status": f"error: {type(error).__name__}: {error}"[:2000],
                "traceback": traceback.format_exc()[-4000:]})  # fmt: skip
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# The driver


class Run:
    def __init__(self, args):
        self.args = args
        self.start = time.time()
        self.deadline = self.start + args.deadline
        self.out = Path(args.out)
        self.result: dict = {
            "what": "bench/gpu.sh: the memory's Triton path on a GPU, and MONETA against Llama",
            "started_unix": self.start,
            "args": vars(args),
            "env": environment(args.device),
            "check": [],
            "speed": [],
            "train": None,
            "tiles": [],
            "log": [],
        }
        self.save()

    def save(self) -> None:
        self.result["elapsed_s"] = time.time() - self.start
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        tmp.replace(self.out)

    def note(self, message: str) -> None:
        print(f"[{time.time() - self.start:6.1f}s] {message}", flush=True)
        self.result["log"].append(f"{time.time() - self.start:.1f}s {message}")
        self.save()

    def time_left(self) -> float:
        return self.deadline - time.time()

    def worker(self, name: str, spec: dict, budget: float) -> list[dict]:
        """Run one worker with at most `budget` seconds (and what the deadline leaves); its result rows."""
        budget = min(budget, self.time_left() - 5)
        if budget < 15:
            self.note(f"{name}: skipped, {self.time_left():.0f}s left")
            return [{"section": spec["worker"], "status": "skipped: deadline", "worker": name}]
        with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as handle:
            results = Path(handle.name)
        spec = {**spec, "quick": self.args.quick, "device": self.args.device, "results": str(results),
                "deadline": time.time() + budget - 10}  # fmt: skip
        self.note(f"{name}: start (budget {budget:.0f}s)")
        status = "ok"
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--_worker", json.dumps(spec)],
                timeout=budget, capture_output=True, text=True, env=worker_env(self.args),
            )  # fmt: skip
            if proc.returncode:
                status = f"exit {proc.returncode}: {proc.stderr[-3000:]}"
        except subprocess.TimeoutExpired as expired:
            status = f"timeout after {budget:.0f}s: {(expired.stderr or b'')[-2000:]!r}"
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        results.unlink(missing_ok=True)
        if status != "ok":
            rows.append({"section": spec["worker"], "worker": name, "size": spec.get("size"), "status": status})
        self.note(f"{name}: {status[:200]} ({len(rows)} rows)")
        return rows


def worker_env(args) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # the kernels on CPU tensors (slow; --quick only)
    return env


def environment(device: str) -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
    }
    for package in ("triton", "transformers", "accelerate", "datasets", "wandb"):
        try:
            info[package] = __import__(package).__version__
        except Exception as error:  # missing packages are facts worth recording, not failures
            info[package] = f"unavailable ({type(error).__name__})"
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
        )
    return info


def section_train(run: Run, budget: float) -> dict:
    """`miras train` on size s (tiny with --quick) for 200 steps of synthetic:recall: does the loss fall?

    T = 512 and batch 8 so that 200 steps fit the budget; --max-time stops it earlier on a slow path
    (the result says how many steps ran).
    """
    quick = run.args.quick
    strict = [r for r in run.result["check"] if r.get("case", "").startswith("op") and r["case"].endswith("highest")]
    # Through the Triton path when it matched the torch path with IEEE matmuls on this GPU (not with --quick on
    # the CPU: the interpreter is far too slow for it).
    impl = "triton" if strict and all(r.get("passed") for r in strict) and not quick else "torch"
    budget = min(budget, run.time_left() - 5)
    if budget < 45:
        return {"status": "skipped: deadline"}
    out = Path(tempfile.mkdtemp(prefix="miras-gpu-train-"))
    steps = 20 if quick else 200
    command = [
        sys.executable, "-m", "miras.cli", "train", "--model-size", "xs" if quick else "s",
        "--dataset", "synthetic:recall", "--seq-len", "128" if quick else "512", "--batch-size", "2" if quick else "8",
        "--max-steps", str(steps), "--max-time", str(max(20, int(budget - 40))), "--log-every", "5" if quick else "10",
        "--eval-every", "0", "--ckpt-every-seconds", "0", "--ckpt-milestone-every-seconds", "0", "--lr", "1e-3",
        "--output-dir", str(out), "--run-name", "gpu-train", "--memory-impl", impl,
        "--device", "cpu" if run.args.device == "cpu" else "cuda",
    ]  # fmt: skip
    run.note(f"train: {' '.join(command[2:])}")
    start = time.time()
    try:
        proc = subprocess.run(command, timeout=budget, capture_output=True, text=True, env=worker_env(run.args))
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    except subprocess.TimeoutExpired:
        status = f"timeout after {budget:.0f}s"
    metrics = out / "gpu-train" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    result = {
        "status": status,
        "memory_impl": impl,
        "command": command[2:],
        "wall_s": time.time() - start,
        "steps_done": losses[-1][0] if losses else 0,
        "losses": losses,
        "last_row": rows[-1] if rows else None,
    }
    if len(losses) >= 2:
        first, last = losses[0][1], losses[-1][1]
        result.update(first_loss=first, last_loss=last, loss_falls=last < first - 0.5)
    return result


def summarise(run: Run) -> None:
    speed = [r for r in run.result["speed"] if r.get("status") == "ok"]
    summary = {}
    for size in SIZES:
        rows = {r["kind"]: r for r in speed if r["size"] == size}
        if "llama" not in rows:
            continue
        llama = rows["llama"]["tokens_per_s"]
        others = [kind for kind in KINDS if kind in rows and kind != "llama"]
        summary[size] = {f"{kind}_over_llama": rows[kind]["tokens_per_s"] / llama for kind in others}
        if "triton" in rows:
            summary[size]["triton_mfu"] = rows["triton"]["mfu"]
            if size == "s":
                ratio, mfu = summary[size]["triton_over_llama"], rows["triton"]["mfu"] or 0.0
                summary[size]["goal_met"] = ratio >= GOAL_RATIO and mfu >= GOAL_MFU
    checks = [r for r in run.result["check"] if "passed" in r]
    summary["check_passed"] = bool(checks) and all(r["passed"] for r in checks)
    triton_fastest = all(
        s.get("triton_over_llama", 0) > max(s.get("torch_over_llama", 0), s.get("compile_over_llama", 0))
        for key, s in summary.items() if key in SIZES
    )  # fmt: skip
    summary["auto_should_take_triton"] = summary["check_passed"] and triton_fastest and any(k in summary for k in SIZES)
    run.result["summary"] = summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "gpu.json"))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--deadline", type=float, default=450.0, help="seconds for everything (default 450)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (halved on out-of-memory)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per speed row (median)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (with --device cpu: checks the script)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker is not None:
        return worker_main(args._worker)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("bench_gpu: no CUDA device (use --device cpu --quick to check the script)", file=sys.stderr)
            return 2
    if args.quick:
        args.seq_len, args.batch, args.steps = min(args.seq_len, 64), min(args.batch, 2), min(args.steps, 2)

    run = Run(args)
    # Budgets (seconds) sum to the 450 s default deadline; a section that ends early leaves its time to the
    # next. Triton compiles each kernel once per head size and matmul precision (the check pays for it; the
    # on-disk cache serves the speed rows and the training run); the compiled torch path compiles per size.
    run.result["check"] = run.worker("check", {"worker": "check"}, 110)
    run.save()
    plain = {"worker": "speed", "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps, "warmup": 1,
             "kinds": list(KINDS), "min_s": {"triton": 30, "llama": 20, "torch": 30, "compile": 70}}  # fmt: skip
    run.result["speed"] += run.worker("speed s", {**plain, "size": "s"}, 120)
    run.save()
    run.result["train"] = section_train(run, budget=110)
    run.note(f"train: {run.result['train']['status'][:200]}")
    run.result["speed"] += run.worker("speed m", {**plain, "size": "m"}, 110)
    run.save()
    if run.time_left() > 60:  # only what is left: one launch shape costs a compile of both kernels
        run.result["tiles"] = run.worker("tiles", {"worker": "tiles"}, run.time_left())
    summarise(run)
    run.note("done")
    print(json.dumps(run.result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
