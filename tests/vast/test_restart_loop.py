"""The on-start command's restart loop on a real tiny training run: killed mid-run, it restarts training
with --resume auto, and it stops once the run's `finished` marker exists."""

import contextlib
import os
import signal
import sys
import time

import pytest

from tests.vast.helpers import clean_env, process_alive, run_script


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.parametrize("status, stops", [(2, True), (3, True), (4, True), (5, False)])
def test_statuses_a_restart_cannot_fix_stop_the_loop_and_a_held_lease_is_tried_again(tmp_path, status, stops):
    """A fake training command: the loop stops at once on 2, 3 and 4; on 5 (the run held by another machine)
    it tries again after MIRAS_LEASE_RETRY_DELAY, here until the attempt that writes the marker."""
    marker, attempts = tmp_path / "finished", tmp_path / "attempts"
    command = f'echo x >> {attempts}; [ $(wc -l < {attempts}) -ge 3 ] && touch {marker}; exit {status}'
    env = clean_env(tmp_path, MIRAS_RESTART_DELAY="0", MIRAS_LEASE_RETRY_DELAY="0")
    result = run_script("run_loop.sh", env, str(marker), "bash", "-c", command)
    if stops:
        assert result.returncode == status and attempts.read_text().count("x") == 1
        assert f"status {status}" in result.stdout and "not restarting" in result.stdout
    else:
        assert result.returncode == 0 and attempts.read_text().count("x") == 3 and marker.exists()
        assert "another machine holds the run" in result.stdout


def test_loop_resumes_after_a_kill_and_stops_at_finished(tmp_path):
    workspace, runs = tmp_path / "workspace", tmp_path / "runs"
    train_args = (
        "--model-size xs --dataset builtin --seq-len 64 --batch-size 2 --max-steps 3 --ckpt-every-steps 1 "
        f"--eval-batches 1 --run-name t --output-dir {runs}"
    )
    env = clean_env(
        tmp_path,
        MIRAS_WORKSPACE=str(workspace),
        MIRAS_SKIP_INSTALL="1",
        MIRAS_TRAIN_ARGS=train_args,
        MIRAS_TRAIN_CMD=f"{sys.executable} -m miras.train",
        MIRAS_RESTART_DELAY="1",
    )
    logs = workspace / "logs"
    started = run_script("entrypoint.sh", env)
    assert started.returncode == 0, started.stderr
    loop_pid = int((logs / "run_loop-t.pid").read_text())
    try:
        # A second on-start (a container restart while the loop lives) leaves the running loop alone.
        again = run_script("entrypoint.sh", env)
        assert again.returncode == 0 and "already running" in again.stdout

        wait_for((runs / "t" / "checkpoints" / "latest").is_file, 240, "the first checkpoint")
        first_pid = int((logs / "train-t.pid").read_text())
        os.kill(first_pid, signal.SIGKILL)  # preemption, as abrupt as it gets

        wait_for(lambda: not process_alive(loop_pid), 240, "the loop to stop at finished")
        log = (logs / "train-t.log").read_text()
        assert (runs / "t" / "finished").exists(), log[-3000:]
        assert "attempt 2:" in log and "--resume auto" in log
        assert "resuming from step_" in log, log[-3000:]
        assert "run finished" in log
        assert not (logs / "train-t.pid").exists()

        # The next on-start sees the finished run and starts nothing.
        after = run_script("entrypoint.sh", env)
        assert after.returncode == 0 and "is finished" in after.stdout
    finally:
        if process_alive(loop_pid):
            with contextlib.suppress(ProcessLookupError):  # it may end between the check and the kill
                os.killpg(loop_pid, signal.SIGTERM)  # the loop runs in its own session (setsid)
