"""How many other writes can MONETA's memory op take before one binding is lost? A probe without training.

The real chunkwise op, one head (d_h 32, expansion 4, the model's initial memory: ||A_0||_4 ~ 1), fed
what a passkey needs: N "filler" writes (keys drawn from 40 fixed unit vectors, values from 20
RMS-1 vectors) with one "digit" write among them at a random place (a fixed unit key, the value one of 10
RMS-1 vectors), then the digit's key as the query. A least-squares linear readout is fitted from the
read (minus the query) to the digit on half of the sequences and scored on the other half (chance 10%):
whether the digit can be read out of the memory at all, whatever the outer model. Every write has the
same eta; alpha 0.99 as the model's initial decay.

  python bench/binding_probe.py                          # the model's rule at eta 0.3
  python bench/binding_probe.py --eta 0.0003
  python bench/binding_probe.py --mixer linear-attention --eta 1
  python bench/binding_probe.py --lq-norm scale_free --fixed-input --eta 3
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from miras.memory.chunkwise import chunkwise_memory
from miras.memory.rule import RuleConfig
from miras.memory.state import MemoryState

HEAD_DIM, WIDTH, FILLER_KEYS, FILLER_VALUES, DIGITS = 32, 128, 40, 20, 10


def readout_accuracy(args, writes: int) -> float:
    generator = torch.Generator().manual_seed(args.seed)
    filler_keys = F.normalize(torch.randn(FILLER_KEYS, HEAD_DIM, generator=generator), dim=-1)
    filler_values = torch.randn(FILLER_VALUES, HEAD_DIM, generator=generator)
    digit_key = F.normalize(torch.randn(HEAD_DIM, generator=generator), dim=-1)
    digit_values = torch.randn(DIGITS, HEAD_DIM, generator=generator)
    n, length = args.sequences, writes + 2
    k = filler_keys[torch.randint(0, FILLER_KEYS, (n, length), generator=generator)]
    v = filler_values[torch.randint(0, FILLER_VALUES, (n, length), generator=generator)]
    where = torch.randint(0, writes + 1, (n,), generator=generator)
    digit = torch.randint(0, DIGITS, (n,), generator=generator)
    k[torch.arange(n), where], v[torch.arange(n), where] = digit_key, digit_values[digit]
    k[:, -1] = digit_key  # the query's own write has eta 0
    q, k, v = k[:, None].clone(), k[:, None], v[:, None]
    eta = torch.full((n, 1, length), args.eta)
    eta[:, 0, -1] = 0.0
    log_alpha = torch.full((n, 1, length), math.log(args.alpha))
    if args.mixer == "linear-attention":
        cumulative = log_alpha.cumsum(-1)
        decay = (cumulative[..., :, None] - cumulative[..., None, :]).exp().tril()
        y = ((q @ k.transpose(-1, -2)) * decay * eta[..., None, :]) @ v
    else:
        sigma = (1.0 / (3.0 * HEAD_DIM * WIDTH)) ** 0.25
        memory_generator = torch.Generator().manual_seed(args.seed + 7)
        a1 = torch.randn(1, HEAD_DIM, WIDTH, generator=memory_generator) * sigma
        a2 = torch.randn(1, WIDTH, HEAD_DIM, generator=memory_generator) * sigma
        rule = RuleConfig(
            p=args.p, q=args.q, chunk_size=args.chunk_size, lq_norm=args.lq_norm, update_input=not args.fixed_input
        )
        state = MemoryState.initial(a1, a2, n, rule.chunk_size, False)
        gamma, beta = torch.ones(1, HEAD_DIM), torch.zeros(1, HEAD_DIM)
        with torch.no_grad():
            y, _ = chunkwise_memory(q, k, v, eta, log_alpha, state, gamma, beta, rule)
        y = y - q
    features = torch.cat([y[:, 0, -1], torch.ones(n, 1)], 1)
    half = n // 2
    readout = torch.linalg.lstsq(features[:half], F.one_hot(digit[:half], DIGITS).float()).solution
    return ((features[half:] @ readout).argmax(1) == digit[half:]).float().mean().item()


def write_size(draws: int = 200, seed: int = 0) -> tuple[float, float, float]:
    """Medians over draws of the initial memory's pre-LayerNorm output std and of one write's size at eta 1
    (p = 3, a unit key, an RMS-1 value) relative to W1_0 and W2_0, by autograd on M(k) = k + LN(W1 gelu(W2 k))."""
    generator = torch.Generator().manual_seed(seed)
    sigma = (1.0 / (3.0 * HEAD_DIM * WIDTH)) ** 0.25
    stds, ratios1, ratios2 = [], [], []
    for _ in range(draws):
        w2 = (torch.randn(WIDTH, HEAD_DIM, generator=generator) * sigma).requires_grad_()
        w1 = (torch.randn(HEAD_DIM, WIDTH, generator=generator) * sigma).requires_grad_()
        k = F.normalize(torch.randn(HEAD_DIM, generator=generator), dim=0)
        v = torch.randn(HEAD_DIM, generator=generator)
        v = v / v.pow(2).mean().sqrt()
        z = w1 @ F.gelu(w2 @ k)
        loss = (k + F.layer_norm(z, (HEAD_DIM,)) - v).abs().pow(3).sum()
        grad1, grad2 = torch.autograd.grad(loss, [w1, w2])
        stds.append(z.std().item())
        ratios1.append((grad1.norm() / w1.norm()).item())
        ratios2.append((grad2.norm() / w2.norm()).item())
    return tuple(torch.tensor(values).median().item() for values in (stds, ratios1, ratios2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixer", choices=["moneta", "linear-attention"], default="moneta")
    parser.add_argument("--writes", type=int, nargs="+", default=[4, 16, 64, 128], help="filler writes N")
    parser.add_argument("--eta", type=float, default=0.3)
    parser.add_argument("--alpha", type=float, default=0.99)
    parser.add_argument("--p", type=float, default=3.0)
    parser.add_argument("--q", type=float, default=4.0)
    parser.add_argument("--lq-norm", default="inverse")
    parser.add_argument(
        "--fixed-input", action="store_true", help="write the output matrix only (memory_update_input=False)"
    )
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args()
    if args.quick:
        args.writes, args.sequences = [4], 100
    std, ratio1, ratio2 = write_size(draws=10 if args.quick else 200)
    print(
        f"initial memory: std of W1 gelu(W2 k) {std:.3f}; one write at eta 1 moves W1 by {ratio1:.0f}x "
        f"and W2 by {ratio2:.0f}x their norm"
    )
    accuracies = [readout_accuracy(args, writes) for writes in args.writes]
    print("| mixer | eta | p | q | " + " | ".join(f"N = {n}" for n in args.writes) + " |")
    print("|---|---|---|---|" + "---|" * len(args.writes))
    cells = " | ".join(f"{accuracy:.0%}" for accuracy in accuracies)
    print(f"| {args.mixer} | {args.eta:g} | {args.p:g} | {args.q:g} | {cells} |")


if __name__ == "__main__":
    main()
