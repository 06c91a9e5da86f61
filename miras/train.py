"""Train MONETA: `python -m miras.train`, `miras train`, `accelerate launch -m miras.train`.

The recipe, top to bottom: parse and validate everything (nothing is written before that), build
the tokenizer, the data stream of this rank and the model, wrap them with Accelerate, then loop:
grad-accum micro-steps, clip, AdamW, cosine schedule; log, evaluate, stop on the step, token or
time budget.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .configuration import MonetaConfig
from .data import (
    SYNTHETIC_RECALL,
    DataConfig,
    DataError,
    default_tokenizer_name,
    open_documents,
    open_stream,
    recall_accuracy,
)
from .memory.chunkwise import compile_chunk_step
from .metrics import (
    RunLogger,
    peak_memory_bytes,
    peak_tflops,
    start_wandb,
    training_flops_per_token,
    write_run_config,
)
from .modeling import MonetaForCausalLM
from .tokenizer import TokenizerError, load_tokenizer
from .train_args import parse_args

NO_DECAY_NAMES = (
    ".mixer.gate_proj.",
    ".mixer.gate_down.",
    ".mixer.eta_up.",
    ".mixer.alpha_up.",
    "memory_a1",
    "memory_a2",
)


def fail(message: str) -> int:
    print(f"miras train: error: {message}", file=sys.stderr)
    return 2


def resolve_precision(args) -> str:
    """Accelerate's mixed_precision value for --precision (auto as the seed: bf16 > fp16 on CUDA, fp32 elsewhere)."""
    if args.precision == "auto":
        if args.device in ("auto", "cuda") and torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    return {"fp32": "no"}.get(args.precision, args.precision)


def build_model_config(args, tokenizer) -> MonetaConfig:
    special = dict(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        detach_state_every=args.moneta_detach_state_every,
    )
    if args.dry_run and not args.dry_run_full_model:
        dim = args.dry_run_dim
        heads = 4 if dim % 4 == 0 else 1
        special["vocab_size"] = max(len(tokenizer), args.dry_run_vocab_size)
        return MonetaConfig(hidden_size=dim, num_hidden_layers=args.dry_run_n_layers, num_heads=heads, **special)
    return MonetaConfig.from_size(args.model_size, **special)


def parameter_groups(model: torch.nn.Module, weight_decay: float):
    """AdamW groups: no decay on norms, biases, gates and the initial memory (MONETA.md §5.4)."""
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


