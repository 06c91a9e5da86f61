"""What a checkpoints folder holds: committed checkpoints, their flags, the newest resumable one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .latest import read_latest
from .layout import LATEST_NAME, parse_step
from .manifest import ManifestError, read_manifest, verify_folder


@dataclass
class CheckpointInfo:
    step: int
    path: Path
    milestone: bool
    weights_only: bool
    created: str
    size: int

    @property
    def resumable(self) -> bool:
        return not self.weights_only


def committed(folder: Path) -> list[Path]:
    """Folders named step_XXXXXXXX (tmp folders excluded), oldest first. Validity is not checked here."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(parse_step(p.name), p) for p in folder.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def describe(path: Path) -> CheckpointInfo:
    """Flags from the manifest (no hashing); raises ManifestError for a folder without a valid manifest."""
    manifest = read_manifest(path)
    return CheckpointInfo(
        step=int(manifest["step"]),
        path=Path(path),
        milestone=bool(manifest.get("milestone")),
        weights_only=bool(manifest.get("weights_only")),
        created=str(manifest.get("created", "")),
        size=sum(int(entry["size"]) for entry in manifest["files"].values()),
    )


def catalog(folder: Path) -> list[CheckpointInfo]:
    """Every committed checkpoint with a readable manifest, oldest first."""
    infos = []
    for path in committed(folder):
        try:
            infos.append(describe(path))
        except ManifestError:
            continue
    return infos


def find_resumable(folder: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies against its manifest and holds the trainer state.

    Invalid ones (a truncated shard, a flipped byte, no manifest) are skipped with a warning naming them.
    The `latest` pointer is only a hint for readers of remote copies: the folders themselves decide.
    """
    latest = read_latest(folder)
    for path in reversed(committed(folder)):
        problems = verify_folder(path)
        if problems:
            more = f" (+{len(problems) - 1} more)" if problems[1:] else ""
            warn(f"skipping checkpoint {path}: {problems[0]}{more}")
            continue
        if describe(path).weights_only:
            continue
        pointer = f"{Path(folder) / LATEST_NAME}"
        if latest is None and (Path(folder) / LATEST_NAME).exists():
            warn(f"{pointer} does not hold a checkpoint name; resuming from {path.name}, the newest valid checkpoint")
        elif latest and parse_step(latest) > parse_step(path.name):
            warn(f"{pointer} names {latest}, which is not a valid checkpoint; resuming from {path.name}, the newest "
                 "one that is")  # fmt: skip
        elif latest and latest != path.name:  # killed between the rename and the pointer's update
            warn(f"{pointer} names the older {latest}; resuming from {path.name}, the newest valid checkpoint")
        return path
    return None
