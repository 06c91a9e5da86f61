import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "miras.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    result = run("--help")
    assert result.returncode == 0 and "train" in result.stdout


def test_train_help_groups_flags_and_marks_aliases():
    result = run("train", "--help")
    assert result.returncode == 0
    for text in ("model:", "data:", "--microbatch-size", "seed alias", "--dry-run-full-model"):
        assert text in result.stdout


def test_unknown_command_is_one_line_exit_2():
    result = run("fly")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "miras: error: unknown command 'fly' (expected one of: train, ckpt, estimate, generate, eval, storage)"
    )
