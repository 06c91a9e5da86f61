"""Train MONETA: `python -m miras.train`, `miras train`, `accelerate launch -m miras.train`.

The recipe, top to bottom: parse and validate everything (nothing is written before that), build the
data stream of this rank, let the Checkpointer lock the run and find the checkpoint to resume from, build
the model, wrap it (DDP through Accelerate, or FSDP2), restore the trainer state, then loop: grad-accum
micro-steps, clip, AdamW, cosine schedule; log, evaluate, checkpoint when the Checkpointer says so, stop
on the step, token or time budget or a signal.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.checkpointer import Checkpointer, CheckpointError, StartRefused
from ..checkpoint.commit import is_disk_full
from ..checkpoint.layout import FINISHED_NAME
from ..data import SYNTHETIC_RECALL, recall_accuracy
from ..metrics import RunLogger, peak_memory_bytes, peak_tflops, start_wandb, training_flops_per_token, write_run_config
from ..parallel import as_float, gradient_sync, reshard
from ..storage.base import one_line
from .args import parse_args
from .build import (
    build_model,
    build_model_config,
    checkpoint_settings,
    open_data,
    resumed_tokenizer,
    run_record,
    start_accelerator,
    wrap_for_training,
)
from .checks import (
    EXIT_DISK_FULL,
    EXIT_DIVERGED,
    EXIT_FAILED,
    START_REFUSED_EXIT,
    TrainingStopped,
    check_resume_compatible,
    log_changes,
    read_wandb_id,
    restore_wandb_id,
    truncate_metrics,
    warn_about_disk,
)
from .compiling import compile_decision
from .hooks import Hooks
from .nodes import detect_topology, setup_nodes
from .state import TrainState


def say(message: str) -> None:
    print(f"miras train: {message}", flush=True)


def main(argv: list[str] | None = None, hooks: Hooks | None = None) -> int:
    return run(parse_args(argv), hooks)


def run(args, hooks: Hooks | None = None) -> int:
    """train() with its failures as one line on stderr and an exit code."""
    try:
        return train(args, hooks)
    except TrainingStopped as stop:
        print(f"miras train: error: {stop}", file=sys.stderr, flush=True)
        return stop.code
    except CheckpointError as error:
        print(f"miras train: error: {error}", file=sys.stderr, flush=True)
        return EXIT_DISK_FULL if error.disk_full else EXIT_FAILED
    except OSError as error:
        if not is_disk_full(error):
            raise
        print(f"miras train: error: the disk is full: {one_line(error)}; free space, then start again with --resume "
              "auto", file=sys.stderr, flush=True)  # fmt: skip
        return EXIT_DISK_FULL
    finally:
        _leave_process_group()
        # An FSDP2-wrapped model is cyclic garbage once train() returns, and it holds the device mesh and with it
        # the gloo process group: left to the interpreter's exit, gloo's threads can abort a finished worker
        # (SIGABRT after "done", seen now and then in the suite). Collected here, while the interpreter is whole.
        gc.collect()


def train(args, hooks: Hooks | None = None) -> int:
    hooks = hooks or Hooks()
    accelerator, use_fsdp = start_accelerator(args)
    world_size, rank, main_process = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    data = open_data(args, rank, world_size, accelerator.device, world_size if use_fsdp else 1)
    run_dir = Path(args.output_dir) / args.run_name
    topology = detect_topology(accelerator)
    setup_nodes(args, run_dir, topology, writes=not args.dry_run)

    # The Checkpointer locks the run, probes the destinations and finds (local, remote, explicit) what to
    # start from; it owns every checkpoint from here on.
    checkpointer = Checkpointer(checkpoint_settings(args, run_dir), topology, log=say)
    try:
        start = checkpointer.open(args.resume, args.init_from)
    except StartRefused as refused:
        raise TrainingStopped(str(refused), START_REFUSED_EXIT[refused.kind]) from None
    if start.finished:
        if main_process:
            say(f"{args.run_name}: already finished ({run_dir / FINISHED_NAME}); nothing to do")
        return 0
    try:
        if start.trainer_state is not None:
            data.tokenizer = resumed_tokenizer(args, start.resume, data.tokenizer)
        model_config = build_model_config(args, data.tokenizer)
        if start.trainer_state is not None:
            check_resume_compatible(args, start.resume, start.trainer_state, model_config, world_size)
    except TrainingStopped:
        # A refused resume leaves the run as it found it: its lock (and lease) released now, not when the
        # process ends, which matters to a caller that runs main() again in the same process.
        checkpointer.close()
        raise

    tokens_per_step = args.seq_len * args.batch_size * args.grad_accum * world_size
    total_steps = args.max_steps or max(1, args.max_tokens // tokens_per_step)
    micro_steps = total_steps * args.grad_accum
    compiled, compile_why = compile_decision(args.compile, accelerator.device.type, micro_steps, use_fsdp)
    model = build_model(args, model_config, start, compile_blocks=compiled)
    model_config = model.config
    num_parameters = sum(p.numel() for p in model.parameters())
    warmup = args.warmup_steps if args.warmup_steps is not None else min(2000, max(1, total_steps // 50))
    model, optimizer, scheduler, bare_model, bare_optimizer = wrap_for_training(
        args, accelerator, model, use_fsdp, total_steps, warmup
    )
    facts = {"fsdp": use_fsdp, "seq_len": args.seq_len, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
             "lr": args.lr, "total_steps": total_steps}  # fmt: skip
    state = TrainState(bare_model, bare_optimizer, scheduler, data.train_stream, data.tokenizer, facts,
                       next_batch=data.first_batch)  # fmt: skip
    checkpointer.restore(state)
    if start.trainer_state is not None and start.trainer_state["world_size"] != world_size and main_process:
        say(f"warning: world size {start.trainer_state['world_size']} -> {world_size} (--allow-world-size-change): "
            "each rank's data stream restarts at the beginning of its new part")  # fmt: skip

    record = run_record(args, world_size=world_size, fsdp=use_fsdp, tokens_per_step=tokens_per_step,
                        total_steps=total_steps, warmup_steps=warmup, num_parameters=num_parameters, compiled=compiled,
                        model_config=model_config.to_dict(), resumed_from=str(start.resume) if start.resume else None)
    wandb_run = None
    if main_process and not args.dry_run:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, record)
        truncate_metrics(run_dir / "metrics.jsonl", state.step)  # rows of a killed attempt past our start go
        if start.trainer_state is not None:
            restore_wandb_id(run_dir, start.trainer_state)
            log_changes(args, start.trainer_state)
        if args.wandb:
            wandb_run = start_wandb(args, run_dir, record)
        state.wandb_id = read_wandb_id(run_dir)
        warn_about_disk(args, run_dir, num_parameters)
    logger = RunLogger(None if args.dry_run else run_dir, total_steps, state.step, main_process, wandb_run)
    if main_process:
        what = f"resuming from {start.resume.name} (step {state.step})" if start.resume else "starting"
        say(f"{args.run_name}: {what}; {num_parameters / 1e6:.1f}M parameters, world size {world_size}"
            f"{' (FSDP2)' if use_fsdp else ''}, {tokens_per_step} tokens/step, {total_steps} steps, "
            f"precision {accelerator.mixed_precision}, compile {compile_why}")  # fmt: skip

    stop = StopSignals()
    stop.install()
    hooks.on_start(rank, world_size)
    window = Window(peak_tflops(accelerator.device, args.peak_tflops), training_flops_per_token(num_parameters))
    finished, stopped_by = state.step >= total_steps, None
    try:
        while not finished:
            started = time.perf_counter()
            loss, accuracy = forward_backward(args, accelerator, model, state, hooks)
            grad_norm = as_float(accelerator.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf")))
            if not (math.isfinite(grad_norm) and math.isfinite(float(loss))) and accelerator.mixed_precision != "fp16":
                # Never step on (or checkpoint) a NaN/inf: `latest` keeps naming the last good checkpoint.
                # (fp16's scaler skips such steps itself.)
                logger.close()
                checkpointer.close()
                raise TrainingStopped(
                    f"the loss ({float(loss)}) or gradient norm ({grad_norm}) is not finite at step {state.step + 1}; "
                    f"stopping without a checkpoint (latest good one: {checkpointer.latest_name()})",
                    EXIT_DIVERGED,
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += tokens_per_step
            state.training_time += time.perf_counter() - started
            window.add(loss, accuracy, tokens_per_step)
            logger.advance()

            # Decisions that depend on a clock are rank 0's; a signal on any rank stops all.
            due, milestone = checkpointer.due(state.step, state.training_time)
            out_of_time = bool(args.max_time) and state.training_time >= args.max_time
            (save, milestone, out_of_time), (signalled,) = agree_flags(
                accelerator, [due, milestone, out_of_time], [stop.received is not None]
            )
            finished = state.step >= total_steps or out_of_time
            # Evaluation steps are a function of the step alone, so a resumed run evaluates where a straight one does.
            evaluating = bool(args.eval_every and state.step % args.eval_every == 0) or finished
            if state.step % args.log_every == 0 or evaluating or signalled:
                row = window.row(accelerator, state, scheduler, grad_norm, world_size)
                row.update(checkpointer.status())
                if evaluating and args.eval_batches and not args.dry_run:
                    row["eval_loss"] = evaluate(model, accelerator, data.eval_stream(), args.eval_batches)
                logger.log(row)
                hooks.on_log(row)
            if save or finished or signalled:
                hooks.on_checkpoint(state.step, bare_model)
                checkpointer.save(state, milestone, final=finished or signalled)
            if signalled:
                stopped_by = stop.received or "a signal on another rank"
                break
    except CheckpointError:
        logger.close()
        checkpointer.close()  # what committed still goes up; the lock is released
        raise
    logger.close()
    checkpointer.close(finished=finished and not stopped_by)
    hooks.on_end(bare_model)
    if wandb_run is not None:
        wandb_run.finish()
    if main_process and stopped_by:
        say(f"{args.run_name}: stopped by {stopped_by} at step {state.step}; checkpoint "
            f"{checkpointer.latest_name()} committed; continue with --resume auto")  # fmt: skip
    elif main_process:
        say(f"{args.run_name}: done after {state.step} steps, {state.tokens_seen} tokens")
    accelerator.end_training()
    return 0


def forward_backward(args, accelerator, model, state: TrainState, hooks: Hooks) -> tuple[torch.Tensor, list]:
    """One optimizer step's micro-batches: forward, backward with gradient sync on the last one only.
    Each micro-batch's loss is divided by their number, so the gradients are those of one large batch."""
    losses, accuracy = [], []
    for micro in range(args.grad_accum):
        batch = state.take_batch()
        hooks.on_batch(batch)
        inputs = {k: v.to(accelerator.device) for k, v in batch.items()}
        with gradient_sync(model, accelerator, micro == args.grad_accum - 1), accelerator.autocast():
            output = model(**inputs)
            loss = hooks.on_loss(state.step + 1, output.loss) / args.grad_accum
        accelerator.backward(loss)
        losses.append(loss.detach().float() * args.grad_accum)
        if args.dataset == SYNTHETIC_RECALL:
            accuracy.append(recall_accuracy(output.logits.detach(), inputs["labels"]))
    hooks.on_gradients(state.step + 1, model)
    return torch.stack(losses).mean(), accuracy


