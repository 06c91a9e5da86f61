"""Does the memory learn associative recall? A tiny MONETA trained on key-value pairs, then queries.

Task: PAIRS distinct keys drawn from KEYS key tokens, each with a random value token (KEYS value
tokens), then a separator and the same keys in a new order; the loss and the accuracy count only the
value after each queried key (chance = 1 / KEYS). Model: hidden 64, 2 layers, 4 heads (d_h = 16),
chunk 16, FFN 128, AdamW, clip 1.0; accuracy is the mean over the last 50 steps.

`--mixer` swaps the memory op for a comparison, leaving the rest of the model as it is:
- `moneta`: the real memory (the default);
- `off`: the memory read disabled (the mixer passes q on): what local context alone gives;
- `linear-attention`: y_t = q_t + sum_{j<=t} (q_t . k_j) v_j: what a plain linear memory reaches.

Examples:
  python bench/bench_recall.py --steps 400 --lr 3e-2
  python bench/bench_recall.py --mixer off --steps 400 --lr 3e-2
  python bench/bench_recall.py --model-overrides memory_gain_init=1.0 --value-rms-norm
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import miras.modeling as modeling
from miras import MonetaConfig, MonetaForCausalLM


def recall_batch(batch_size: int, keys: int, pairs: int, generator: torch.Generator):
    vocab = 2 * keys + 1
    chosen = torch.stack([torch.randperm(keys, generator=generator)[:pairs] for _ in range(batch_size)])
    values = torch.randint(0, keys, (batch_size, pairs), generator=generator) + keys
    context = torch.stack([chosen, values], -1).reshape(batch_size, -1)
    order = torch.stack([torch.randperm(pairs, generator=generator) for _ in range(batch_size)])
    queries = torch.stack([chosen.gather(1, order), values.gather(1, order)], -1).reshape(batch_size, -1)
    ids = torch.cat([context, torch.full((batch_size, 1), vocab - 1), queries], 1)
    labels = torch.full_like(ids, -100)
    answers = torch.arange(context.shape[1] + 2, ids.shape[1], 2)
    labels[:, answers] = ids[:, answers]
    return ids, labels


def memory_off(q, k, v, eta, log_alpha, state, gamma, beta, rule, mask=None):
    return q + 0 * v, state


def linear_attention(q, k, v, eta, log_alpha, state, gamma, beta, rule, mask=None):
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
    return q + ((q @ k.transpose(-1, -2)) * causal) @ v, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixer", choices=["moneta", "off", "linear-attention"], default="moneta")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--keys", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--value-rms-norm", action="store_true", help="RMS-normalise v before the memory")
    parser.add_argument("--model-overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out")
    args = parser.parse_args()

    overrides = {}
    for item in args.model_overrides:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    inner = {"moneta": modeling.chunkwise_memory, "off": memory_off, "linear-attention": linear_attention}[args.mixer]
    if args.value_rms_norm:

        def memory(q, k, v, *rest, **kw):
            return inner(q, k, v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6), *rest, **kw)

        modeling.chunkwise_memory = memory
    else:
        modeling.chunkwise_memory = inner

    torch.manual_seed(0)
    settings = dict(
        vocab_size=2 * args.keys + 1,
        hidden_size=64,
        num_hidden_layers=2,
        num_heads=4,
        chunk_size=16,
        intermediate_size=128,
    )
    config = MonetaConfig(**{**settings, **overrides})
    model = MonetaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    accuracies, curve, started = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, labels = recall_batch(args.batch_size, args.keys, args.pairs, generator)
        out = model(ids, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        predicted, target = out.logits[:, :-1].argmax(-1), labels[:, 1:]
        answered = target != -100
        accuracies.append((predicted[answered] == target[answered]).float().mean().item())
        if step % 50 == 0 or step == args.steps:
            recent = sum(accuracies[-50:]) / len(accuracies[-50:])
            curve.append({"step": step, "loss": out.loss.item(), "accuracy_last50": recent})
            print(f"step {step:5d}  loss {out.loss.item():.3f}  recall accuracy (last 50) {recent:.3f}", flush=True)
    result = {
        "mixer": args.mixer,
        "chance": 1.0 / args.keys,
        "final_accuracy": curve[-1]["accuracy_last50"],
        "seconds": time.perf_counter() - started,
        "curve": curve,
        "args": vars(args),
    }
    print(f"{args.mixer}: {result['final_accuracy']:.3f} after {args.steps} steps (chance {result['chance']:.3f})")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
