"""What a checkpoint argument means: the one resolver behind `--resume PATH|URL`, `--init-from`, `miras
generate` and `miras storage pull`.

A source is a checkpoint folder (`step_XXXXXXXX`), a run folder or its `checkpoints/` folder (then the
checkpoint `latest` names), given as a local path, a `file://` URL or any storage URL. A local source is
used in place. A remote one is downloaded under `into` and verified against its manifest (size and sha256
of every file) before it is returned; for a run folder, the remote `latest` first, then the others newest
first, skipping any that does not verify.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

from ..storage import StorageBackend, StorageError, is_remote, open_backend, redact
from ..storage.base import one_line
from ..storage.fsspec_backend import local_path
from .latest import read_latest
from .layout import CHECKPOINTS_DIR, LATEST_NAME, MANIFEST_NAME, parse_step
from .remote import download_checkpoint, remote_candidates

log = logging.getLogger(__name__)
EXPECTED = "expected a checkpoint folder, a run folder or a storage URL"


class CheckpointNotFound(ValueError):
    """The source names no usable checkpoint (a user error): one line naming it and what is accepted."""


class FetchFailed(RuntimeError):
    """Storage failed while looking or downloading (network, permissions, a missing plugin): one line."""


def is_model_folder(path: Path) -> bool:
    """config.json and weights (a run folder also has a config.json: the training arguments)."""
    weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return (path / "config.json").is_file() and weights


def local_checkpoint(path: Path) -> Path:
    """The checkpoint folder of a local checkpoint, run or checkpoints folder (the one `latest` names)."""
    path = Path(path)
    if path.is_file():
        raise CheckpointNotFound(f"{str(path)!r} is a file ({EXPECTED})")
    if not path.exists():
        raise CheckpointNotFound(f"{str(path)!r} does not exist ({EXPECTED})")
    if is_model_folder(path) or (path / MANIFEST_NAME).is_file():
        return path
    for checkpoints in (path / CHECKPOINTS_DIR, path):
        if (checkpoints / LATEST_NAME).is_file():
            name = read_latest(checkpoints)
            if name and is_model_folder(checkpoints / name):
                return checkpoints / name
            what = f"names {name}, which is not a checkpoint folder here" if name else "holds no checkpoint name"
            raise CheckpointNotFound(f"{str(checkpoints / LATEST_NAME)!r} {what}")
    raise CheckpointNotFound(
        f"{str(path)!r} is not a checkpoint folder (expected a folder with config.json and weights, a run folder "
        f"with checkpoints/{LATEST_NAME}, or a storage URL)"
    )


def cache_folder(url: str, cache_dir: Path | None = None) -> Path:
    """Where a URL's checkpoints land by default: CACHE/<the URL made into one folder name>."""
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "miras" / "checkpoints"
    return root / re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/")).strip("_")


def holds_checkpoint(backend: StorageBackend) -> bool:
    """Whether the backend's URL is one checkpoint folder (its manifest.json at the top)."""
    with tempfile.TemporaryDirectory(prefix="miras-probe-") as tmp:
        try:
            backend.get(MANIFEST_NAME, Path(tmp) / MANIFEST_NAME)
            return True
        except FileNotFoundError:
            return False


def resolve_checkpoint(source: str, into: Path | None = None, options: dict[str, str] | None = None) -> Path:
    """The local checkpoint folder for `source` (see the module docstring). Remote checkpoints go to
    `into/<step folder>` (default: a cache folder named after the URL); files already there with the
    manifest's sha256 are kept rather than downloaded again."""
    source = str(source)
    try:
        remote = is_remote(source)
    except StorageError as error:
        raise CheckpointNotFound(str(error)) from None
    if not remote:
        return local_checkpoint(local_path(source))
    into = Path(into) if into is not None else cache_folder(source)
    try:
        backend = open_backend(source, options)
        if holds_checkpoint(backend):
            name = source.rstrip("/").rsplit("/", 1)[-1]
            return download_checkpoint(backend, "", into / (name if parse_step(name) is not None else "checkpoint"),
                                       reuse_local=True)  # fmt: skip
        for name in remote_candidates(backend):
            try:
                return download_checkpoint(backend, f"{CHECKPOINTS_DIR}/{name}", into / name, reuse_local=True)
            except StorageError as error:
                log.warning("skipping remote checkpoint %s: %s", name, redact(one_line(error), options))
    except StorageError as error:
        raise CheckpointNotFound(redact(one_line(error), options)) from None
    except Exception as error:  # a backend's own (network, permissions, missing plugin): one line
        raise FetchFailed(f"{redact(source, options)}: {redact(one_line(error), options)}") from None
    raise CheckpointNotFound(f"{source!r}: no valid checkpoint here (expected a checkpoint folder or a run folder URL)")
