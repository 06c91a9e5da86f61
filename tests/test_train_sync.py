"""Training with --sync-to: remote resume on a fresh machine (bit-identical) once it takes the dead machine's
lease over, a destination that is down, and a destination that fails the startup probe."""

import json
import shutil

from miras.checkpoint.catalog import committed
from tests.test_train_checkpoints import TINY, losses, refused_here, run


def test_a_fresh_machine_resumes_from_the_remote_copy_bit_identically(tmp_path, capsys):
    remote = tmp_path / "remote"
    common = [*TINY, "--max-steps", "6", "--ckpt-every-steps", "2", "--output-dir", str(tmp_path / "local")]
    straight = run([*common, "--run-name", "straight"])
    assert straight.returncode == 0, straight.stderr[-2000:]

    synced = [*common, "--run-name", "r", "--resume", "auto", "--sync-to", str(remote)]
    killed = run(synced, env={"MIRAS_TEST_FAULT": "after_commit:kill@3"})  # dies while committing step 6
    assert killed.returncode != 0
    remote_steps = [p.name for p in committed(remote / "r" / "checkpoints")]
    assert remote_steps and "step_00000006" not in remote_steps
    # The kill may land while a later step is still uploading (its manifest goes up last): at least one is whole.
    complete = [p for p in committed(remote / "r" / "checkpoints") if (p / "manifest.json").is_file()]
    assert complete and json.loads((complete[-1] / "manifest.json").read_text())["files"]
    shutil.rmtree(tmp_path / "local" / "r")  # the instance and its disk are gone

    # A new machine: the dead one's lease on the remote run is still fresh, so it is refused (exit 5, one
    # line naming the holder) until the lease expires, or it is told to take over.
    code, stderr = refused_here(synced, capsys)  # in this process; its lock must be free afterwards
    assert code == 5, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith(f"miras train: error: --sync-to: {remote}/r is held by")
    assert str(tmp_path / "local" / "r") in stderr and "--takeover" in stderr
    assert not (tmp_path / "local" / "r" / "checkpoints").exists()  # nothing pulled before the lease was held
    resumed = run([*synced, "--takeover"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "took over the lease" in resumed.stdout
    assert "pulled step_" in resumed.stdout and "resuming from step_" in resumed.stdout
    assert not (remote / "r" / "lease.json").exists()  # released at the end
    assert losses(tmp_path / "local" / "r") == losses(tmp_path / "local" / "straight")
    assert "step_00000006" in [p.name for p in committed(remote / "r" / "checkpoints")]
    assert (remote / "r" / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (remote / "r" / "metrics.jsonl").read_text() == (tmp_path / "local" / "r" / "metrics.jsonl").read_text()

    # --resume URL: a named remote checkpoint, downloaded and verified, continues exactly too.
    url = f"file://{remote}/r/checkpoints/step_00000004"
    named = run([*common, "--run-name", "from-url", "--resume", url])
    assert named.returncode == 0, named.stderr[-2000:]
    assert losses(tmp_path / "local" / "from-url") == [
        row for row in losses(tmp_path / "local" / "straight") if row[0] > 4
    ]


def test_the_seed_gdrive_flags_mean_an_rclone_destination():
    from miras.train.args import parse_args

    args = parse_args(["--gdrive-sync", "--gdrive-remote", "gdrive", "--gdrive-dir", "research/papers/miras/runs"])
    assert args.sync_to == ["rclone://gdrive/research/papers/miras/runs"]


def test_a_destination_down_for_the_whole_run_leaves_training_and_local_checkpoints_intact(tmp_path, capsys):
    args = [*TINY, "--max-steps", "4", "--ckpt-every-steps", "2", "--output-dir", str(tmp_path), "--run-name", "d"]
    args += ["--sync-to", f"testfs://{tmp_path / 'remote'}", "--storage-option", "testfs.down=true"]
    code, stderr = refused_here(args, capsys)
    assert code == 2 and "--sync-optional" in stderr.strip().splitlines()[-1]
    assert not (tmp_path / "d").exists()  # failed fast, nothing written

    result = run([*args, "--sync-optional", "--sync-timeout", "1"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in committed(tmp_path / "d" / "checkpoints")] == ["step_00000002", "step_00000004"]
    rows = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["sync_failed"] >= 1 and "down" in rows[-1]["sync_last_error"]
    assert "uploads did not finish within --sync-timeout" in result.stdout and "last error: None" not in result.stdout
    assert (tmp_path / "d" / "finished").exists()


def test_an_unknown_scheme_is_one_line_and_exit_2(tmp_path, capsys):
    code, stderr = refused_here([*TINY, "--max-steps", "1", "--output-dir", str(tmp_path), "--sync-to", "nosuch://x/y"],
                                capsys)  # fmt: skip
    assert code == 2
    last = stderr.strip().splitlines()[-1]
    assert "nosuch" in last and "file" in last and "Traceback" not in stderr
