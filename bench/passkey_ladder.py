"""Which part of MONETA's memory keeps the passkey from binding? A ladder from linear attention to it.

The passkey of bench_passkey.py (its flags pass through) with MONETA's memory op replaced by an anchored
memory in attention form: the whole sequence is one chunk, so every write is the gradient of the
l_p loss at the initial weights W_0, as inside one of MONETA's chunks, and the read at t sees the
weights W_0 - sum_{j <= t} eta_j decay_{t,j} grad_j (no l_q normaliser, no commit). The backward is
autograd's. Each ingredient switches alone:

- `--mem linear|mlp`: f(x) = W x, or W1 gelu(W2 x) with MONETA's expansion of 4;
- `--ln 1`: LayerNorm(f(x)) (MONETA's post-LN, no affine);
- `--residual 1`: the error is x + f(x) - v (MONETA's residual) instead of f(x) - v;
- `--p`: the l_p loss of the error (2 = the delta rule, 3 = MONETA's);
- `--init S`: W_0 drawn at S times MONETA's initial scale (0 = zero), fixed, not learned;
- `--write-scale W`: the model's eta gates (0 .. eta_max) times W;
- `--write-in-scale S`: the MLP's input matrix W2 takes S times the write its output matrix W1 takes (0: fixed
  random features, a linear memory over gelu(W2_0 x)).

The mixer's read gain, per-head norm and output gate are the model's, as are the eta and decay gates.

Examples (bench/RESULTS.md, "Passkey retrieval beyond the training length", has the table):
  python bench/passkey_ladder.py --mem linear --ln 0 --residual 0 --p 2 --init 0 --steps 800 --batch-size 8 \\
      --min-train-len 128 --max-train-len 128 --lr 1e-2 --eval-lens 128 512 --eval-samples 20 --eval-batch-size 1
  python bench/passkey_ladder.py --mem mlp --ln 1 --residual 1 --p 3 --write-scale 0.001 [the same flags]
"""

from __future__ import annotations

import argparse
import functools
import math

import bench_passkey
import torch
import torch.nn.functional as F

from miras.probes import MIXERS


def layer_norm(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + eps)


def gelu_derivative(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


@functools.cache
def initial_weights(head_dim: int, init: float, expansion: int = 4):
    """(W2_0, W1_0, W_0): fixed, the same in every head and layer."""
    generator = torch.Generator().manual_seed(1234)
    width = expansion * head_dim
    sigma = (1.0 / (3.0 * head_dim * width)) ** 0.25 * init  # MONETA's initial accumulators: ||A_0||_4 ~ 1
    w2 = torch.randn(width, head_dim, generator=generator) * sigma
    w1 = torch.randn(head_dim, width, generator=generator) * sigma
    return w2, w1, torch.randn(head_dim, head_dim, generator=generator) * init / math.sqrt(head_dim)


def anchored_memory(args):
    """A MemoryFunction (miras.probes) for one ladder rung."""

    def memory(q, k, v, eta, log_alpha, state, mask=None, decoding=False, keep_intermediates=False):
        q, k, v, eta, log_alpha = (t.float() for t in (q, k, v, eta, log_alpha))
        w2, w1, w = initial_weights(q.shape[-1], args.init)
        length = q.shape[2]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        cumulative = log_alpha.cumsum(-1)
        decay_of_w0 = cumulative.exp()[..., None]
        decay = (cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(~causal, -math.inf).exp()
        weight = decay * (args.write_scale * eta)[..., None, :]  # write j's weight in the read at t
        if args.mem == "linear":
            z_k = k @ w.T
        else:
            h_k = k @ w2.T
            a_k = F.gelu(h_k)
            z_k = a_k @ w1.T
        out_k = layer_norm(z_k) if args.ln else z_k
        error = (k if args.residual else 0) + out_k - v
        grad = args.p * error * error.abs().pow(args.p - 2)
        if args.ln:  # LayerNorm's backward at z_k
            centred = z_k - z_k.mean(-1, keepdim=True)
            std = torch.sqrt(centred.var(-1, unbiased=False, keepdim=True) + 1e-5)
            normed = centred / std
            grad = (grad - grad.mean(-1, keepdim=True) - normed * (grad * normed).mean(-1, keepdim=True)) / std
        if args.mem == "linear":
            z_q = decay_of_w0 * (q @ w.T) - (weight * (q @ k.transpose(-1, -2))) @ grad
        else:
            grad_h = (grad @ w1) * gelu_derivative(h_k)
            h_q = decay_of_w0 * (q @ w2.T) - args.write_in_scale * (weight * (q @ k.transpose(-1, -2))) @ grad_h
            a_q = F.gelu(h_q)
            z_q = decay_of_w0 * (a_q @ w1.T) - (weight * (a_q @ a_k.transpose(-1, -2))) @ grad
        return q + (layer_norm(z_q) if args.ln else z_q), state

    return memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mem", choices=["linear", "mlp"], default="mlp")
    parser.add_argument("--ln", type=int, choices=[0, 1], default=1)
    parser.add_argument("--residual", type=int, choices=[0, 1], default=1)
    parser.add_argument("--p", type=float, default=3.0)
    parser.add_argument("--init", type=float, default=1.0)
    parser.add_argument("--write-scale", type=float, default=1.0)
    parser.add_argument("--write-in-scale", type=float, default=1.0)
    args, passkey_argv = parser.parse_known_args()
    MIXERS["ladder"] = anchored_memory(args)
    print(f"ladder rung: {vars(args)}", flush=True)
    bench_passkey.main([*passkey_argv, "--models", "moneta", "--mixer", "ladder"])


if __name__ == "__main__":
    main()
