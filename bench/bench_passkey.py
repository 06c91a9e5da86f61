"""Length generalisation: a passkey hidden in filler, trained at <= 512 tokens, asked at 1K, 4K and 16K.

Task (byte tokens, one per byte), as in the passkey-retrieval tests of the long-context literature
and RULER's S-NIAH passkey row (MIRAS Table 3):

    The grass is green. The sky is blue. ... The pass key is 40917. Remember it. 40917 is the pass
    key. ... The sun is yellow. Here we go. What is the pass key? The pass key is 40917

The key sentence sits at a uniformly random sentence boundary of the filler; only the five digits
of the answer are labelled (loss and accuracy). A sample counts as retrieved when all five digits
are the model's argmax (teacher-forced; with every digit right, greedy decoding gives the same).
Chance: 1e-5 per sample, 10% per digit.

Training: lengths drawn uniformly from [--min-train-len, --max-train-len] (default 128-256), one
length per batch of --batch-size (32) for --steps (800) at --lr (1e-2, cosine to a tenth): the recipe
that learns the task at the training length on every seed tried (bench/RESULTS.md, passkey; batches
of 8 sit on the bag-of-digits plateau for a seed-dependent time). Evaluation: --eval-samples (20) fresh
samples at each of --eval-lens (default 256, 512, 1024, 4096, 16384) with the key at depths spread
evenly over the filler. MONETA (the model's defaults) against a LlamaForCausalLM (sdpa, RoPE) of the
same width, depth and heads with its FFN sized to match MONETA's parameter count: the recurrent model
carries a state of fixed size, the Llama's RoPE positions beyond the trained length are new to it.

`--mixer` swaps MONETA's memory op as in bench_recall.py (`off`: the read disabled; `linear-attention`:
a plain linear memory in its place, the rest of the model unchanged; its quadratic form suits short
lengths only).

`--lm-weight W` adds W times the next-byte loss on every byte to the digits' loss (the way a pretrained
model meets the task); the log shows both either way.

Examples:
  python bench/bench_passkey.py --models moneta --seed 1 --threads 1    # the RESULTS recipe, ~15 CPU minutes
  python bench/bench_passkey.py --models moneta --batch-size 8 --steps 1500
  python bench/bench_passkey.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from bench_lm_quality import matched_llama, param_groups, parse_overrides
from transformers import LlamaForCausalLM

import miras
from miras.evaluation import next_token_losses
from miras.probes import MIXERS, memory_replaced

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is {key}"
MODEL = dict(vocab_size=257, hidden_size=128, num_hidden_layers=2, num_heads=4, intermediate_size=344)


def passkey_sample(length: int, depth: float, key: int) -> tuple[list[int], int]:
    """Byte ids of one sample of about `length` bytes, and the index of the first answer digit."""
    secret = f"{key:05d}"
    question = QUESTION.format(key=secret).encode()
    needle = KEY_SENTENCE.format(key=secret).encode()
    sentences = [s + ". " for s in FILLER.rstrip(". ").split(". ")]
    budget = max(0, length - len(question) - len(needle))
    filler: list[bytes] = []
    while sum(map(len, filler)) < budget:
        filler.append(sentences[len(filler) % len(sentences)].encode())
    cut = round(depth * len(filler))
    text = b"".join(filler[:cut]) + needle + b"".join(filler[cut:]) + question
    return list(text), len(text) - 5


def passkey_batch(batch_size: int, length: int, generator: torch.Generator, depths=None):
    """(ids, labels) of equal-length samples; labels only on the five answer digits."""
    rows, starts = [], []
    for i in range(batch_size):
        depth = float(torch.rand((), generator=generator)) if depths is None else depths[i]
        key = int(torch.randint(0, 100000, (), generator=generator))
        ids, start = passkey_sample(length, depth, key)
        rows.append(ids)
        starts.append(start)
    width = max(map(len, rows))
    # Left-pad with spaces to a common length (samples differ by a sentence at most): the answer
    # stays at the end, and a few spaces before the filler are filler too.
    ids = torch.tensor([[32] * (width - len(r)) + r for r in rows])
    labels = torch.full_like(ids, -100)
    labels[:, -5:] = ids[:, -5:]
    return ids, labels


def digit_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, list[float]]:
    """(share of samples with all five digits right, share of digits right, share right at each of the five)."""
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    answered = target != -100
    right = (predicted == target) | ~answered
    # The answer is the last five labels of every row (passkey_batch): which of its digits a plateau has learned.
    by_digit = (predicted == target)[:, -5:].float().mean(dim=0).tolist()
    return float(right.all(dim=1).float().mean()), float((predicted == target)[answered].float().mean()), by_digit


def train(model, args, log) -> list[dict]:
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))

    def factor(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(args.seed + 1)
    curve, recent, norms, digit_sums, started = [], [], [], [0.0] * 5, time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        length = int(torch.randint(args.min_train_len, args.max_train_len + 1, (), generator=generator))
        ids, labels = passkey_batch(args.batch_size, length, generator)
        logits = model(input_ids=ids, use_cache=False).logits
        losses = next_token_losses(logits, labels)
        loss = losses[~torch.isnan(losses)].mean()  # the answer's digits
        lm_loss = next_token_losses(logits, ids).mean()  # every byte; logged even when not trained on
        optimizer.zero_grad(set_to_none=True)
        (loss + args.lm_weight * lm_loss).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)))
        optimizer.step()
        schedule.step()
        whole, _, by_digit = digit_accuracy(logits.detach(), labels)
        recent.append(whole)
        digit_sums = [a + b for a, b in zip(digit_sums, by_digit)]
        if step % args.log_every == 0 or step == args.steps:
            share = sum(recent) / len(recent)
            by_digit = [round(total / len(recent), 3) for total in digit_sums]
            # the window's largest gradient norm before clipping: whether a run that sits on a plateau is clipped
            curve.append({"step": step, "loss": loss.item(), "lm_loss": lm_loss.item(), "retrieved": share,
                          "by_digit": by_digit, "max_grad_norm": max(norms)})  # fmt: skip
            log(
                f"step {step:5d}  loss {loss.item():.3f}  every byte {lm_loss.item():.3f}  retrieved {share:.3f}  "
                f"digits {' '.join(f'{x:.2f}' for x in by_digit)}  "
                f"largest gradient norm {max(norms):.3g}  ({time.perf_counter() - started:.0f} s)"
            )
            recent, norms, digit_sums = [], [], [0.0] * 5
    return curve


@torch.no_grad()
def evaluate(model, length: int, samples: int, batch_size: int, seed: int) -> dict:
    model.eval()
    generator = torch.Generator().manual_seed(10_000 + seed + length)
    depths = [(i + 0.5) / samples for i in range(samples)]
    whole, digits, by_digit = [], [], [0.0] * 5
    for first in range(0, samples, batch_size):
        part = depths[first : first + batch_size]
        ids, labels = passkey_batch(len(part), length, generator, depths=part)
        logits = model(input_ids=ids, use_cache=False).logits
        w, d, each = digit_accuracy(logits, labels)
        whole += [w] * len(part)
        digits += [d] * len(part)
        by_digit = [total + x * len(part) / samples for total, x in zip(by_digit, each)]
    return {"length": int(ids.shape[1]), "retrieved": sum(whole) / len(whole), "digits": sum(digits) / len(digits),
            "by_digit": by_digit}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--models", nargs="+", default=["moneta", "llama"], choices=["moneta", "llama"])
    parser.add_argument("--mixer", choices=sorted(MIXERS), default="moneta", help="MONETA's memory op (see above)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--min-train-len", type=int, default=128)
    parser.add_argument("--max-train-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument(
        "--lm-weight",
        type=float,
        default=0.0,
        help="weight of the next-byte loss on every byte, added to the answer's loss (0: the answer only)",
    )
    parser.add_argument("--eval-lens", type=int, nargs="+", default=[256, 512, 1024, 4096, 16384])
    parser.add_argument("--eval-samples", type=int, default=20)
    # one sample per forward: a batch pads its rows to a common length, which moves a row's filler
    parser.add_argument("--eval-batch-size", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model-overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="bench/out/passkey.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.max_train_len, args.eval_lens, args.eval_samples = 3, 2, 160, [256], 2
        args.log_every, args.warmup = 1, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = miras.MonetaConfig(**{**MODEL, **parse_overrides(args.model_overrides)})
    llama_config, moneta_params, llama_params = matched_llama(config, max(args.eval_lens))
    results = {}
    for name in args.models:
        torch.manual_seed(args.seed)
        model = miras.MonetaForCausalLM(config) if name == "moneta" else LlamaForCausalLM(llama_config)
        print(f"{name}: {moneta_params if name == 'moneta' else llama_params:,} parameters")
        swapped = name == "moneta" and MIXERS[args.mixer] is not None
        with memory_replaced(model, MIXERS[args.mixer]) if swapped else contextlib.nullcontext():
            curve = train(model, args, lambda line, name=name: print(f"{name} {line}", flush=True))
            evals = []
            for length in args.eval_lens:
                started = time.perf_counter()
                row = evaluate(model, length, args.eval_samples, args.eval_batch_size, args.seed)
                row["seconds"] = time.perf_counter() - started
                evals.append(row)
                print(
                    f"{name} eval {length:6d}: retrieved {row['retrieved']:.3f}, digits {row['digits']:.3f} "
                    f"({' '.join(f'{x:.2f}' for x in row['by_digit'])})",
                    flush=True,
                )
        results[name] = {"train_curve": curve, "eval": evals}
    print("\n| model | " + " | ".join(f"{n} tokens" for n in args.eval_lens) + " |")
    print("|---|" + "---|" * len(args.eval_lens))
    for name, result in results.items():
        print(f"| {name} | " + " | ".join(f"{100 * row['retrieved']:.1f}%" for row in result["eval"]) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"wrote {out}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
