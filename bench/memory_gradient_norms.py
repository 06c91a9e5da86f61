"""Does the gradient through the memory's recurrence stay bounded on long windows? Gradient norms of the first steps.

The long-documents benchmark's MONETA (hidden 128, 4 layers, 4 heads, FFN 344), data (`python-source`,
byte tokens, windows of `--seq-len`) and optimiser (AdamW lr 3e-3, warmup 30, weight decay 0.1, clip 1.0),
one window per step: each step prints the loss and the gradient's global norm before clipping. A memory
form whose chunk recurrence amplifies the gradient shows it here from the first steps (norms of 1e5 and
more against ~3), long before a training run diverges or quietly learns from clipped noise.

Examples:
  python bench/memory_gradient_norms.py --steps 8
  python bench/memory_gradient_norms.py --steps 8 --model-overrides alpha_init=0.99
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lm_quality import param_groups, parse_overrides  # noqa: E402

import miras  # noqa: E402
from miras.data import DataConfig, open_stream  # noqa: E402
from miras.data_sources import PYTHON_SOURCE  # noqa: E402
from miras.tokenizer import byte_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = miras.MonetaConfig(vocab_size=257, hidden_size=128, num_hidden_layers=4, num_heads=4,
                                intermediate_size=344, **parse_overrides(args.model_overrides))  # fmt: skip
    torch.manual_seed(args.seed)
    model = miras.MonetaForCausalLM(config)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-3, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 30))
    data = DataConfig(dataset=PYTHON_SOURCE, seq_len=args.seq_len, batch_size=1, seed=args.seed, eval_documents=64)
    stream = open_stream(data, byte_tokenizer())
    start = time.time()
    norms = []
    for step in range(1, args.steps + 1):
        ids = stream.next_batch()["input_ids"]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        optimizer.step()
        schedule.step()
        print(f"step {step}  loss {loss.item() / math.log(2):.3f} bits per byte  gradient norm {norms[-1]:.3g}"
              f"  ({time.time() - start:.0f} s)", flush=True)  # fmt: skip
    print(f"gradient norms over {args.steps} steps: {min(norms):.3g} - {max(norms):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
