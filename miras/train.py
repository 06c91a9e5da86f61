"""Train MONETA: `python -m miras.train`, `miras train`, `accelerate launch -m miras.train`.

The recipe, top to bottom: parse and validate everything (nothing is written before that), take the
run's lock, find the checkpoint to resume from, build the tokenizer, the data stream of this rank and
the model, wrap them (DDP through Accelerate, or FSDP2), restore the trainer state, then loop:
grad-accum micro-steps, clip, AdamW, cosine schedule; log, evaluate, checkpoint on the clock, stop on
the step, token or time budget or a signal.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import layout
from .checkpoint.catalog import committed, find_resumable
from .checkpoint.commit import CheckpointCommitter, remove_stale_tmp
from .checkpoint.faults import fault_point
from .checkpoint.files import checkpoints_dir, write_text_atomic
from .checkpoint.lock import RunLock, RunLockedError
from .checkpoint.schedule import CheckpointSchedule
from .checkpoint.trainer_state import (
    SCHEDULER_STATE,
    TRAINER_STATE,
    capture_rng,
    full_model_state,
    load_optimizer,
    rank_state_name,
    read_trainer_state,
    restore_rng,
    save_optimizer,
    save_weights,
    write_json,
)
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
from .parallel import as_float, gradient_sync, reshard, shard_model, take_fsdp_request
from .tokenizer import TokenizerError, load_tokenizer
from .train_args import parse_args
from .train_checks import (
    EXIT_DIVERGED,
    EXIT_FAILED,
    TrainingStopped,
    check_checkpoint_argument,
    check_resume_compatible,
    check_shape,
    latest_name,
    log_changes,
    read_wandb_id,
    truncate_metrics,
    warn_about_disk,
)
from .train_nodes import detect_topology, leaders_gather, on_every_node, setup_nodes, start_node_local
from .train_sync import close_syncer, download_explicit, fetch_init_from, is_url, pull_remote, start_syncer, sync_hook

NO_DECAY_NAMES = (
    ".mixer.gate_proj.",
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


def build_model_config(args, tokenizer) -> MonetaConfig:
    special = dict(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        detach_state_every=args.moneta_detach_state_every,
        memory_checkpoint_group=args.moneta_checkpoint_group,
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
        print(f"miras train: {name} received: checkpointing at the end of this step, then exiting", flush=True)


def broadcast(accelerator, value):
    """Rank 0's Python value on every rank."""
    if accelerator.num_processes == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree_flags(accelerator, rank0_flags: list[bool], any_flags: list[bool]) -> tuple[list[bool], list[bool]]:
    """Rank 0 decides `rank0_flags` (clock-based: ranks' clocks differ); `any_flags` are true if any rank says so.
    One small all-reduce per step, so ranks never disagree about checkpointing or stopping."""
    if accelerator.num_processes == 1:
        return rank0_flags, any_flags
    import torch.distributed as dist

    mine = rank0_flags if accelerator.is_main_process else [False] * len(rank0_flags)
    values = torch.tensor([float(x) for x in mine + any_flags], device=accelerator.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    flags = [bool(x) for x in values.tolist()]
    return flags[: len(rank0_flags)], flags[len(rank0_flags) :]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except TrainingStopped as stop:
        print(f"miras train: error: {stop}", file=sys.stderr, flush=True)
        return stop.code
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter exits. Left to the interpreter's exit, gloo's
    destructor can find a peer already gone and abort the process (SIGABRT instead of our exit code)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # exiting anyway; the exit code must stay ours
            pass


def train(args) -> int:  # noqa: C901 - the recipe reads top to bottom on purpose
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TrainingStopped("--device cuda: no CUDA device is visible (accepted here: auto, cpu)")
    if args.device == "mps" and not torch.backends.mps.is_available():
        raise TrainingStopped("--device mps: MPS is not available (accepted here: auto, cpu)")

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    use_fsdp = take_fsdp_request(args.fsdp)
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=resolve_precision(args))
    world_size, rank = accelerator.num_processes, accelerator.process_index
    main_process = accelerator.is_main_process
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
        raise TrainingStopped(str(error)) from None
    source = args.resume if args.resume not in (None, "auto") else args.init_from
    if source is not None and not is_url(source):
        check_checkpoint_argument(source, "--resume" if args.resume else "--init-from")

    writes = not args.dry_run
    run_dir = Path(args.output_dir) / args.run_name
    ckpt_dir = checkpoints_dir(run_dir)
    # Several nodes: is the run folder shared? If not (node-local mode), each node's leader (its local rank 0)
    # commits, uploads and downloads its own node's folder (miras/train_nodes.py).
    topology = detect_topology(accelerator)
    setup_nodes(args, run_dir, topology, writes)
    node_local = topology.node_local

    # One writer per run; then the checkpoint to continue from, decided on rank 0 (on every node's leader
    # in node-local mode).
    lock = RunLock(run_dir)
    decision = {"error": None, "resume": None, "finished": False}
    syncer = None
    if node_local:
        decision, syncer = start_node_local(args, run_dir, topology, lock)
    elif main_process and writes:
        if args.resume == "auto" and (run_dir / layout.FINISHED_NAME).exists():
            decision["finished"] = True
        else:
            try:
                syncer = start_syncer(args, run_dir)  # probes every destination before anything is written
                lock.acquire()
                remove_stale_tmp(ckpt_dir)
                if args.resume == "auto":
                    found = find_resumable(ckpt_dir, warn=lambda m: print(f"miras train: warning: {m}", flush=True))
                    if found is None and syncer is not None:
                        found = pull_remote(args, run_dir)  # a fresh instance: continue from the remote copy
                    decision["resume"] = str(found) if found else None
                elif args.resume and is_url(args.resume):
                    decision["resume"] = str(download_explicit(args.resume, ckpt_dir, args))
                elif args.resume:
                    decision["resume"] = args.resume
                elif committed(ckpt_dir):
                    decision["error"] = (
                        f"run folder {run_dir} already has checkpoints (newest {committed(ckpt_dir)[-1].name}): "
                        "pass --resume auto to continue it, or choose another --run-name"
                    )
            except (RunLockedError, TrainingStopped) as error:
                decision["error"] = str(error)
    if not node_local:
        decision = broadcast(accelerator, decision)
    if decision["error"] or decision["finished"]:
        lock.release()
        if syncer is not None:
            syncer.close(0)
    if decision["finished"]:
        if main_process:
            print(f"miras train: {args.run_name}: already finished ({run_dir / layout.FINISHED_NAME}); nothing to do")
        return 0
    if decision["error"]:
        raise TrainingStopped(decision["error"])
    resume_dir = Path(decision["resume"]) if decision["resume"] else None
    if syncer is not None and resume_dir is not None and not node_local:
        from .checkpoint.catalog import describe

        info = describe(resume_dir)  # the remote catches up if this one never made it there
        syncer.submit_checkpoint(resume_dir, info.step, info.milestone)
    trainer_state = read_trainer_state(resume_dir) if resume_dir else None
    if trainer_state is not None:
        check_resume_compatible(args, resume_dir, trainer_state, model_config, world_size)

    if args.init_from and is_url(args.init_from) and node_local:
        args.init_from = on_every_node(topology, lambda: fetch_init_from(args, run_dir))
    elif args.init_from and is_url(args.init_from):
        args.init_from = broadcast(accelerator, fetch_init_from(args, run_dir) if main_process else None)
    weights_from = resume_dir or (Path(args.init_from) if args.init_from else None)
    if weights_from is not None:
        model = MonetaForCausalLM.from_pretrained(weights_from, dtype=torch.float32)
        if args.init_from:
            check_shape(MonetaConfig.from_pretrained(weights_from), model_config, "--init-from")
    else:
        model = MonetaForCausalLM(model_config)
    model_config = model.config
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
    bare_optimizer = getattr(optimizer, "optimizer", optimizer)

    # The trainer state: step, tokens, clocks, optimizer, scheduler, data position and RNG of this rank.
    schedule = CheckpointSchedule(args.ckpt_every_seconds, args.ckpt_every_steps, args.ckpt_milestone_every_seconds)
    step, tokens_seen, training_time, batch = 0, 0, 0.0, first_batch
    if trainer_state is not None:
        load_optimizer(bare_model, bare_optimizer, resume_dir)
        scheduler.load_state_dict(torch.load(resume_dir / SCHEDULER_STATE, weights_only=False))
        step, tokens_seen = trainer_state["step"], trainer_state["tokens_seen"]
        training_time = trainer_state["training_time"]
        schedule.load_clock_state(trainer_state["schedule"])
        rank_file = resume_dir / rank_state_name(rank)
        if trainer_state["world_size"] == world_size:
            rank_state = torch.load(rank_file, weights_only=False)
            train_stream.load_state_dict(rank_state["data"])
            restore_rng(rank_state["rng"])
            batch = None  # the prefetched first batch belongs to a fresh start
        elif main_process:
            print(
                f"miras train: warning: world size {trainer_state['world_size']} -> {world_size} "
                "(--allow-world-size-change): each rank's data stream restarts at the beginning of its new part",
                flush=True,
            )

    run_record = {
        **{k: v for k, v in vars(args).items()},
        "world_size": world_size,
        "fsdp": use_fsdp,
        "tokens_per_step": tokens_per_step,
        "total_steps": total_steps,
        "warmup_steps": warmup,
        "num_parameters": num_parameters,
        "model_config": model_config.to_dict(),
        "versions": _versions(),
        "resumed_from": str(resume_dir) if resume_dir else None,
    }
    wandb_run = None
    if main_process and writes:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, run_record)
        truncate_metrics(run_dir / "metrics.jsonl", step)  # rows of a killed attempt past our start go
        if trainer_state is not None:
            if trainer_state.get("wandb_id") and not (run_dir / layout.WANDB_ID_NAME).exists():
                (run_dir / layout.WANDB_ID_NAME).write_text(trainer_state["wandb_id"] + "\n")
            log_changes(args, trainer_state)
        if args.wandb:
            wandb_run = start_wandb(args, run_dir, run_record)
        warn_about_disk(args, run_dir, num_parameters)
    logger = RunLogger(run_dir if writes else None, total_steps, step, main_process, wandb_run)
    if main_process:
        what = f"resuming from {resume_dir.name} (step {step})" if resume_dir else "starting"
        print(
            f"miras train: {args.run_name}: {what}; {num_parameters / 1e6:.1f}M parameters, world size {world_size}"
            f"{' (FSDP2)' if use_fsdp else ''}, {tokens_per_step} tokens/step, {total_steps} steps, "
            f"precision {accelerator.mixed_precision}",
            flush=True,
        )

    from .checkpoint.retention import KEEP_ALL, RetentionPolicy

    committer = CheckpointCommitter(
        ckpt_dir,
        KEEP_ALL if args.no_ckpt_prune else RetentionPolicy(args.ckpt_keep_last, args.ckpt_keep_milestones),
        weights_only_milestones=args.milestone_weights_only,
        weights_bf16=args.milestone_weights_bf16 and topology.node == 0,  # other nodes hold no weights
        log=lambda m: print(f"miras train: {m}", flush=True),
        on_commit=sync_hook(syncer, run_dir) if syncer is not None else None,
        gather=leaders_gather(topology) if node_local else None,
        node=topology.node,
    )
    commits_here = main_process or (node_local and topology.leader)  # this rank commits its node's folder
    pending_optimizer = []  # this rank's optimizer shard write in flight

    def wait_for_checkpoint() -> None:
        committer.wait()
        for future in pending_optimizer:
            future.result()
        pending_optimizer.clear()

    def checkpoint(milestone: bool, final: bool) -> None:
        wait_for_checkpoint()  # the next checkpoint waits for the previous one to commit
        tmp = committer.tmp_dir(step)
        if commits_here:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / layout.TRAINER_DIR).mkdir(parents=True)
        accelerator.wait_for_everyone()
        # Per-rank state first (small, synchronous): the optimizer save below is collective, so once it
        # completes on rank 0 every rank's file is on disk.
        torch.save({"rng": capture_rng(), "data": train_stream.state_dict()}, tmp / rank_state_name(rank))
        weights = full_model_state(bare_model)
        if record is not None:  # test-only: the live model's logits, to compare with the loaded checkpoint
            _record_logits(Path(record_dir), bare_model, model_config, step, main_process)
        pending_optimizer.append(save_optimizer(bare_model, bare_optimizer, tmp))
        schedule.record(training_time, milestone)
        if not main_process:
            if commits_here:  # node-local mode: this node's files; node 0's leader (rank 0) adds the rest
                committer.submit(step, milestone, lambda folder: None, wait_for=list(pending_optimizer), final=final)
                pending_optimizer.clear()
            return
        state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "training_time": training_time,
            "schedule": schedule.clock_state(),
            "world_size": world_size,
            "fsdp": use_fsdp,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "lr": args.lr,
            "total_steps": total_steps,
            "wandb_id": read_wandb_id(run_dir),
            "milestone": milestone,
        }
        scheduler_state = scheduler.state_dict()
        config = MonetaConfig.from_dict(model_config.to_dict())

        def write(folder: Path) -> None:
            save_weights(folder, weights, config, tokenizer, args.ckpt_shard_size)
            write_json(folder / TRAINER_STATE, state)
            torch.save(scheduler_state, folder / SCHEDULER_STATE)

        committer.submit(
            step,
            milestone,
            write,
            wait_for=list(pending_optimizer),
            manifest_extra={"final": final, "versions": _versions()},
            final=final,
        )
        pending_optimizer.clear()  # rank 0's committer waits for it

    stop_signals = StopSignals()
    stop_signals.install()
    flops_per_token = training_flops_per_token(num_parameters)
    peak = peak_tflops(accelerator.device, args.peak_tflops)
    window_start, window_tokens = time.perf_counter(), 0
    window_losses, window_accuracy = [], []
    nan_step = int(os.environ.get("MIRAS_TEST_NAN_AT_STEP", "0"))  # test-only: poison the loss at this step
    # Test-only: MIRAS_TEST_RECORD=DIR makes each rank write what it read and the weights it ended with.
    record_dir = os.environ.get("MIRAS_TEST_RECORD")
    record = {"rank": rank, "world_size": world_size, "rows": [], "losses": []} if record_dir else None
    finished = step >= total_steps
    stopped_by = None
    while not finished:
        started = time.perf_counter()
        step_losses = []
        for micro in range(args.grad_accum):
            batch = batch if batch is not None else train_stream.next_batch()
            if record is not None:
                record["rows"].extend(row[:16] for row in batch["input_ids"].tolist())
            inputs = {k: v.to(accelerator.device) for k, v in batch.items()}
            batch = None
            last = micro == args.grad_accum - 1
            with gradient_sync(model, accelerator, last), accelerator.autocast():
                output = model(**inputs)
                loss = output.loss / args.grad_accum
                if nan_step == step + 1:
                    loss = loss * float("nan")
            accelerator.backward(loss)
            step_losses.append(loss.detach().float() * args.grad_accum)
            if args.dataset == SYNTHETIC_RECALL:
                window_accuracy.append(recall_accuracy(output.logits.detach(), inputs["labels"]))
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip else float("inf"))
        grad_norm = as_float(grad_norm)
        step_loss = torch.stack(step_losses).mean()
        if not (math.isfinite(grad_norm) and math.isfinite(float(step_loss))):
            # Never step on (or checkpoint) a NaN/inf: `latest` keeps naming the last good checkpoint.
            # (fp16's scaler skips such steps itself.)
            if accelerator.mixed_precision != "fp16":
                logger.close()
                wait_for_checkpoint()
                close_syncer(syncer, args.sync_timeout, run_dir, node_local)
                raise TrainingStopped(
                    f"the loss ({float(step_loss)}) or gradient norm ({grad_norm}) is not finite at step {step + 1}; "
                    f"stopping without a checkpoint (latest good one: {latest_name(ckpt_dir)})",
                    EXIT_DIVERGED,
                )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_losses.append(step_loss)
        step += 1
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        training_time += time.perf_counter() - started
        logger.advance()

        # Decisions that depend on a clock are rank 0's; a signal on any rank stops all.
        (ckpt_due, milestone, out_of_time), (signalled,) = agree_flags(
            accelerator,
            [
                schedule.due(step, training_time),
                schedule.is_milestone(training_time),
                bool(args.max_time) and training_time >= args.max_time,
            ],
            [stop_signals.received is not None],
        )
        finished = step >= total_steps or out_of_time
        if step % args.log_every == 0 or finished or signalled:
            loss_value = float(accelerator.reduce(torch.stack(window_losses).mean(), reduction="mean"))
            elapsed = time.perf_counter() - window_start
            rate = window_tokens / max(elapsed, 1e-9)
            row = {
                "step": step,
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_seen": tokens_seen,
                "tokens_per_second": rate,
                "mfu": rate * flops_per_token / (peak * 1e12 * world_size) if peak else None,
                "peak_memory_bytes": peak_memory_bytes(accelerator.device),
                "elapsed": training_time,
                "recall_accuracy": sum(window_accuracy) / len(window_accuracy) if window_accuracy else None,
            }
            if syncer is not None:
                row.update({k: v for k, v in syncer.status().items() if k != "sync_last_error" or v})
            if (args.eval_every and step % args.eval_every == 0) or finished:
                if args.eval_batches and not args.dry_run:
                    row["eval_loss"] = evaluate(model, accelerator, eval_stream(), args.eval_batches)
            logger.log(row)
            if record is not None:
                record["losses"].append(loss_value)
            window_start, window_tokens, window_losses, window_accuracy = time.perf_counter(), 0, [], []
        if writes and (ckpt_due or finished or signalled):
            checkpoint(milestone, final=finished)
            fault_point("step_checkpointed")
        if signalled:
            stopped_by = stop_signals.received or "a signal on another rank"
            break

    wait_for_checkpoint()
    logger.close()
    close_syncer(syncer, args.sync_timeout, run_dir, node_local)
    accelerator.wait_for_everyone()
    if committer.last_error is not None and (finished or stopped_by):
        raise TrainingStopped(f"the final checkpoint failed: {committer.last_error}", EXIT_FAILED)
    if record is not None:
        _write_record(Path(record_dir), record, bare_model)
    if wandb_run is not None:
        wandb_run.finish()
    if main_process:
        if stopped_by:
            print(
                f"miras train: {args.run_name}: stopped by {stopped_by} at step {step}; checkpoint "
                f"{latest_name(ckpt_dir)} committed; continue with --resume auto",
                flush=True,
            )
        else:
            if writes:
                write_text_atomic(run_dir / layout.FINISHED_NAME, f"step {step}\n")
            print(f"miras train: {args.run_name}: done after {step} steps, {tokens_seen} tokens", flush=True)
    lock.release()
    accelerator.end_training()
    return 0


def _write_record(directory: Path, record: dict, model: torch.nn.Module) -> None:
    from .parallel import is_sharded

    directory.mkdir(parents=True, exist_ok=True)
    record["sharded"] = is_sharded(model)
    # Replicated (DDP): each rank's own copy, to compare ranks. Sharded: the gathered whole, on rank 0.
    if is_sharded(model):
        state = full_model_state(model)
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if state:
        torch.save({k: v.float() for k, v in state.items()}, directory / f"weights_rank{record['rank']}.pt")
    (directory / f"rank{record['rank']}.json").write_text(json.dumps(record))


@torch.no_grad()
def _record_logits(directory: Path, model, config, step: int, main: bool) -> None:
    probe = torch.arange(96).remainder(config.vocab_size).unsqueeze(0)
    was_training = model.training
    model.eval()
    logits = model(probe.to(next(model.parameters()).device)).logits.float().cpu()
    reshard(model)
    model.train(was_training)
    if main:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(logits, directory / f"logits_step{step}.pt")


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
