"""The background commit: write into step_XXXXXXXX.tmp/, fsync, manifest last, rename, point `latest`.

The training loop hands over state that is already a CPU copy and goes on; one commit runs at a time
(the next checkpoint waits for the previous one). A commit that fails (a full disk, an I/O error) removes
its .tmp folder, leaves `latest` on the last good checkpoint and reports a CommitOutcome; the Checkpointer
decides what follows. Points of the protocol carry fault hooks so tests can kill the process exactly there.

Multi-node with node-local disks: every node's committer commits its own node's folder. `gather` exchanges
each node's file list (or its failure) between the nodes, so each writes the same manifest listing every
file of every node (under "nodes", which node holds which); if any node failed, no node commits.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .faults import fault_point
from .files import fsync_path, fsync_tree
from .latest import write_latest
from .layout import TMP_SUFFIX, checkpoint_name
from .manifest import NODES_KEY, build_manifest, file_entries, now_utc, write_manifest
from .retention import KEEP_ALL, RetentionPolicy, prune, recover_interrupted_swap


@dataclass
class CommitOutcome:
    step: int
    milestone: bool
    final: bool
    error: BaseException | None = None  # None: committed

    @property
    def disk_full(self) -> bool:
        return is_disk_full(self.error)


def is_disk_full(error: BaseException | None) -> bool:
    """Whether a failure comes from a full disk or quota, looking through causes and DCP's per-rank failures."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(current):
            return True
        failures = getattr(current, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [current.__cause__, current.__context__]
    return False


class CheckpointCommitter:
    def __init__(
        self,
        folder: Path,
        retention: RetentionPolicy = KEEP_ALL,
        weights_only_milestones: bool = False,
        log: Callable[[str], None] = print,
        weights_bf16: bool = False,
        on_commit: Callable[[Path, int, bool, bool], None] | None = None,
        gather: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None,
        node: int = 0,
    ):
        self.folder = Path(folder)
        self.retention, self.weights_only_milestones = retention, weights_only_milestones
        self.log, self.on_commit, self.weights_bf16 = log, on_commit, weights_bf16
        self.gather, self.node = gather, node  # node-local multi-node commits (see the module docstring)
        self._thread: threading.Thread | None = None
        self._outcome: CommitOutcome | None = None
        self.last_committed: Path | None = None
        self.last_commit_seconds = 0.0

    def tmp_dir(self, step: int) -> Path:
        return self.folder / (checkpoint_name(step) + TMP_SUFFIX)

    def wait(self) -> CommitOutcome | None:
        """Block until the commit in flight (if any) has finished; its outcome, once (None when none was left)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        outcome, self._outcome = self._outcome, None
        return outcome

    def failed(self) -> bool:
        """Without waiting: whether the last commit finished and failed (its outcome is still to be taken)."""
        thread, outcome = self._thread, self._outcome
        return (thread is None or not thread.is_alive()) and outcome is not None and outcome.error is not None

    def submit(
        self,
        step: int,
        milestone: bool,
        write: Callable[[Path], None],
        wait_for: Iterable[Future] = (),
        manifest_extra: dict[str, Any] | None = None,
        final: bool = False,
        background: bool = True,
    ) -> None:
        """Commit checkpoint `step`: `write(tmp_dir)` writes this process's files, `wait_for` are other
        writers (e.g. the sharded optimizer save of every rank) that must finish before the manifest. The
        previous commit's outcome, if not taken yet, is dropped: take it with wait() first."""
        self.wait()
        args = (step, milestone, write, list(wait_for), manifest_extra or {}, final)
        if background:
            self._thread = threading.Thread(target=self._run, args=args, name=f"miras-commit-{step}", daemon=True)
            self._thread.start()
        else:
            self._run(*args)

    def _run(self, step, milestone, write, wait_for, manifest_extra, final) -> None:
        started = time.perf_counter()
        tmp, final_dir = self.tmp_dir(step), self.folder / checkpoint_name(step)
        try:
            if self.gather is None:
                self._write_files(tmp, write, wait_for)
                manifest = build_manifest(tmp, step, milestone, manifest_extra)
            else:
                manifest = self._gathered_manifest(tmp, step, milestone, write, wait_for, manifest_extra)
            fault_point("before_manifest")
            write_manifest(tmp, manifest)
            fault_point("before_rename")
            if final_dir.exists():  # the same step saved again (e.g. a finished run restarted): replace it
                shutil.rmtree(final_dir)
            os.replace(tmp, final_dir)
            fsync_path(self.folder)
            fault_point("before_latest")
            write_latest(self.folder, final_dir.name)
            fault_point("after_commit")
            self.last_committed = final_dir
            self.last_commit_seconds = time.perf_counter() - started
        except BaseException as error:  # the Checkpointer reports it; training goes on and the next one retries
            for future in wait_for:  # nothing may still write into the folder removed below
                try:
                    future.result()
                except BaseException:
                    pass
            shutil.rmtree(tmp, ignore_errors=True)
            self._outcome = CommitOutcome(step, milestone, final, error)
            return
        self._outcome = CommitOutcome(step, milestone, final)
        if not self.retention.keeps_all:
            prune(self.folder, self.retention, self.weights_only_milestones, self.log, weights_bf16=self.weights_bf16)
        if self.on_commit is not None:
            try:
                self.on_commit(final_dir, step, milestone, final)
            except Exception as error:  # a sync hand-off must never break the commit
                self.log(f"warning: after-commit hook failed for {final_dir.name}: {error}")

    @staticmethod
    def _write_files(tmp: Path, write: Callable[[Path], None], wait_for: list[Future]) -> None:
        write(tmp)
        fault_point("files_written")
        for future in wait_for:
            future.result()
        fsync_tree(tmp)

    def _gathered_manifest(self, tmp, step, milestone, write, wait_for, manifest_extra) -> dict[str, Any]:
        mine: dict[str, Any] = {"node": self.node, "files": None, "error": None}
        try:
            self._write_files(tmp, write, wait_for)
            mine["files"] = file_entries(tmp)
        except Exception as error:
            mine["error"] = f"{type(error).__name__}: {error}"
        if self.node == 0:
            mine.update(extra=manifest_extra, created=now_utc())
        parts = {int(part["node"]): part for part in self.gather(mine)}  # collective: every node, failed or not
        failed = [f"node {node}: {parts[node]['error']}" for node in sorted(parts) if parts[node]["error"]]
        if failed:
            raise RuntimeError("; ".join(failed))
        files: dict[str, Any] = {}
        for node in sorted(parts):
            for name, entry in parts[node]["files"].items():
                if name in files:
                    raise RuntimeError(f"{name} was written on two nodes (one is node {node})")
                files[name] = entry
        nodes = {str(node): sorted(parts[node]["files"]) for node in sorted(parts)}
        extra = {**(parts[0].get("extra") or {}), NODES_KEY: nodes}
        return build_manifest(None, step, milestone, extra, files=files, created=parts[0]["created"])


def remove_stale_tmp(folder: Path) -> None:
    """Half-written step_*.tmp folders of a dead process (the run lock says no one else is writing)."""
    recover_interrupted_swap(folder)
    for path in Path(folder).glob("step_*" + TMP_SUFFIX):
        shutil.rmtree(path, ignore_errors=True)
