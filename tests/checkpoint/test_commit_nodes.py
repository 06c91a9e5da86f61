"""Node-local commits (multi-node runs without a shared run folder): each node's committer commits its own
files under one manifest that lists every node's; a failure on any node commits nothing anywhere."""

import json
import threading

from miras.checkpoint.catalog import committed, find_resumable
from miras.checkpoint.commit import CheckpointCommitter
from miras.checkpoint.manifest import verify_folder


def exchange(n):
    """A stand-in for all_gather_object between the nodes' commit threads."""
    barrier, parts, lock = threading.Barrier(n), [], threading.Lock()

    def gather(mine):
        with lock:
            parts.append(mine)
        barrier.wait(timeout=10)
        return list(parts)

    return gather


def commit_on_two_nodes(tmp_path, fail_on=None):
    gather = exchange(2)
    committers = []
    for node in (0, 1):
        folder = tmp_path / f"node{node}" / "checkpoints"
        folder.mkdir(parents=True)
        committers.append(CheckpointCommitter(folder, gather=gather, node=node, log=lambda m: None))

    def write(node):
        def files(tmp):
            (tmp / "trainer").mkdir(parents=True, exist_ok=True)
            (tmp / "trainer" / f"rank_0000{node}.pt").write_bytes(bytes([node]) * 100)
            if node == 0:
                (tmp / "model.safetensors").write_bytes(b"w" * 500)
            if node == fail_on:
                raise OSError("disk full")

        return files

    for node, committer in enumerate(committers):
        extra = {"final": True} if node == 0 else None
        committer.submit(4, False, write(node), manifest_extra=extra)
    return [committer.wait() for committer in committers]


def test_each_node_commits_its_own_files_under_one_manifest_listing_every_node(tmp_path):
    outcomes = commit_on_two_nodes(tmp_path)
    assert all(outcome.error is None for outcome in outcomes)
    folders = [tmp_path / f"node{node}" / "checkpoints" / "step_00000004" for node in (0, 1)]
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in folders]
    assert manifests[0] == manifests[1]
    assert set(manifests[0]["files"]) == {"model.safetensors", "trainer/rank_00000.pt", "trainer/rank_00001.pt"}
    nodes = {"0": ["model.safetensors", "trainer/rank_00000.pt"], "1": ["trainer/rank_00001.pt"]}
    assert manifests[0]["nodes"] == nodes
    assert manifests[0]["final"] is True  # node 0's extra fields
    assert sorted(p.name for p in folders[1].rglob("*") if p.is_file()) == ["manifest.json", "rank_00001.pt"]
    for folder in folders:  # a node's part is committed, never mistaken for a complete checkpoint
        assert "node-local disks" in verify_folder(folder)[0]
        assert find_resumable(folder.parent, warn=lambda m: None) is None
        assert not list(folder.parent.glob("*.tmp"))


def test_a_failure_on_one_node_commits_nothing_on_any_node(tmp_path):
    outcomes = commit_on_two_nodes(tmp_path, fail_on=1)
    for node, outcome in enumerate(outcomes):
        assert "node 1: OSError: disk full" in str(outcome.error)
        assert committed(tmp_path / f"node{node}" / "checkpoints") == []
        assert not list((tmp_path / f"node{node}" / "checkpoints").glob("*.tmp"))  # the failed attempt is gone
