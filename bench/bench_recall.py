"""Does the memory learn? Associative recall: a tiny MONETA trained on key-value pairs, then a query.

Task: PAIRS distinct keys drawn from KEYS key tokens, each followed by a random value token (KEYS
value tokens), then GAP separator tokens, then QUERIES of the keys (one by default), each followed
by its value. The loss and the accuracy count only the values after the queried keys (chance =
1 / KEYS). The gap is at least the model's local receptive field (2 layers of a kernel-4 causal conv
see 7 tokens), so nothing but the memory can carry a value to its query.

One query by default (session 6): with 2 pairs both asked, the second answer is "the value not
given yet", which the convs can read off the first answer, so a memory that keeps only the bag of
values, not which key each belongs to, scores 75% without binding anything. With one query that
memory scores ~56% (50%, plus the pairs whose values coincide); only binding gets near 100%.

Model: hidden 64, 2 layers, 4 heads (d_h = 16), chunk 16, FFN 128, the default MonetaConfig
otherwise; AdamW lr 3e-2 with a cosine decay to 3e-3 (`--constant-lr`: none; `--warmup N`: linear
warmup first), no weight decay, clip 1.0, batch 64; accuracy is the mean over the last 50 steps.
`recall_ladder.py` reuses the task.

`--mixer` swaps the memory op for a comparison, leaving the rest of the model as it is:
- `moneta`: the real memory (the default);
- `off`: the memory read disabled (the mixer passes q on): what local context alone gives;
- `linear-attention`: y_t = q_t + sum_{j<=t} (q_t . k_j) v_j: what a plain linear memory reaches.

Examples:
  python bench/bench_recall.py
  python bench/bench_recall.py --mixer off
  python bench/bench_recall.py --pairs 4 --keys 16 --steps 800
  python bench/bench_recall.py --model-overrides memory_gain_init=0.1 eta_max=1 eta_init=0.01
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time

import torch

import miras.modeling as modeling
from miras import MonetaConfig, MonetaForCausalLM

RECALL_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_heads=4, chunk_size=16, intermediate_size=128)


def recall_batch(batch_size: int, keys: int, pairs: int, generator: torch.Generator, gap: int = 6, queries: int = 1):
    """(ids, labels): keys are tokens [0, keys), values [keys, 2 keys), the separator 2 keys.

    queries: how many of the pairs are asked (distinct, in random order). With more than one, the
    later answers leak: with 2 pairs the second answer is "the value not given yet", which a model
    that only remembers the bag of values gets right without binding keys to values.
    """
    if not 1 <= queries <= pairs:
        raise ValueError(f"queries={queries}: expected 1 <= queries <= pairs={pairs}")
    separator = 2 * keys
    chosen = torch.stack([torch.randperm(keys, generator=generator)[:pairs] for _ in range(batch_size)])
    values = torch.randint(0, keys, (batch_size, pairs), generator=generator) + keys
    context = torch.stack([chosen, values], -1).reshape(batch_size, -1)
    order = torch.stack([torch.randperm(pairs, generator=generator)[:queries] for _ in range(batch_size)])
    asked = torch.stack([chosen.gather(1, order), values.gather(1, order)], -1).reshape(batch_size, -1)
    ids = torch.cat([context, torch.full((batch_size, gap), separator), asked], 1)
    labels = torch.full_like(ids, -100)
    answers = torch.arange(context.shape[1] + gap + 1, ids.shape[1], 2)
    labels[:, answers] = ids[:, answers]
    return ids, labels


# Stand-ins for chunkwise_memory: they take its keyword arguments (mask, impl) and ignore what they do not use.
def memory_off(q, k, v, eta, log_alpha, state, gamma, beta, rule, mask=None, **_):
    return q + 0 * v, state


def linear_attention(q, k, v, eta, log_alpha, state, gamma, beta, rule, mask=None, **_):
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
    return q + ((q @ k.transpose(-1, -2)) * causal) @ v, state


MIXERS = {"moneta": None, "off": memory_off, "linear-attention": linear_attention}


@contextlib.contextmanager
def mixer_swapped(mixer, value_rms_norm: bool = False):
    """Replace the mixer's memory op for the duration (the model is otherwise untouched).

    mixer: a name in MIXERS, or a function with chunkwise_memory's signature.
    value_rms_norm: RMS-normalise v before the memory (a variant tried in sessions 3-5).
    """
    original = modeling.chunkwise_memory
    inner = (MIXERS[mixer] if isinstance(mixer, str) else mixer) or original
    if value_rms_norm:

        def memory(q, k, v, *rest, **kw):
            return inner(q, k, v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6), *rest, **kw)

        modeling.chunkwise_memory = memory
    else:
        modeling.chunkwise_memory = inner
    try:
        yield
    finally:
        modeling.chunkwise_memory = original


def train_recall(
    mixer="moneta",
    steps: int = 400,
    lr: float = 3e-2,
    batch_size: int = 64,
    keys: int = 8,
    pairs: int = 2,
    gap: int = 6,
    queries: int = 1,
    model_overrides: dict | None = None,
    seed: int = 0,
    cosine: bool = True,
    warmup: int = 0,
    value_rms_norm: bool = False,
    log=None,
) -> dict:
    """Train a fresh tiny model on the recall task; the accuracy curve and the final accuracy."""
    torch.manual_seed(seed)
    config = MonetaConfig(vocab_size=2 * keys + 1, **{**RECALL_MODEL, **(model_overrides or {})})
    model = MonetaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:
        # Linear warmup, then cosine decay to 10% of lr: the last steps, which the accuracy averages
        # over, are not lr-noise bound.
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed + 1)
    accuracies, curve, started = [], [], time.perf_counter()
    with mixer_swapped(mixer, value_rms_norm):
        for step in range(1, steps + 1):
            ids, labels = recall_batch(batch_size, keys, pairs, generator, gap, queries)
            out = model(ids, labels=labels)
            optimizer.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            predicted, target = out.logits[:, :-1].argmax(-1), labels[:, 1:]
            answered = target != -100
            accuracies.append((predicted[answered] == target[answered]).float().mean().item())
            if step % 50 == 0 or step == steps:
                recent = sum(accuracies[-50:]) / len(accuracies[-50:])
                curve.append({"step": step, "loss": out.loss.item(), "accuracy_last50": recent})
                if log is not None:
                    log(f"step {step:5d}  loss {out.loss.item():.3f}  recall accuracy (last 50) {recent:.3f}")
    return {
        "mixer": mixer if isinstance(mixer, str) else mixer.__name__,
        "chance": 1.0 / keys,
        "final_accuracy": curve[-1]["accuracy_last50"],
        "seconds": time.perf_counter() - started,
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixer", choices=sorted(MIXERS), default="moneta")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--gap", type=int, default=6, help="separator tokens between the pairs and the queries")
    parser.add_argument("--queries", type=int, default=1, help="pairs asked per sequence (more leak, see recall_batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--constant-lr", action="store_true", help="no cosine decay")
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear lr warmup")
    parser.add_argument("--value-rms-norm", action="store_true", help="RMS-normalise v before the memory")
    parser.add_argument("--model-overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out")
    args = parser.parse_args()

    overrides = {}
    for item in args.model_overrides:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    result = train_recall(
        args.mixer,
        args.steps,
        args.lr,
        args.batch_size,
        args.keys,
        args.pairs,
        args.gap,
        args.queries,
        overrides,
        args.seed,
        cosine=not args.constant_lr,
        warmup=args.warmup,
        value_rms_norm=args.value_rms_norm,
        log=lambda line: print(line, flush=True),
    )
    result["args"] = vars(args)
    print(f"{args.mixer}: {result['final_accuracy']:.3f} after {args.steps} steps (chance {result['chance']:.3f})")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
