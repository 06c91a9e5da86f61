"""`testfs:///abs/folder`: a local-folder storage backend with faults, for the storage tests.

Options: fail_puts=N (the first N puts of this instance raise ConnectionError), down=true (every call raises),
delay=SECONDS (each put sleeps first), gate=PATH (each put waits until PATH exists: a test holds uploads back
for as long as it needs, whatever the machine's speed), journal=PATH (appends "start put KEY" / "put KEY" /
"delete KEY" lines).
It imports nothing from miras: a plugin only has to honour the protocol (put, get, list, delete) and raise
FileNotFoundError for a missing key.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path


class TestFS:
    def __init__(self, url: str, options: dict[str, str]):
        self.url = url
        self.root = Path(url[len("testfs://") :])
        self.fail_puts = int(options.get("fail_puts", 0))
        self.down = options.get("down", "false").lower() == "true"
        self.delay = float(options.get("delay", 0))
        self.gate = Path(options["gate"]) if options.get("gate") else None
        self.journal = Path(options["journal"]) if options.get("journal") else None
        self.lock = threading.Lock()

    def _note(self, line: str) -> None:
        if self.journal:
            with self.lock, open(self.journal, "a") as handle:
                handle.write(line + "\n")

    def _check(self) -> None:
        if self.down:
            raise ConnectionError(f"{self.url} is down")

    def put(self, local: Path, key: str) -> None:
        self._check()
        self._note(f"start put {key}")
        if self.delay:
            time.sleep(self.delay)
        while self.gate and not self.gate.exists():
            time.sleep(0.005)
        with self.lock:
            if self.fail_puts > 0:
                self.fail_puts -= 1
                raise ConnectionError(f"injected failure putting {key}")
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".miras-tmp-testfs")
        shutil.copyfile(local, tmp)
        os.replace(tmp, target)
        self._note(f"put {key}")

    def get(self, key: str, local: Path) -> None:
        self._check()
        source = self.root / key
        if not source.is_file():
            raise FileNotFoundError(f"{self.url}: no object {key!r}")
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, local)

    def list(self, prefix: str = "") -> list[str]:
        self._check()
        folder = self.root / prefix
        if not folder.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in folder.rglob("*") if p.is_file())
        return sorted(k for k in keys if ".miras-tmp-" not in k)

    def delete(self, key: str) -> None:
        self._check()
        (self.root / key).unlink(missing_ok=True)
        self._note(f"delete {key}")


def open_backend(url: str, options: dict[str, str] | None = None) -> TestFS:
    return TestFS(url, dict(options or {}))
