"""Checkpoints at a remote run folder: find, download and verify them (resume, `miras storage pull`,
`miras generate URL`).

A remote run folder mirrors the local one: `URL/<run_name>/config.json`, `metrics.jsonl`,
`checkpoints/step_XXXXXXXX/...` (manifest.json uploaded last) and `checkpoints/latest`. A remote folder
without manifest.json is an unfinished upload and does not count as a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..storage import StorageBackend, StorageError, join_key, open_backend
from ..storage.base import clean_key, one_line
from .latest import read_latest, write_latest
from .layout import CHECKPOINTS_DIR, MANIFEST_NAME, parse_step
from .manifest import ManifestError, read_manifest, sha256_file, verify_folder

log = logging.getLogger(__name__)

RUN_FILES = ("metrics.jsonl",)


def run_url(url: str, run_name: str) -> str:
    """`URL/<run_name>`: where a run lands under a `--sync-to` destination."""
    return f"{str(url).rstrip('/')}/{clean_key(run_name)}"


def _backend(backend_or_url: StorageBackend | str | Path, options: dict[str, str] | None) -> StorageBackend:
    if isinstance(backend_or_url, (str, Path)):
        return open_backend(str(backend_or_url), options)
    return backend_or_url


def find_remote_checkpoints(
    url_run_prefix: StorageBackend | str, options: dict[str, str] | None = None
) -> list[tuple[int, str]]:
    """Complete remote checkpoints of a run folder (those with a manifest.json), oldest first, as
    `(step, "checkpoints/step_XXXXXXXX")` keys relative to the run folder."""
    backend = _backend(url_run_prefix, options)
    found = []
    for key in backend.list(CHECKPOINTS_DIR):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == MANIFEST_NAME and parse_step(parts[1]) is not None:
            found.append((parse_step(parts[1]), f"{CHECKPOINTS_DIR}/{parts[1]}"))
    return sorted(found)


def remote_candidates(backend: StorageBackend) -> list[str]:
    """Names of the complete remote checkpoints in the order resume tries them: the one remote `latest` names,
    then the others newest first."""
    names = [key.rsplit("/", 1)[1] for _step, key in reversed(find_remote_checkpoints(backend))]
    latest = read_latest(backend)
    if latest in names:
        names.remove(latest)
        names.insert(0, latest)
    return names


def download_checkpoint(
    backend_or_url: StorageBackend | str,
    remote_folder_key: str,
    local_dest: Path,
    options: dict[str, str] | None = None,
    reuse_local: bool = False,
) -> Path:
    """Download one remote checkpoint folder into `<local_dest>.tmp`, verify it against its manifest, then
    rename it to `local_dest` (replacing what was there). StorageError (one line) if it is incomplete or
    does not match its manifest; nothing is left behind then. With `reuse_local`, a file already in
    `local_dest` with the manifest's size and sha256 (e.g. a node's own part of a multi-node checkpoint) is
    linked or copied instead of downloaded."""
    backend = _backend(backend_or_url, options)
    folder = clean_key(remote_folder_key)
    where = f"{backend.url.rstrip('/')}/{folder}".rstrip("/")
    local_dest = Path(local_dest)
    tmp = local_dest.with_name(local_dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            backend.get(join_key(folder, MANIFEST_NAME), tmp / MANIFEST_NAME)
        except FileNotFoundError:
            raise StorageError(f"{where}: no {MANIFEST_NAME} (not a checkpoint, or an unfinished upload)") from None
        try:
            manifest = read_manifest(tmp)
        except ManifestError as error:
            raise StorageError(f"{where}: {error}") from None
        for name in sorted(manifest["files"]):
            if reuse_local and _reuse(local_dest / name, tmp / name, manifest["files"][name]):
                continue
            try:
                backend.get(join_key(folder, name), tmp / name)
            except FileNotFoundError:
                raise StorageError(f"{where}: {name} is listed in the manifest but missing remotely") from None
        problems = verify_folder(tmp)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise StorageError(f"{where}: downloaded checkpoint does not match its manifest: {problems[0]}{more}")
        if local_dest.exists():
            shutil.rmtree(local_dest)
        local_dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, local_dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local_dest


def _reuse(have: Path, target: Path, entry: dict) -> bool:
    try:
        if not have.is_file() or have.stat().st_size != entry["size"] or sha256_file(have) != entry["sha256"]:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(have, target)
        except OSError:
            shutil.copy2(have, target)
        return True
    except (OSError, KeyError, TypeError):
        return False


def pull_latest(
    url_run: StorageBackend | str,
    local_run_dir: Path,
    options: dict[str, str] | None = None,
    run_files: tuple[str, ...] = RUN_FILES,
    overwrite_run_files: bool = False,
) -> Path | None:
    """Download the newest valid checkpoint of a remote run folder into `local_run_dir/checkpoints/`.

    Tries the one remote `latest` names, then the others newest first, skipping (with a warning) any that is
    incomplete or fails its manifest. Points the local `checkpoints/latest` at it and fetches the run's
    `run_files` (metrics.jsonl) when they are missing locally (or always, with `overwrite_run_files`).
    Returns the local checkpoint folder, or None when the remote run folder has no valid checkpoint.
    """
    backend = _backend(url_run, options)
    local_run_dir = Path(local_run_dir)
    checkpoints_dir = local_run_dir / CHECKPOINTS_DIR
    for name in remote_candidates(backend):
        try:
            path = download_checkpoint(backend, f"{CHECKPOINTS_DIR}/{name}", checkpoints_dir / name)
        except StorageError as error:
            log.warning("skipping remote checkpoint %s: %s", name, one_line(error))
            continue
        write_latest(checkpoints_dir, name)
        for run_file in run_files:
            target = local_run_dir / run_file
            if target.exists() and not overwrite_run_files:
                log.info("keeping local %s (not replaced by the remote copy)", target)
                continue
            try:
                backend.get(run_file, target)
            except FileNotFoundError:
                log.info("remote run folder has no %s", run_file)
        return path
    return None


def remote_checkpoint_summary(backend: StorageBackend) -> list[dict]:
    """For `miras storage ls --checkpoints`: each complete checkpoint's step, key, milestone flag, latest mark."""
    latest = read_latest(backend)
    summary = []
    for step, key in find_remote_checkpoints(backend):
        with tempfile.TemporaryDirectory(prefix="miras-manifest-") as tmp:
            backend.get(f"{key}/{MANIFEST_NAME}", Path(tmp) / MANIFEST_NAME)
            manifest = json.loads((Path(tmp) / MANIFEST_NAME).read_text())
        summary.append(
            {
                "step": step,
                "key": key,
                "milestone": bool(manifest.get("milestone")),
                "files": len(manifest.get("files", {})),
                "bytes": sum(int(e.get("size", 0)) for e in manifest.get("files", {}).values()),
                "latest": key.rsplit("/", 1)[1] == latest,
            }
        )
    return summary
