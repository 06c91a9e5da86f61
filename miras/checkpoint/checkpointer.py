"""The Checkpointer: the one owner of a checkpoint's whole life (torchtitan's CheckpointManager is the model).

The way out, called by the training loop:
  due(step, training_time)   rank 0's clock decides (time, steps, a retry); the loop agrees it over ranks
  save(trainer, milestone, final)
      capture  trainer.state_dict() (progress, scheduler, this rank's RNG and data position), the model's
               full weights (gathered to rank 0's CPU), the optimizer through DCP (every rank its shard)
      commit   in a background thread: step_X.tmp/, fsync, manifest.json last, rename, `latest`
      prune    the RetentionPolicy, never what `latest` names
      replicate  the Syncer uploads it to every --sync-to destination (files, manifest, then `latest`)
  close(finished)            waits for the last commit and the uploads; `finished` marks the run done
The way back, at start:
  open(resume, init_from)    lock the run folder, probe the destinations, then find -> fetch -> verify the
                             checkpoint to continue from: local, then remote, then an explicit path or URL
  restore(trainer)           optimizer, scheduler, counters, clocks, RNG and data position

A failed checkpoint (a full disk, an I/O error, on any rank) is logged in one line, its .tmp folder removed,
`latest` left on the last good one, and it is retried at the next step; the run goes on. Only
FAILURES_BEFORE_STOP failures in a row stop it (CheckpointError: exit 4 for a full disk, 1 otherwise), as
does a final checkpoint that cannot be written.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..remote_code import flattened_sources
from ..storage import StorageError, open_backend, redact
from ..storage.base import one_line
from .catalog import committed, describe, find_resumable
from .commit import CheckpointCommitter, is_disk_full, remove_stale_tmp
from .faults import fault_point
from .files import checkpoints_dir, write_text_atomic
from .latest import read_latest, write_latest
from .layout import CHECKPOINTS_DIR, FINISHED_NAME, TRAINER_DIR, checkpoint_name
from .lease import DEFAULT_TIMEOUT, LeaseHeld, owner_id
from .lock import RunLock, RunLockedError
from .manifest import verify_folder
from .remote import RUN_FILES, download_checkpoint, pull_latest, remote_candidates, run_url
from .resolve import CheckpointNotFound, FetchFailed, resolve_checkpoint
from .retention import KEEP_ALL, RetentionPolicy
from .schedule import CheckpointSchedule
from .topology import Topology
from .trainer_state import (
    SCHEDULER_STATE,
    TRAINER_STATE,
    full_model_state,
    load_optimizer,
    rank_state_name,
    read_trainer_state,
    save_optimizer,
    save_weights,
    software_versions,
    write_json,
)

FAILURES_BEFORE_STOP = 3  # checkpoints in a row that fail before the run stops rather than train unprotected
RUN_LEVEL_FILES = ("config.json", "metrics.jsonl")  # uploaded beside the checkpoints


class Checkpointable(Protocol):
    """What the Checkpointer captures and restores (torchtitan's Stateful): `state_dict()` returns
    {"progress": JSON-able counters with "step" and "training_time", "scheduler": its state_dict,
    "rank": this rank's RNG and data position}; `load_state_dict` takes the same, "rank" None when the
    world size changed. The weights come from `model` (a from_pretrained folder), the optimizer from
    `optimizer` (DCP, one shard per rank under FSDP2)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: Any

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class CheckpointSettings:
    run_dir: Path
    run_name: str
    every_seconds: float = 300.0
    every_steps: int = 0
    milestone_every_seconds: float = 3600.0
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    weights_only_milestones: bool = False
    weights_bf16: bool = False
    shard_size: int | str = "2GB"
    sync_to: list[str] = field(default_factory=list)
    storage_options: dict[str, str] = field(default_factory=dict)
    remote_retention: RetentionPolicy = KEEP_ALL
    sync_milestones_only: bool = False
    sync_timeout: float = 600.0
    sync_optional: bool = False
    takeover: bool = False  # take the destinations' leases even from a live holder
    lease_timeout: float = DEFAULT_TIMEOUT
    checkpoint_bytes: int = 0  # an estimate, for the Drive upload-cap warning
    writes: bool = True  # False for a dry run: nothing is read or written


@dataclass
class Start:
    """What open() found: a finished run, the checkpoint to resume, the weights to start a new run from."""

    finished: bool = False
    resume: Path | None = None
    init_from: Path | None = None
    trainer_state: dict[str, Any] | None = None

    @property
    def weights(self) -> Path | None:
        return self.resume or self.init_from


class StartRefused(Exception):
    """The run cannot start as asked, in one line. `kind`: "usage" (the arguments or the run folder's state),
    "storage" (a destination failed), "lease" (another machine holds the run at a destination), "disk_full"."""

    def __init__(self, message: str, kind: str = "usage"):
        super().__init__(message)
        self.kind = kind


class CheckpointError(Exception):
    """Checkpoints keep failing (or the final one did): the run stops. `disk_full` picks the exit code."""

    def __init__(self, message: str, disk_full: bool):
        super().__init__(message)
        self.disk_full = disk_full


class Checkpointer:
    def __init__(self, settings: CheckpointSettings, topology: Topology | None = None, log: Callable = print):
        self.settings, self.topology, self.log = settings, topology or Topology(), log
        flattened_sources()  # the model code every checkpoint carries, parsed here on the main thread (remote_code.py)
        t = self.topology
        self.folder = checkpoints_dir(settings.run_dir)
        s = settings
        self.schedule = CheckpointSchedule(s.every_seconds, s.every_steps, s.milestone_every_seconds)
        self.lock = RunLock(settings.run_dir)
        self.syncer = None
        self.start = Start()
        self.committer = CheckpointCommitter(
            self.folder,
            settings.retention,
            weights_only_milestones=settings.weights_only_milestones,
            weights_bf16=settings.weights_bf16 and t.node == 0,  # other nodes hold no weights
            log=log,
            on_commit=self._replicate,
            gather=t.gather_leaders if t.node_local else None,
            node=t.node,
        )
        self._pending: list[Future] = []  # this rank's optimizer write in flight (ranks that do not commit)
        self._failures = 0  # checkpoints in a row that failed (agreed on every rank)
        self._disk_full = 0  # of those, for a full disk
        self._retry_pending = False  # a checkpoint failed: the next step saves again
        self._retry_milestone = False  # a failed milestone: its retry is a milestone too
        self._final_failure: tuple[str, bool] | None = None  # (message, disk full)

    # -- the way back -------------------------------------------------------------------------------------
    def open(self, resume: str | None = None, init_from: str | None = None) -> Start:
        """Lock, probe the destinations, then find, fetch and verify what to start from (collective)."""
        decision: dict[str, Any] = {"error": None, "kind": "usage", "resume": None, "finished": False}
        if self.settings.writes:
            decision = self._open_node_local(resume) if self.topology.node_local else self._open_shared(resume)
        if decision["error"] or decision["finished"]:
            self._release()
        if decision["error"]:
            raise StartRefused(decision["error"], decision["kind"])
        start = Start(finished=decision["finished"], resume=Path(decision["resume"]) if decision["resume"] else None)
        if start.finished:
            return start
        if init_from:
            start.init_from = Path(self._on_every_node(lambda: str(self._init_from(init_from))))
        if start.resume is not None:
            start.trainer_state = read_trainer_state(start.resume)
            if self.syncer is not None and not self.topology.node_local:  # the remote catches up if it missed it
                info = describe(start.resume)
                self.syncer.submit_checkpoint(start.resume, info.step, info.milestone)
        self.start = start
        return start

    def restore(self, trainer: Checkpointable) -> None:
        """Load the checkpoint open() chose into `trainer` (collective under DCP); nothing for a fresh start."""
        folder, saved = self.start.resume, self.start.trainer_state
        if folder is None or saved is None:
            return
        load_optimizer(trainer.model, trainer.optimizer, folder)
        self.schedule.load_clock_state(saved.get("schedule", {}))
        rank_file = folder / rank_state_name(self.topology.rank)
        same_world = saved.get("world_size") == self.topology.world_size
        trainer.load_state_dict({
            "progress": saved,
            "scheduler": torch.load(folder / SCHEDULER_STATE, weights_only=False),
            "rank": torch.load(rank_file, weights_only=False) if same_world else None,
        })  # fmt: skip

    # -- the way out --------------------------------------------------------------------------------------
    def due(self, step: int, training_time: float) -> tuple[bool, bool]:
        """(save now, as a milestone) by this rank's clock: the loop takes rank 0's answer for every rank."""
        retry = self._retry_pending or self.committer.failed()
        milestone = self.schedule.is_milestone(training_time) or self._retry_milestone
        return bool(self.settings.writes and (retry or self.schedule.due(step, training_time))), milestone

    def save(self, trainer: Checkpointable, milestone: bool, final: bool = False) -> None:
        """Capture this step's state and hand the commit to the background (collective: every rank calls it)."""
        if not self.settings.writes:
            return
        t = self.topology
        self._settle()
        state = trainer.state_dict()
        progress = state["progress"]
        step = int(progress["step"])
        tmp = self.committer.tmp_dir(step)
        problem = self._attempt(lambda: self._prepare(tmp)) if t.commits_here else None
        # Every rank learns rank 0's count of failures in a row, and waits here until the folder exists.
        reports = t.gather((problem, self._failures, self._disk_full, self._final_failure))
        self._failures, self._disk_full, self._final_failure = reports[0][1:]
        try:
            self._stop_if_failing()
        except CheckpointError:
            if t.commits_here:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not self._agreed(reports, step, milestone, final, tmp):
            return
        problem = self._attempt(lambda: self._write_rank_state(tmp, state["rank"]))
        if not self._agreed(t.gather((problem,)), step, milestone, final, tmp):
            return
        self._retry_pending = False  # this attempt is the retry
        weights = full_model_state(trainer.model)  # rank 0's CPU copy (a collective under FSDP2)
        optimizer_written = save_optimizer(trainer.model, trainer.optimizer, tmp)  # collective; writes go on
        fault_point("optimizer_save_started")
        self.schedule.record(float(progress["training_time"]), milestone)
        self._retry_milestone = self._retry_milestone and not milestone
        if t.commits_here:
            write = self._writer(trainer, weights, state, milestone) if t.main else (lambda folder: None)
            extra = {"final": final, "versions": software_versions()} if t.main else None
            self.committer.submit(step, milestone, write, wait_for=[optimizer_written], manifest_extra=extra,
                                  final=final)  # fmt: skip
        else:
            self._pending.append(optimizer_written)
        fault_point("step_checkpointed")

    def close(self, finished: bool = False) -> None:
        """Wait for the last commit and the uploads, release the run; `finished` writes the end marker.
        CheckpointError (on every rank) when the final checkpoint could not be written."""
        if not self.settings.writes:
            return
        self._settle()
        failure = self.topology.from_main(self._final_failure)
        if finished and failure is None and self.topology.main:
            write_text_atomic(self.settings.run_dir / FINISHED_NAME, f"{self.latest_name()}\n")
        self._close_syncer()
        self._release()
        if failure is not None:
            raise CheckpointError(*failure)

    def wait(self) -> None:
        """Block until the checkpoint in flight is committed (or failed, which is booked and logged)."""
        self._settle()

    def latest_name(self) -> str:
        return read_latest(self.folder) or "none"

    def status(self) -> dict[str, Any]:
        """The uploads' state for the metrics row (empty without --sync-to)."""
        if self.syncer is None:
            return {}
        return {k: v for k, v in self.syncer.status().items() if k != "sync_last_error" or v}

    # -- saving, step by step -----------------------------------------------------------------------------
    def _settle(self) -> None:
        """Wait for the previous commit (and this rank's optimizer write); count its outcome."""
        for future in self._pending:
            try:
                future.result()
            except Exception:  # the committing rank sees the same failure and reports it
                pass
        self._pending.clear()
        if self.topology.commits_here:
            outcome = self.committer.wait()
            if outcome is not None:
                self._count(outcome.step, outcome.milestone, outcome.final, outcome.error)

    @staticmethod
    def _attempt(work: Callable[[], None]) -> str | None:
        try:
            work()
            return None
        except OSError as error:
            return f"{one_line(error)}{' [disk full]' if is_disk_full(error) else ''}"

    def _prepare(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / TRAINER_DIR).mkdir(parents=True)
        fault_point("tmp_prepared")

    def _write_rank_state(self, tmp: Path, rank_state: dict[str, Any]) -> None:
        torch.save(rank_state, tmp / rank_state_name(self.topology.rank))
        fault_point("rank_state_written")

    def _agreed(self, reports: list, step: int, milestone: bool, final: bool, tmp: Path) -> bool:
        """Whether every rank's part so far worked; if not, the attempt is dropped on every rank."""
        problems = [(rank, report[0]) for rank, report in enumerate(reports) if report[0]]
        if not problems:
            return True
        rank, problem = problems[0]
        error = OSError(problem.removesuffix(" [disk full]"))
        if self.topology.commits_here:
            shutil.rmtree(tmp, ignore_errors=True)
        self._count(step, milestone, final, error, disk_full=problem.endswith("[disk full]"), rank=rank)
        self._stop_if_failing()
        return False

    def _count(self, step: int, milestone: bool, final: bool, error: BaseException | None, disk_full=None,
               rank: int | None = None) -> None:  # fmt: skip
        """Book one checkpoint's outcome; a failure is logged once, in one line."""
        if error is None:
            self._failures = self._disk_full = 0
            return
        full = is_disk_full(error) if disk_full is None else disk_full
        self._failures += 1
        self._disk_full = self._disk_full + 1 if full else 0
        self._retry_pending = True
        self._retry_milestone = self._retry_milestone or milestone
        name = checkpoint_name(step)
        where = f" on rank {rank}" if rank is not None and self.topology.world_size > 1 else ""
        why = f"the disk is full{where} ({self._free_space()})" if full else f"{one_line(error)}{where}"
        latest = read_latest(self.folder)
        kept = f"{latest} stays the newest checkpoint" if latest else "there is no checkpoint yet"
        if final:
            self._final_failure = (f"the final checkpoint {name} was not saved: {why}; {kept}", full)
        if self.topology.main:
            then = "" if final else "; retrying at the next step"
            self.log(f"warning: checkpoint {name} was not saved: {why}; removed {name}.tmp; {kept}{then}")

    def _stop_if_failing(self) -> None:
        if self._failures < FAILURES_BEFORE_STOP:
            return
        latest = self.latest_name()
        if self._disk_full >= FAILURES_BEFORE_STOP:
            raise CheckpointError(
                f"{self._failures} checkpoints in a row were not saved because the disk is full "
                f"({self._free_space()}); the newest checkpoint is {latest}. Free space or keep fewer checkpoints "
                "(--ckpt-keep-last, --ckpt-keep-milestones), then start again with --resume auto",
                disk_full=True,
            )
        raise CheckpointError(f"{self._failures} checkpoints in a row failed; the newest checkpoint is {latest}",
                              disk_full=False)  # fmt: skip

    def _free_space(self) -> str:
        try:
            usage = shutil.disk_usage(self.folder)
            return f"{usage.free / 1e9:.2f} GB free of {usage.total / 1e9:.1f} GB on {self.folder}"
        except OSError:
            return f"{self.folder}"

    def _writer(self, trainer: Checkpointable, weights: dict, state: dict, milestone: bool) -> Callable[[Path], None]:
        """Rank 0's files of one checkpoint, written by the commit thread from copies taken now."""
        config = type(trainer.model.config).from_dict(trainer.model.config.to_dict())
        trainer_state = {**state["progress"], "schedule": self.schedule.clock_state(),
                         "world_size": self.topology.world_size, "milestone": milestone}  # fmt: skip
        tokenizer, shard_size, scheduler = trainer.tokenizer, self.settings.shard_size, state["scheduler"]

        def write(folder: Path) -> None:
            save_weights(folder, weights, config, tokenizer, shard_size)
            write_json(folder / TRAINER_STATE, trainer_state)
            torch.save(scheduler, folder / SCHEDULER_STATE)

        return write

    def _replicate(self, folder: Path, step: int, milestone: bool, final: bool) -> None:
        """After each commit (commit thread): the checkpoint and the run's files go to every destination."""
        if self.syncer is None:
            return
        self.syncer.submit_checkpoint(folder, step, milestone, final=final)
        for name in RUN_LEVEL_FILES:
            if (self.settings.run_dir / name).exists():
                self.syncer.submit_file(self.settings.run_dir / name)

    # -- starting: find, fetch, verify --------------------------------------------------------------------
    def _open_shared(self, resume: str | None) -> dict[str, Any]:
        """One committer (rank 0) decides for every rank."""
        decision: dict[str, Any] = {"error": None, "kind": "usage", "resume": None, "finished": False}
        if self.topology.main:
            if resume == "auto" and (self.settings.run_dir / FINISHED_NAME).exists():
                decision["finished"] = True
            else:
                try:
                    self.syncer = self._start_syncer()
                    self.lock.acquire()
                    self._hold_leases()
                    remove_stale_tmp(self.folder)
                    found = self._find(resume)
                    decision["resume"] = str(found) if found else None
                except (RunLockedError, StartRefused, OSError) as error:
                    decision["error"], decision["kind"] = refusal(error)
        return self.topology.from_main(decision)

    def _find(self, resume: str | None) -> Path | None:
        if resume == "auto":
            found = find_resumable(self.folder, warn=lambda message: self.log(f"warning: {message}"))
            return found if found is not None else self._pull_remote()
        if resume:
            return self._explicit(resume)
        newest = committed(self.folder)
        if newest:
            raise StartRefused(
                f"run folder {self.settings.run_dir} already has checkpoints (newest {newest[-1].name}): pass "
                "--resume auto to continue it, or choose another --run-name"
            )
        return None

    def _explicit(self, source: str) -> Path:
        """--resume PATH|URL: the checkpoint it names, downloaded (remote) and verified, with its trainer state."""
        try:
            path = resolve_checkpoint(source, self.folder, self.settings.storage_options)
        except CheckpointNotFound as error:
            raise StartRefused(f"--resume {source!r}: {error}") from None
        except FetchFailed as error:
            raise StartRefused(f"--resume: {error}", "storage") from None
        check_resumable(path, source)
        return path

    def _init_from(self, source: str) -> Path:
        """--init-from PATH|URL: weights for a new run (a remote one lands in RUN/init_from/), verified."""
        try:
            path = resolve_checkpoint(source, self.settings.run_dir / "init_from", self.settings.storage_options)
        except CheckpointNotFound as error:
            raise StartRefused(f"--init-from {source!r}: {error}") from None
        except FetchFailed as error:
            raise StartRefused(f"--init-from: {error}", "storage") from None
        problems = verify_folder(path) if (path / "manifest.json").exists() else []
        if problems:
            raise StartRefused(f"--init-from {source!r} is not a valid checkpoint: {problems[0]}")
        return path

    def _pull_remote(self) -> Path | None:
        """A fresh instance: the newest valid checkpoint of the remote copy, downloaded and verified."""
        for url in self.settings.sync_to:
            where = redact(run_url(url, self.settings.run_name), self.settings.storage_options)
            try:
                found = pull_latest(run_url(url, self.settings.run_name), self.settings.run_dir,
                                    self.settings.storage_options)  # fmt: skip
            except Exception as error:  # StorageError or a backend's own: the next destination may have it
                self.log(f"warning: could not read {where}: {redact(one_line(error), self.settings.storage_options)}")
                continue
            if found is not None:
                self.log(f"pulled {found.name} from {where} (verified)")
                return found
        return None

    def _start_syncer(self, node: int | None = None):
        """The uploader for --sync-to, after a probe of every destination (a bad one stops the start)."""
        s = self.settings
        if not s.sync_to:
            return None
        from .sync import Syncer, drive_cap_warning, estimated_daily_bytes

        try:
            syncer = Syncer(s.sync_to, s.run_name, s.run_dir, s.storage_options, retention=s.remote_retention,
                            milestones_only=s.sync_milestones_only, node=node,
                            max_retries=None if node is not None else 10)  # fmt: skip
        except StorageError as error:
            raise StartRefused(f"--sync-to: {error}") from None
        try:
            syncer.probe()
        except StorageError as error:
            if not s.sync_optional:
                syncer.close(0)
                raise StartRefused(f"{error} (pass --sync-optional to train anyway)") from None
            self.log(f"warning: {error}; training anyway (--sync-optional), uploads will be retried")
        interval = s.milestone_every_seconds if s.sync_milestones_only else s.every_seconds
        if interval and s.checkpoint_bytes:
            warning = drive_cap_warning(syncer.destinations, estimated_daily_bytes(s.checkpoint_bytes, interval))
            if warning:
                self.log(f"warning: {warning}")
        shown = ", ".join(redact(url, s.storage_options) for url in syncer.destinations)
        self.log(f"syncing to {shown} (under <url>/{s.run_name}/)")
        return syncer

    def _hold_leases(self) -> None:
        """The run's lease at every destination (the run's committer, rank 0, holds them for every node)."""
        if self.syncer is None or not self.topology.main:
            return
        s = self.settings
        try:
            notes = self.syncer.hold_leases(owner_id(s.run_dir), s.takeover, s.lease_timeout)
        except LeaseHeld as error:
            raise StartRefused(f"--sync-to: {error}", "lease") from None
        except StorageError as error:
            if not s.sync_optional:
                raise StartRefused(f"{error} (pass --sync-optional to train anyway)") from None
            self.log(f"warning: {error}; training anyway (--sync-optional) without the lease")
            return
        for note in notes:
            self.log(f"note: {note}")

    def _close_syncer(self) -> None:
        if self.syncer is None:
            return
        for name in RUN_LEVEL_FILES:
            if (self.settings.run_dir / name).exists():
                self.syncer.submit_file(self.settings.run_dir / name)
        timeout = self.settings.sync_timeout
        done = self.syncer.close(timeout)
        if done:
            self.log(f"sync: every upload is done ({self.syncer.status()['sync_uploaded']} uploaded)")
        elif self.topology.node_local:
            self.log(f"warning: sync: this node's uploads did not finish within --sync-timeout {timeout:g}s: "
                     f"{self.syncer.unfinished()}; with node-local disks a checkpoint is complete only remotely, so "
                     "the next start with --resume auto continues from the newest complete remote checkpoint")
        else:
            self.log(f"warning: sync: uploads did not finish within --sync-timeout {timeout:g}s: "
                     f"{self.syncer.unfinished()}; the local checkpoints are intact and the next start with --resume "
                     "auto uploads them again")  # fmt: skip
        self.syncer = None

    def _release(self) -> None:
        self.lock.release()
        if self.syncer is not None:
            self.syncer.close(0)
            self.syncer = None

    # -- starting with node-local disks (several nodes, each its own run folder) ---------------------------
    def _open_node_local(self, resume: str | None) -> dict[str, Any]:
        """Every leader probes its destinations, locks its folder and clears stale tmp folders; then the
        checkpoint to resume, on every node (collective)."""
        t = self.topology
        mine: dict[str, Any] = {"error": None, "finished": False, "newest": None}
        if t.leader:
            if t.main and resume == "auto" and (self.settings.run_dir / FINISHED_NAME).exists():
                mine["finished"] = True
            else:
                try:
                    self.syncer = self._start_syncer(node=t.node)
                    self.lock.acquire()
                    self._hold_leases()
                    remove_stale_tmp(self.folder)
                    found = committed(self.folder)
                    mine["newest"] = found[-1].name if found else None
                except (RunLockedError, StartRefused, OSError) as error:
                    message, mine["kind"] = refusal(error)
                    mine["error"] = self._on_node(message)
        states = t.gather(mine)
        decision: dict[str, Any] = {"error": None, "kind": "usage", "resume": None, "finished": states[0]["finished"]}
        errors = [(state["error"], state.get("kind", "usage")) for state in states if state["error"]]
        if errors or decision["finished"]:
            decision["error"], decision["kind"] = errors[0] if errors else (None, "usage")
            return decision
        try:
            if resume == "auto":
                decision["resume"] = self._resume_from_remote()
            elif resume:
                decision["resume"] = self._on_every_node(lambda: str(self._explicit(resume)))
            else:
                newest = [(node, states[rank]["newest"]) for node, rank in enumerate(t.leaders)]
                newest = [(node, name) for node, name in newest if name]
                if newest:
                    node, name = newest[0]
                    where = f" on node {node}" if node else ""
                    decision["error"] = (
                        f"run folder {self.settings.run_dir} already has checkpoints (newest {name}{where}): pass "
                        "--resume auto to continue it, or choose another --run-name"
                    )
        except StartRefused as error:
            decision["error"], decision["kind"] = str(error), error.kind
        return decision

    def _on_node(self, error: Exception | str) -> str:
        return f"node {self.topology.node}: {error}" if self.topology.node else str(error)

    def _on_every_node(self, work: Callable[[], Any]) -> Any:
        """`work()` on rank 0, or in node-local mode on each node's leader (collective): the first failure is
        raised on every rank, else rank 0's result is returned on every rank."""
        t = self.topology
        result, error, kind = None, None, "usage"
        if t.main or (t.node_local and t.leader):
            try:
                result = work()
            except StartRefused as err:
                error, kind = self._on_node(err), err.kind
            except Exception as err:  # the others must hear of it, or they would wait in the gather below
                error, kind = self._on_node(one_line(err)), "storage"
        results = t.gather((result, error, kind))
        failed = [(error, kind) for _, error, kind in results if error]
        if failed:
            raise StartRefused(*failed[0])
        return results[0][0]

    def _resume_from_remote(self) -> str | None:
        """--resume auto with node-local disks: the newest remote checkpoint that every node's leader
        downloads and verifies (a node's own files already here with the right sha256 are kept)."""
        t, s = self.topology, self.settings
        candidates = t.from_main(self._remote_candidates() if t.main else None)
        for url, name in candidates:
            ok, reason = True, None
            if t.leader:
                try:
                    self._fetch_remote(url, name, run_files=t.main)
                except Exception as error:  # StorageError or a backend's own: this candidate is out
                    ok, reason = False, redact(one_line(error), s.storage_options)
            results = t.gather((ok, reason))
            if all(ok for ok, _ in results):
                if t.main:
                    self.log(f"pulled {name} from {redact(url, s.storage_options)} onto every node (verified)")
                return str(self.folder / name)
            if t.main:
                failed = [f"node {node}: {results[rank][1]}" for node, rank in enumerate(t.leaders)
                          if not results[rank][0]]  # fmt: skip
                self.log(f"warning: skipping remote {name}: {'; '.join(failed)}")
        return None

    def _remote_candidates(self) -> list[tuple[str, str]]:
        """(destination, checkpoint name) of every complete remote checkpoint, in the order resume tries them."""
        found, options = [], self.settings.storage_options
        for url in self.settings.sync_to:
            where = run_url(url, self.settings.run_name)
            try:
                found += [(url, name) for name in remote_candidates(open_backend(where, options))]
            except Exception as error:  # StorageError or a backend's own: the next destination may have some
                self.log(f"warning: could not read {redact(where, options)}: {redact(one_line(error), options)}")
        return found

    def _fetch_remote(self, url: str, name: str, run_files: bool) -> Path:
        """One remote checkpoint into this node's run folder, verified, `latest` pointed at it; with
        `run_files`, metrics.jsonl too when it is missing here."""
        backend = open_backend(run_url(url, self.settings.run_name), self.settings.storage_options)
        path = download_checkpoint(backend, f"{CHECKPOINTS_DIR}/{name}", self.folder / name, reuse_local=True)
        write_latest(self.folder, name)
        for run_file in RUN_FILES if run_files else ():
            if not (self.settings.run_dir / run_file).exists():
                try:
                    backend.get(run_file, self.settings.run_dir / run_file)
                except FileNotFoundError:
                    pass
        return path


def refusal(error: Exception) -> tuple[str, str]:
    """(message, StartRefused kind) for what stopped a start on the committing rank."""
    if isinstance(error, StartRefused):
        return str(error), error.kind
    if isinstance(error, OSError) and not isinstance(error, RunLockedError):
        if is_disk_full(error):
            return f"cannot write the run folder, the disk is full: {one_line(error)}", "disk_full"
        return f"cannot write the run folder: {one_line(error)}", "usage"
    return str(error), "usage"


def check_resumable(path: Path, source: str) -> None:
    """A checkpoint to resume must verify against its manifest and hold the trainer state."""
    problems = verify_folder(path)
    if problems:
        raise StartRefused(f"--resume {source!r} is not a valid checkpoint: {problems[0]}")
    if not (path / TRAINER_STATE).is_file():
        raise StartRefused(f"--resume {source!r} holds weights only (use --init-from to start a new run from it)")


__all__ = ["Checkpointable", "CheckpointError", "CheckpointSettings", "Checkpointer", "Start", "StartRefused"]