@torch.no_grad()
def evaluate(model, accelerator, eval_stream, batches: int) -> float:
    model.eval()
    losses = []
    for _ in range(batches):
        batch = {k: v.to(accelerator.device) for k, v in eval_stream.next_batch().items()}
        with accelerator.autocast():
            losses.append(model(**batch).loss.float())
    model.train()
    mean = torch.stack(losses).mean()
    return float(accelerator.reduce(mean, reduction="mean"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda: no CUDA device is visible (accepted here: auto, cpu)")
    if args.device == "mps" and not torch.backends.mps.is_available():
        return fail("--device mps: MPS is not available (accepted here: auto, cpu)")

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=resolve_precision(args))
    world_size, rank = accelerator.num_processes, accelerator.process_index
    expected = os.environ.get("MIRAS_EXPECT_WORLD_SIZE")
    if expected is not None and int(expected) != world_size:
        return fail(f"world size is {world_size}, but MIRAS_EXPECT_WORLD_SIZE={expected}")
    if args.global_batch_size is not None:
        per_step = args.batch_size * world_size
        if args.global_batch_size % per_step:
            return fail(
                f"--global-batch-size {args.global_batch_size} is not a multiple of --batch-size x processes "
                f"= {per_step}"
            )
        args.grad_accum = args.global_batch_size // per_step
    if torch.cuda.is_available() and not args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(args.seed)

    # Everything that can fail on user input fails here, before the run folder exists.
    tokenizer_name = args.tokenizer or default_tokenizer_name(args.dataset)
    data_config = DataConfig(
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
            open_documents(data_config)  # a bad dataset is named before the tokenizer is tried
        tokenizer = load_tokenizer(tokenizer_name)
        train_stream = open_stream(data_config, tokenizer)
        eval_config = DataConfig(**{**asdict(data_config), "batch_size": max(1, args.batch_size)})

        def eval_stream():
            return open_stream(eval_config, tokenizer, evaluation=True)

        first_batch = train_stream.next_batch()
        model_config = build_model_config(args, tokenizer)
    except (DataError, TokenizerError, ValueError) as error:
        return fail(str(error))

    model = MonetaForCausalLM(model_config)
    num_parameters = sum(p.numel() for p in model.parameters())
    if not args.no_grad_checkpoint:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    if args.compile:
        # The memory's chunk step is the hot loop; compiling it alone keeps compile time short.
        compile_chunk_step()

    tokens_per_step = args.seq_len * args.batch_size * args.grad_accum * world_size
    total_steps = args.max_steps or max(1, args.max_tokens // tokens_per_step)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(2000, max(1, total_steps // 50))
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay),
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=torch.cuda.is_available() or None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(warmup, total_steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    run_dir = None if args.dry_run else Path(args.output_dir) / args.run_name
    run_record = {
        **{k: v for k, v in vars(args).items()},
        "world_size": world_size,
        "tokens_per_step": tokens_per_step,
        "total_steps": total_steps,
        "warmup_steps": warmup,
        "num_parameters": num_parameters,
        "model_config": model_config.to_dict(),
        "versions": _versions(),
    }
    wandb_run = None
    if accelerator.is_main_process and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, run_record)
        if args.wandb:
            wandb_run = start_wandb(args, run_dir, run_record)
    logger = RunLogger(run_dir, total_steps, 0, accelerator.is_main_process, wandb_run)
    if accelerator.is_main_process:
        print(
            f"miras train: {args.run_name}: {num_parameters / 1e6:.1f}M parameters, world size {world_size}, "
            f"{tokens_per_step} tokens/step, {total_steps} steps, precision {accelerator.mixed_precision}",
            flush=True,
        )

    flops_per_token = training_flops_per_token(num_parameters)
    peak = peak_tflops(accelerator.device, args.peak_tflops)
    training_time, window_start, window_tokens = 0.0, time.perf_counter(), 0
    window_losses, window_accuracy = [], []
    tokens_seen, step, batch = 0, 0, first_batch
    # Test-only: MIRAS_TEST_RECORD=DIR makes each rank write what it read and the weights it ended with.
    record_dir = os.environ.get("MIRAS_TEST_RECORD")
    record = {"rank": rank, "world_size": world_size, "rows": [], "losses": []} if record_dir else None
    while step < total_steps:
        started = time.perf_counter()
        for micro in range(args.grad_accum):
            batch = batch if batch is not None else train_stream.next_batch()
            if record is not None:
                record["rows"].extend(row[:16] for row in batch["input_ids"].tolist())
            inputs = {k: v.to(accelerator.device) for k, v in batch.items()}
            batch = None
            last = micro == args.grad_accum - 1
            context = accelerator.no_sync(model) if not last else contextlib.nullcontext()
            with context, accelerator.autocast():
                output = model(**inputs)
                loss = output.loss / args.grad_accum
            accelerator.backward(loss)
            window_losses.append(loss.detach().float() * args.grad_accum)
            if args.dataset == SYNTHETIC_RECALL:
                window_accuracy.append(recall_accuracy(output.logits.detach(), inputs["labels"]))
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip else float("inf"))
        if not math.isfinite(float(grad_norm)):
            # Never step on a NaN/inf gradient: the weights would be lost. (fp16's scaler skips such steps itself.)
            if accelerator.mixed_precision != "fp16":
                logger.close()
                return fail(f"the gradient norm is not finite ({float(grad_norm)}) at step {step + 1}; stopping")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        training_time += time.perf_counter() - started
        logger.advance()

        out_of_time = bool(args.max_time) and training_time >= args.max_time
        if step % args.log_every == 0 or step == total_steps or out_of_time:
            loss_value = float(accelerator.reduce(torch.stack(window_losses).mean(), reduction="mean"))
            if not math.isfinite(loss_value):
                logger.close()
                return fail(f"the loss is not finite ({loss_value}) at step {step}; stopping")
            elapsed = time.perf_counter() - window_start
            rate = window_tokens / max(elapsed, 1e-9)
            row = {
                "step": step,
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_seen": tokens_seen,
                "tokens_per_second": rate,
                "mfu": rate * flops_per_token / (peak * 1e12 * world_size) if peak else None,
                "peak_memory_bytes": peak_memory_bytes(accelerator.device),
                "elapsed": training_time,
                "recall_accuracy": sum(window_accuracy) / len(window_accuracy) if window_accuracy else None,
            }
            if (args.eval_every and step % args.eval_every == 0) or step == total_steps or out_of_time:
                if args.eval_batches and not args.dry_run:
                    row["eval_loss"] = evaluate(model, accelerator, eval_stream(), args.eval_batches)
            logger.log(row)
            if record is not None:
                record["losses"].append(loss_value)
            window_start, window_tokens, window_losses, window_accuracy = time.perf_counter(), 0, [], []
        if out_of_time:
            break

    logger.close()
    accelerator.wait_for_everyone()
    if record is not None:
        _write_record(Path(record_dir), record, accelerator.unwrap_model(model))
    if wandb_run is not None:
        wandb_run.finish()
    if accelerator.is_main_process:
        print(f"miras train: {args.run_name}: done after {step} steps, {tokens_seen} tokens", flush=True)
    accelerator.end_training()
    return 0


def _write_record(directory: Path, record: dict, model: torch.nn.Module) -> None:
    import json

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    torch.save(state, directory / f"weights_rank{record['rank']}.pt")
    (directory / f"rank{record['rank']}.json").write_text(json.dumps(record))


def _versions() -> dict[str, str]:
    import accelerate
    import transformers

    from . import __version__

    return {
        "miras": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": sys.version.split()[0],
    }


if __name__ == "__main__":
    sys.exit(main())
