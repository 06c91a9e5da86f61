"""Training-loop benchmark: tokens/s of `miras.train` for xs and s, fp32 vs bf16, and the loop's overhead.

The overhead is the loop's own cost (data, logging, progress, scheduling) measured against bare
model steps (autocast forward, backward, clip, AdamW) on the same batches and the same model in
the same process: overhead = 1 - loop tokens/s / bare tokens/s. Target: <= 5%.

    python bench/bench_train.py --sizes xs s --steps 6 --out bench/out/train.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miras import MonetaConfig, MonetaForCausalLM, count_parameters  # noqa: E402
from miras.data import DataConfig, open_stream  # noqa: E402
from miras.tokenizer import byte_tokenizer  # noqa: E402
from miras.train import main as train_main  # noqa: E402


def loop_tokens_per_second(size: str, precision: str, steps: int, seq_len: int, batch: int) -> float:
    """Median tokens/s that the training loop itself logs, first step excluded."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    for variable in [v for v in os.environ if v.startswith("ACCELERATE_")]:
        del os.environ[variable]
    with tempfile.TemporaryDirectory() as out:
        args = [
            "--model-size",
            size,
            "--dataset",
            "builtin",
            "--seq-len",
            str(seq_len),
            "--batch-size",
            str(batch),
            "--device",
            "cpu",
            "--precision",
            precision,
            "--max-steps",
            str(steps),
            "--log-every",
            "1",
            "--eval-batches",
            "1",
            "--output-dir",
            out,
            "--run-name",
            "bench",
        ]
        assert train_main(args) == 0
        rows = [json.loads(line) for line in (Path(out) / "bench" / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_second"] for r in rows[1:])


def bare_tokens_per_second(size: str, precision: str, steps: int, seq_len: int, batch: int) -> float:
    """The same model and batches without the loop: forward, backward, clip, AdamW, nothing else."""
    tokenizer = byte_tokenizer()
    stream = open_stream(DataConfig(dataset="builtin", seq_len=seq_len, batch_size=batch, seed=1337), tokenizer)
    batches = [stream.next_batch()["input_ids"] for _ in range(steps)]
    torch.manual_seed(1337)
    model = MonetaForCausalLM(MonetaConfig.from_size(size, vocab_size=len(tokenizer)))
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    times = []
    for ids in batches:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return seq_len * batch / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["xs", "s"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", default="bench/out/train.json")
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        for precision in args.precisions:
            loop = loop_tokens_per_second(size, precision, args.steps, args.seq_len, args.batch_size)
            bare = bare_tokens_per_second(size, precision, args.steps, args.seq_len, args.batch_size)
            params = count_parameters(MonetaConfig.from_size(size, vocab_size=257))["total"]
            rows.append(
                {
                    "size": size,
                    "precision": precision,
                    "params": params,
                    "loop_tokens_per_second": loop,
                    "bare_tokens_per_second": bare,
                    "overhead": 1 - loop / bare,
                }
            )
            print(rows[-1], flush=True)
    print(
        f"\n{torch.get_num_threads()} threads, torch {torch.__version__}, seq {args.seq_len} x batch "
        f"{args.batch_size}, block checkpointing on (the default)\n"
    )
    print("| size | params | precision | loop tok/s | bare tok/s | loop overhead |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['precision']} | {r['loop_tokens_per_second']:.0f} | "
            f"{r['bare_tokens_per_second']:.0f} | {100 * r['overhead']:+.1f}% |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
