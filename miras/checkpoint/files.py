"""Durable file operations for the commit: fsync files and folders, atomic pointer replacement."""

from __future__ import annotations

import os
from pathlib import Path

from .layout import CHECKPOINTS_DIR


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder (so the names are durable too)."""
    folders = [folder]
    for path in Path(folder).rglob("*"):
        if path.is_file():
            fsync_path(path)
        elif path.is_dir():
            folders.append(path)
    for path in folders:
        fsync_path(path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR
