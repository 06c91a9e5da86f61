"""Retention: one policy (the last N checkpoints plus the last M milestones, never what `latest` names),
applied after each commit to the local checkpoints folder here and to each remote run by the Syncer.

A failed delete is reported and left for the next prune; it never stops training. Milestones that
leave the keep-last set can shed their trainer state (`--milestone-weights-only`), keeping only what
from_pretrained needs; their manifest is rewritten so they still verify.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .catalog import catalog
from .faults import fault_point
from .files import fsync_tree
from .latest import read_latest
from .layout import MANIFEST_NAME, TRAINER_DIR
from .manifest import build_manifest, read_manifest, write_manifest


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints stay: the newest `keep_last` plus the newest `keep_milestones` milestones (the union),
    plus the protected ones (what `latest` names, the one just written). None means no limit."""

    keep_last: int | None = 12
    keep_milestones: int | None = 24

    @property
    def keeps_all(self) -> bool:
        return self.keep_last is None and self.keep_milestones is None

    def kept(self, checkpoints: Iterable[tuple[int, bool]], protect: Iterable[int] = ()) -> set[int]:
        """Steps to keep among `checkpoints`, given as (step, is_milestone)."""
        ordered = sorted(checkpoints, reverse=True)
        newest = {step for step, _ in _first(ordered, self.keep_last)}
        milestones = {step for step, milestone in _first([c for c in ordered if c[1]], self.keep_milestones)}
        return newest | milestones | set(protect)


def _first(items: list, count: int | None) -> list:
    return list(items) if count is None else list(items)[: max(0, count)]


KEEP_ALL = RetentionPolicy(None, None)


def prune(
    folder: Path,
    policy: RetentionPolicy,
    weights_only_milestones: bool = False,
    log: Callable[[str], None] = print,
    weights_bf16: bool = False,
) -> list[int]:
    """Delete checkpoints outside the retention policy; returns the steps deleted."""
    infos = catalog(folder)
    latest = read_latest(folder)
    protect = {info.step for info in infos if info.path.name == latest}
    kept = policy.kept([(i.step, i.milestone) for i in infos], protect)
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
        newest = {step for step, _ in _first(sorted(((i.step, 0) for i in infos), reverse=True), policy.keep_last)}
        for info in infos:
            if info.step in kept and info.milestone and not info.weights_only and info.step not in newest | protect:
                try:
                    strip_trainer_state(info.path, bf16=weights_bf16)
                except OSError as error:
                    log(f"warning: could not slim milestone {info.path}: {error}")
    return deleted


def strip_trainer_state(path: Path, bf16: bool = False) -> None:
    """Keep only the model and tokenizer of a checkpoint (it can no longer be resumed, only loaded).

    With `bf16`, the weights are also stored in bfloat16 (half the size again): the slim copy is built
    beside the original as step_X.slim.tmp, then swapped in (original -> step_X.old.tmp, slim -> step_X);
    `recover_interrupted_swap` puts the original back if the process dies between the two renames.
    """
    manifest = read_manifest(path)
    if not bf16:
        manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(TRAINER_DIR + "/")}
        manifest["weights_only"] = True
        write_manifest(path, manifest)  # first: the manifest must never list files that are gone
        shutil.rmtree(path / TRAINER_DIR, ignore_errors=True)
        return
    slim, old = path.with_name(path.name + ".slim.tmp"), path.with_name(path.name + ".old.tmp")
    shutil.rmtree(slim, ignore_errors=True)
    slim.mkdir()
    for name in manifest["files"]:
        if name.startswith(TRAINER_DIR + "/"):
            continue
        source, target = path / name, slim / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors"):
            _save_bf16(source, target)
        else:
            shutil.copy2(source, target)
    _rewrite_json(slim / "config.json", lambda c: {**c, "dtype": "bfloat16"})
    index = slim / "model.safetensors.index.json"
    if index.exists():
        total = sum(p.stat().st_size for p in slim.glob("*.safetensors"))
        _rewrite_json(index, lambda x: {**x, "metadata": {**x.get("metadata", {}), "total_size": total}})
    extra = {k: v for k, v in manifest.items() if k not in ("files", "step", "milestone", "created", "format")}
    extra.update(weights_only=True, weights_dtype="bfloat16")
    fsync_tree(slim)
    write_manifest(slim, build_manifest(slim, manifest["step"], manifest.get("milestone", False), extra))
    os.replace(path, old)
    os.replace(slim, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_swap(folder: Path) -> None:
    """A bf16 slimming killed between its two renames: the original (step_X.old.tmp) goes back in place."""
    for old in Path(folder).glob("step_*.old.tmp"):
        original = old.with_name(old.name[: -len(".old.tmp")])
        if not original.exists():
            os.replace(old, original)


def _save_bf16(source: Path, target: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(source).items()}
    save_file(tensors, target, metadata={"format": "pt"})


def _rewrite_json(path: Path, change) -> None:
    if path.exists():
        path.write_text(json.dumps(change(json.loads(path.read_text())), indent=2, sort_keys=True) + "\n")
