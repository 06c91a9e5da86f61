"""`miras estimate`: parameters, checkpoint bytes, disk for the retention policy, daily upload volume
and training GPU memory of a run, computed from the model itself rather than a rule of thumb.

Checkpoint (what `runs/<run>/checkpoints/step_XXXXXXXX/` holds; FSDP shards the same bytes):
    weights     4 P   fp32 safetensors, tied embeddings stored once (P = unique parameters)
    optimizer   8 P   AdamW exp_avg + exp_avg_sq in fp32 (trainer/optimizer/, torch.distributed.checkpoint),
                      plus a step and DCP metadata per tensor
    small files       tokenizer, config, scheduler, RNG, data position, trainer_state.json, manifest
A milestone kept with --milestone-weights-only is the weights and small files only.

Disk: (keep_last + keep_milestones + 1) checkpoints (the +1 is the one being written before pruning),
times 1.1, plus --headroom-gb for the image, caches and logs (Vast's disk also holds the image).

Training GPU memory per device (DDP; one process per GPU), N = batch_size * seq_len tokens per micro-step:
    static   = P * (4 weights + 4 grads + 8 AdamW) [+ 2 P for the bf16/fp16 weight copies autocast keeps]
    no ckpt  = static + N * (L * a_layer + a_head) + N * a_layer
    ckpt     = static + N * (L * 4 d + a_head) + 2 * N * a_layer
    peak     = 1.1 * (the above) + 1 GiB (CUDA context, allocator slack)
a_layer and a_head are the bytes per token that autograd saves for backward inside one block and
outside the blocks (embedding, final norm, logits, loss). They are MEASURED, not guessed: a one-block
model of the same width and vocabulary runs a forward at 64 and 128 tokens on the CPU under the
chosen precision (autocast), and torch's saved-tensor hooks sum the distinct storages saved for
backward; the difference per token removes constant terms. With activation checkpointing a block
keeps only its fp32 input (4 d bytes per token) and recomputes one block at a time (the second
N * a_layer is that recomputation's working set; the last one is the gradients flowing through a
block). It is an estimate: CUDA kernels, fragmentation and the allocator's caching move the real
peak by some percent; measure with `torch.cuda.max_memory_allocated` on the GPU to be sure.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from typing import Any

from .argtypes import non_negative_float, non_negative_int, positive_int
from .configuration import MODEL_SIZES, MonetaConfig

GB = 10**9
GIB = 2**30
DRIVE_DAILY_UPLOAD_CAP = 750 * GB  # Google Drive: 750 GB uploaded per user per day
GPT2_VOCAB = 50257
HIDDEN_BYTES = 4  # the residual stream stays fp32 under autocast (fp32 parameters)
SAFETENSORS_BYTES_PER_TENSOR = 150  # JSON header entry
OPTIMIZER_BYTES_PER_TENSOR = 6000  # DCP: the .distcp entry (step, moments headers) + .metadata, measured on xs
# config, generation config, scheduler, RNG + data state, trainer_state, manifest, and ~140 KB of modeling code
# (miras.remote_code: the folder loads with trust_remote_code=True)
SMALL_FILES_BYTES = 200_000
TOKENIZER_BYTES_PER_TOKEN = 75  # tokenizer.json (+ vocab/merges) of BPE tokenizers, gpt2: ~3.6 MB
TOKENIZER_MIN_BYTES = 10_000  # the byte tokenizer's files (~6 kB)
DEFAULT_HEADROOM_GB = 30.0
DISK_SLACK = 1.1
MEMORY_SLACK = 1.1
CUDA_CONTEXT_BYTES = GIB


RUN_FLAGS = (
    "model_size",
    "seq_len",
    "batch_size",
    "precision",
    "ckpt_keep_last",
    "ckpt_keep_milestones",
    "ckpt_every_seconds",
    "ckpt_milestone_every_seconds",
    "no_ckpt_prune",
    "milestone_weights_only",
)


class EstimateError(ValueError):
    """A bad argument: one line naming the value and what is accepted."""


def model_config(model_size: str, vocab_size: int) -> MonetaConfig:
    if model_size not in MODEL_SIZES:
        raise EstimateError(f"--model-size {model_size!r} is not a size (expected one of: {', '.join(MODEL_SIZES)})")
    return MonetaConfig.from_size(model_size, vocab_size=vocab_size)


def parameter_tensors(config: MonetaConfig) -> tuple[int, int]:
    """(unique parameters, unique parameter tensors) of the model, built on the meta device."""
    import torch

    from .modeling import MonetaForCausalLM

    with torch.device("meta"):
        model = MonetaForCausalLM(config)
    tensors = list(model.parameters())  # a tied tensor once
    return sum(p.numel() for p in tensors), len(tensors)


def checkpoint_bytes(config: MonetaConfig) -> dict[str, int]:
    """Bytes of one checkpoint folder: fp32 weights once, AdamW's two fp32 moments, small files."""
    params, tensors = parameter_tensors(config)
    weights = 4 * params + SAFETENSORS_BYTES_PER_TENSOR * tensors
    optimizer = 8 * params + OPTIMIZER_BYTES_PER_TENSOR * tensors
    small = SMALL_FILES_BYTES + max(TOKENIZER_MIN_BYTES, TOKENIZER_BYTES_PER_TOKEN * config.vocab_size)
    return {
        "parameters": params,
        "weights": weights,
        "optimizer": optimizer,
        "small_files": small,
        "total": weights + optimizer + small,
        "weights_only": weights + small,
    }


