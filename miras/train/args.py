"""The `miras train` command line: flags grouped as `--help` shows them, seed aliases, validation.

Every flag of the seed's train.py still works; where our name differs the seed's is an alias
(marked "seed alias" in --help). Bad values end in one line naming the value and what is
accepted (argparse's error, exit code 2), before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from ..argtypes import byte_size, non_negative_float, non_negative_int, open_unit_float, positive_float, positive_int
from ..checkpoint.layout import CHECKPOINTS_DIR, LATEST_NAME
from ..data_sources import BUILTIN, DEFAULT_HUB_DATASET, PYTHON_SOURCE
from ..storage import StorageError, check_destination

# The names of miras.configuration.MODEL_SIZES, miras.memory.dispatch.IMPLEMENTATIONS and miras.memory.rule.LQ_NORMS,
# written out so that parsing the command line (and --help) imports neither torch nor transformers; a test checks
# they match.
MODEL_SIZE_NAMES = ("xs", "s", "m", "l", "xl")
MEMORY_IMPLS = ("auto", "torch", "compiled", "triton")
LQ_NORMS = ("inverse", "scale_free")
COMPILE_CHOICES = ("auto", "on", "off")  # --compile; miras/train/compiling.py decides "auto"

# The paper's token budgets (MIRAS Table 5 and text); also the cosine schedule's horizon.
PAPER_TOKEN_BUDGET = {"xs": 100_000_000, "s": 15_000_000_000, "m": 15_000_000_000, "l": 30_000_000_000}
PAPER_TOKEN_BUDGET["xl"] = 100_000_000_000
PAPER_PEAK_LR = {"s": 3e-3, "m": 1.5e-3, "l": 1.25e-3}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad value is one line (no usage dump) and exit code 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="miras train",
        description="Train MONETA. Same code under `python -m miras.train`, `miras train` and "
        "`accelerate launch [--config_file accelerate_configs/X.yaml] -m miras.train`.",
    )
    add = parser.add_argument_group("model").add_argument
    add("--model-size", default="xs", choices=list(MODEL_SIZE_NAMES), help="size preset (default: xs)")
    add(
        "--compile",
        nargs="?",
        const="on",
        default="auto",
        choices=list(COMPILE_CHOICES),
        help="torch.compile each block, one graph each, the memory's steps compiled inside (memory impl auto): on, "
        "off, or auto (the default): on for a CPU run planned for at least 2000 micro-steps (steps x --grad-accum) "
        "where torch.compile works, "
        "off otherwise (compiling costs ~50 s once; bare --compile means on)",
    )
    add(
        "--memory-impl",
        default=None,
        choices=list(MEMORY_IMPLS),
        help="what runs the memory: torch, compiled (its steps through torch.compile), triton (fused kernels, CUDA, "
        "pip install 'miras[triton]') or auto (compiled inside a compiled block, else torch); the function is the "
        "same (default: the config's, auto for a new run)",
    )
    add("--no-grad-checkpoint", action="store_true", help="disable block activation checkpointing (on by default)")
    add(
        "--moneta-detach-state-every",
        type=non_negative_int,
        default=None,
        help="truncated BPTT inside the memory, in tokens (a multiple of the chunk; 0 = full backprop, the paper's; "
        "default: the model's, MonetaConfig.detach_state_every)",
    )
    add(
        "--moneta-lq-norm",
        default=None,
        choices=list(LQ_NORMS),
        help="the memory's l_q normaliser for a new run: inverse (the paper's) or scale_free (binds across chunk "
        "commits: docs/model.md); a resumed run keeps its checkpoint's (default: the model's, MonetaConfig.lq_norm)",
    )
    add(
        "--moneta-update-input",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="whether the memory's inner loop writes its input matrix too (the paper's MONETA) or only its output "
        "matrix, the input a feature map the outer loop learns (docs/model.md); a resumed run keeps its "
        "checkpoint's (default: the model's, MonetaConfig.memory_update_input)",
    )
    add(
        "--moneta-alpha-init",
        type=open_unit_float,
        default=None,
        help="the memory's retention alpha at initialisation for a new run, in (0, 1): 0.9999 (the model's default) "
        "keeps a horizon of ~10K tokens, 0.99 (the paper's form, with --moneta-update-input --moneta-lq-norm inverse) "
        "~100; a resumed run keeps its checkpoint's (default: the model's, MonetaConfig.alpha_init)",
    )
    add(
        "--moneta-checkpoint-group",
        type=non_negative_int,
        default=0,
        help="recompute the memory in groups of G chunks: fewer saved states for one more forward (0 = off)",
    )

    add = parser.add_argument_group("hardware and precision").add_argument
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="single-process runs only")
    add(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="auto: bf16 on CUDA that supports it, fp16 + grad scaler on older CUDA, fp32 on CPU and MPS",
    )
    add("--no-tf32", action="store_true", help="disable TF32 matmuls on CUDA")

    add = parser.add_argument_group("batch and schedule").add_argument
    add("--seq-len", type=positive_int, default=4096, help="tokens per sequence (default 4096)")
    add("--batch-size", "--microbatch-size", type=positive_int, default=1, help="sequences per device per micro-step")
    add("--grad-accum", "--grad-accum-steps", type=positive_int, default=1, help="micro-steps per optimizer step")
    add(
        "--global-batch-size",
        type=positive_int,
        default=None,
        help="seed alias: sequences per optimizer step over all devices; sets --grad-accum",
    )
    add("--lr", type=positive_float, default=3e-4, help="peak learning rate (default 3e-4, as the seed)")
    add("--warmup-steps", type=non_negative_int, default=None, help="default: 2%% of the steps, at most 2000")
    add("--weight-decay", type=non_negative_float, default=0.1)
    add("--grad-clip", "--grad-clip-norm", type=non_negative_float, default=1.0, help="0 disables clipping")
    add("--max-steps", type=non_negative_int, default=0, help="optimizer steps (0: from the token budget)")
    add("--max-tokens", type=non_negative_int, default=0, help="default: the paper's budget for the size")
    add(
        "--max-time",
        "--max-time-seconds",
        type=non_negative_float,
        default=0,
        help="stop after this many seconds of training time (0: no limit)",
    )
    add("--seed", type=int, default=1337)

    add = parser.add_argument_group("data").add_argument
    add(
        "--dataset",
        "--dataset-name",
        default=DEFAULT_HUB_DATASET,
        help=f"hub name, local file(s) (.txt/.jsonl/.parquet, globs), '{BUILTIN}' (stdlib docs), "
        f"'{PYTHON_SOURCE}' (stdlib source files, long documents) or 'synthetic:recall' "
        f"(default {DEFAULT_HUB_DATASET})",
    )
    add("--dataset-config", default=None, help="hub dataset configuration (default sample-10BT for the default)")
    add("--dataset-split", default="train")
    add("--text-field", default="text")
    add(
        "--tokenizer",
        "--tokenizer-name",
        default=None,
        help="name or path; default byte for the offline corpora, else gpt2",
    )
    add("--data-source", default=None, choices=["random", "hf_buffer"], help="seed alias: random = random tokens")
    add("--eval-documents", type=non_negative_int, default=32, help="documents held out for evaluation")
    add("--eval-batches", type=positive_int, default=4, help="batches of held-out windows per evaluation")
    add("--eval-dataset", default=None,
        help="evaluate on the first --eval-documents documents of this dataset (same forms as --dataset) instead of "
             "the documents held out of --dataset")  # fmt: skip
    add("--max-seq-len", type=int, default=None, help="seed alias; no effect here (no position table)")
    add("--buffer-tokens", type=int, default=None, help="seed alias; no effect here (the data streams)")

    add = parser.add_argument_group("run and logging").add_argument
    add("--output-dir", "--runs-dir", default="runs", help="runs land in OUTPUT_DIR/RUN_NAME (default runs)")
    add("--run-name", default=None, help="default: start time and size")
    add("--log-every", "--log-every-steps", type=positive_int, default=10)
    add("--eval-every", type=non_negative_int, default=0, help="steps between evaluations (0: at the end only)")
    add("--peak-tflops", type=positive_float, default=None, help="hardware peak for MFU (default: known GPUs)")
    add("--wandb", action="store_true")
    add("--wandb-project", default=None, help="default: $WANDB_PROJECT or miras")
    add("--wandb-entity", default=None, help="default: $WANDB_ENTITY")
    add("--wandb-name", default=None, help="default: the run name")
    add("--wandb-tags", default=None, help="comma-separated")
    add("--wandb-mode", default=None, choices=["online", "offline", "disabled"], help="default: $WANDB_MODE")

    add = parser.add_argument_group("checkpoints and resume").add_argument
    add("--ckpt-every-seconds", type=non_negative_float, default=300.0, help="of training time (0: off)")
    add("--ckpt-every-steps", type=non_negative_int, default=0, help="also every N steps (0: off)")
    add(
        "--ckpt-milestone-every-seconds",
        type=non_negative_float,
        default=3600.0,
        help="a checkpoint is a milestone when this much training time passed since the last one",
    )
    add("--ckpt-keep-last", type=non_negative_int, default=12, help="newest checkpoints kept")
    add("--ckpt-keep-milestones", type=non_negative_int, default=24, help="newest milestones kept (besides)")
    add("--no-ckpt-prune", action="store_true", help="keep every checkpoint")
    add(
        "--milestone-weights-only",
        action="store_true",
        help="milestones leaving the keep-last set keep only the model (~3x less disk; no longer resumable)",
    )
    add(
        "--milestone-weights-bf16",
        action="store_true",
        help="with --milestone-weights-only: also store those milestones' weights in bfloat16 (~6x less disk)",
    )
    add("--ckpt-shard-size", type=byte_size, default="2GB", help="safetensors shard size (default 2GB)")
    add(
        "--resume",
        default=None,
        help="'auto' (newest valid checkpoint of the run, else start fresh; needs --run-name), or a "
        "checkpoint folder or URL",
    )
    add("--init-from", default=None, help="start a NEW run from a checkpoint's weights only")
    add(
        "--allow-world-size-change",
        action="store_true",
        help="resume with another number of processes (data positions restart; see README)",
    )

    add = parser.add_argument_group("storage (checkpoints mirrored to Drive, GCS, S3, ...)").add_argument
    add(
        "--sync-to",
        action="append",
        default=[],
        metavar="URL",
        help="upload the run to URL/<run-name>/ in the background (repeatable): a path, file://, gs://, s3://, "
        "rclone://REMOTE/path, gdrive://FOLDER_ID/path, or any installed scheme",
    )
    add("--storage-option", action="append", default=[], metavar="KEY=VALUE", help="e.g. endpoint_url=... (S3)")
    add("--sync-milestones-only", action="store_true", help="upload only milestones and the final checkpoint")
    add("--sync-timeout", type=non_negative_float, default=600.0, help="seconds to finish uploads at exit")
    add("--sync-optional", action="store_true", help="train even if a destination fails the startup probe")
    add(
        "--takeover",
        action="store_true",
        help="take the run over at the destinations even if another machine's lease on it is still live",
    )
    add(
        "--lease-timeout",
        type=positive_float,
        default=300.0,
        help="seconds after its last heartbeat that another machine's lease on the run expires (default 300)",
    )
    add("--remote-keep-last", type=non_negative_int, default=None, help="default: --ckpt-keep-last")
    add("--remote-keep-milestones", type=non_negative_int, default=None, help="default: --ckpt-keep-milestones")
    add("--gdrive-sync", action="store_true", help="seed alias: --sync-to rclone://GDRIVE_REMOTE/GDRIVE_DIR")
    add("--gdrive-remote", default="gdrive", help="seed alias: the rclone remote for --gdrive-sync")
    add("--gdrive-dir", default="research/papers/miras/runs", help="seed alias: the folder for --gdrive-sync")

    add = parser.add_argument_group("distributed").add_argument
    add(
        "--fsdp",
        action="store_true",
        help="shard parameters, gradients and optimizer with FSDP2 (also set by accelerate_configs/fsdp.yaml)",
    )

    add = parser.add_argument_group("dry run (a few offline steps, writes nothing)").add_argument
    add("--dry-run", action="store_true")
    add("--dry-run-dim", type=positive_int, default=64)
    add("--dry-run-n-layers", type=positive_int, default=2)
    add("--dry-run-steps", type=positive_int, default=3)
    add("--dry-run-seq-len", type=positive_int, default=128)
    add("--dry-run-microbatch-size", type=positive_int, default=2)
    add("--dry-run-vocab-size", type=positive_int, default=257)
    add("--dry-run-full-model", action="store_true", help="use --model-size instead of the tiny dry-run model")
    for action in parser._actions:  # mark the seed's names where ours differ
        if len(action.option_strings) > 1 and action.dest != "help":
            aliases = ", ".join(action.option_strings[1:])
            action.help = f"{action.help or ''} [seed alias: {aliases}]".strip()
    return parser


def output_dir_problem(output_dir: str) -> str | None:
    """Why runs cannot be written under `output_dir` (a file in the way, no permission), found by creating and
    removing an empty folder in its nearest existing ancestor; None when they can."""
    path = Path(output_dir).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    accepted = "accepted: a folder miras can create or write in"
    if not existing.is_dir():
        what = "is a file" if existing == path else f"is under {str(existing)!r}, which is a file"
        return f"{output_dir!r} {what}, not a folder ({accepted})"
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".miras-probe-").cleanup()
    except OSError as error:
        return f"{output_dir!r}: cannot create a folder in {str(existing)!r} ({error.strerror or error}; {accepted})"
    return None


def earlier_checkpoint_name(value: str, run_dir: Path | None, flag: str) -> str:
    """A checkpoint argument in the earlier train.py's terms, in miras' terms. Its checkpoints were files
    (`step_XXXXXXXX.pt`, `latest.pt`); miras' are folders named alike, with a `latest` pointer. A `.pt` name
    that does not exist means the folder of the same name, `latest.pt` the checkpoint `latest` names (in that
    folder, else in the run's own checkpoints). An existing `.pt` file is the earlier trainer's: refused,
    since its model is not MONETA's (ValueError, one line)."""
    path = Path(value).expanduser()
    if path.is_file() and path.suffix == ".pt":
        raise ValueError(
            f"argument {flag}: {value!r} is a checkpoint file of the earlier train.py; its model (one d x d linear "
            "memory per layer, RoPE) is not MONETA's, so miras can neither resume nor load it (accepted: a miras "
            "checkpoint folder, run folder or URL; start a new run without it)"
        )
    if path.suffix != ".pt" or path.exists() or "://" in value:
        return value
    stem = path.with_suffix("")
    if stem.name == LATEST_NAME:
        folders = [stem.parent] + ([run_dir / CHECKPOINTS_DIR] if run_dir and str(stem.parent) == "." else [])
        for folder in folders:
            if (folder / LATEST_NAME).is_file():
                print(f"miras train: note: {flag} {value}: the checkpoint {folder / LATEST_NAME} names "
                      "(miras keeps checkpoints as folders)", flush=True)  # fmt: skip
                return str(folder)
    elif stem.is_dir():
        return str(stem)
    raise ValueError(
        f"argument {flag}: {value!r} does not exist, and no checkpoint folder goes by its name (miras keeps "
        f"checkpoints as folders, step_XXXXXXXX/ with checkpoints/{LATEST_NAME} naming the newest; accepted: "
        "auto, a checkpoint folder, a run folder or a URL)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset == DEFAULT_HUB_DATASET and args.dataset_config is None:
        args.dataset_config = "sample-10BT"
    args.random_tokens = args.data_source == "random"
    args.run_name_given = args.run_name is not None
    if args.resume == "auto" and not args.run_name_given:
        parser.error("argument --resume: 'auto' needs an explicit --run-name (a restart must find the same run)")
    if args.resume and args.init_from:
        parser.error("arguments --resume and --init-from: pick one (resume continues a run, init-from starts one)")
    for flag in ("resume", "init_from"):
        value = getattr(args, flag)
        if value and value != "auto":
            run_dir = Path(args.output_dir) / args.run_name if args.run_name_given else None
            try:
                setattr(args, flag, earlier_checkpoint_name(value, run_dir, f"--{flag.replace('_', '-')}"))
            except ValueError as error:
                parser.error(str(error))
    if not args.dry_run:
        problem = output_dir_problem(args.output_dir)
        if problem:
            parser.error(f"argument --output-dir: {problem}")
    if args.gdrive_sync:
        args.sync_to.append(f"rclone://{args.gdrive_remote}/{args.gdrive_dir.strip('/')}")
    try:
        args.sync_to = [check_destination(url) for url in args.sync_to]
    except StorageError as error:
        parser.error(f"argument --sync-to: {error}")
    if args.run_name is None:
        args.run_name = time.strftime("%Y%m%d-%H%M%S") + f"-{args.model_size}"
    elif not args.run_name or "/" in args.run_name or args.run_name.startswith("."):
        parser.error(f"argument --run-name: {args.run_name!r} is not a folder name (no '/', not starting with '.')")
    chunk = 64
    if args.moneta_detach_state_every is not None and args.moneta_detach_state_every % chunk:
        parser.error(
            f"argument --moneta-detach-state-every: {args.moneta_detach_state_every} is not a multiple of the "
            f"chunk size {chunk} (expected 0 or a multiple of {chunk})"
        )
    if args.dry_run:
        args.seq_len = args.dry_run_seq_len
        args.batch_size = args.dry_run_microbatch_size
        args.max_steps = args.dry_run_steps
        if args.dataset == DEFAULT_HUB_DATASET and not args.random_tokens:
            args.random_tokens = True  # offline by definition
            args.tokenizer = args.tokenizer or "byte"
    if not args.max_tokens and not args.max_steps:
        args.max_tokens = PAPER_TOKEN_BUDGET[args.model_size]
    return args
