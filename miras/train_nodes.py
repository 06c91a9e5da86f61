"""Multi-node runs: is the run folder shared by every node, and node-local checkpoints when it is not.

With a run folder every node shares (NFS, a cluster filesystem) nothing changes: global rank 0 commits,
uploads and resumes for every rank. With node-local disks (Vast.ai: each machine its own disk) each node's
local rank 0, its *leader*, commits its node's folder (every rank writes its own `trainer/rank_*.pt` and DCP
shard there), uploads it with a Syncer of its own and downloads the checkpoint to resume from. A
checkpoint is then complete only at the `--sync-to` destination, where node 0 publishes the manifest and
`latest` once every node has confirmed its files (miras.storage.sync).

Object collectives run on gloo groups: at startup on the checkpoint group, from the main thread; in the
commit threads on a group of the leaders alone. Never on the training group from a background thread.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import layout
from .checkpoint.catalog import committed
from .checkpoint.commit import remove_stale_tmp
from .checkpoint.files import checkpoints_dir
from .checkpoint.lock import RunLock, RunLockedError
from .train_checks import TrainingStopped
from .train_sync import download_explicit, fetch_remote_checkpoint, is_url, remote_candidates, start_syncer


@dataclass
class Topology:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node: int = 0
    nodes: int = 1
    leaders: list[int] = field(default_factory=lambda: [0])  # global rank of each node's leader, by node
    node_local: bool = False  # several nodes, run folder not shared
    leaders_group: Any = None  # gloo group of the leaders (node-local mode)

    @property
    def leader(self) -> bool:
        return self.rank in self.leaders


def gather_object(value: Any) -> list[Any]:
    """Every rank's `value`, by rank, over the gloo checkpoint group (main thread only)."""
    import torch.distributed as dist

    from .checkpoint.trainer_state import checkpoint_process_group

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=checkpoint_process_group())
    return out


def detect_topology(accelerator) -> Topology:
    """Ranks, nodes and each node's leader. A node is torchrun's GROUP_RANK (`accelerate launch` runs
    torchrun's agent too), else rank // LOCAL_WORLD_SIZE."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        return Topology()
    local_rank = accelerator.local_process_index
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    node = int(os.environ.get("GROUP_RANK") or rank // max(1, local_world))
    everyone = gather_object((node, local_rank, rank))
    node_ids = sorted({n for n, _, _ in everyone})
    leaders = [min((lr, r) for n, lr, r in everyone if n == node_id)[1] for node_id in node_ids]
    return Topology(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        node=node_ids.index(node),
        nodes=len(node_ids),
        leaders=leaders,
    )


def probe_shared(run_dir: Path, topology: Topology) -> bool:
    """Global rank 0 writes a file with a random (never looked-up, so never negatively cached) name into the
    run folder; each node's leader looks for it. The probe and any folder made for it are removed."""
    name, error, created = None, None, []
    if topology.rank == 0:
        try:
            for folder in reversed([run_dir, *run_dir.parents]):
                if not folder.exists():
                    folder.mkdir()
                    created.append(folder)
            name = f".miras-shared-probe-{uuid.uuid4().hex}"
            (run_dir / name).write_text(f"written by global rank 0 on {socket.gethostname()}\n")
        except OSError as err:
            error = f"cannot write into the run folder {run_dir}: {err}"
    name, error = gather_object((name, error))[0]
    if error:
        raise TrainingStopped(error)
    seen = gather_object((run_dir / name).is_file() if topology.leader else True)
    if topology.rank == 0:
        (run_dir / name).unlink(missing_ok=True)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break
    return all(seen)


def setup_nodes(args, run_dir: Path, topology: Topology, writes: bool) -> None:
    """On several nodes: shared run folder, or node-local mode (one line says which). Collective."""
    if topology.nodes <= 1 or not writes:
        return
    import torch.distributed as dist

    topology.node_local = not probe_shared(run_dir, topology)
    if topology.rank == 0:
        if topology.node_local:
            what = "not shared: node-local mode, each node commits and uploads its own files"
        else:
            what = "shared by every node: global rank 0 commits and uploads"
        print(f"miras train: {topology.nodes} nodes; run folder {run_dir} {what}", flush=True)
    if topology.node_local and not args.sync_to:
        raise TrainingStopped(
            f"the run folder {run_dir} is on each node's own disk ({topology.nodes} nodes), so a checkpoint is "
            "complete only at a --sync-to destination: put --output-dir on a filesystem every node shares, or "
            "pass --sync-to URL"
        )
    if topology.node_local:
        topology.leaders_group = dist.new_group(ranks=topology.leaders, backend="gloo")