def measure_activation_bytes(config: MonetaConfig, precision: str) -> dict[str, float]:
    """Bytes per token saved for backward inside one block (a_layer) and outside the blocks (a_head).

    A one-block model of the same width and vocabulary, forward at 64 and 128 tokens (batch 1) on the CPU,
    autocast to bf16 for bf16/fp16 (same element size); distinct non-parameter storages saved for backward
    are summed by torch's saved-tensor hooks, separately while the block runs and outside it.
    """
    import torch

    from .modeling import MonetaForCausalLM

    one_block = MonetaConfig(**{**config.to_dict(), "num_hidden_layers": 1})
    lengths = (config.chunk_size, 2 * config.chunk_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MonetaForCausalLM(one_block).train()
        parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        in_block = [False]
        saved: dict[str, dict[int, int]] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameter_storages:
                bucket = saved.setdefault("block" if in_block[0] else "head", {})
                bucket[storage.data_ptr()] = storage.nbytes()
            return tensor

        block = model.model.layers[0]
        handles = [
            block.register_forward_pre_hook(lambda *_: in_block.__setitem__(0, True)),
            block.register_forward_hook(lambda *_: in_block.__setitem__(0, False)),
        ]
        totals = []
        try:
            for length in lengths:
                saved.clear()
                ids = torch.randint(0, one_block.vocab_size, (1, length))
                with (
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision in ("bf16", "fp16")),
                ):
                    loss = model(ids, labels=ids).loss
                del loss
                totals.append({name: sum(bucket.values()) for name, bucket in saved.items()})
        finally:
            for handle in handles:
                handle.remove()
    span = lengths[1] - lengths[0]
    return {
        "layer": (totals[1].get("block", 0) - totals[0].get("block", 0)) / span,
        "head": (totals[1].get("head", 0) - totals[0].get("head", 0)) / span,
    }


def training_memory(
    config: MonetaConfig, params: int, tokens: int, precision: str, activations: dict[str, float]
) -> dict[str, float]:
    """Peak GPU bytes per device with and without activation checkpointing (formula in the module docstring)."""
    static = params * (4 + 4 + 8) + (2 * params if precision in ("bf16", "fp16") else 0)
    layers, layer, head = config.num_hidden_layers, activations["layer"], activations["head"]
    no_ckpt = static + tokens * (layers * layer + head) + tokens * layer
    ckpt = static + tokens * (layers * HIDDEN_BYTES * config.hidden_size + head) + 2 * tokens * layer
    return {
        "static": static,
        "activation_bytes_per_token_per_layer": layer,
        "activation_bytes_per_token_head": head,
        "without_checkpointing": MEMORY_SLACK * no_ckpt + CUDA_CONTEXT_BYTES,
        "with_checkpointing": MEMORY_SLACK * ckpt + CUDA_CONTEXT_BYTES,
    }


def estimate(
    model_size: str = "xs",
    vocab_size: int = GPT2_VOCAB,
    seq_len: int = 4096,
    batch_size: int = 1,
    precision: str = "auto",
    ckpt_keep_last: int = 12,
    ckpt_keep_milestones: int = 24,
    ckpt_every_seconds: float = 300.0,
    ckpt_milestone_every_seconds: float = 3600.0,
    no_ckpt_prune: bool = False,
    milestone_weights_only: bool = False,
    headroom_gb: float = DEFAULT_HEADROOM_GB,
    measure: bool = True,
) -> dict[str, Any]:
    """Everything `miras estimate` prints, as a dict (bytes unless the key says otherwise)."""
    config = model_config(model_size, vocab_size)
    precision = "bf16" if precision == "auto" else precision  # auto resolves to bf16 on the GPUs Vast rents
    ckpt = checkpoint_bytes(config)
    params = ckpt["parameters"]

    milestone_bytes = ckpt["weights_only"] if milestone_weights_only else ckpt["total"]
    retained = (ckpt_keep_last + 1) * ckpt["total"] + ckpt_keep_milestones * milestone_bytes
    disk_checkpoints = DISK_SLACK * retained
    disk_total = disk_checkpoints + headroom_gb * GB
    per_day = {}
    for name, interval in (("every_checkpoint", ckpt_every_seconds), ("milestones_only", ckpt_milestone_every_seconds)):
        count = 86400 / interval if interval > 0 else 0.0
        volume = count * ckpt["total"]
        per_day[name] = {
            "interval_seconds": interval,
            "checkpoints_per_day": count,
            "bytes_per_day": volume,
            "fraction_of_drive_cap": volume / DRIVE_DAILY_UPLOAD_CAP,
            "sustained_bytes_per_second": volume / 86400,
        }
    result: dict[str, Any] = {
        "model_size": model_size,
        "vocab_size": vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "parameters": params,
        "precision": precision,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "checkpoint": {k: v for k, v in ckpt.items() if k != "parameters"},
        "retention": {
            "keep_last": ckpt_keep_last,
            "keep_milestones": ckpt_keep_milestones,
            "milestone_weights_only": milestone_weights_only,
            "pruning": not no_ckpt_prune,
            "checkpoints_on_disk": ckpt_keep_last + ckpt_keep_milestones + 1,
        },
        "disk": {
            "checkpoints": disk_checkpoints,
            "headroom": headroom_gb * GB,
            "total": disk_total,
        },
        "disk_gb": math.ceil(disk_total / GB),
        "upload": {"drive_daily_cap": DRIVE_DAILY_UPLOAD_CAP, **per_day},
        "min_ckpt_every_seconds_under_drive_cap": math.ceil(86400 * ckpt["total"] / DRIVE_DAILY_UPLOAD_CAP),
    }
    if no_ckpt_prune:
        growth = per_day["every_checkpoint"]["bytes_per_day"]
        result["disk"]["growth_per_day_without_pruning"] = growth
    if measure:
        activations = measure_activation_bytes(config, precision)
        result["gpu_memory"] = training_memory(config, params, seq_len * batch_size, precision, activations)
    return result


