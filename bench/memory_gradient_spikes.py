"""Where does a gradient spike on long windows come from? Train until one, then take it apart.

Trains the long-documents benchmark's MONETA (bench_long_context.py: hidden 128, 4 layers, 4 heads, the
`python-source` corpus, byte tokens, one window of `--seq-len` per step, AdamW lr 3e-3 with its warmup and
cosine over `--steps`, clip 1.0) until the first step whose gradient norm before clipping exceeds
`--threshold`, and at that step, before its update, reports:
- the parameters with the largest gradients, and the memory's parameters' gradient per head: which head;
- the gradient of the loss restricted to each position bucket: which predictions it comes from;
- the gradient with the memory's state detached every N tokens (`detach_state_every`): whether it grows
  through the chunk recurrence or inside a chunk;
- for the head with the largest memory gradient, chunk by chunk: the norm of the accumulator A1 at the
  chunk's start, the gradient reaching it and its growth over the chunk (||dL/dA1_c|| / ||dL/dA1_c+1||),
  the chunk's summed write size (eta), the retention over the chunk (prod alpha) and the smallest LayerNorm
  scale std(z) of its writes. Growth above 1 is where the recurrence amplifies the gradient.

`--save PATH` keeps the spike step's weights and window; `--load PATH` reports on a saved one without training.

Examples (full backprop: the model's default truncation at 1024 tokens keeps these norms below 50):
  python bench/memory_gradient_spikes.py --steps 3000 --seed 1 --threshold 200 --save bench/out/spike_s1.pt \
      --model-overrides detach_state_every=0
  python bench/memory_gradient_spikes.py --load bench/out/spike_s1.pt
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lm_quality import Run, next_token_loss, parse_overrides  # noqa: E402
from bench_long_context import MODEL  # noqa: E402

import miras  # noqa: E402
from miras.data import DataConfig, open_stream  # noqa: E402
from miras.data_sources import PYTHON_SOURCE  # noqa: E402
from miras.evaluation import LN2  # noqa: E402
from miras.memory.chunkwise import chunkwise_memory  # noqa: E402
from miras.memory.rule import gelu, layer_norm, lq_scale  # noqa: E402
from miras.memory.state import MemoryState  # noqa: E402
from miras.tokenizer import byte_tokenizer  # noqa: E402

BUCKETS = ((0, 64), (64, 512), (512, 2048), (2048, 4096))


def train_until_spike(args) -> dict | None:
    config = miras.MonetaConfig(**{**MODEL, **parse_overrides(args.model_overrides)})
    torch.manual_seed(args.seed)
    model = miras.MonetaForCausalLM(config)
    optimizer_args = argparse.Namespace(lr=3e-3, min_lr_ratio=0.1, warmup=30, weight_decay=0.1, grad_clip=1.0)
    run = Run("moneta", model, argparse.Namespace(**vars(optimizer_args), steps=args.steps))
    data = DataConfig(dataset=PYTHON_SOURCE, seq_len=args.seq_len, batch_size=1, seed=args.seed, eval_documents=64)
    stream = open_stream(data, byte_tokenizer())
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = stream.next_batch()["input_ids"]
        model.train()
        loss = next_token_loss(model, ids)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))
        if norm > args.threshold:
            print(f"step {step}: gradient norm {norm:.4g} > {args.threshold:g}, before its update")
            return {"model": model.state_dict(), "config": config.to_dict(), "ids": ids, "step": step, "norm": norm}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the same clip as the benchmark's runs
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item() / LN2:.3f} bits per byte, gradient norm {norm:.3g} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    print(f"no gradient norm above {args.threshold:g} in {args.steps} steps")
    return None


def rebuild(spike: dict, **overrides) -> miras.MonetaForCausalLM:
    config = miras.MonetaConfig(**{**spike["config"], **overrides})
    model = miras.MonetaForCausalLM(config)
    model.load_state_dict(spike["model"])
    return model.train()


def gradients(model, ids, positions: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Gradients of the mean next-token loss (restricted to predictions at `positions`, same normalisation)."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    per_token = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")
    loss = per_token.mean() if positions is None else per_token[positions[0] : positions[1]].sum() / per_token.numel()
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def total_norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.norm()) ** 2 for g in grads.values()))


def worst_head(grads: dict[str, torch.Tensor], layers: int) -> tuple[int, int, float]:
    """(layer, head, norm) with the largest gradient on its memory's own parameters (A1_0, A2_0, LayerNorm)."""
    best = (0, 0, -1.0)
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mixer."
        per_head = sum(grads[prefix + n].flatten(1).norm(dim=1) ** 2 for n in ("memory_a1", "memory_a2",
                       "memory_ln_weight", "memory_ln_bias")).sqrt()  # fmt: skip
        head = int(per_head.argmax())
        if float(per_head[head]) > best[2]:
            best = (layer, head, float(per_head[head]))
    return best