class Window:
    """What the next metrics row averages: losses, recall accuracy and tokens since the last row."""

    def __init__(self, peak: float | None, flops_per_token: float):
        self.peak, self.flops_per_token = peak, flops_per_token
        self.start, self.tokens, self.losses, self.accuracy = time.perf_counter(), 0, [], []

    def add(self, loss: torch.Tensor, accuracy: list, tokens: int) -> None:
        self.losses.append(loss)
        self.accuracy += accuracy
        self.tokens += tokens

    def row(self, accelerator, state: TrainState, scheduler, grad_norm: float, world_size: int) -> dict:
        loss = float(accelerator.reduce(torch.stack(self.losses).mean(), reduction="mean"))
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        row = {
            "step": state.step,
            "loss": loss,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_seen": state.tokens_seen,
            "tokens_per_second": rate,
            "mfu": rate * self.flops_per_token / (self.peak * 1e12 * world_size) if self.peak else None,
            "peak_memory_bytes": peak_memory_bytes(accelerator.device),
            "elapsed": state.training_time,
            "recall_accuracy": sum(self.accuracy) / len(self.accuracy) if self.accuracy else None,
        }
        self.start, self.tokens, self.losses, self.accuracy = time.perf_counter(), 0, [], []
        return row


@torch.no_grad()
def evaluate(model, accelerator, eval_stream, batches: int) -> float:
    model.eval()
    losses = []
    for _ in range(batches):
        batch = {k: v.to(accelerator.device) for k, v in eval_stream.next_batch().items()}
        with accelerator.autocast():
            losses.append(model(**batch).loss.float())
    reshard(model)
    model.train()
    mean = torch.stack(losses).mean()
    return float(accelerator.reduce(mean, reduction="mean"))


class StopSignals:
    """SIGTERM/SIGINT set a flag the loop reads at the next step boundary; a second one exits at once."""

    def __init__(self):
        self.received: str | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"miras train: second {name}: exiting now without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = name
        say(f"{name} received: checkpointing at the end of this step, then exiting")


def agree_flags(accelerator, rank0_flags: list[bool], any_flags: list[bool]) -> tuple[list[bool], list[bool]]:
    """Rank 0 decides `rank0_flags` (clock-based: ranks' clocks differ); `any_flags` are true if any rank says so.
    One small all-reduce per step, so ranks never disagree about checkpointing or stopping."""
    if accelerator.num_processes == 1:
        return rank0_flags, any_flags
    mine = rank0_flags if accelerator.is_main_process else [False] * len(rank0_flags)
    values = torch.tensor([float(x) for x in mine + any_flags], device=accelerator.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    flags = [bool(x) for x in values.tolist()]
    return flags[: len(rank0_flags)], flags[len(rank0_flags) :]


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter exits. Left to the interpreter's exit, gloo's
    destructor can find a peer already gone and abort the process (SIGABRT instead of our exit code)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # exiting anyway; the exit code must stay ours
            pass
