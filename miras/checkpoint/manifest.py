"""manifest.json: every file of a checkpoint with its size and sha256, written last.

A folder whose manifest is missing, unreadable, or disagrees with the files does not count as a
checkpoint. Storage code uses the same check after a download.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .layout import MANIFEST_NAME

FORMAT_VERSION = 1
# Multi-node runs with node-local disks: node index (a string) -> the files that node wrote. A node's local
# folder holds only its own files, so it never verifies; the remote copy holds them all.
NODES_KEY = "nodes"
_NODE_PART = (
    ": this folder is one node's part of a checkpoint saved on node-local disks; the complete checkpoint is the "
    "--sync-to copy"
)
_HASH_BLOCK = 8 << 20


class ManifestError(Exception):
    """A checkpoint folder that is not a valid, complete checkpoint."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under `folder` (except the manifest itself): relative POSIX path -> size, sha256."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in _files(folder)
    }


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_manifest(
    folder: Path | None,
    step: int,
    milestone: bool,
    extra: dict[str, Any] | None = None,
    files: dict[str, dict[str, Any]] | None = None,
    created: str | None = None,
) -> dict[str, Any]:
    """The manifest of `folder`'s files, or of `files` (entries gathered from several nodes)."""
    return {
        "format": FORMAT_VERSION,
        "step": int(step),
        "milestone": bool(milestone),
        "created": created or now_utc(),
        **(extra or {}),
        "files": file_entries(folder) if files is None else files,
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json durably (temp file, fsync, rename)."""
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_name(MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{folder}: no {MANIFEST_NAME} (an incomplete checkpoint)") from None
    except (OSError, ValueError) as error:
        raise ManifestError(f"{path}: unreadable ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "step" not in manifest:
        raise ManifestError(f"{path}: not a miras manifest (no 'files' or 'step')")
    return manifest


def verify_folder(folder: Path, check_hashes: bool = True) -> list[str]:
    """Problems found in a checkpoint folder against its manifest; an empty list means valid."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except ManifestError as error:
        return [str(error)]
    problems = []
    nodes = manifest.get(NODES_KEY) if isinstance(manifest.get(NODES_KEY), dict) else {}
    where = {name: node for node, names in nodes.items() if isinstance(names, list) for name in names}
    explained = False
    for name, entry in sorted(manifest["files"].items()):
        path = folder / name
        if not path.is_file():
            if name in where and len(nodes) > 1:  # a node's part of a multi-node checkpoint (node-local disks)
                problems.append(f"{name}: missing (on node {where[name]}{'' if explained else _NODE_PART})")
                explained = True
            else:
                problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"{name}: size {size}, manifest says {entry['size']}")
        elif check_hashes and sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems
