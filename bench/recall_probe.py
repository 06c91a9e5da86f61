"""Can MONETA's memory op store the pairs of the recall task at all? A probe without outer training.

The real chunkwise op, one head (d_h = 16, expansion 4), fed the keys and values a trained model
would need: each key token a fixed random unit vector, each value token a random vector (scale
`--value-scale`); the sequence of `bench_recall.py` (2 pairs, 6 separators written with a key of
their own and a zero value, then one of the two keys, not written). A least-squares linear readout
is fitted on half of the sequences, from the read at the query (minus the query itself) plus the
query key's one-hot (so the readout can remove the key's fixed part), and scored on the other half:
the accuracy says whether the bound value can be read out of the memory, whatever the outer model.

  python bench/recall_probe.py
  python bench/recall_probe.py --sequences 8000 --seed 1
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from miras.memory.chunkwise import chunkwise_memory
from miras.memory.rule import RuleConfig
from miras.memory.state import MemoryState

HEAD_DIM, WIDTH, KEYS, PAIRS, GAP = 16, 64, 8, 2, 6


def probe(eta: float, gain: float, p: float, value_scale: float, sequences: int, write_separators: bool = True):
    keys = F.normalize(torch.randn(KEYS, HEAD_DIM), dim=-1)
    separator = F.normalize(torch.randn(HEAD_DIM), dim=-1)
    values = torch.randn(KEYS, HEAD_DIM) * value_scale
    sigma = (1.0 / (3.0 * HEAD_DIM * WIDTH)) ** 0.25  # the model's initial accumulators (||A_0||_4 ~ 1)
    a1, a2 = torch.randn(1, HEAD_DIM, WIDTH) * sigma, torch.randn(1, WIDTH, HEAD_DIM) * sigma

    chosen = torch.stack([torch.randperm(KEYS)[:PAIRS] for _ in range(sequences)])
    given = torch.randint(0, KEYS, (sequences, PAIRS))
    asked = torch.randint(0, PAIRS, (sequences, 1))
    query_key, answer = chosen.gather(1, asked)[:, 0], given.gather(1, asked)[:, 0]

    length = PAIRS + GAP + 1
    k = torch.zeros(sequences, 1, length, HEAD_DIM)
    v = torch.zeros_like(k)
    k[:, 0, :PAIRS], v[:, 0, :PAIRS] = keys[chosen], values[given]
    k[:, 0, PAIRS : PAIRS + GAP] = separator
    k[:, 0, -1] = keys[query_key]
    q = torch.zeros_like(k)
    q[:, 0, -1] = keys[query_key]
    step = torch.full((sequences, 1, length), eta)
    step[:, 0, -1] = 0.0
    if not write_separators:
        step[:, 0, PAIRS : PAIRS + GAP] = 0.0

    rule = RuleConfig(p=p, q=4.0, chunk_size=16)
    state = MemoryState.initial(a1, a2, sequences, rule.chunk_size, False)
    gamma, beta = torch.full((1, HEAD_DIM), gain), torch.zeros(1, HEAD_DIM)
    with torch.no_grad():
        y, _ = chunkwise_memory(q, k, v, step, torch.zeros(sequences, 1, length), state, gamma, beta, rule)
    read = y[:, 0, -1] - q[:, 0, -1]
    features = torch.cat([read, F.one_hot(query_key, KEYS).float(), torch.ones(sequences, 1)], dim=1)
    half = sequences // 2
    readout = torch.linalg.lstsq(features[:half], F.one_hot(answer[:half], KEYS).float()).solution
    return ((features[half:] @ readout).argmax(1) == answer[half:]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    print("| p | eta | LN gain | value scale | readout accuracy | separators not written |")
    print("|---|---|---|---|---|---|")
    for p in (2.0, 3.0):
        for eta, gain in ((0.01, 0.1), (0.1, 0.1), (0.1, 1.0), (1.0, 0.3), (1.0, 1.0), (3.0, 1.0)):
            for scale in (0.3, 1.0):
                written = probe(eta, gain, p, scale, args.sequences)
                quiet = probe(eta, gain, p, scale, args.sequences, write_separators=False)
                print(f"| {p:g} | {eta:g} | {gain:g} | {scale:g} | {written:.1%} | {quiet:.1%} |", flush=True)


if __name__ == "__main__":
    main()