def chunk_table(model, ids, layer: int, head: int) -> list[dict]:
    """One head's memory re-run chunk by chunk in fp64 from its captured inputs, the model's gradient on its reads
    pulled back through it: per chunk the accumulator's norm and the gradient reaching it."""
    mixer = model.model.layers[layer].mixer
    captured = {}
    read_memory = mixer.read_memory

    def capture(q, k, v, eta, log_alpha, state, mask, decoding, keep_intermediates=False):
        y, new_state = read_memory(q, k, v, eta, log_alpha, state, mask, decoding, keep_intermediates)
        y.retain_grad()
        captured.update(q=q, k=k, v=v, eta=eta, log_alpha=log_alpha, y=y)
        return y, new_state

    mixer.read_memory = capture
    try:
        gradients(model, ids)
    finally:
        del mixer.read_memory  # back to the class's method
    one = {name: t.detach()[:, head : head + 1].double() for name, t in captured.items() if name != "y"}
    read_grad = captured["y"].grad[:, head : head + 1].double()
    a1, a2, gamma, beta = (p.detach()[head : head + 1].double() for p in (mixer.memory_a1, mixer.memory_a2,
                           mixer.memory_ln_weight, mixer.memory_ln_bias))  # fmt: skip
    rule, b = mixer.rule, mixer.rule.chunk_size
    state = MemoryState.initial(a1, a2, 1, b, False)
    anchors, pulled = [], 0.0
    for start in range(0, one["q"].shape[2] - b + 1, b):
        piece = {name: t[:, :, start : start + b] for name, t in one.items()}
        state.a1.requires_grad_(True)
        state.a1.retain_grad()
        anchors.append(state.a1)
        y, state = chunkwise_memory(piece["q"], piece["k"], piece["v"], piece["eta"], piece["log_alpha"], state,
                                    gamma, beta, rule)  # fmt: skip
        pulled = pulled + (y * read_grad[:, :, start : start + b]).sum()
    pulled.backward()
    features = gelu((one["k"] * lq_scale(a2, rule)) @ a2.transpose(-1, -2))
    rows = []
    for c, anchor in enumerate(anchors):
        a = anchor.detach()
        z = (features[:, :, c * b : (c + 1) * b] @ a.transpose(-1, -2)) * lq_scale(a, rule)
        std = layer_norm(z, gamma[:, None], beta[:, None], rule.ln_eps)[2]
        grad = float(anchor.grad.norm())
        rows.append({"chunk": c, "a1_norm": float(a.norm()), "grad": grad,
                     "eta_sum": float(one["eta"][:, :, c * b : (c + 1) * b].sum()),
                     "retention": float(one["log_alpha"][:, :, c * b : (c + 1) * b].sum().exp()),
                     "min_std": float(std.min())})  # fmt: skip
    for row, after in zip(rows, rows[1:]):
        row["growth"] = row["grad"] / max(after["grad"], 1e-300)
    return rows


def report(spike: dict, detach: list[int]) -> None:
    model, ids = rebuild(spike), spike["ids"]
    grads = gradients(model, ids)
    print(f"step {spike['step']}: gradient norm {total_norm(grads):.4g}")
    print("largest parameter gradients: " + ", ".join(
        f"{name.removeprefix('model.')} {float(g.norm()):.3g}"
        for name, g in sorted(grads.items(), key=lambda kv: -float(kv[1].norm()))[:6]))  # fmt: skip
    layer, head, norm = worst_head(grads, model.config.num_hidden_layers)
    print(f"largest memory gradient: layer {layer} head {head} ({norm:.3g} on A1_0, A2_0 and its LayerNorm)")
    length = ids.shape[1]
    for low, high in BUCKETS:
        if low < length:
            norm = total_norm(gradients(model, ids, (low, high)))
            print(f"loss on predictions {low}-{high} only: gradient norm {norm:.4g}")
    for every in detach:
        norm = total_norm(gradients(rebuild(spike, detach_state_every=every), ids))
        print(f"state detached every {every} tokens: gradient norm {norm:.4g}")
    print(f"\nlayer {layer} head {head}, chunk by chunk (growth: the gradient's growth crossing the chunk backwards)")
    print("| chunk | ||A1|| at its start | ||dL/dA1|| | growth | sum of eta | retention | min std(z) |")
    print("|---|---|---|---|---|---|---|")
    for row in chunk_table(model, ids, layer, head):
        print(f"| {row['chunk']} | {row['a1_norm']:.2f} | {row['grad']:.3g} | {row.get('growth', math.nan):.2f} | "
              f"{row['eta_sum']:.2f} | {row['retention']:.3f} | {row['min_std']:.1f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="the schedule's length, and the most steps trained")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=200.0, help="gradient norm (before clipping) that stops it")
    parser.add_argument("--detach", type=int, nargs="*", default=[256, 1024, 2048], metavar="TOKENS")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--save", help="keep the spike step's weights and window here")
    parser.add_argument("--load", help="report on a spike saved with --save instead of training")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spike = torch.load(args.load, weights_only=False) if args.load else train_until_spike(args)
    if spike is None:
        return 1
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        torch.save(spike, args.save)
    report(spike, args.detach)
    return 0


if __name__ == "__main__":
    sys.exit(main())
