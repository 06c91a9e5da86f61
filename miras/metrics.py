"""Run logging: config.json, metrics.jsonl, the progress bar, MFU, and wandb."""

from __future__ import annotations

import json
import os
import resource
import secrets
import sys
from pathlib import Path
from typing import Any

import torch

from .storage import is_secret_name
from .storage.base import redact_word

# Dense bf16 peak TFLOP/s for MFU; --peak-tflops overrides (and is needed on other hardware).
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "4090": 165.0}
def redact(value: Any, name: str = "") -> Any:
    """`value` with secrets replaced by '***' (recursively through dicts and lists): anything under a secret's
    name, `NAME=value` items naming one (storage options) and URL passwords (miras.storage's one list)."""
    if name and is_secret_name(name) and value not in (None, "", False):
        return "***"
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, name) for v in value]
    if isinstance(value, str):
        return redact_word(value)
    return value


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return tflops
    return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def training_flops_per_token(num_parameters: int) -> float:
    """6 N: forward + backward of the weights (the memory's own cost is small next to it at these sizes)."""
    return 6.0 * num_parameters


class RunLogger:
    """metrics.jsonl rows on the main process, a tqdm bar on a terminal, plain lines otherwise, wandb if enabled."""

    def __init__(self, run_dir: Path | None, total_steps: int, start_step: int, enabled: bool, wandb_run=None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl" if run_dir is not None else None
        self.wandb_run = wandb_run
        self.write_failed = False
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: v for k, v in row.items() if v is not None}
        if self.path is not None:
            try:
                with open(self.path, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
            except OSError as error:  # a full disk: training goes on, the checkpoints decide whether it can
                if not self.write_failed:
                    print(f"miras train: warning: could not append to {self.path}: {error} (rows are skipped until "
                          "it works again)", flush=True)  # fmt: skip
                self.write_failed = True
            else:
                self.write_failed = False
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        summary = " ".join(_short(k, v) for k, v in row.items() if k in _SHOWN)
        if self.bar is not None:
            self.bar.set_postfix_str(summary)
        else:
            print(f"step {row['step']}: {summary}", flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_SHOWN = ("loss", "eval_loss", "recall_accuracy", "lr", "tokens_per_second", "mfu", "sync_queued", "sync_failed")


def _short(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key}={value:.4g}"
    return f"{key}={value}"


def write_run_config(run_dir: Path, config: dict[str, Any]) -> None:
    path = run_dir / "config.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(redact(config), indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def start_wandb(args, run_dir: Path, config: dict[str, Any]):
    """A wandb run whose files stay in the run folder and whose id is kept there for resumes."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("miras train: error: --wandb needs wandb: pip install 'miras[wandb]'") from None
    wandb_dir = run_dir / "wandb"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        os.environ[variable] = str(wandb_dir)  # everything wandb writes stays with the run
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(8)
    id_file.write_text(run_id + "\n")
    # wandb records this process's command line as the run's program arguments: secrets out of it first.
    sys.argv[1:] = [redact_word(word) for word in sys.argv[1:]]
    run = wandb.init(
        project=args.wandb_project or os.environ.get("WANDB_PROJECT", "miras"),
        entity=args.wandb_entity or os.environ.get("WANDB_ENTITY"),
        name=args.wandb_name or args.run_name,
        tags=[t for t in (args.wandb_tags or "").split(",") if t] or None,
        mode=args.wandb_mode or os.environ.get("WANDB_MODE"),
        dir=str(wandb_dir),
        id=run_id,
        resume="allow",
        config=redact(config),
    )
    return run