def _human(n: float) -> str:
    for unit, size in (("TB", 10**12), ("GB", GB), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def format_table(r: dict[str, Any]) -> str:
    ckpt, ret, disk, up = r["checkpoint"], r["retention"], r["disk"], r["upload"]
    rows = [
        (
            "model",
            f"{r['model_size']}: d={r['hidden_size']}, {r['num_hidden_layers']} layers, vocab {r['vocab_size']:,}",
        ),
        ("parameters", f"{r['parameters']:,} ({r['parameters'] / 1e6:.1f}M)"),
        ("", ""),
        ("checkpoint: weights (fp32)", _human(ckpt["weights"])),
        ("checkpoint: AdamW state (fp32)", _human(ckpt["optimizer"])),
        ("checkpoint: small files", _human(ckpt["small_files"])),
        ("checkpoint: total", _human(ckpt["total"])),
        ("", ""),
    ]
    milestone_note = " (weights only)" if ret["milestone_weights_only"] else ""
    if ret["pruning"]:
        rows.append(
            (
                "checkpoints on disk",
                f"{ret['checkpoints_on_disk']} = keep-last {ret['keep_last']} + milestones "
                f"{ret['keep_milestones']}{milestone_note} + 1 being written",
            )
        )
    else:
        rows.append(("checkpoints on disk", "all (--no-ckpt-prune): the disk fills up"))
        rows.append(("disk growth per day", _human(disk["growth_per_day_without_pruning"])))
    rows += [
        ("disk: checkpoints (+10%)", _human(disk["checkpoints"])),
        ("disk: headroom (image, caches)", _human(disk["headroom"])),
        ("disk: recommended --disk", f"{r['disk_gb']} GB"),
        ("", ""),
    ]
    labels = {"every_checkpoint": "upload/day, every checkpoint", "milestones_only": "upload/day, milestones only"}
    for name, label in labels.items():
        entry = up[name]
        verdict = "OVER" if entry["fraction_of_drive_cap"] > 1 else "under"
        rows.append(
            (
                label,
                f"{_human(entry['bytes_per_day'])} (every {entry['interval_seconds']:g} s; "
                f"{100 * entry['fraction_of_drive_cap']:.0f}% of Drive's 750 GB/day: {verdict}; "
                f"{_human(entry['sustained_bytes_per_second'])}/s sustained)",
            )
        )
    rows.append(("Drive cap allows", f"a checkpoint every >= {r['min_ckpt_every_seconds_under_drive_cap']} s"))
    if "gpu_memory" in r:
        mem = r["gpu_memory"]
        rows += [
            ("", ""),
            (
                "GPU memory per device",
                f"{r['precision']}, batch {r['batch_size']} x seq {r['seq_len']} (estimate; see miras/estimate.py)",
            ),
            ("  weights+grads+AdamW", _gib(mem["static"])),
            (
                "  activations (measured)",
                f"{mem['activation_bytes_per_token_per_layer'] / 1e3:.1f} kB/token/layer, "
                f"{mem['activation_bytes_per_token_head'] / 1e3:.1f} kB/token outside the blocks",
            ),
            ("  with activation checkpointing", _gib(mem["with_checkpointing"])),
            ("  without (--no-grad-checkpoint)", _gib(mem["without_checkpointing"])),
        ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}".rstrip() if label else "" for label, value in rows)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise EstimateError(message)


def _add_run_flags(add, defaults: bool) -> None:
    """The flags shared with `miras train` (same names and defaults); without defaults for --train-args."""

    def d(value):
        return value if defaults else None

    add("--model-size", default=d("xs"), choices=list(MODEL_SIZES), help="size preset (default xs, as train)")
    add("--seq-len", type=positive_int, default=d(4096), help="tokens per sequence (default 4096)")
    add("--batch-size", "--microbatch-size", type=positive_int, default=d(1), help="sequences per device")
    add("--precision", default=d("auto"), choices=["auto", "bf16", "fp16", "fp32"], help="auto = bf16 (GPU)")
    add("--ckpt-keep-last", type=non_negative_int, default=d(12))
    add("--ckpt-keep-milestones", type=non_negative_int, default=d(24))
    add("--ckpt-every-seconds", type=non_negative_float, default=d(300.0))
    add("--ckpt-milestone-every-seconds", type=non_negative_float, default=d(3600.0))
    add("--no-ckpt-prune", action="store_true", default=d(False))
    add("--milestone-weights-only", action="store_true", default=d(False))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="miras estimate",
        description="Parameters, checkpoint size, disk for the retention policy, upload volume per day and "
        "training GPU memory of a run (the flags are those of miras train).",
    )
    _add_run_flags(parser.add_argument, defaults=True)
    add = parser.add_argument
    add("--vocab-size", type=positive_int, default=GPT2_VOCAB, help="default 50257 (gpt2, the training default)")
    add("--headroom-gb", type=non_negative_float, default=DEFAULT_HEADROOM_GB, help="image, caches, logs (30)")
    add("--train-args", default=None, help="a training command line: its run flags override the defaults")
    add("--no-measure", action="store_true", help="skip the GPU memory estimate (its CPU measurement)")
    add("--json", action="store_true", help="print JSON instead of the table")
    add("--field", default=None, help="print one top-level number, e.g. disk_gb or parameters")
    return parser


def parse_train_args(text: str) -> dict[str, Any]:
    """The estimate-relevant flags of a `miras train` command line; every other flag is ignored."""
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise EstimateError(f"--train-args {text!r}: {error} (expected a training command line)") from None
    parser = _Parser(add_help=False)
    _add_run_flags(parser.add_argument, defaults=False)
    known, _ = parser.parse_known_args(words)
    return {k: v for k, v in vars(known).items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        options = {name: getattr(args, name) for name in RUN_FLAGS}
        if args.train_args:
            options.update(parse_train_args(args.train_args))
        wants_memory = not args.no_measure and args.field in (None, "gpu_memory")
        result = estimate(vocab_size=args.vocab_size, headroom_gb=args.headroom_gb, measure=wants_memory, **options)
        if args.field is not None and args.field not in result:
            numbers = [k for k, v in result.items() if isinstance(v, (int, float, str))]
            raise EstimateError(f"--field {args.field!r} is not a result (expected one of: {', '.join(numbers)})")
    except EstimateError as error:
        print(f"miras estimate: error: {error} (see --help)", file=sys.stderr)
        return 2
    if args.field is not None:
        value = result[args.field]
        print(json.dumps(value) if isinstance(value, dict) else value)
    elif args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
