"""Which part of MONETA's memory slows recall learning? A ladder from the delta rule to MONETA's memory.

Diagnostic, not the real op: the tiny model of `bench_recall.py` (same task, same defaults) with its
memory op replaced by a per-token loop whose inner gradient comes from `torch.autograd.grad` (fine
for sequences this short), so each ingredient can be switched on alone:

- `--mem linear|mlp`: f(x) = W x, or W1 gelu(W2 x) (expansion 4);
- `--p`: the l_p attentional bias of the error f(k) - v (2 = the delta rule);
- `--residual 1`: M(x) = x + f(x) in the error and the read (MONETA's residual);
- `--ln 1 --gain G`: G * LayerNorm(f(x)) (MONETA's post-LN; no affine beyond the gain);
- `--init S`: W_0 (W1_0 for the MLP) drawn at scale S (0 = zero), fixed, not learned; `--init2`: W2_0;
- `--eta E`: a fixed inner step; `--gate 1`: the model's learned eta gate, rescaled to (0, E);
- `--anchor B`: tokens take their gradient at the weights of the last multiple of B (MONETA's chunk).

The read is y_t = q_t + f(q_t; W_t) (or M(q_t; W_t) with the residual). No decay, no l_q normaliser.

Examples (bench/RESULTS.md has the table):
  python bench/recall_ladder.py --eta 0.5                          # the delta rule
  python bench/recall_ladder.py --eta 0.5 --ln 1 --init 1          # + post-LN
  python bench/recall_ladder.py --eta 1 --gate 1 --mem mlp --ln 1 --init 1
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from miras import MonetaConfig
from miras.probes import train_recall

# The model the ladder was measured with: hidden 64, 2 layers, 4 heads of 16, chunk 16.
LADDER_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_heads=4, chunk_size=16, intermediate_size=128)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mem", choices=["linear", "mlp"], default="linear")
    parser.add_argument("--p", type=float, default=2.0)
    parser.add_argument("--residual", type=int, choices=[0, 1], default=0)
    parser.add_argument("--ln", type=int, choices=[0, 1], default=0)
    parser.add_argument("--gain", type=float, default=1.0)
    parser.add_argument("--init", type=float, default=0.0)
    parser.add_argument("--init2", type=float, default=1.0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--gate", type=int, choices=[0, 1], default=0)
    parser.add_argument("--anchor", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--gap", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--queries", type=int, default=1, help="pairs asked per sequence (see bench_recall)")
    return parser.parse_args()


def ladder_memory(args, eta_max: float):
    def f(weights, x):
        if args.mem == "linear":
            out = x @ weights[0].transpose(-1, -2)
        else:
            out = F.gelu(x @ weights[1].transpose(-1, -2)) @ weights[0].transpose(-1, -2)
        if args.ln:
            out = args.gain * F.layer_norm(out, out.shape[-1:])
        return x + out if args.residual else out

    def ladder(q, k, v, eta, log_alpha, state, mask=None, decoding=False, keep_intermediates=False):
        batch, heads, length, dh = q.shape
        generator = torch.Generator().manual_seed(0)
        if args.mem == "linear":
            initial = [args.init * torch.randn(heads, dh, dh, generator=generator) / math.sqrt(dh)]
        else:
            initial = [
                args.init * torch.randn(heads, dh, 4 * dh, generator=generator) / math.sqrt(4 * dh),
                args.init2 * torch.randn(heads, 4 * dh, dh, generator=generator) / math.sqrt(dh),
            ]
        weights = [w.expand(batch, *w.shape).clone().requires_grad_(True) for w in initial]
        step = eta / eta_max * args.eta if args.gate else torch.full_like(eta, args.eta)
        anchor, reads = weights, []
        for t in range(length):
            if t % args.anchor == 0:
                anchor = weights
            err = f(anchor, k[:, :, t : t + 1]) - v[:, :, t : t + 1]
            grads = torch.autograd.grad(err.abs().pow(args.p).sum(), anchor, create_graph=True)
            weights = [w - step[:, :, t, None, None] * g for w, g in zip(weights, grads)]
            reads.append(f(weights, q[:, :, t : t + 1]))
        y = torch.cat(reads, 2)
        return (y if args.residual else q + y), state

    return ladder


def main() -> None:
    args = parse_args()
    # The gate starts where the session-5 runs had it (per-head eta 0.001-0.1 of the maximum).
    overrides = dict(eta_max=1.0, eta_init=0.01)
    config = MonetaConfig(vocab_size=2 * args.keys + 1, **LADDER_MODEL, **overrides)
    result = train_recall(
        config,
        memory=ladder_memory(args, overrides["eta_max"]),
        steps=args.steps,
        lr=args.lr,
        keys=args.keys,
        pairs=args.pairs,
        gap=args.gap,
        queries=args.queries,
        batch_size=args.batch_size,
        cosine=False,
        log=print,
    )
    print(f"final accuracy (last 50 steps): {result['final_accuracy']:.3f}")


if __name__ == "__main__":
    main()
