"""What `miras train` checks before it resumes, the run folder's housekeeping, and the exit codes.

A resumed run must share its checkpoint's model shape and sequence length (and, unless allowed, its
world size); metrics.jsonl is cut back to the checkpoint's step; a retention policy that will not fit on
the disk is named at start. Failures end the run with a one-line TrainingStopped.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..checkpoint import layout
from ..checkpoint.files import write_text_atomic
from ..configuration import MonetaConfig

# 1: a failure a restart may fix; 2: bad arguments or a refused start (a restart cannot help); 3: the loss
# diverged (a restart would replay it); 4: checkpoints cannot be written for lack of disk space (restart
# only once space is freed); 5: another machine holds the run at a --sync-to destination (a later start
# may find its lease expired). vast/run_loop.sh restarts at once on 1 only, and after a wait on 5.
EXIT_FAILED, EXIT_USAGE, EXIT_DIVERGED, EXIT_DISK_FULL, EXIT_LEASE_HELD = 1, 2, 3, 4, 5
START_REFUSED_EXIT = {"usage": EXIT_USAGE, "storage": EXIT_FAILED, "lease": EXIT_LEASE_HELD,
                      "disk_full": EXIT_DISK_FULL}  # fmt: skip
# Model fields a resumed run must share with its checkpoint (anything else may change).
SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_heads",
    "intermediate_size",
    "vocab_size",
    "chunk_size",
    "mem_expansion",
    "p",
    "q",
    "conv_size",
    "channelwise_gates",
)


class TrainingStopped(Exception):
    """Ends the run with a one-line message and an exit code (EXIT_*)."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def device_memory_bytes(device) -> int:
    """What the device can hold at most: a CUDA device's memory, else the machine's physical memory."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # a container's
        try:
            physical = min(physical, int(Path(limit).read_text().split()[0]))
        except (OSError, ValueError, IndexError):  # absent, or "max"
            pass
    return physical


def check_fits(args, config: MonetaConfig, device, shards: int = 1) -> None:
    """Refuse sizes the device cannot hold before anything is allocated, from two lower bounds of one step:
    the logits of a micro-batch (batch x seq-len x vocab, in the compute precision) and the fp32 weights
    (sharded over `shards` processes under FSDP2). Both are far below a real step's needs, so a refusal is
    certain and a pass is no promise (`miras estimate` gives the full count)."""
    from ..parameters import count_parameters

    memory = device_memory_bytes(device)
    cuda = getattr(device, "type", "") == "cuda"
    element = 2 if args.precision in ("bf16", "fp16") or (args.precision == "auto" and cuda) else 4
    per_token = config.vocab_size * element
    logits = args.batch_size * args.seq_len * per_token
    weights = 4 * count_parameters(config)["total"] // max(1, shards)
    if logits + weights <= memory:
        return
    where = f"{_bytes(memory)} of {'GPU' if cuda else 'machine'} memory"
    dry = args.dry_run
    if weights > memory:
        size = f"--model-size {args.model_size}"
        if dry and not args.dry_run_full_model:
            size = f"--dry-run-dim {args.dry_run_dim} --dry-run-n-layers {args.dry_run_n_layers}"
        raise TrainingStopped(f"{size}: the fp32 weights alone take {_bytes(weights)}, more than the {where} "
                              "(accepted here: a smaller model, or FSDP2 over more processes)")  # fmt: skip
    most = (memory - weights) // per_token
    seq, batch = ("--dry-run-seq-len", "--dry-run-microbatch-size") if dry else ("--seq-len", "--batch-size")
    raise TrainingStopped(
        f"{seq} {args.seq_len} x {batch} {args.batch_size}: one micro-batch's logits alone take {_bytes(logits)} "
        f"(vocab {config.vocab_size}), more than the {where} (accepted here: {seq} x {batch} below {most:,} "
        "tokens; --grad-accum adds micro-batches without memory)"
    )


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def check_shape(saved: MonetaConfig, wanted: MonetaConfig, flag: str) -> None:
    for field in SHAPE_FIELDS:
        if getattr(saved, field, None) != getattr(wanted, field, None):
            raise TrainingStopped(
                f"{flag}: the checkpoint's model has {field}={getattr(saved, field, None)!r} but this run asks for "
                f"{getattr(wanted, field, None)!r} (model shape cannot change; match --model-size and --tokenizer)"
            )


def check_resume_compatible(args, folder: Path, state: dict, model_config: MonetaConfig, world_size: int) -> None:
    check_shape(MonetaConfig.from_pretrained(folder), model_config, "--resume")
    if state["seq_len"] != args.seq_len:
        raise TrainingStopped(
            f"--seq-len {args.seq_len}: the run being resumed trains with --seq-len {state['seq_len']} "
            "(it cannot change on resume)"
        )
    if state["world_size"] != world_size and not args.allow_world_size_change:
        raise TrainingStopped(
            f"world size {world_size}: the checkpoint was written by {state['world_size']} processes; resume with "
            f"{state['world_size']}, or pass --allow-world-size-change (data positions then restart; see README)"
        )


def log_changes(args, state: dict) -> None:
    for field, value in (("lr", args.lr), ("batch_size", args.batch_size), ("grad_accum", args.grad_accum)):
        if field in state and state[field] != value:
            print(f"miras train: note: {field} changes on resume: {state[field]} -> {value}", flush=True)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from, so metrics.jsonl reads as one run."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut by the kill
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def restore_wandb_id(run_dir: Path, state: dict) -> None:
    """A resumed run on a fresh disk continues the checkpoint's wandb run."""
    if state.get("wandb_id") and not (run_dir / layout.WANDB_ID_NAME).exists():
        (run_dir / layout.WANDB_ID_NAME).write_text(state["wandb_id"] + "\n")


def read_wandb_id(run_dir: Path) -> str | None:
    try:
        return (run_dir / layout.WANDB_ID_NAME).read_text().strip() or None
    except OSError:
        return None


def warn_about_disk(args, run_dir: Path, num_parameters: int) -> None:
    """Compare the retention policy's estimated size with the free disk, and name the gap."""
    if args.no_ckpt_prune:
        kept = None
    else:
        kept = args.ckpt_keep_last + args.ckpt_keep_milestones
    one = num_parameters * 4 * 3  # fp32 weights + AdamW's two moments
    if kept is None:
        return
    needed = one * kept
    free = shutil.disk_usage(run_dir).free
    if needed > free:
        print(
            f"miras train: warning: keeping {kept} checkpoints of ~{one / 1e9:.2f} GB needs ~{needed / 1e9:.1f} GB, "
            f"but {run_dir} has {free / 1e9:.1f} GB free (short by {(needed - free) / 1e9:.1f} GB); lower "
            "--ckpt-keep-last/--ckpt-keep-milestones or use --milestone-weights-only",
            flush=True,
        )
