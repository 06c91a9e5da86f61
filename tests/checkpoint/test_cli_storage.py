"""`miras storage ls/pull`, and every cloud-free storage command README shows, run as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from miras.checkpoint.manifest import verify_folder
from miras.checkpoint.sync import Syncer

from .test_sync import make_checkpoint

README = Path(__file__).resolve().parents[2] / "README.md"
CLOUD = ("gdrive://", "gs://", "s3://", "rclone://gdrive", "FOLDER_ID", "BUCKET")


def miras(*args, capsys):
    """`miras ARGS` in this process (a subprocess would spend seconds importing torch for each call)."""
    from miras.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def synced_run(root: Path, run_name: str = "my-run") -> Path:
    """A run synced by the real Syncer to the local destination `root`: checkpoints 10 (milestone) and 20."""
    run_dir = root.parent / "local-runs" / run_name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 20, "loss": 2.5}\n')
    syncer = Syncer([str(root)], run_name, run_dir)
    for step in (10, 20):
        syncer.submit_checkpoint(make_checkpoint(run_dir, step, milestone=step == 10), step, step == 10)
    syncer.submit_file(run_dir / "metrics.jsonl")
    assert syncer.close(30)
    return run_dir


def test_ls_and_ls_checkpoints(tmp_path, capsys):
    synced_run(tmp_path / "remote")
    result = miras("storage", "ls", str(tmp_path / "remote" / "my-run"), capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "checkpoints/step_00000020/manifest.json" in result.stdout.splitlines()
    assert "metrics.jsonl" in result.stdout.splitlines()
    result = miras("storage", "ls", str(tmp_path / "remote" / "my-run"), "--checkpoints", capsys=capsys)
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and "milestone" in lines[0] and lines[1].endswith("<- latest")


def test_pull_run_and_single_checkpoint(tmp_path, capsys):
    run_dir = synced_run(tmp_path / "remote")
    result = miras("storage", "pull", str(tmp_path / "remote" / "my-run"), str(tmp_path / "fresh"), capsys=capsys)
    assert result.returncode == 0, result.stderr
    pulled = Path(result.stdout.strip())
    assert pulled == tmp_path / "fresh" / "checkpoints" / "step_00000020" and verify_folder(pulled) == []
    assert (tmp_path / "fresh" / "metrics.jsonl").read_text() == (run_dir / "metrics.jsonl").read_text()
    one = miras(
        "storage",
        "pull",
        str(tmp_path / "remote/my-run/checkpoints/step_00000010"),
        str(tmp_path / "one"),
        capsys=capsys,
    )
    assert one.returncode == 0 and verify_folder(tmp_path / "one") == []


def readme_storage_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("\n## Storage\n") : text.index("\n## ", text.index("\n## Storage\n") + 5)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("pip ") and not any(c in line for c in CLOUD)]


def test_readme_storage_commands_run_as_written(tmp_path, capsys, monkeypatch):
    """Runs every command of README's Storage section that needs no cloud account, /mnt/backup -> a temp dir."""
    commands = readme_storage_commands()
    assert any(c.startswith("miras storage pull") for c in commands) and any("RCLONE_CONFIG_" in c for c in commands)
    backup = tmp_path / "mnt" / "backup"
    synced_run(backup / "runs")
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    outputs = []
    for command in commands:
        words = shlex.split(command.replace("/mnt/backup", str(backup)))
        if words[0] == "export":
            name, _, value = words[1].partition("=")
            monkeypatch.setenv(name, value)
            continue
        assert words[:2] == ["miras", "storage"], f"README command not covered by this test: {command}"
        result = miras(*words[1:], capsys=capsys)
        assert result.returncode == 0, (command, result.stderr)
        outputs.append(result.stdout)
    assert verify_folder(tmp_path / "runs" / "my-run" / "checkpoints" / "step_00000020") == []
    assert "checkpoints/step_00000020/manifest.json" in outputs[-1]  # the rclone:// listing


def test_the_miras_command_has_the_storage_subcommand(tmp_path):
    synced_run(tmp_path / "remote")
    miras_script = Path(sys.executable).parent / "miras"
    command = [str(miras_script)] if miras_script.exists() else [sys.executable, "-m", "miras.cli"]
    result = subprocess.run([*command, "storage", "ls", str(tmp_path / "remote" / "my-run"), "--checkpoints"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].endswith("<- latest")
