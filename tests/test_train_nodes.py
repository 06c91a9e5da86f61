"""Two nodes with their own disks: `torchrun --nnodes 2 --nproc_per_node 1` twice, each from its own working
directory with a relative --output-dir, so each node's run folder is a different folder (gloo, CPU).

Node-local mode is detected; each node commits and uploads its own files; the remote checkpoint is complete
and verifies; both local folders are deleted and the run resumes from the remote copy bit-identically
(FSDP2, where every rank's optimizer shard differs). Without --sync-to such a run is refused in one line."""

import json
import os
import re
import shutil
import subprocess
import sys

from miras.checkpoint import verify_folder
from miras.checkpoint.catalog import committed, find_resumable
from tests.test_train_checkpoints import BASE_ENV, TINY, assert_same_weights, free_port, kill_tree, losses, weights


def launch_nodes(args, cwds, env=None, timeout=300, hooks=()):
    """Node k runs `torchrun --node_rank k` in cwds[k]; both at once (they meet at node 0's rendezvous)."""
    port = str(free_port())
    full_env = {**os.environ, **BASE_ENV, "ACCELERATE_USE_CPU": "1", "MIRAS_EXPECT_WORLD_SIZE": "2", **(env or {})}
    processes = []
    for node, cwd in enumerate(cwds):
        cwd.mkdir(parents=True, exist_ok=True)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port]  # fmt: skip
        module = ["-m", "tests.hooked_train", *hooks, "--"] if hooks else ["-m", "miras.train"]
        command = [*launcher, *module, *args]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        processes.append(subprocess.Popen(command, cwd=cwd, env=full_env, **pipes))
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    finally:
        for process in processes:
            kill_tree(process.pid)
    return results


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_two_nodes_with_their_own_disks_upload_their_own_files_and_resume_from_the_remote_bit_identically(tmp_path):
    nodes, remote = [tmp_path / "node0", tmp_path / "node1"], tmp_path / "remote"
    args = [*TINY, "--fsdp", "--max-steps", "4", "--ckpt-every-steps", "2", "--output-dir", "runs", "--run-name", "r",
            "--resume", "auto", "--sync-to", f"file://{remote}"]  # fmt: skip
    first = launch_nodes(args, nodes, hooks=("--record", str(tmp_path / "a")))
    for result in first:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 nodes; run folder runs/r not shared: node-local mode" in first[0].stdout

    checkpoint = remote / "r" / "checkpoints" / "step_00000004"
    assert verify_folder(checkpoint) == []
    assert (remote / "r" / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    per_rank = [f"trainer/{name}" for name in ("rank_00000.pt", "rank_00001.pt")]
    per_rank += [f"trainer/optimizer/__{rank}_0.distcp" for rank in (0, 1)]
    assert set(per_rank) | {"model.safetensors", "trainer/optimizer/.metadata"} <= set(manifest["files"])
    assert manifest["nodes"]["1"] == ["trainer/optimizer/__1_0.distcp", "trainer/rank_00001.pt"]
    for node in nodes:  # every node committed its part: no tmp folder left, never taken for a whole checkpoint
        ckpts = node / "runs" / "r" / "checkpoints"
        assert [p.name for p in committed(ckpts)] == ["step_00000002", "step_00000004"]
        assert not list(ckpts.glob("*.tmp"))
        assert "node-local disks" in verify_folder(ckpts / "step_00000004")[0]
        assert find_resumable(ckpts, warn=lambda m: None) is None
    node1_part = nodes[1] / "runs" / "r" / "checkpoints" / "step_00000004"
    assert files_under(node1_part) == ["manifest.json", "trainer/optimizer/__1_0.distcp", "trainer/rank_00001.pt"]
    straight = losses(nodes[0] / "runs" / "r")
    assert [step for step, _ in straight] == [1, 2, 3, 4]

    # Both disks are gone, and step 4 was never published (as if node 0 died before its manifest went up).
    for node in nodes:
        shutil.rmtree(node / "runs")
    (checkpoint / "manifest.json").unlink()
    resumed = launch_nodes(args, nodes, hooks=("--record", str(tmp_path / "b")))
    for result in resumed:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "pulled step_00000002" in resumed[0].stdout and "resuming from step_00000002" in resumed[0].stdout
    assert losses(nodes[0] / "runs" / "r") == straight  # every per-step loss, with ==
    for rank in (0, 1):
        a, b = (json.loads((tmp_path / run / f"rank{rank}.json").read_text()) for run in ("a", "b"))
        assert b["losses"] == a["losses"][2:] and b["sharded"] is True
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert verify_folder(checkpoint) == []  # published again, complete
    assert not [p for p in tmp_path.rglob("*.tmp") if p.is_dir()]


def test_node_local_disks_without_sync_to_are_refused_in_one_line_and_nothing_is_touched(tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    (nodes[1] / "runs" / "r").mkdir(parents=True)
    (nodes[1] / "runs" / "r" / "notes.txt").write_text("mine\n")
    results = launch_nodes([*TINY, "--max-steps", "2", "--output-dir", "runs", "--run-name", "r"], nodes)
    for result in results:
        ours = [line for line in result.stderr.splitlines() if line.startswith("miras train")]
        assert len(ours) == 1 and ours[0] == result.stderr.splitlines()[0], result.stderr[-3000:]
        assert "--output-dir on a filesystem every node shares" in ours[0] and "--sync-to URL" in ours[0]
        # torchrun exits 1 with its own report of the worker's status, 2
        assert re.search(r"exitcode\s*:\s*2 ", result.stderr) and result.returncode != 0
    assert not (nodes[0] / "runs").exists()  # the probe's folder is gone again
    assert files_under(nodes[1] / "runs") == ["r/notes.txt"]


def test_a_run_folder_every_node_shares_keeps_one_committer_and_needs_no_sync_to(tmp_path):
    nodes, shared = [tmp_path / "node0", tmp_path / "node1"], tmp_path / "shared"
    results = launch_nodes([*TINY, "--max-steps", "1", "--output-dir", str(shared), "--run-name", "r"], nodes)
    for result in results:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 nodes; run folder" in results[0].stdout and "shared by every node" in results[0].stdout
    folder = shared / "r" / "checkpoints" / "step_00000001"
    assert verify_folder(folder) == [] and "nodes" not in json.loads((folder / "manifest.json").read_text())
    assert {"trainer/rank_00000.pt", "trainer/rank_00001.pt"} <= set(files_under(folder))
    assert not list((shared / "r").glob(".miras-shared-probe-*"))
