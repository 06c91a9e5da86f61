"""Running vast/*.sh in a temporary root, with an environment that holds no real secret or remote."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VAST = REPO / "vast"


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test process's environment minus anything that could name a real remote or secret."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RCLONE_CONFIG_", "MIRAS_", "GDRIVE_", "WANDB_", "AWS_"))
    }
    env["RCLONE_CONFIG"] = str(tmp_path / "no-rclone.conf")  # no user rclone.conf remotes
    env.update(extra)
    return env


def run_script(name: str, env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(VAST / name), *args], env=env, capture_output=True, text=True, timeout=timeout)


def process_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (an orphan's parent may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
