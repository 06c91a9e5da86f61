"""Checkpoint benchmark: how long the training loop is blocked by one checkpoint, and the background commit.

For each size, a model and an AdamW with state (after one real step) are checkpointed by the real
`miras.checkpoint.Checkpointer`, exactly as training does: `save()` captures the trainer state, copies
the full model state to CPU memory and starts the sharded optimizer save (DCP's async_save; its CPU
staging is synchronous), then hands the commit to the background thread. "blocked" is the time save()
takes (the loop waits that long); "commit" is the background part (safetensors, tokenizer, optimizer files,
fsync, sha256 manifest, rename, latest). The share of training time lost at a 300 s interval is
blocked / 300; for l it is projected from the measured CPU-copy bandwidth (bytes per blocked second).

    python bench/bench_checkpoint.py --sizes xs s --out bench/out/checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miras import MonetaConfig, MonetaForCausalLM, count_parameters  # noqa: E402
from miras.checkpoint.checkpointer import Checkpointer, CheckpointSettings  # noqa: E402
from miras.checkpoint.retention import RetentionPolicy  # noqa: E402
from miras.tokenizer import load_tokenizer  # noqa: E402
from miras.train.state import TrainState  # noqa: E402

INTERVAL = 300.0


class Position:
    """A data stream's resumable position, as the real streams keep it."""

    def __init__(self):
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}


def measure(size: str, vocab: int, repeats: int, folder: Path) -> dict:
    tokenizer = load_tokenizer("byte")
    config = MonetaConfig.from_size(size, vocab_size=vocab)
    model = MonetaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ids = torch.randint(0, vocab, (1, 64))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = TrainState(model, optimizer, scheduler, Position(), tokenizer, {"seq_len": 64})
    settings = CheckpointSettings(run_dir=folder, run_name=folder.name, retention=RetentionPolicy(2, 0))
    checkpointer = Checkpointer(settings, log=lambda message: None)
    checkpointer.open()
    blocked, commits = [], []
    for step in range(1, repeats + 1):
        state.step = step
        started = time.perf_counter()
        checkpointer.save(state, milestone=False)
        blocked.append(time.perf_counter() - started)
        checkpointer.wait()
        commits.append(checkpointer.committer.last_commit_seconds)
    last = checkpointer.committer.last_committed
    size_bytes = sum(p.stat().st_size for p in last.rglob("*") if p.is_file())
    checkpointer.close()
    return {
        "size": size,
        "parameters": count_parameters(config)["total"],
        "checkpoint_bytes": size_bytes,
        "blocked_s": statistics.median(blocked),
        "commit_s": statistics.median(commits),
        "blocked_bytes_per_s": size_bytes / statistics.median(blocked),
        "commit_bytes_per_s": size_bytes / statistics.median(commits),
        "share_at_300s": statistics.median(blocked) / INTERVAL,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["xs", "s"])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        folder = Path(tempfile.mkdtemp(prefix=f"miras-ckpt-bench-{size}-"))
        try:
            rows.append(measure(size, args.vocab, args.repeats, folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        r = rows[-1]
        print(
            f"{size}: {r['parameters'] / 1e6:.0f}M params, checkpoint {r['checkpoint_bytes'] / 1e9:.2f} GB, "
            f"blocked {r['blocked_s']:.2f} s ({r['blocked_bytes_per_s'] / 1e9:.2f} GB/s), background commit "
            f"{r['commit_s']:.2f} s ({r['commit_bytes_per_s'] / 1e6:.0f} MB/s), lost at 300 s: "
            f"{100 * r['share_at_300s']:.2f}%",
            flush=True,
        )
    l_params = count_parameters(MonetaConfig.from_size("l", vocab_size=args.vocab))["total"]
    l_bytes = l_params * 12
    rate = min(r["blocked_bytes_per_s"] for r in rows)
    projection = {"size": "l", "checkpoint_bytes": l_bytes, "blocked_s": l_bytes / rate}
    projection["share_at_300s"] = projection["blocked_s"] / INTERVAL
    print(
        f"l (projected from the slowest CPU-copy rate): {l_bytes / 1e9:.1f} GB, "
        f"blocked ~{projection['blocked_s']:.1f} s, lost at 300 s: ~{100 * projection['share_at_300s']:.2f}%"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "l_projection": projection}, indent=1))


if __name__ == "__main__":
    main()
