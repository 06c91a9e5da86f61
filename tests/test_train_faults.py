"""Faults around checkpoints in real training runs: a failed checkpoint is retried and never fails a run whose
later checkpoints commit; a full disk (injected, and a real tmpfs that fills up) gives one line, removes the
failed .tmp, keeps the last good checkpoint and exits 4 when it stays full; empty or rootless --sync-to
destinations are refused before anything is written; secrets never reach wandb, config.json or the logs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from miras.checkpoint import verify_folder
from miras.checkpoint.catalog import committed
from tests.test_train_checkpoints import BASE_ENV, TINY, losses, run


def names(run_dir):
    return [folder.name for folder in committed(Path(run_dir) / "checkpoints")]


def leftovers(run_dir):
    return [p.name for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_a_failed_checkpoint_is_retried_at_the_next_step_and_the_run_succeeds(tmp_path):
    """Rank 1 cannot write its part of step 2 (a full disk): every rank drops that checkpoint, step 3 retries
    it, and the run ends with exit 0 although a checkpoint failed on the way."""
    args = [*TINY, "--max-steps", "6", "--ckpt-every-steps", "2", "--output-dir", str(tmp_path), "--run-name", "r"]
    result = run(args, procs=2, env={"MIRAS_TEST_FAULT": "rank_state_written/1:enospc@1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    warnings = [line for line in result.stdout.splitlines() if "was not saved" in line]
    assert len(warnings) == 1 and "step_00000002 was not saved: the disk is full on rank 1" in warnings[0]
    assert "Traceback" not in result.stderr
    assert names(tmp_path / "r") == ["step_00000003", "step_00000004", "step_00000006"]
    assert not leftovers(tmp_path / "r") and (tmp_path / "r" / "finished").exists()
    assert all(verify_folder(folder) == [] for folder in committed(tmp_path / "r" / "checkpoints"))


def test_a_commit_that_fails_in_the_background_does_not_fail_the_run(tmp_path):
    """The first commit fails inside the commit thread; later ones commit: exit 0, no .tmp left."""
    args = [*TINY, "--max-steps", "6", "--ckpt-every-steps", "2", "--output-dir", str(tmp_path), "--run-name", "r"]
    result = run(args, env={"MIRAS_TEST_FAULT": "files_written:enospc@1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("was not saved") == 1 and "there is no checkpoint yet" in result.stdout
    assert "step_00000002" not in names(tmp_path / "r") and names(tmp_path / "r")[-1] == "step_00000006"
    assert not leftovers(tmp_path / "r") and (tmp_path / "r" / "finished").exists()


def test_a_disk_that_stays_full_exits_4_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    args = [*TINY, "--max-steps", "40", "--ckpt-every-steps", "1", "--output-dir", str(tmp_path), "--run-name", "r"]
    fault = ",".join(f"files_written:enospc@{n}" for n in (2, 3, 4))  # every commit after the first
    result = run(args, env={"MIRAS_TEST_FAULT": fault})
    assert result.returncode == 4, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "3 checkpoints in a row were not saved because the disk is full" in last and "Traceback" not in result.stderr
    assert "the newest checkpoint is step_00000001" in last and "--resume auto" in last
    assert names(tmp_path / "r") == ["step_00000001"] and not leftovers(tmp_path / "r")
    assert verify_folder(tmp_path / "r" / "checkpoints" / "step_00000001") == []
    assert not (tmp_path / "r" / "finished").exists()


def can_mount_a_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_a_tmpfs(), reason="needs user and mount namespaces (unshare -rm) for a small tmpfs")
def test_a_real_full_disk_stops_the_run_cleanly(tmp_path):
    """The run folder on a 70 MB tmpfs: the first checkpoint (~47 MB) fits, no second one does. Inside the
    namespace a script reports what the tmpfs held when training exited."""
    disk, report = tmp_path / "disk", tmp_path / "report.json"
    disk.mkdir()
    args = [*TINY, "--max-steps", "40", "--ckpt-every-steps", "1", "--output-dir", str(disk), "--run-name", "r"]
    inspect = (
        "import json, sys; from pathlib import Path; from miras.checkpoint import verify_folder; "
        "c = Path(sys.argv[1]) / 'r' / 'checkpoints'; "
        "json.dump({'entries': sorted(p.name for p in c.iterdir()), 'latest': (c / 'latest').read_text().strip(), "
        "'valid': verify_folder(c / 'step_00000001') == []}, open(sys.argv[2], 'w'))"
    )
    script = (
        f"mount -t tmpfs -o size=70m tmpfs {disk} && {sys.executable} -m miras.train {' '.join(args)}; rc=$?; "
        f"{sys.executable} -c \"{inspect}\" {disk} {report}; exit $rc"
    )
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, **BASE_ENV})  # fmt: skip
    assert result.returncode == 4, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "disk is full" in result.stderr.strip().splitlines()[-1]
    seen = json.loads(report.read_text())
    assert seen == {"entries": ["latest", "step_00000001"], "latest": "step_00000001", "valid": True}


@pytest.mark.parametrize(
    "destination, message",
    [
        ("", "empty destination ''"),
        ("  ", "empty destination"),
        ("s3://", "names no bucket"),
        ("file://", "names no folder"),
        ("/", "is the filesystem root"),
    ],
)
def test_empty_or_rootless_sync_destinations_are_refused_before_anything_is_written(tmp_path, capsys, destination,
                                                                                   message):  # fmt: skip
    from miras.train import main

    with pytest.raises(SystemExit) as exit:
        main(["--dataset", "builtin", "--max-steps", "1", "--output-dir", str(tmp_path), "--sync-to", destination])
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "argument --sync-to:" in lines[0] and message in lines[0]
    assert not any(tmp_path.iterdir())


def test_secrets_never_reach_wandb_config_json_metrics_or_logs(tmp_path):
    secret = "s3cr3t-value-8d2f"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_API_KEY": "k" * 40}
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[variable] = ""
    remote = tmp_path / "remote"
    args = [*TINY, "--max-steps", "2", "--output-dir", str(tmp_path / "runs"), "--run-name", "w", "--wandb",
            "--sync-to", str(remote), "--storage-option", f"secret={secret}",
            f"--storage-option=file.token={secret}"]  # fmt: skip
    result = run(args, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    files = [p for p in [*(tmp_path / "runs").rglob("*"), *remote.rglob("*")] if p.is_file()]
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in result.stdout + result.stderr
    # wandb recorded the program's arguments (in its offline run file), with the secrets masked
    (recorded,) = [p.read_bytes() for p in files if p.suffix == ".wandb"]
    assert b"secret=***" in recorded and b"--storage-option=file.token=***" in recorded
    config = json.loads((tmp_path / "runs" / "w" / "config.json").read_text())
    assert config["storage_option"] == ["secret=***", "file.token=***"] and config["tokenizer"] is None
    assert losses(tmp_path / "runs" / "w")[-1][0] == 2
