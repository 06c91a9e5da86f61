"""Does the memory pay on long documents? Held-out loss by position, MONETA against its read-off twin and a Llama.

Corpus: `--dataset python-source` of miras.data, the standard library's own .py files (one
document per file, no download). Identifiers, names and idioms recur thousands of bytes apart in a
file, so a model that carries the file's context forward predicts late bytes better than one that
sees only a local window. Byte tokenizer (one token per byte).

Three models train in lockstep on the same windows of `--seq-len` tokens (default 4096):
- `moneta`: MonetaForCausalLM with the model's defaults (hidden 128, 4 layers, 4 heads by default);
- `moneta-read-off`: the same model and initialisation with the memory's read replaced by its
  query (projections, conv, gates, output norm and gate unchanged): local context only;
- `llama`: a LlamaForCausalLM (sdpa, RoPE) of the same width, depth and heads, its FFN sized to
  match MONETA's parameter count within 5%.
Evaluation: the first `--eval-documents` documents of the corpus are held out; each held-out file
of at least seq-len bytes gives its first window (position 0 = the start of the file). The loss is
reported by position bucket (0-64, 64-512, 512-2048, 2048-4096) in bits per byte. The memory pays
where `moneta` is below `moneta-read-off` at positions >= 512 by more than the seed spread.
With `--limited-context N [N ...]` (64 and 512 by default; none: off) each model is evaluated once more
per N with every prediction seeing only its last N to 2N tokens (miras.evaluation.evaluate_positions_limited): the rise
of a model's late-position loss under that cut is what it draws from further back (for MONETA: what its
state carries across the window; the read-off twin and its conv see a few tokens and lose nothing).

Examples:
  python bench/bench_long_context.py --steps 300 --seeds 0 1 --out bench/out/long_context.json
  python bench/bench_long_context.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_lm_quality import Run, matched_llama, parse_overrides
from transformers import LlamaForCausalLM

import miras
from miras.data import PYTHON_SOURCE, DataConfig, open_documents, open_stream
from miras.evaluation import LN2, POSITION_EDGES, evaluate_positions, evaluate_positions_limited
from miras.probes import memory_read_off
from miras.tokenizer import byte_tokenizer

MODELS = ("moneta", "moneta-read-off", "llama")
MODEL = dict(vocab_size=257, hidden_size=128, num_hidden_layers=4, num_heads=4, intermediate_size=344)


def held_out_windows(seq_len: int, eval_documents: int, tokenizer, limit: int) -> torch.Tensor:
    """The first seq_len tokens of each held-out document at least that long: (N, seq_len)."""
    documents, _ = open_documents(DataConfig(dataset=PYTHON_SOURCE))
    windows = []
    for text in documents.select(range(eval_documents))["text"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= seq_len:
            windows.append(ids[:seq_len])
        if len(windows) == limit:
            break
    if not windows:
        raise SystemExit(f"no held-out document has {seq_len} tokens: raise --eval-documents")
    return torch.tensor(windows)


def memory_gates(model) -> list[dict] | None:
    """Per layer, each head's read gain and the eta and alpha its gate gives at bias (a zero input): where the
    outer loop took the memory. None for a model without per-head gates (the Llama, channel-wise gates)."""
    layers = []
    for layer in getattr(getattr(model, "model", None), "layers", []):
        mixer = getattr(layer, "mixer", None)
        if mixer is None or mixer.channelwise:
            return None
        heads = mixer.num_heads
        bias = mixer.eta_alpha_proj.bias.detach().double()
        gain = mixer.memory_read_gain
        layers.append({
            "read_gain": None if gain is None else [round(float(g), 4) for g in gain],
            "eta": [round(float(e), 4) for e in mixer.eta_max * torch.sigmoid(bias[:heads])],
            "one_minus_alpha": [float(f"{float(f):.3g}") for f in torch.sigmoid(-bias[heads:])],
        })  # fmt: skip
    return layers or None


def train_seed(args, seed: int, windows: torch.Tensor) -> dict:
    config = miras.MonetaConfig(**{**MODEL, **parse_overrides(args.model_overrides)})
    llama_config, moneta_params, llama_params = matched_llama(config, args.seq_len)
    torch.manual_seed(seed)
    moneta = miras.MonetaForCausalLM(config)
    read_off = miras.MonetaForCausalLM(config)
    read_off.load_state_dict(moneta.state_dict())
    ablations = contextlib.ExitStack()
    ablations.enter_context(memory_read_off(read_off))  # for the whole run: training and evaluation
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(llama_config)
    models = {"moneta": moneta, "moneta-read-off": read_off, "llama": llama}
    runs = {name: Run(name, models[name], args) for name in MODELS if name in args.models}
    params = {"moneta": moneta_params, "moneta-read-off": moneta_params, "llama": llama_params}

    tokenizer = byte_tokenizer()
    stream = open_stream(
        DataConfig(
            dataset=PYTHON_SOURCE,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            seed=seed,
            eval_documents=args.eval_documents,
        ),
        tokenizer,
    )
    started = time.perf_counter()
    curves = {name: [] for name in runs}
    for step in range(1, args.steps + 1):
        ids = stream.next_batch()["input_ids"]
        for run in runs.values():
            run.train_step(ids, step)
        if step % args.log_every == 0 or step == args.steps:
            parts = []
            for name, run in runs.items():
                recent = run.step_bpb[-args.log_every :]
                # the window's largest gradient norm too: when a memory's gradient explodes, not only how far
                norms = run.grad_norms[-args.log_every :]
                curves[name].append({"step": step, "train_bpb": statistics.fmean(recent) if recent else None,
                                     "max_grad_norm": max(norms) if norms else None})  # fmt: skip
                parts.append(f"{name} {curves[name][-1]['train_bpb']:.3f}")
            print(
                f"seed {seed} step {step:5d}  train bpb  "
                + "  ".join(parts)
                + f"  ({time.perf_counter() - started:.0f} s)"
            )
            sys.stdout.flush()

    result = {}
    for name, run in runs.items():
        positions = evaluate_positions(run.model, windows, args.eval_batch_size, POSITION_EDGES)
        result[name] = {
            "params": params[name],
            "held_out_bpb": positions.mean() / LN2,
            "by_position_bpb": {k: v / LN2 for k, v in positions.by_bucket().items()},
            "max_grad_norm": max(run.grad_norms) if run.grad_norms else None,
            "limited_context": args.limited_context,
            "by_position_bpb_limited": {},
            "memory_gates": memory_gates(run.model) if name == "moneta" else None,
            "diverged_at": run.diverged_at,
            "train_curve": curves[name],
        }
        buckets = "  ".join(f"{k}: {v:.3f}" for k, v in result[name]["by_position_bpb"].items())
        print(f"seed {seed} {name:16s} held-out {result[name]['held_out_bpb']:.3f} bpb   {buckets}")
        for index, gates in enumerate(result[name]["memory_gates"] or []):
            print(f"seed {seed} {name:16s} layer {index} gates at bias: {gates}")
        for context in args.limited_context:
            limited = evaluate_positions_limited(run.model, windows, args.eval_batch_size, context)
            by_position = {k: v / LN2 for k, v in limited.by_bucket().items()}
            result[name]["by_position_bpb_limited"][context] = by_position
            rise = "  ".join(f"{k}: {v - result[name]['by_position_bpb'][k]:+.3f}" for k, v in by_position.items())
            print(f"seed {seed} {name:16s} context cut to {context}-{2 * context}: {rise}")
    sys.stdout.flush()
    ablations.close()
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (seq 256, 3 steps)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--eval-documents", type=int, default=64, help="documents held out (the corpus's first)")
    parser.add_argument("--eval-windows", type=int, default=24, help="held-out windows evaluated (at most)")
    parser.add_argument("--eval-batch-size", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument(
        "--limited-context", type=int, nargs="*", default=[64, 512], help="also evaluate, each context cut to N-2N"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="which of the three to train (default: all)"
    )
    parser.add_argument("--model-overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="bench/out/long_context.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seq_len, args.seeds, args.eval_windows, args.log_every, args.warmup = 3, 256, [0], 2, 1, 1
        args.limited_context = [c for c in args.limited_context if c < args.seq_len // 2]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    windows = held_out_windows(args.seq_len, args.eval_documents, byte_tokenizer(), args.eval_windows)
    print(f"held-out: {windows.shape[0]} windows of {args.seq_len} tokens; {args.steps} steps x {args.batch_size}")
    results = {seed: train_seed(args, seed, windows) for seed in args.seeds}

    names = list(next(iter(results.values())))
    buckets = [f"{low}-{high}" for low, high in zip(POSITION_EDGES[:-1], POSITION_EDGES[1:]) if low < args.seq_len]
    print("\n| model | " + " | ".join(f"{b} bpb" for b in buckets) + " | all |")
    print("|---|" + "---|" * (len(buckets) + 1))
    for name in names:
        cells = []
        for bucket in buckets + ["all"]:
            values = [
                r[name]["held_out_bpb"] if bucket == "all" else r[name]["by_position_bpb"].get(bucket, float("nan"))
                for r in results.values()
            ]
            spread = f" ± {(max(values) - min(values)) / 2:.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.3f}{spread}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "python": sys.version.split()[0], "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
