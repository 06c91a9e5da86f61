"""Names inside a run folder: `checkpoints/step_XXXXXXXX/`, its `manifest.json`, the `latest` pointer."""

from __future__ import annotations

import re

CHECKPOINTS_DIR = "checkpoints"
MANIFEST_NAME = "manifest.json"
LATEST_NAME = "latest"  # a text file holding the newest committed folder's name, e.g. step_00012000
TRAINER_DIR = "trainer"
TMP_SUFFIX = ".tmp"
LOCK_NAME = "lock"
FINISHED_NAME = "finished"
WANDB_ID_NAME = "wandb_id"
_STEP_FOLDER = re.compile(r"^step_(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a committed checkpoint folder's name; None for anything else (tmp folders included)."""
    match = _STEP_FOLDER.match(name)
    return int(match.group(1)) if match else None
