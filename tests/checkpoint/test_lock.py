"""One writer per run: a second holder is refused, a dead holder's lock is taken over."""

import subprocess
import sys

import pytest

from miras.checkpoint.lock import RunLock, RunLockedError

HOLD = (
    "import sys, time\nfrom miras.checkpoint.lock import RunLock\n"
    "lock = RunLock(sys.argv[1])\nlock.acquire()\nprint('held', flush=True)\ntime.sleep(60)"
)


def test_a_second_process_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        holder.wait()
    assert (tmp_path / "lock").exists()
    lock = RunLock(tmp_path)
    lock.acquire()  # stale: taken over
    lock.release()
