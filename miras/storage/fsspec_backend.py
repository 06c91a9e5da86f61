"""Built-in backends through fsspec: `file://` and bare paths, `memory://`, `gs://` (gcsfs), `s3://` (s3fs).

Atomic puts, per filesystem:
- file:   copy to `<name>.miras-tmp-<hex>` in the same folder, fsync, then `os.replace` (an atomic rename on
          POSIX and Windows within one filesystem).
- memory: fsspec's MemoryFile stores its bytes under the name only when closed: a reader never sees half.
- gs, s3: an object store makes an object visible only when its single PUT, resumable upload (GCS) or
          multipart upload (S3) completes, and replacing it swaps the whole object: already atomic, and a
          name always holds exactly one object. No temporary name (a rename would be a second full copy).

Options (`--storage-option KEY=VALUE`) go to the fsspec filesystem's constructor: `endpoint_url=...`,
`key=...`, `secret=...`, `token=...`, `project=...`; `true`/`false` become booleans and a dotted key makes
a nested dict (`client_kwargs.region_name=auto`). One is the backend's own: `chunksize=BYTES` (gs, s3) is
the size of a resumable upload's chunks (gcsfs: files from 5 MiB on are uploaded resumably) and of a
multipart upload's parts (s3fs: files of two parts or more); both default to 50 MiB. S3 parts are at least
5 MiB, GCS chunks a multiple of 256 KiB.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from .base import TMP_MARKER, MissingKeyError, StorageError, clean_key, is_tmp_key, join_key, under_prefix

_EXTRAS = {"gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3")}


def _coerce(value: str) -> Any:
    lowered = value.strip().lower()
    if lowered in ("true", "yes"):
        return True
    if lowered in ("false", "no"):
        return False
    if lowered in ("none", "null"):
        return None
    return value


def fsspec_kwargs(options: dict[str, str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        target = kwargs
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise StorageError(f"storage option {key!r} conflicts with another option of the same name")
        target[leaf] = _coerce(value)
    return kwargs


def local_path(url: str) -> Path:
    """The local folder of a bare path or a file:// URL."""
    if url.lower().startswith("file://"):
        rest = unquote(url[len("file://") :])
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        return Path(rest)
    return Path(url).expanduser()


class FsspecBackend:
    """A StorageBackend over one fsspec filesystem and a base path inside it."""

    def __init__(self, url: str, fs: Any, base: str, local: bool = False, chunksize: int | None = None):
        self.url = url
        self.fs = fs
        self.base = base.rstrip("/")
        self.local = local
        self.put_options = {"chunksize": chunksize} if chunksize else {}

    # -- paths
    def _path(self, key: str) -> str:
        key = clean_key(key)
        return f"{self.base}/{key}" if key else self.base

    def _key(self, path: str) -> str:
        path = path.rstrip("/")
        base = self.base.lstrip("/") if not path.startswith("/") else self.base
        if path == base:
            return ""
        if not path.startswith(base + "/") and base:
            raise StorageError(f"{self.url}: listing returned {path!r} outside the destination")
        return path[len(base) + 1 :] if base else path.lstrip("/")

    # -- protocol
    def put(self, local: Path, key: str) -> None:
        target = self._path(key)
        if not clean_key(key):
            raise StorageError(f"{self.url}: empty key")
        if self.local:
            dest = Path(target)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f"{dest.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}")
            try:
                with open(local, "rb") as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 8 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, dest)  # atomic: a reader sees the old file or the new one, never half
            finally:
                tmp.unlink(missing_ok=True)
            return
        parent = target.rsplit("/", 1)[0]
        if self.fs.protocol and "memory" in self.fs.protocol:
            self.fs.makedirs(parent, exist_ok=True)
        # Object stores: one PUT / completed multipart upload is atomic (see the module docstring).
        self.fs.put_file(str(local), target, **self.put_options)
        self.fs.invalidate_cache(parent)

    def get(self, key: str, local: Path) -> None:
        source = self._path(key)
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{local.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}")
        try:
            self.fs.invalidate_cache(source.rsplit("/", 1)[0])
            if not self.fs.isfile(source):
                raise MissingKeyError(f"{self.url}: no object {clean_key(key)!r}")
            self.fs.get_file(source, str(tmp))
            os.replace(tmp, local)
        except FileNotFoundError as error:
            if isinstance(error, MissingKeyError):
                raise
            raise MissingKeyError(f"{self.url}: no object {clean_key(key)!r}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        folder = self._path(prefix)
        self.fs.invalidate_cache(folder)
        try:
            if not self.fs.exists(folder):
                return []
            paths = self.fs.find(folder)
        except FileNotFoundError:
            return []
        keys = (self._key(p) for p in paths)
        return sorted(k for k in keys if k and not is_tmp_key(k) and under_prefix(k, prefix))

    def delete(self, key: str) -> None:
        path = self._path(key)
        if not clean_key(key):
            raise StorageError(f"{self.url}: refusing to delete the whole destination")
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path.rsplit("/", 1)[0])

    def __repr__(self) -> str:
        return f"FsspecBackend({self.url!r})"


