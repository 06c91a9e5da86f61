"""Where a MONETA training step spends its time: torch.profiler over forward + backward + AdamW.

The reference shape of bench_model.py (d=256, 4 layers, 4 heads, d_h=64, FFN 688, vocab 4096,
chunk 64), one batch of `--batch x --seq-len` tokens after one warm-up step, fp32 on the CPU.
Prints the operators sorted by self CPU time and the share of the step spent inside the memory op.

  python bench/profile_train_step.py --seq-len 2048 --batch 4 --rows 15
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import miras.modeling as modeling
from miras import MonetaConfig, MonetaForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--compile", action="store_true", help="compile the chunk step first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = MonetaConfig(
        vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_heads=4, intermediate_size=688, chunk_size=64
    )
    model = MonetaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if args.compile:
        from miras.memory.chunkwise import compile_chunk_step

        compile_chunk_step()
    memory = modeling.chunkwise_memory

    def labelled_memory(*a, **kw):
        with record_function("moneta_memory_op"):
            return memory(*a, **kw)

    modeling.chunkwise_memory = labelled_memory
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len))

    def step():
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("train_step"):
            step()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    total = next(e for e in averages if e.key == "train_step").cpu_time_total
    in_memory = next(e for e in averages if e.key == "moneta_memory_op").cpu_time_total
    print(f"memory op forward (incl. its ops): {in_memory / total:.1%} of the step's wall time in the forward pass")


if __name__ == "__main__":
    main()
