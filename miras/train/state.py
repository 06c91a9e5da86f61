"""The trainer's state: everything a step changes, in one object the Checkpointer captures and restores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint.trainer_state import capture_rng, restore_rng


@dataclass
class TrainState:
    """A `Checkpointable` (miras.checkpoint.checkpointer): the model and optimizer go into a checkpoint
    through their own formats, the rest through state_dict()/load_state_dict()."""

    model: torch.nn.Module  # the bare model: DDP's inner module, or the FSDP2-sharded one
    optimizer: torch.optim.Optimizer  # the bare optimizer
    scheduler: Any  # the learning-rate schedule (a LambdaLR, possibly wrapped by Accelerate)
    stream: Any  # this rank's data stream (state_dict / load_state_dict / next_batch)
    tokenizer: Any
    facts: dict[str, Any] = field(default_factory=dict)  # run settings a resume checks or reports (seq_len, lr...)
    next_batch: dict | None = None  # the batch read before the model was built (a fresh start uses it)
    step: int = 0
    tokens_seen: int = 0
    training_time: float = 0.0  # seconds of training, across resumes (the checkpoint clock)
    wandb_id: str | None = None

    def take_batch(self) -> dict:
        batch, self.next_batch = self.next_batch, None
        return batch if batch is not None else self.stream.next_batch()

    def state_dict(self) -> dict[str, Any]:
        progress = {"step": self.step, "tokens_seen": self.tokens_seen, "training_time": self.training_time}
        return {
            "progress": {**progress, **self.facts, "wandb_id": self.wandb_id},
            "scheduler": self.scheduler.state_dict(),
            "rank": {"rng": capture_rng(), "data": self.stream.state_dict()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        progress = state["progress"]
        self.step, self.tokens_seen = int(progress["step"]), int(progress["tokens_seen"])
        self.training_time = float(progress["training_time"])
        self.wandb_id = progress.get("wandb_id")
        self.scheduler.load_state_dict(state["scheduler"])
        if state["rank"] is not None:  # None: another world size, each rank's stream starts its new part afresh
            self.stream.load_state_dict(state["rank"]["data"])
            restore_rng(state["rank"]["rng"])
            self.next_batch = None  # it belongs to a fresh start