def leaders_gather(topology: Topology):
    """The committer's exchange of file lists between node leaders (called from its commit thread)."""

    def gather(mine: dict) -> list[dict]:
        import torch.distributed as dist

        out: list[Any] = [None] * len(topology.leaders)
        dist.all_gather_object(out, mine, group=topology.leaders_group)
        return out

    return gather


def _on_node(topology: Topology, error: Exception | str) -> str:
    return f"node {topology.node}: {error}" if topology.node else str(error)


def on_every_node(topology: Topology, work) -> Any:
    """`work()` on each node's leader (collective); the first node's TrainingStopped is raised on every rank,
    else node 0's result is returned on every rank."""
    from .storage.base import one_line

    result, error = None, None
    if topology.leader:
        try:
            result = work()
        except TrainingStopped as err:
            error = _on_node(topology, err)
        except Exception as err:  # the other nodes must hear of it, or they would wait in the gather below
            error = _on_node(topology, one_line(err))
    results = gather_object((result, error))
    errors = [error for _, error in results if error]
    if errors:
        raise TrainingStopped(errors[0])
    return results[0][0]


def start_node_local(args, run_dir: Path, topology: Topology, lock: RunLock):
    """Node-local mode's start (collective): every leader probes its destinations, takes its folder's lock
    and clears stale tmp folders; then the checkpoint to resume from, on every node. Returns (decision,
    this node's Syncer or None)."""
    ckpt_dir = checkpoints_dir(run_dir)
    mine: dict[str, Any] = {"error": None, "finished": False, "newest": None}
    syncer = None
    if topology.leader:
        if topology.rank == 0 and args.resume == "auto" and (run_dir / layout.FINISHED_NAME).exists():
            mine["finished"] = True
        else:
            try:
                syncer = start_syncer(args, run_dir, node=topology.node)
                lock.acquire()
                remove_stale_tmp(ckpt_dir)
                found = committed(ckpt_dir)
                mine["newest"] = found[-1].name if found else None
            except (RunLockedError, TrainingStopped, OSError) as error:
                mine["error"] = _on_node(topology, error)
    states = gather_object(mine)
    decision: dict[str, Any] = {"error": None, "resume": None, "finished": states[0]["finished"]}
    errors = [state["error"] for state in states if state["error"]]
    if errors or decision["finished"]:
        decision["error"] = errors[0] if errors else None
        return decision, syncer
    if args.resume == "auto":
        decision["resume"] = resume_from_remote(args, run_dir, topology)
    elif args.resume and is_url(args.resume):
        try:
            work = lambda: str(download_explicit(args.resume, ckpt_dir, args, reuse_local=True))  # noqa: E731
            decision["resume"] = on_every_node(topology, work)
        except TrainingStopped as error:
            decision["error"] = str(error)
    elif args.resume:
        decision["resume"] = args.resume
    else:
        newest = [(node, states[rank]["newest"]) for node, rank in enumerate(topology.leaders)]
        newest = [(node, name) for node, name in newest if name]
        if newest:
            node, name = newest[0]
            where = f" on node {node}" if node else ""
            decision["error"] = (
                f"run folder {run_dir} already has checkpoints (newest {name}{where}): pass --resume auto to "
                "continue it, or choose another --run-name"
            )
    return decision, syncer


def resume_from_remote(args, run_dir: Path, topology: Topology) -> str | None:
    """`--resume auto` with node-local disks: the newest remote checkpoint that every node's leader downloads
    and verifies (a node's own files already here with the right sha256 are kept). Collective."""
    from .storage.base import one_line, redact
    from .train_sync import storage_options

    candidates = gather_object(remote_candidates(args) if topology.rank == 0 else None)[0]
    for url, name in candidates:
        ok, reason = True, None
        if topology.leader:
            try:
                fetch_remote_checkpoint(args, run_dir, url, name, run_files=topology.rank == 0)
            except Exception as error:  # StorageError or a backend's own: this candidate is out
                ok, reason = False, redact(one_line(error), storage_options(args))
        results = gather_object((ok, reason))
        if all(ok for ok, _ in results):
            if topology.rank == 0:
                print(f"miras train: pulled {name} from {url} onto every node (verified)", flush=True)
            return str(checkpoints_dir(run_dir) / name)
        if topology.rank == 0:
            failed = [f"node {node}: {results[rank][1]}" for node, rank in enumerate(topology.leaders)
                      if not results[rank][0]]  # fmt: skip
            print(f"miras train: warning: skipping remote {name}: {'; '.join(failed)}", flush=True)
    return None
