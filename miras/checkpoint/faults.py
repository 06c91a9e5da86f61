"""Test-only fault injection at named points of the checkpoint commit.

MIRAS_TEST_FAULT="POINT:ACTION[@N]" with ACTION `kill` (SIGKILL this process, as a preemption would),
`pause=SECONDS`, or `fail` (raise OSError, e.g. a failing delete); @N fires at the Nth time the point
is reached (default 1). Unset in normal runs, where fault_point() is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

_reached: Counter = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get("MIRAS_TEST_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        point, _, rest = item.partition(":")
        if point != name:
            continue
        action, _, nth = rest.partition("@")
        _reached[name] += 1
        if _reached[name] != int(nth or 1):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("pause="):
            time.sleep(float(action.split("=", 1)[1]))
        elif action == "fail":
            raise OSError(f"injected fault at {name}")
