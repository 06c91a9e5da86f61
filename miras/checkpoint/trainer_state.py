"""The torch side of a checkpoint: model weights for from_pretrained, the optimizer (sharded through
torch.distributed.checkpoint), per-rank RNG and data position, restored exactly on resume.

One code path for one process, DDP and FSDP2: the full model state dict is gathered to rank 0 on the
CPU (a collective under FSDP2), the optimizer is saved with DCP, which writes each rank's shard (under
DDP the replicated state is written once). DCP's async_save copies to CPU memory and writes in a thread;
its collectives use a separate gloo group so they never interleave with training's.
"""

from __future__ import annotations

import json
import random
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..modeling import current_parameter_name
from ..remote_code import write_model_code
from .layout import TRAINER_DIR

OPTIMIZER_DIR = f"{TRAINER_DIR}/optimizer"
TRAINER_STATE = f"{TRAINER_DIR}/trainer_state.json"
SCHEDULER_STATE = f"{TRAINER_DIR}/scheduler.pt"

_checkpoint_group = None
# DCP notes that a single process saves without collectives: expected here, not worth a line per checkpoint.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def rank_state_name(rank: int) -> str:
    return f"{TRAINER_DIR}/rank_{rank:05d}.pt"


def checkpoint_process_group():
    """A gloo group of all ranks for DCP's background collectives (None when not distributed)."""
    global _checkpoint_group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if _checkpoint_group is None:
        _checkpoint_group = dist.new_group(backend="gloo")
    return _checkpoint_group


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, on rank 0 (other ranks get {}). Copies, never views of the
    live parameters, since the loop keeps training while they are written."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def save_weights(folder: Path, state: dict[str, torch.Tensor], config, tokenizer, shard_size: int | str) -> None:
    """A from_pretrained folder: config, generation config, sharded safetensors + index, tokenizer."""
    from huggingface_hub import save_torch_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    if getattr(config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied: stored once, as HF does
    config.architectures = ["MonetaForCausalLM"]
    config.save_pretrained(folder)
    try:
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(folder)
    except Exception:  # a generation config is a convenience, never a reason to lose a checkpoint
        pass
    save_torch_state_dict(state, folder, max_shard_size=shard_size, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_model_code(folder)  # loads with trust_remote_code=True where miras is not installed


def save_optimizer(model, optimizer, folder: Path) -> Future:
    """Start the sharded optimizer save (collective); the returned future completes when every rank's
    shard and DCP's metadata are written."""
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    group = checkpoint_process_group()
    return dcp.async_save(state, checkpoint_id=str(folder / OPTIMIZER_DIR), process_group=group, no_dist=group is None)


def load_optimizer(model, optimizer, folder: Path) -> None:
    path = Path(folder) / OPTIMIZER_DIR
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    saved_as = _saved_parameter_names(path)
    if saved_as:  # saved by a version with other parameter names: read under those, use under today's
        state["optimizer"] = _rename_parameters(state["optimizer"], saved_as)
    group = checkpoint_process_group()
    dcp.load(state, checkpoint_id=str(path), process_group=group, no_dist=group is None)
    if saved_as:
        state["optimizer"] = _rename_parameters(state["optimizer"], {new: old for old, new in saved_as.items()})
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _saved_parameter_names(path: Path) -> dict[str, str]:
    """{today's name: the name the checkpoint holds} for the parameters an earlier version named otherwise."""
    prefix = "optimizer.state."
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {key.removeprefix(prefix).rsplit(".", 1)[0] for key in keys if key.startswith(prefix)}
    return {current_parameter_name(name): name for name in saved if current_parameter_name(name) != name}


def _rename_parameters(optimizer_state: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    return {
        "state": {names.get(name, name): value for name, value in optimizer_state["state"].items()},
        "param_groups": [
            {**group, "params": [names.get(name, name) for name in group["params"]]}
            for group in optimizer_state["param_groups"]
        ],
    }


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, sort_keys=True, default=str) + "\n")


def read_trainer_state(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / TRAINER_STATE).read_text())


def software_versions() -> dict[str, str]:
    """The versions a checkpoint records in its manifest (and a run in its config.json)."""
    import sys

    import accelerate
    import transformers

    from .. import __version__

    return {
        "miras": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": sys.version.split()[0],
    }
