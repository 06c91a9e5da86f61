"""One real xs training run with a checkpoint, made once per test session and shared by the estimate and
generate tests (a training start costs ~15 s on these CPUs)."""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

XS_TRAIN_ARGS = "--model-size xs --dataset builtin --seq-len 64 --batch-size 1 --max-steps 2 --eval-batches 1".split()


@functools.cache
def trained_xs_run() -> Path:
    """runs/t of `python -m miras.train` (xs, 2 steps, seq 64): holds checkpoints/latest and finished."""
    root = Path(tempfile.mkdtemp(prefix="miras-xs-run-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    command = [sys.executable, "-m", "miras.train", *XS_TRAIN_ARGS, "--run-name", "t", "--output-dir", str(root)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "t"


def latest_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
