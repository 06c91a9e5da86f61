"""The on-start command's restart loop on a real tiny training run: killed mid-run, it restarts training
with --resume auto, and it stops once the run's `finished` marker exists."""

import os
import signal
import sys
import time

import pytest

from miras.train.args import build_parser
from tests.vast.helpers import clean_env, process_alive, run_script

TRAIN_HELP = build_parser().format_help()  # exactly what `python -m miras.train --help` prints


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.skipif("--resume" not in TRAIN_HELP, reason="miras train has no --resume yet")
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
            os.killpg(loop_pid, signal.SIGTERM)  # the loop runs in its own session (setsid)
