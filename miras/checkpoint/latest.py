"""The `latest` pointer: the one reader and the one writer, for a local checkpoints folder and a remote run.

`checkpoints/latest` is a text file holding the newest committed folder's name (`step_00012000`). Locally it
is replaced atomically (temporary file, fsync, rename); remotely through the backend's atomic `put`. It is a
hint for readers: resume trusts the folders and their manifests, and anything in `latest` that is not a
checkpoint folder's name reads as no pointer at all.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from ..storage import StorageBackend
from .files import write_text_atomic
from .layout import CHECKPOINTS_DIR, LATEST_NAME, parse_step

Where = Path | StorageBackend  # a local checkpoints folder, or a backend opened on a remote run folder


def read_latest(where: Where) -> str | None:
    """The checkpoint folder name `latest` holds, or None (no pointer, or one that names no checkpoint)."""
    if isinstance(where, Path):
        try:
            text = (where / LATEST_NAME).read_text()
        except (OSError, UnicodeDecodeError):
            return None
    else:
        with tempfile.TemporaryDirectory(prefix="miras-latest-") as tmp:
            try:
                where.get(f"{CHECKPOINTS_DIR}/{LATEST_NAME}", Path(tmp) / LATEST_NAME)
                text = (Path(tmp) / LATEST_NAME).read_text()
            except (FileNotFoundError, UnicodeDecodeError):
                return None
    name = text.strip()
    return name if parse_step(name) is not None else None


def write_latest(where: Where, name: str) -> None:
    """Point `latest` at the checkpoint folder `name` (atomically for every reader)."""
    if parse_step(name) is None:
        raise ValueError(f"latest must name a checkpoint folder (step_XXXXXXXX), not {name!r}")
    if isinstance(where, Path):
        write_text_atomic(where / LATEST_NAME, name + "\n")
        return
    with tempfile.TemporaryDirectory(prefix="miras-latest-") as tmp:
        pointer = Path(tmp) / f"latest-{uuid.uuid4().hex}"
        pointer.write_text(name + "\n")
        where.put(pointer, f"{CHECKPOINTS_DIR}/{LATEST_NAME}")
