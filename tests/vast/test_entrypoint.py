import base64
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess

import pytest

from tests.vast.helpers import clean_env, process_alive, run_script

PRIVATE_KEY = "-----BEGIN PRIVATE KEY-----\\nFAKE-KEY-MATERIAL-0123456789\\n-----END PRIVATE KEY-----\\n"
KEY_JSON = json.dumps(
    {
        "type": "service_account",
        "project_id": "fake-project",
        "private_key_id": "0123abcd",
        "private_key": PRIVATE_KEY,
        "client_email": "trainer@fake-project.iam.gserviceaccount.com",
    }
)
KEY_B64 = base64.b64encode(KEY_JSON.encode()).decode()
WANDB_KEY = "fake-wandb-key-5f2d9c"
FOLDER_ID = "1AbCdEfGhIjKlMnOpQrStUvWxYz012345"
SECRETS = (KEY_B64, "FAKE-KEY-MATERIAL", WANDB_KEY)


def snapshot(root):
    """path -> (mode, mtime_ns, sha256) of every file and folder outside logs/."""
    state = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] == "logs":
            continue
        info = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        state[str(relative)] = (stat.S_IMODE(info.st_mode), info.st_mtime_ns, digest)
    return state


def assert_no_secret(text):
    for secret in SECRETS:
        assert secret not in text


@pytest.fixture
def workspace(tmp_path):
    return tmp_path / "workspace"


def entrypoint_env(tmp_path, workspace, **extra):
    values = {
        "MIRAS_WORKSPACE": str(workspace),
        "MIRAS_SKIP_INSTALL": "1",
        "GDRIVE_SERVICE_ACCOUNT_JSON_B64": KEY_B64,
        "MIRAS_GDRIVE_FOLDER_ID": FOLDER_ID,
        "WANDB_API_KEY": WANDB_KEY,
    }
    return clean_env(tmp_path, **{**values, **extra})


def test_twice_writes_key_and_env_file_once_and_never_prints_a_secret(tmp_path, workspace):
    env = entrypoint_env(tmp_path, workspace)
    first = run_script("entrypoint.sh", env)
    assert first.returncode == 0, first.stderr
    key_file = workspace / "secrets" / "gdrive-sa.json"
    env_file = workspace / "miras.env"
    assert json.loads(key_file.read_text()) == json.loads(KEY_JSON)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((workspace / "secrets").stat().st_mode) == 0o700
    before = snapshot(workspace)

    second = run_script("entrypoint.sh", env)
    assert second.returncode == 0, second.stderr
    assert snapshot(workspace) == before  # nothing rewritten: same bytes, modes and mtimes
    assert "unchanged" in second.stdout

    logs = "".join(p.read_text() for p in (workspace / "logs").rglob("*") if p.is_file())
    for text in (first.stdout, first.stderr, second.stdout, second.stderr, logs):
        assert_no_secret(text)

    # The env file, sourced as run_loop.sh does, configures an rclone remote "gdrive" with no rclone.conf.
    sourced = subprocess.run(
        ["bash", "-c", f'set -a; . "{env_file}"; set +a; env | grep ^RCLONE_CONFIG_GDRIVE_ | sort'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert sourced == [
        f"RCLONE_CONFIG_GDRIVE_ROOT_FOLDER_ID={FOLDER_ID}",
        "RCLONE_CONFIG_GDRIVE_SCOPE=drive",
        f"RCLONE_CONFIG_GDRIVE_SERVICE_ACCOUNT_FILE={key_file}",
        "RCLONE_CONFIG_GDRIVE_TYPE=drive",
    ]
    assert_no_secret(env_file.read_text())


def test_shared_drive_and_an_already_configured_remote(tmp_path, workspace):
    env = entrypoint_env(tmp_path, workspace, MIRAS_GDRIVE_SHARED_DRIVE_ID="0AbCdEfSharedDrive")
    assert run_script("entrypoint.sh", env).returncode == 0
    assert "export RCLONE_CONFIG_GDRIVE_TEAM_DRIVE=0AbCdEfSharedDrive" in (workspace / "miras.env").read_text()

    # The template already defines the remote: the key is still written, the remote left alone.
    env["RCLONE_CONFIG_GDRIVE_TYPE"] = "drive"
    result = run_script("entrypoint.sh", env)
    assert result.returncode == 0
    assert "RCLONE_CONFIG_GDRIVE_" not in (workspace / "miras.env").read_text().replace("# ", "")
    assert "already configured" in (workspace / "miras.env").read_text()
    assert (workspace / "secrets" / "gdrive-sa.json").is_file()


def test_key_padding_cut_by_an_env_parser_is_restored(tmp_path, workspace):
    padded = base64.b64encode(b'{"type": "service_account", "k": 1}').decode()
    assert padded.endswith("=")
    env = entrypoint_env(tmp_path, workspace, GDRIVE_SERVICE_ACCOUNT_JSON_B64=padded.rstrip("="))
    assert run_script("entrypoint.sh", env).returncode == 0
    assert json.loads((workspace / "secrets" / "gdrive-sa.json").read_text()) == {"type": "service_account", "k": 1}


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"GDRIVE_SERVICE_ACCOUNT_JSON_B64": "@@not base64@@"}, "GDRIVE_SERVICE_ACCOUNT_JSON_B64 is not valid base64"),
        (
            {"GDRIVE_SERVICE_ACCOUNT_JSON_B64": base64.b64encode(b"hello").decode()},
            "does not decode to a service account JSON key",
        ),
        ({"MIRAS_TRAIN_ARGS": "--model-size xs --max-steps 3"}, "MIRAS_TRAIN_ARGS must include --run-name"),
        ({"MIRAS_TRAIN_ARGS": "--run-name 'unbalanced"}, "MIRAS_TRAIN_ARGS has unbalanced quotes"),
        ({"MIRAS_TRAIN_ARGS": "--run-name a/b"}, "is not a folder name"),
        ({"MIRAS_TRAIN_ARGS": "--run-name r --resume auto"}, "remove --resume"),
    ],
)
def test_bad_values_are_one_line_exit_2(tmp_path, workspace, extra, message):
    result = run_script("entrypoint.sh", entrypoint_env(tmp_path, workspace, **extra))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert_no_secret(result.stdout + result.stderr)


