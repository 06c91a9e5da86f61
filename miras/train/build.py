"""What the training recipe builds before its loop: the accelerator, the data, the model, the optimizer and
schedule, the Checkpointer's settings, the run record. Everything that can fail on user input fails here
with a one-line TrainingStopped, before anything is written."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.checkpointer import CheckpointSettings, Start
from ..checkpoint.retention import KEEP_ALL, RetentionPolicy
from ..checkpoint.trainer_state import software_versions
from ..configuration import MonetaConfig
from ..data import (
    SYNTHETIC_RECALL,
    DataConfig,
    DataError,
    HubUnreachable,
    default_tokenizer_name,
    open_documents,
    open_stream,
)
from ..modeling import MonetaForCausalLM
from ..parallel import shard_model, take_fsdp_request
from ..storage import StorageError, parse_options
from ..tokenizer import TokenizerError, load_tokenizer, prepare_for_checkpoints
from .checks import EXIT_FAILED, TrainingStopped, check_fits, check_shape
from .compiling import compile_for_training

NO_DECAY_NAMES = (
    ".mixer.eta_alpha_proj.",
    ".mixer.gate_down.",
    ".mixer.eta_up.",
    ".mixer.alpha_up.",
    "memory_a1",
    "memory_a2",
)


def resolve_precision(args) -> str:
    """Accelerate's mixed_precision value for --precision (auto as the seed: bf16 > fp16 on CUDA, fp32 elsewhere)."""
    if args.precision == "auto":
        if args.device in ("auto", "cuda") and torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    return {"fp32": "no"}.get(args.precision, args.precision)