# The service a bucket URL reaches unless an option or variable points elsewhere (an emulator, R2, MinIO).
_DEFAULT_HOSTS = {"gs": "https://storage.googleapis.com", "gcs": "https://storage.googleapis.com",
                  "s3": "https://s3.amazonaws.com"}  # fmt: skip


def unreachable_host(url: str, options: dict[str, str] | None = None, timeout: float = 5.0) -> str | None:
    """Why the service behind a gs:// or s3:// URL cannot be reached (its host name does not resolve, or does
    not within `timeout` seconds), else None. One look-up, where gcsfs and s3fs retry a dead connection
    for most of a minute."""
    import socket
    import threading
    from urllib.parse import urlparse

    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    if scheme not in _DEFAULT_HOSTS:
        return None
    options = options or {}
    endpoint = options.get("endpoint_url") or options.get(f"{scheme}.endpoint_url")
    if scheme in ("gs", "gcs"):
        endpoint = endpoint or os.environ.get("STORAGE_EMULATOR_HOST")
    else:
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    host = urlparse(endpoint if endpoint and "://" in endpoint else f"https://{endpoint or ''}").hostname
    host = host or urlparse(_DEFAULT_HOSTS[scheme]).hostname
    outcome: dict[str, str | None] = {}

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            outcome["reason"] = None
        except OSError as error:
            outcome["reason"] = f"cannot reach {host} ({error.strerror or error}); offline?"

    thread = threading.Thread(target=resolve, name="miras-resolve", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome.get("reason", f"cannot reach {host} (no answer from the name resolver in {timeout:.0f} s)")


def open_backend(url: str, options: dict[str, str] | None = None) -> FsspecBackend:
    """Entry point for the schemes file, memory, gs/gcs and s3."""
    import fsspec

    options = dict(options or {})
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    if scheme == "file":
        root = local_path(url).resolve()
        return FsspecBackend(url, fsspec.filesystem("file"), root.as_posix(), local=True)
    rest = url.split("://", 1)[1].strip("/")
    if scheme == "memory":
        return FsspecBackend(url, fsspec.filesystem("memory"), "/" + rest)
    if scheme in _EXTRAS:
        module, extra = _EXTRAS[scheme]
        if not rest:
            raise StorageError(f"storage URL {url!r} names no bucket (expected {scheme}://BUCKET/path)")
        if module == "gcsfs":
            # gcsfs's experimental zonal/HNS layer probes the bucket over gRPC (and hangs on emulators);
            # miras needs none of it. A user who wants it sets the variable to true.
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        try:
            __import__(module)
        except ImportError:
            raise StorageError(f"{scheme}:// needs {module}: pip install 'miras[{extra}]'") from None
        chunksize = options.pop("chunksize", None)
        if chunksize is not None and not (chunksize.isdigit() and int(chunksize) > 0):
            raise StorageError(f"storage option chunksize={chunksize!r}: expected a number of bytes")
        try:
            fs = fsspec.filesystem("gcs" if scheme == "gs" else scheme, **fsspec_kwargs(options))
        except TypeError as error:
            raise StorageError(f"{scheme}:// rejected a storage option: {error}") from None
        return FsspecBackend(url, fs, rest, chunksize=int(chunksize) if chunksize else None)
    raise StorageError(f"the fsspec backend does not handle {scheme}:// ({url!r})")


__all__ = ["FsspecBackend", "join_key", "open_backend"]
