"""Several nodes: which node each rank is on, and whether the run folder is shared by every node.

With a run folder every node shares (NFS, a cluster filesystem) nothing changes: global rank 0 commits,
uploads and resumes for every rank. With node-local disks (Vast.ai: each machine its own disk) each node's
local rank 0, its *leader*, commits, uploads and downloads its own node's folder: the Checkpointer does that
from the Topology found here. A checkpoint is then complete only at the `--sync-to` destination.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from ..checkpoint.topology import Topology
from .checks import TrainingStopped


def detect_topology(accelerator) -> Topology:
    """Ranks, nodes and each node's leader. A node is torchrun's GROUP_RANK (`accelerate launch` runs
    torchrun's agent too), else rank // LOCAL_WORLD_SIZE."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        return Topology()
    local_rank = accelerator.local_process_index
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    node = int(os.environ.get("GROUP_RANK") or rank // max(1, local_world))
    everyone = Topology(rank=rank, world_size=world).gather((node, local_rank, rank))
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
    name, error = topology.gather((name, error))[0]
    if error:
        raise TrainingStopped(error)
    seen = topology.gather((run_dir / name).is_file() if topology.leader else True)
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
