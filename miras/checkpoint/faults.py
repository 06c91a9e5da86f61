"""Test-only fault injection at named points of checkpointing.

MIRAS_TEST_FAULT="POINT[/RANK]:ACTION[@N],..." with ACTION
  kill    SIGKILL this process, as a preemption of one process would;
  stop    SIGSTOP this process exactly there: the test sees it stopped and SIGKILLs the whole process tree,
          as a preemption of the machine would;
  pause=SECONDS, fail (raise OSError, e.g. a failing delete), enospc (raise OSError ENOSPC, a full disk).
@N fires at the Nth time the point is reached (default 1); /RANK only on that global rank ($RANK).
Unset in normal runs, where fault_point() is a dictionary lookup.

Points: tmp_prepared, rank_state_written, optimizer_save_started (every rank, in the loop's part of a save),
files_written, before_manifest, before_rename, before_latest, after_commit (the committing rank's thread),
prune_delete, step_checkpointed (every rank, after the save returned to the loop).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections import Counter

_reached: Counter = Counter()
_counted_for = [""]  # the spec the counts belong to: a new one starts them again (tests in one process)


def fault_point(name: str) -> None:
    spec = os.environ.get("MIRAS_TEST_FAULT")
    if not spec:
        return
    if spec != _counted_for[0]:
        _reached.clear()
        _counted_for[0] = spec
    actions = []
    for item in spec.split(","):
        where, _, rest = item.partition(":")
        point, _, rank = where.partition("/")
        if point == name and (not rank or rank == os.environ.get("RANK", "0")):
            action, _, nth = rest.partition("@")
            actions.append((action, int(nth or 1)))
    if not actions:
        return
    _reached[name] += 1  # once per arrival, whatever the number of items naming this point
    for action, nth in actions:
        if _reached[name] != nth:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action.startswith("pause="):
            time.sleep(float(action.split("=", 1)[1]))
        elif action == "fail":
            raise OSError(f"injected fault at {name}")
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected at {name})")
