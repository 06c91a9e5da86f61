"""The remote lease: one machine at a time writes a run at a destination.

`URL/<run_name>/lease.json` names its holder (an id kept in the holder's local run folder, its host, pid and
run folder) and when the holder last renewed it: its heartbeat, every timeout/4 seconds from a thread of the
Syncer. A machine that finds a lease renewed less than `timeout` seconds ago by another holder refuses to
start (LeaseHeld, one line naming the holder), unless told to take over. A lease older than that belongs to a
machine that died: it is taken over with a note. The same machine restarting (same local run folder, so the
same id) takes its own lease back at once, so a restart after a crash never waits.

Storage has no compare-and-swap: a lease is written, then read back. Two machines starting within the same
moment could both write; the read-back and every heartbeat show the one whose write was overwritten that it
does not hold the lease, and it stops uploading there.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..storage import StorageBackend

LEASE_NAME = "lease.json"  # at the remote run folder
OWNER_NAME = "lease_owner"  # in the local run folder: this machine's id for the leases of the run
DEFAULT_TIMEOUT = 300.0


class LeaseHeld(Exception):
    """Another machine holds the run at this destination (one line naming it)."""


def owner_id(run_dir: Path) -> str:
    """This run folder's lease id, made once and kept beside the run (a fresh disk is a new machine)."""
    path = Path(run_dir) / OWNER_NAME
    try:
        text = path.read_text().strip()
        if text:
            return text
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    text = uuid.uuid4().hex
    path.write_text(text + "\n")
    return text


class Lease:
    def __init__(
        self,
        backend: StorageBackend,
        owner: str,
        run_dir: Path,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
        where: str | None = None,
    ):
        self.backend, self.owner, self.run_dir, self.timeout, self.clock = backend, owner, run_dir, timeout, clock
        self.where = where or backend.url  # how messages name the destination (secrets removed)

    def read(self) -> dict[str, Any] | None:
        """The lease as stored, or None (no lease, or one that is not a lease)."""
        with tempfile.TemporaryDirectory(prefix="miras-lease-") as tmp:
            try:
                self.backend.get(LEASE_NAME, Path(tmp) / LEASE_NAME)
                lease = json.loads((Path(tmp) / LEASE_NAME).read_text())
            except (FileNotFoundError, ValueError, UnicodeDecodeError):
                return None
        return lease if isinstance(lease, dict) and lease.get("owner") else None

    def acquire(self, takeover: bool = False) -> str | None:
        """Hold the lease, or LeaseHeld. Returns a note when another holder's lease was taken over."""
        current, note = self.read(), None
        if current is not None and current.get("owner") != self.owner:
            age = self.clock() - float(current.get("heartbeat", 0.0))
            holder = describe(current)
            if age < self.timeout and not takeover:
                raise LeaseHeld(
                    f"{self.where} is held by {holder}, last heartbeat {age:.0f} s ago: two machines would overwrite "
                    f"each other's checkpoints there. Stop that one, wait until its lease expires ({self.timeout:g} s "
                    f"after its last heartbeat, {max(0.0, self.timeout - age):.0f} s from now), or pass --takeover"
                )
            why = "--takeover" if age < self.timeout else f"its last heartbeat was {age:.0f} s ago"
            note = f"took over the lease of {self.where} from {holder} ({why})"
        self._write()
        stored = self.read()
        if stored is None or stored.get("owner") != self.owner:
            raise LeaseHeld(f"{self.where} was taken by {describe(stored or {})} while this machine took its lease")
        return note

    def renew(self) -> bool:
        """The heartbeat. False when another holder has taken the lease (this machine must stop writing)."""
        current = self.read()
        if current is not None and current.get("owner") != self.owner:
            return False
        self._write()
        return True

    def release(self) -> None:
        """Remove the lease if it is still this machine's."""
        current = self.read()
        if current is not None and current.get("owner") == self.owner:
            self.backend.delete(LEASE_NAME)

    def holder(self) -> str:
        return describe(self.read() or {})

    def _write(self) -> None:
        now = self.clock()
        lease = {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "run_dir": str(Path(self.run_dir).resolve()),
            "heartbeat": now,
            "heartbeat_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "timeout": self.timeout,
        }
        with tempfile.TemporaryDirectory(prefix="miras-lease-") as tmp:
            (Path(tmp) / LEASE_NAME).write_text(json.dumps(lease, indent=1) + "\n")
            self.backend.put(Path(tmp) / LEASE_NAME, LEASE_NAME)


def describe(lease: dict[str, Any]) -> str:
    if not lease:
        return "another machine"
    return f"{lease.get('host', '?')} (pid {lease.get('pid', '?')}, run folder {lease.get('run_dir', '?')})"
