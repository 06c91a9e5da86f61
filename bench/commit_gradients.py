"""How much gradient crosses the memory's chunk commits, step by step, on the builtin-corpus run.

Trains MONETA exactly as bench_lm_quality.py does (same corpus, batches, optimiser and schedule) and,
before each step's update, measures at the same weights and on the same batch:

- the gradient norm with full backpropagation through the memory (what training uses), and with the
  state detached at every chunk commit (`detach_state_every` = the chunk): where the first is far
  above the second, the gradient came through the commits;
- with --carried, per layer and chunk (last chunk first), the norm of the state gradient carried
  out of each chunk towards the previous one, "in -> out (r read)": `in` arrives from the later
  chunks, `out` leaves for the earlier ones, `r` is what the chunk's own reads add (largest over
  sequences and heads). The torch path's backward is read for this (its per-chunk step), so it runs
  with `memory_impl` "torch" only.

Examples:
  python bench/commit_gradients.py --steps 15 --model-overrides lq_norm=scale_free
  python bench/commit_gradients.py --steps 6 --carried 4 5 6
  python bench/commit_gradients.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import sys

import torch
from bench_lm_quality import Run, load_corpus, moneta_config, next_token_loss
from bench_lm_quality import parse_args as lm_args

import miras
from miras.memory import RuleConfig, torch_chunk


def gradient_norm(model: torch.nn.Module, ids: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    next_token_loss(model, ids).backward()
    norm = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    return norm


class CarriedNorms:
    """Records, for each chunk the torch path's backward steps through, the carried state-gradient norms."""

    def __init__(self):
        self.rows: list[tuple[float, float, float]] = []
        self.steps = torch_chunk._steps(False)
        self.original = self.steps.backward_step

    def __enter__(self):
        signature = inspect.signature(torch_chunk._backward_step)

        def record(*args, **kwargs):
            out = self.original(*args, **kwargs)
            named = signature.bind(*args, **kwargs).arguments  # by name, so a reordered signature cannot mislead
            carried_in = (named["da1_out"], named["da2_out"])
            reads = (named["da1_read"], named["da2_read"])  # the chunk's own reads' gradients of its anchor
            self.rows.append(tuple(_pair_norm(a, b) for a, b in (carried_in, out[:2], reads)))
            return out

        self.steps.backward_step = record
        return self

    def __exit__(self, *exc):
        self.steps.backward_step = self.original


def _pair_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """sqrt(||a||^2 + ||b||^2) per sequence and head, largest over them."""
    return (a.pow(2).sum((-2, -1)) + b.pow(2).sum((-2, -1))).sqrt().max().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--carried", type=int, nargs="*", default=[], help="steps whose per-chunk norms to print")
    parser.add_argument("--model-overrides", nargs="*", default=[], help="key=value MonetaConfig fields")
    parser.add_argument("--quick", action="store_true", help="2 steps on 2 x 128 bytes: a seconds-long smoke run")
    args = parser.parse_args(argv)
    lm = lm_args(["--steps", "200", "--threads", "1", "--model-overrides", *args.model_overrides])
    if args.quick:
        args.steps, args.carried, lm.batch_size, lm.seq_len = 2, [2], 2, 128
    torch.set_num_threads(1)
    data = load_corpus()
    train = data[: int(len(data) * 0.95)]
    config = moneta_config(lm)
    if config.memory_impl not in ("auto", "torch"):
        parser.error(f"--model-overrides memory_impl={config.memory_impl}: this reads the torch path (auto or torch)")
    torch.manual_seed(lm.seed)
    model = miras.MonetaForCausalLM(config).float()
    run = Run("moneta", model, lm)
    mixers = [m for m in model.modules() if isinstance(getattr(m, "rule", None), RuleConfig)]
    full_rules = [m.rule for m in mixers]
    generator = torch.Generator().manual_seed(lm.seed)
    print("| step | loss (bits/byte) | gradient norm, full | detached at every commit |\n|---|---|---|---|")
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(train) - lm.seq_len + 1, (lm.batch_size,), generator=generator)
        ids = torch.stack([train[o : o + lm.seq_len] for o in offsets.tolist()])
        with CarriedNorms() as carried:
            full = gradient_norm(model, ids)
        for mixer, rule in zip(mixers, full_rules):
            mixer.rule = dataclasses.replace(rule, detach_state_every=rule.chunk_size)
        detached = gradient_norm(model, ids)
        for mixer, rule in zip(mixers, full_rules):
            mixer.rule = rule
        run.train_step(ids, step)
        print(f"| {step} | {run.step_bpb[-1]:.3f} | {full:.1f} | {detached:.1f} |", flush=True)
        if step in args.carried:
            if not carried.rows:
                raise SystemExit("--carried: the torch path did not run (channel-wise gates or inner_grad_clamp)")
            chunks = len(carried.rows) // len(mixers)
            for index in range(len(mixers)):  # the backward visits the last layer first
                rows = carried.rows[index * chunks : (index + 1) * chunks]
                line = " ".join(f"{i:.2g}->{o:.2g} (r {r:.2g})" for i, o, r in rows)
                print(f"    layer {len(mixers) - 1 - index}: {line}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