def test_finished_run_is_not_started_again(tmp_path, workspace):
    runs = tmp_path / "runs"
    (runs / "done").mkdir(parents=True)
    (runs / "done" / "finished").write_text("")
    env = entrypoint_env(tmp_path, workspace, MIRAS_TRAIN_ARGS=f"--run-name done --output-dir {runs}")
    result = run_script("entrypoint.sh", env)
    assert result.returncode == 0 and "is finished" in result.stdout
    assert not (workspace / "logs" / "run_loop-done.pid").exists()


def test_a_slow_to_start_loop_is_running_in_its_own_session_when_the_on_start_returns(tmp_path, workspace):
    """Until setsid has run, the background loop is a copy of the entrypoint's shell: a next on-start would
    start a second loop and a signal to the loop's group would reach nothing. A setsid that takes 2 s (as on
    a loaded machine) must not open that window: the on-start returns once the loop leads its own session."""
    slow_bin = tmp_path / "slow-bin"
    slow_bin.mkdir()
    (slow_bin / "setsid").write_text(f'#!/bin/sh\nsleep 2\nexec {shutil.which("setsid")} "$@"\n')
    (slow_bin / "setsid").chmod(0o755)
    runs = tmp_path / "runs"
    env = entrypoint_env(
        tmp_path,
        workspace,
        PATH=f"{slow_bin}:{os.environ['PATH']}",
        MIRAS_TRAIN_ARGS=f"--run-name slow --output-dir {runs}",
        MIRAS_TRAIN_CMD="sleep 60",
    )
    started = run_script("entrypoint.sh", env)
    assert started.returncode == 0, started.stderr
    loop_pid = int((workspace / "logs" / "run_loop-slow.pid").read_text())
    try:
        assert os.getsid(loop_pid) == loop_pid
        again = run_script("entrypoint.sh", env)
        assert again.returncode == 0 and f"already running (pid {loop_pid})" in again.stdout
    finally:
        if process_alive(loop_pid):
            os.killpg(loop_pid, signal.SIGTERM)
