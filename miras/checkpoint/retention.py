"""Pruning after a commit: keep the last N plus the last M milestones, never what `latest` names.

A failed delete is reported and left for the next prune; it never stops training. Milestones that
leave the keep-last set can shed their trainer state (`--milestone-weights-only`), keeping only what
from_pretrained needs; their manifest is rewritten so they still verify.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from .catalog import catalog
from .faults import fault_point
from .files import read_latest
from .layout import MANIFEST_NAME, TRAINER_DIR
from .manifest import read_manifest, write_manifest
from .schedule import select_kept


def prune(
    folder: Path,
    keep_last: int,
    keep_milestones: int,
    weights_only_milestones: bool = False,
    log: Callable[[str], None] = print,
) -> list[int]:
    """Delete checkpoints outside the retention sets; returns the steps deleted."""
    infos = catalog(folder)
    latest = read_latest(folder)
    protect = {info.step for info in infos if info.path.name == latest}
    kept = select_kept([(i.step, i.milestone) for i in infos], keep_last, keep_milestones, protect)
    deleted = []
    for info in infos:
        if info.step in kept:
            continue
        try:
            fault_point("prune_delete")
            # The manifest goes first: a half-deleted folder must never look like a checkpoint.
            (info.path / MANIFEST_NAME).unlink(missing_ok=True)
            shutil.rmtree(info.path)
            deleted.append(info.step)
        except OSError as error:
            log(f"warning: could not delete checkpoint {info.path}: {error} (will retry at the next prune)")
    if weights_only_milestones:
        newest = {i.step for i in sorted(infos, key=lambda i: i.step)[-keep_last:]} if keep_last else set()
        for info in infos:
            if info.step in kept and info.milestone and not info.weights_only and info.step not in newest | protect:
                try:
                    strip_trainer_state(info.path)
                except OSError as error:
                    log(f"warning: could not slim milestone {info.path}: {error}")
    return deleted


def strip_trainer_state(path: Path) -> None:
    """Keep only the model and tokenizer of a checkpoint (it can no longer be resumed, only loaded)."""
    manifest = read_manifest(path)
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(TRAINER_DIR + "/")}
    manifest["weights_only"] = True
    write_manifest(path, manifest)  # first: the manifest must never list files that are gone
    shutil.rmtree(path / TRAINER_DIR, ignore_errors=True)