def start_accelerator(args):
    """(Accelerator, use FSDP2) after the checks of the device, the world size and the batch arithmetic."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TrainingStopped("--device cuda: no CUDA device is visible (accepted here: auto, cpu)")
    if args.device == "mps" and not torch.backends.mps.is_available():
        raise TrainingStopped("--device mps: MPS is not available (accepted here: auto, cpu)")
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    use_fsdp = take_fsdp_request(args.fsdp)
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=resolve_precision(args))
    if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        raise TrainingStopped(f"--precision fp16 needs a CUDA GPU (its grad scaler); on {accelerator.device.type} "
                              "it would silently compute in fp32 (accepted here: auto, bf16, fp32)")  # fmt: skip
    world_size = accelerator.num_processes
    expected = os.environ.get("MIRAS_EXPECT_WORLD_SIZE")
    if expected is not None and int(expected) != world_size:
        raise TrainingStopped(f"world size is {world_size}, but MIRAS_EXPECT_WORLD_SIZE={expected}")
    if use_fsdp and world_size == 1:
        raise TrainingStopped("--fsdp needs several processes (launch with accelerate launch or torchrun)")
    if use_fsdp and accelerator.mixed_precision == "fp16":
        raise TrainingStopped("--precision fp16 with FSDP2 is not supported (accepted: bf16, fp32)")
    if args.global_batch_size is not None:
        per_step = args.batch_size * world_size
        if args.global_batch_size % per_step:
            raise TrainingStopped(
                f"--global-batch-size {args.global_batch_size} is not a multiple of --batch-size x processes "
                f"= {per_step}"
            )
        args.grad_accum = args.global_batch_size // per_step
    if torch.cuda.is_available() and not args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(args.seed)
    return accelerator, use_fsdp


@dataclass
class Data:
    tokenizer: Any
    train_stream: Any  # this rank's part of the training data
    eval_config: DataConfig
    first_batch: dict  # read now, so a bad dataset fails before anything is written

    def eval_stream(self):
        return open_stream(self.eval_config, self.tokenizer, evaluation=True)


def open_data(args, rank: int, world_size: int, device=None, shards: int = 1) -> Data:
    """The tokenizer and this rank's streams; a bad dataset is named before the tokenizer is tried, and a
    batch the device cannot hold before the first one is read."""
    config = DataConfig(
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        split=args.dataset_split,
        text_field=args.text_field,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        rank=rank,
        world_size=world_size,
        eval_documents=args.eval_documents,
        random_tokens=args.random_tokens,
    )
    try:
        if not args.random_tokens and args.dataset != SYNTHETIC_RECALL:
            open_documents(config)
        tokenizer = load_tokenizer(args.tokenizer or default_tokenizer_name(args.dataset))
        prepare_for_checkpoints(tokenizer, args.seq_len)
        check_fits(args, build_model_config(args, tokenizer), device or torch.device("cpu"), shards)
        stream = open_stream(config, tokenizer)
        eval_config = DataConfig(**{**asdict(config), "batch_size": max(1, args.batch_size)})
        if args.eval_dataset is not None:
            eval_config = held_out_dataset(args, eval_config)
        return Data(tokenizer, stream, eval_config, stream.next_batch())
    except HubUnreachable as error:  # the network, not the arguments: a later start may succeed
        raise TrainingStopped(str(error), EXIT_FAILED) from None
    except (DataError, TokenizerError, ValueError) as error:
        raise TrainingStopped(str(error)) from None


def resumed_tokenizer(args, folder: Path, tokenizer):
    """A resumed run keeps the tokenizer its checkpoint saved: the ids its model learned (a byte-tokenizer run
    saved before <|pad|> existed keeps 257 tokens). Encoding text is the same; only the vocabulary may differ."""
    if not (folder / "tokenizer_config.json").is_file():
        return tokenizer
    from transformers import AutoTokenizer

    try:
        saved = AutoTokenizer.from_pretrained(folder)
    except Exception:  # an unreadable tokenizer is not a reason to refuse the resume: the shape check decides
        return tokenizer
    return prepare_for_checkpoints(saved, args.seq_len)


def held_out_dataset(args, eval_config: DataConfig) -> DataConfig:
    """The evaluation data of --eval-dataset: its first --eval-documents documents (all of them if fewer)."""
    config = replace(eval_config, dataset=args.eval_dataset, dataset_config=None, split="train")
    try:
        documents, streaming = open_documents(config)
    except DataError as error:
        raise DataError(str(error).replace("--dataset", "--eval-dataset", 1)) from None
    if not streaming:
        if len(documents) == 0:
            raise DataError(f"--eval-dataset {args.eval_dataset!r} has no documents")
        config = replace(config, eval_documents=min(max(1, args.eval_documents), len(documents)))
    return config


def build_model_config(args, tokenizer) -> MonetaConfig:
    special = dict(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        memory_checkpoint_group=args.moneta_checkpoint_group,
    )
    # The memory's form and truncation: the model's defaults unless the command line names them.
    if args.moneta_detach_state_every is not None:
        special["detach_state_every"] = args.moneta_detach_state_every
    if args.moneta_lq_norm is not None:
        special["lq_norm"] = args.moneta_lq_norm
    if args.moneta_update_input is not None:
        special["memory_update_input"] = args.moneta_update_input
    if args.moneta_alpha_init is not None:
        special["alpha_init"] = args.moneta_alpha_init
    if args.dry_run and not args.dry_run_full_model:
        dim = args.dry_run_dim
        heads = 4 if dim % 4 == 0 else 1
        special["vocab_size"] = max(len(tokenizer), args.dry_run_vocab_size)
        return MonetaConfig(hidden_size=dim, num_hidden_layers=args.dry_run_n_layers, num_heads=heads, **special)
    try:
        return MonetaConfig.from_size(args.model_size, **special)
    except ValueError as error:
        raise TrainingStopped(str(error)) from None


def build_model(args, config: MonetaConfig, start: Start, compile_blocks: bool = False) -> MonetaForCausalLM:
    """The model in fp32, from the checkpoint to resume or start from, else freshly initialised.

    compile_blocks: compiling.compile_decision's answer for this run.
    """
    if start.weights is not None:
        model = MonetaForCausalLM.from_pretrained(start.weights, dtype=torch.float32)
        if start.init_from is not None:
            check_shape(MonetaConfig.from_pretrained(start.weights), config, "--init-from")
    else:
        model = MonetaForCausalLM(config)
    if args.memory_impl is not None:  # what runs the memory, not what it computes: a resumed run may change it
        model.config.memory_impl = args.memory_impl
    if not args.no_grad_checkpoint:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    if compile_blocks:
        # One graph per block (torch.compile, fullgraph: the memory is one op in it), compiled in place so that
        # state dicts and checkpoints are unchanged; what runs inside the memory op is --memory-impl's choice
        # ("auto" runs its steps compiled inside a compiled block: memory/dispatch.py).
        for block in model.model.layers:
            compile_for_training(block)
    return model


def parameter_groups(model: torch.nn.Module, weight_decay: float):
    """AdamW groups: no decay on norms, biases, gates and the initial memory."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(warmup_steps: int, total_steps: int, final_ratio: float = 0.1):
    """Linear warmup, then cosine from the peak down to final_ratio * peak at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def wrap_for_training(args, accelerator, model, use_fsdp: bool, total_steps: int, warmup: int):
    """(model, optimizer, scheduler) wrapped for the run (DDP through Accelerate, or FSDP2 applied by miras),
    and the bare model and optimizer a checkpoint saves."""
    if use_fsdp:
        model = shard_model(model, accelerator.device)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay),
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=torch.cuda.is_available() or None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(warmup, total_steps))
    if use_fsdp:
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    bare_model = model if use_fsdp else accelerator.unwrap_model(model)
    return model, optimizer, scheduler, bare_model, getattr(optimizer, "optimizer", optimizer)


def storage_options(args) -> dict[str, str]:
    try:
        return parse_options(args.storage_option)
    except StorageError as error:
        raise TrainingStopped(f"--storage-option: {error}") from None


def checkpoint_settings(args, run_dir: Path, node: int = 0) -> CheckpointSettings:
    local = KEEP_ALL if args.no_ckpt_prune else RetentionPolicy(args.ckpt_keep_last, args.ckpt_keep_milestones)
    remote = KEEP_ALL
    if not args.no_ckpt_prune:
        remote = RetentionPolicy(
            args.ckpt_keep_last if args.remote_keep_last is None else args.remote_keep_last,
            args.ckpt_keep_milestones if args.remote_keep_milestones is None else args.remote_keep_milestones,
        )
    return CheckpointSettings(
        run_dir=run_dir,
        run_name=args.run_name,
        every_seconds=args.ckpt_every_seconds,
        every_steps=args.ckpt_every_steps,
        milestone_every_seconds=args.ckpt_milestone_every_seconds,
        retention=local,
        weights_only_milestones=args.milestone_weights_only,
        weights_bf16=args.milestone_weights_bf16,
        shard_size=args.ckpt_shard_size,
        sync_to=list(args.sync_to),
        storage_options=storage_options(args),
        remote_retention=remote,
        sync_milestones_only=args.sync_milestones_only,
        sync_timeout=args.sync_timeout,
        sync_optional=args.sync_optional,
        takeover=args.takeover,
        lease_timeout=args.lease_timeout,
        checkpoint_bytes=checkpoint_bytes_estimate(args),
        writes=not args.dry_run,
    )


def checkpoint_bytes_estimate(args) -> int:
    """fp32 weights + AdamW's two moments for the chosen size (the gpt2 vocabulary when it is unknown yet)."""
    if not args.sync_to:
        return 0
    try:
        from ..parameters import count_parameters

        config = MonetaConfig.from_size(args.model_size, vocab_size=50257)
        return int(count_parameters(config)["total"]) * 12
    except Exception:
        return 0


def run_record(args, **facts: Any) -> dict[str, Any]:
    """What config.json holds: every argument (secrets are masked when it is written) and the run's facts."""
    return {**vars(args), **facts, "versions": software_versions()}
