"""One writer per run: an advisory lock on `runs/<run>/lock`, released by the kernel when the process dies.

flock() needs no stale-lock detection: a dead holder's lock is gone, so the next process takes it over.
The file also records who holds it (pid and host) for the refusal message.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from .layout import LOCK_NAME


class RunLockedError(Exception):
    pass


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._handle = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunLockedError(
                f"run folder {self.path.parent} is in use by {holder}; one writer per run "
                "(stop it first, or pick another --run-name)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
