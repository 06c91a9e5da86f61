"""Tiny byte-level LM quality check: MONETA against a Llama of (near) equal parameter count.

Corpus: the bytes of Python's standard-library topic docs (pydoc_data.topics, ~466 KB, always
installed), byte-level (vocab 256); the last 5% of bytes are held out. Both models see the same
batches in lockstep (same tokens, same steps, same batch size) with AdamW (betas 0.9/0.95, weight
decay 0.1 except norms, biases and 1-D parameters), gradient clipping, and a cosine schedule with
linear warmup. Every --eval-every steps the train loss (mean over the steps since the last log)
and the held-out loss are logged in bits per byte (loss / ln 2).

MONETA: hidden 128, 4 layers, 4 heads, FFN 344, chunk 64 (plus --model-overrides). Llama: the same
width, depth and heads, its FFN sized so that its parameter count matches MONETA's within 5%.

Examples:
  python bench/bench_lm_quality.py --quick
  python bench/bench_lm_quality.py --out bench/out/lm_quality.json
  python bench/bench_lm_quality.py --model-overrides eta_init=0.03 inner_grad_clamp=1.0 --out bench/out/lmq_eta.json
  python bench/bench_lm_quality.py --steps 200 --eval-every 25 --memory-read off --out bench/out/lmq_off.json

`--memory-read off` replaces MONETA's memory op by its query (the mixer keeps its projections,
conv, gates, output norm and gate): what the model reaches from local context alone, to compare
with the real memory on the same batches.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import miras
from miras.probes import memory_read_off

LN2 = math.log(2.0)
HELD_OUT_FRACTION = 0.05


def load_corpus() -> torch.Tensor:
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics.values()).encode("utf-8")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def parse_overrides(items: list[str]) -> dict:
    """key=value pairs for MonetaConfig; values are Python literals (0.03, None, True), else strings."""
    accepted = set(inspect.signature(miras.MonetaConfig.__init__).parameters) - {"self", "kwargs"}
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in accepted:
            raise SystemExit(f"--model-overrides: {item!r} is not key=value with a MonetaConfig field as key")
        try:
            overrides[key] = ast.literal_eval({"none": "None", "true": "True", "false": "False"}.get(text, text))
        except (ValueError, SyntaxError):
            overrides[key] = text
    return overrides


def moneta_config(args) -> miras.MonetaConfig:
    fields = dict(
        vocab_size=256, hidden_size=128, num_hidden_layers=4, num_heads=4, intermediate_size=344, chunk_size=64
    )
    fields.update(parse_overrides(args.model_overrides))
    return miras.MonetaConfig(**fields)


def llama_config(moneta: miras.MonetaConfig, intermediate_size: int, seq_len: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=moneta.vocab_size,
        hidden_size=moneta.hidden_size,
        num_hidden_layers=moneta.num_hidden_layers,
        num_attention_heads=moneta.num_heads,
        num_key_value_heads=moneta.num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


def count(model_class, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config).parameters())


def matched_llama(moneta: miras.MonetaConfig, seq_len: int) -> tuple[LlamaConfig, int, int]:
    """A Llama whose SwiGLU width (a multiple of 8) brings its parameter count closest to MONETA's."""
    target = count(miras.MonetaForCausalLM, moneta)
    per_unit = 3 * moneta.hidden_size * moneta.num_hidden_layers  # gate, up, down per FFN unit per layer
    base = count(LlamaForCausalLM, llama_config(moneta, 8, seq_len)) - 8 * per_unit
    width = max(8, round((target - base) / per_unit / 8) * 8)
    config = llama_config(moneta, width, seq_len)
    llama = count(LlamaForCausalLM, config)
    if abs(llama - target) > 0.05 * target:
        raise SystemExit(f"cannot match parameters within 5%: MONETA {target:,}, Llama {llama:,} (FFN {width})")
    return config, target, llama


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms (incl. the memory's LayerNorm), biases or 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exempt = p.dim() < 2 or name.endswith("bias") or "norm" in name or "_ln_" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:  # step = number of optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class Run:
    """One model, its optimizer and schedule, and its curves."""

    def __init__(self, name: str, model: nn.Module, args):
        self.name, self.model = name, model
        self.optimizer = torch.optim.AdamW(
            param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8
        )
        factor = cosine_with_warmup(args.warmup, args.steps, args.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.grad_clip = args.grad_clip
        self.step_bpb: list[float] = []
        self.grad_norms: list[float] = []
        self.log = {"step": [], "train_bpb": [], "eval_bpb": [], "lr": []}
        self.train_seconds = 0.0
        self.diverged_at: int | None = None
        self._since_log: list[float] = []

    def train_step(self, ids: torch.Tensor, step: int) -> None:
        if self.diverged_at is not None:
            return
        self.model.train()
        start = time.perf_counter()
        loss = next_token_loss(self.model, ids)
        if not torch.isfinite(loss):
            self.diverged_at = step  # no more updates: the curves stop here
            self.optimizer.zero_grad(set_to_none=True)
            return
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip if self.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.train_seconds += time.perf_counter() - start
        bpb = loss.item() / LN2
        self.step_bpb.append(bpb)
        self._since_log.append(bpb)
        self.grad_norms.append(float(norm))

    @torch.no_grad()
    def evaluate(self, windows: torch.Tensor, batch_size: int) -> float:
        self.model.eval()
        total = 0.0
        for chunk in windows.split(batch_size):
            total += next_token_loss(self.model, chunk).item() * chunk.shape[0]
        return total / windows.shape[0] / LN2

    def record(self, step: int, eval_bpb: float) -> None:
        train = statistics.fmean(self._since_log) if self._since_log else math.nan
        self._since_log = []
        self.log["step"].append(step)
        self.log["train_bpb"].append(train)
        self.log["eval_bpb"].append(eval_bpb if self.diverged_at is None else math.nan)
        self.log["lr"].append(self.optimizer.param_groups[0]["lr"])

    def summary(self, tokens_per_step: int, params: int) -> dict:
        logged = [x for x in self.log["train_bpb"] if math.isfinite(x)]
        jumps = [b - a for a, b in zip(logged[:-1], logged[1:], strict=True)]
        window = 10
        spikes = [
            self.step_bpb[i] - statistics.fmean(self.step_bpb[i - window : i])
            for i in range(window, len(self.step_bpb))
        ]
        evals = [x for x in self.log["eval_bpb"] if math.isfinite(x)]
        return {
            "params": params,
            "final_eval_bpb": evals[-1] if evals else math.nan,
            "best_eval_bpb": min(evals) if evals else math.nan,
            "final_train_bpb": logged[-1] if logged else math.nan,
            "max_logged_train_jump_bpb": max(jumps) if jumps else 0.0,
            "max_step_spike_bpb": max(spikes) if spikes else 0.0,
            "max_grad_norm": max(self.grad_norms) if self.grad_norms else math.nan,
            "train_tokens_per_s": len(self.step_bpb) * tokens_per_step / max(self.train_seconds, 1e-9),
            "diverged_at": self.diverged_at,
        }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 tiny steps: a seconds-long smoke run")
    parser.add_argument("--out", default="bench/out/lm_quality.json")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0: off)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-windows", type=int, default=0, help="held-out windows per eval (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--memory-read", choices=["on", "off"], default="on", help="off: MONETA without its memory")
    parser.add_argument(
        "--model-overrides", nargs="*", default=[], metavar="KEY=VALUE", help="MonetaConfig fields, e.g. eta_init=0.03"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.warmup, args.batch_size, args.seq_len, args.eval_windows = 4, 2, 1, 2, 128, 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_corpus()
    split = int(len(data) * (1.0 - HELD_OUT_FRACTION))
    train, held = data[:split], data[split:]
    windows = held[: len(held) // args.seq_len * args.seq_len].view(-1, args.seq_len)
    if args.eval_windows:
        windows = windows[: args.eval_windows]

    moneta_cfg = moneta_config(args)
    llama_cfg, moneta_params, llama_params = matched_llama(moneta_cfg, args.seq_len)
    torch.manual_seed(args.seed)
    moneta = miras.MonetaForCausalLM(moneta_cfg).float()
    ablation = contextlib.ExitStack()
    if args.memory_read == "off":
        ablation.enter_context(memory_read_off(moneta))  # for the whole run: the model is the ablation
    torch.manual_seed(args.seed)
    llama = LlamaForCausalLM(llama_cfg).float()
    runs = [Run("moneta", moneta, args), Run("llama", llama, args)]
    tokens_per_step = args.batch_size * args.seq_len

    print(f"corpus: {len(data):,} bytes, train {len(train):,}, held-out {len(held):,} ({windows.shape[0]} windows)")
    print(f"MONETA: {moneta_params:,} params (hidden {moneta_cfg.hidden_size}, FFN {moneta_cfg.intermediate_size})")
    print(
        f"Llama:  {llama_params:,} params (hidden {llama_cfg.hidden_size}, FFN {llama_cfg.intermediate_size}), "
        f"{100 * (llama_params / moneta_params - 1):+.1f}%"
    )
    overrides = parse_overrides(args.model_overrides)
    if overrides:
        print(f"MONETA overrides: {overrides}")
    print(f"{args.steps} steps x {args.batch_size} x {args.seq_len} bytes, lr {args.lr}, {args.threads} threads\n")
    sys.stdout.flush()

    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(train) - args.seq_len + 1, (args.batch_size,), generator=generator)
        ids = torch.stack([train[o : o + args.seq_len] for o in offsets.tolist()])
        for run in runs:
            run.train_step(ids, step)
        if step % args.eval_every == 0 or step == args.steps:
            parts = []
            for run in runs:
                run.record(step, run.evaluate(windows, args.batch_size))
                flag = f" diverged@{run.diverged_at}" if run.diverged_at else ""
                train_bpb, eval_bpb = run.log["train_bpb"][-1], run.log["eval_bpb"][-1]
                parts.append(f"{run.name} train {train_bpb:.3f} held-out {eval_bpb:.3f}{flag}")
            print(
                f"step {step:5d}  lr {runs[0].log['lr'][-1]:.2e}  "
                + "  |  ".join(parts)
                + f"  ({time.perf_counter() - start:.0f} s)"
            )
            sys.stdout.flush()

    params = {"moneta": moneta_params, "llama": llama_params}
    summaries = {run.name: run.summary(tokens_per_step, params[run.name]) for run in runs}
    gap = summaries["moneta"]["final_eval_bpb"] - summaries["llama"]["final_eval_bpb"]
    print(
        "\n| model | params | final held-out bpb | best held-out bpb | final train bpb | max logged jump "
        "| max step spike | max grad norm | train tok/s |"
    )
    print("|" + "---|" * 9)
    for name, s in summaries.items():
        print(
            f"| {name} | {s['params']:,} | {s['final_eval_bpb']:.4f} | {s['best_eval_bpb']:.4f} "
            f"| {s['final_train_bpb']:.4f} | {s['max_logged_train_jump_bpb']:+.4f} | {s['max_step_spike_bpb']:+.4f} "
            f"| {s['max_grad_norm']:.2f} | {s['train_tokens_per_s']:.0f} |"
        )
    print(f"\nheld-out gap (MONETA - Llama): {gap:+.4f} bits per byte")

    result = {
        "args": vars(args),
        "moneta_config": moneta_cfg.to_diff_dict(),
        "llama_intermediate_size": llama_cfg.intermediate_size,
        "corpus_bytes": len(data),
        "held_out_bytes": len(held),
        "eval_windows": windows.shape[0],
        "summary": summaries,
        "gap_bpb_moneta_minus_llama": gap,
        "curves": {run.name: {**run.log, "step_bpb": run.step_bpb, "grad_norm": run.grad_norms} for run in runs},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
