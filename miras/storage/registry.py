"""Backends by URL scheme, loaded from the entry-point group `miras.storage`.

An entry point's name is the URL scheme and its object a factory `factory(url, options) -> StorageBackend`
(`options` is a dict of strings, e.g. from `--storage-option endpoint_url=http://...`). A third party adds a
scheme by publishing a package with such an entry point, e.g. in its pyproject.toml:

    [project.entry-points."miras.storage"]
    myfs = "my_package.backend:open_backend"

Bare paths (`runs/`, `/mnt/ckpt`) and `file://` URLs use the built-in `file` backend.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib.metadata import entry_points

from .base import StorageBackend, StorageError

GROUP = "miras.storage"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_RCLONE_STYLE = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.\- ]*):(?!//)")

# Used when the package runs from a source tree that was never pip-installed (no entry points).
_BUILTIN = {
    "file": "miras.storage.fsspec_backend:open_backend",
    "memory": "miras.storage.fsspec_backend:open_backend",
    "gs": "miras.storage.fsspec_backend:open_backend",
    "gcs": "miras.storage.fsspec_backend:open_backend",
    "s3": "miras.storage.fsspec_backend:open_backend",
}


def _entry_points() -> dict[str, object]:
    found: dict[str, object] = dict(_BUILTIN)
    for ep in entry_points(group=GROUP):
        found[ep.name] = ep
    return found


def installed_schemes() -> list[str]:
    return sorted(_entry_points())


def url_scheme(url: str) -> str:
    """The scheme of a destination URL; bare paths are `file`."""
    match = _SCHEME.match(url)
    if match:
        return match.group(1).lower()
    rclone_style = _RCLONE_STYLE.match(url)
    if rclone_style and len(rclone_style.group(1)) > 1:  # one letter = a Windows drive (C:\...)
        remote, path = rclone_style.group(1), url[rclone_style.end() :]
        raise StorageError(
            f"storage URL {url!r} looks like an rclone remote path; write it as rclone://{remote}/{path.lstrip('/')}"
            f" (installed schemes: {', '.join(installed_schemes())}, or a local path)"
        )
    return "file"


def is_remote(url: str) -> bool:
    """A URL another backend than the local file one serves (`file://` URLs and bare paths are local)."""
    return url_scheme(str(url)) != "file"


def check_destination(url: str) -> str:
    """`url` stripped of spaces, or StorageError when it names no place a run could go under: empty (an unset
    shell variable), a scheme with nothing after it, or the filesystem root (a run would land in /<run-name>)."""
    text = str(url or "").strip()
    expected = "expected a local folder or SCHEME://BUCKET-OR-FOLDER/path"
    if not text:
        raise StorageError(f"empty destination {url!r} (an unset shell variable?); {expected}")
    scheme = url_scheme(text)
    rest = text.split("://", 1)[1] if "://" in text else text
    if not rest.strip("/"):
        if scheme == "file" and "://" not in text:
            raise StorageError(f"destination {text!r} is the filesystem root; {expected}")
        raise StorageError(f"destination {text!r} names no {_WHAT.get(scheme, _WHAT['*'])[0]}; expected "
                           f"{_WHAT.get(scheme, _WHAT['*'])[1].format(scheme=scheme)}")  # fmt: skip
    return text


# What a URL of each scheme must name after the scheme, and its form, for check_destination's one line.
_WHAT = {
    "s3": ("bucket", "s3://BUCKET/path (AWS, or R2, B2, MinIO with --storage-option endpoint_url=...)"),
    "gs": ("bucket", "gs://BUCKET/path"),
    "gcs": ("bucket", "gcs://BUCKET/path"),
    "rclone": ("remote", "rclone://REMOTE/path, REMOTE as `rclone listremotes` shows it (without the colon) or "
                         "defined by RCLONE_CONFIG_<REMOTE>_TYPE"),  # fmt: skip
    "gdrive": ("folder", "gdrive://FOLDER_ID/path, FOLDER_ID from the folder's link"),
    "file": ("folder", "file:///absolute/folder"),
    "memory": ("name", "memory://name"),
    "*": ("bucket, remote or folder", "{scheme}://BUCKET-OR-FOLDER/path, or a local folder"),
}


def _load(scheme: str, target: object) -> Callable[..., StorageBackend]:
    try:
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            module = __import__(module_name, fromlist=[attr])
            return getattr(module, attr)
        return target.load()  # an importlib.metadata.EntryPoint
    except Exception as error:  # a broken plugin must not take the others down with a traceback
        raise StorageError(f"storage backend {scheme!r} failed to load: {type(error).__name__}: {error}") from None


def scoped_options(options: dict[str, str] | None, scheme: str) -> dict[str, str]:
    """Options for one scheme: `key=value` applies to every destination, `<scheme>.key=value` to that scheme only."""
    schemes = set(installed_schemes())
    result: dict[str, str] = {}
    scoped: dict[str, str] = {}
    for key, value in (options or {}).items():
        head, dot, rest = key.partition(".")
        if dot and head in schemes:
            if head == scheme:
                scoped[rest] = value
        else:
            result[key] = value
    result.update(scoped)
    return result


def open_backend(url: str, options: dict[str, str] | None = None) -> StorageBackend:
    """The backend for a destination URL; StorageError (one line, listing installed schemes) if unknown."""
    if not url or not str(url).strip():
        raise StorageError("empty storage URL (expected a local path or SCHEME://...)")
    url = str(url)
    scheme = url_scheme(url)
    available = _entry_points()
    if scheme not in available:
        raise StorageError(
            f"unknown storage scheme {scheme!r} in {url!r}; installed: {', '.join(sorted(available))}"
            " (or a local path; plugins: pip install -e plugins/rclone -e plugins/gdrive)"
        )
    factory = _load(scheme, available[scheme])
    return factory(url, scoped_options(options, scheme))


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """`["endpoint_url=http://x", "s3.anon=true"]` -> dict; StorageError for an item without '='."""
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise StorageError(f"bad storage option {pair.split('=')[0]!r}: expected KEY=VALUE")
        options[key.strip()] = value
    return options
