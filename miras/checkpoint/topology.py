"""Who commits what: ranks, nodes, each node's leader, and the object collectives checkpointing uses.

With one process, or a run folder every node shares, global rank 0 commits, uploads and resumes for every
rank. With node-local disks (several nodes, each its own disk: `node_local`) each node's local rank 0, its
*leader*, commits its node's folder and uploads it (miras.train.nodes detects which case it is).

Object collectives run on gloo groups, from the main thread: the checkpoint group of all ranks (the one
DCP's background saves use, so only while none is in flight), or in the commit threads the group of the
leaders alone. Never on the training group from a background thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    def main(self) -> bool:
        return self.rank == 0

    @property
    def leader(self) -> bool:
        return self.rank in self.leaders

    @property
    def commits_here(self) -> bool:
        """This rank commits a checkpoint folder: rank 0, and in node-local mode every node's leader."""
        return self.main or (self.node_local and self.leader)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, by rank (collective over the checkpoint group; [value] with one process)."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        from .trainer_state import checkpoint_process_group

        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, value, group=checkpoint_process_group())
        return out

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (collective)."""
        return self.gather(value if self.main else None)[0]

    def gather_leaders(self, value: Any) -> list[Any]:
        """Every node leader's `value`, by node: the commit threads' exchange in node-local mode."""
        import torch.distributed as dist

        out: list[Any] = [None] * len(self.leaders)
        dist.all_gather_object(out, value, group=self.leaders_group)
        return out
