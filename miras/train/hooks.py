"""Observers a caller attaches to `train(args, hooks)`: tests record what each rank read, the gradients, the
live model's logits at each checkpoint, or poison a loss (tests/hooked_train.py). The loop calls them at
fixed points and never reads the environment for them; the defaults do nothing."""

from __future__ import annotations

from typing import Any

import torch


class Hooks:
    def on_start(self, rank: int, world_size: int) -> None:
        """Once, before the first step."""

    def on_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Each micro-batch as read from the data stream (on the CPU)."""

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of a micro-batch of optimizer step `step` (1-based), before backward; may replace it."""
        return loss

    def on_gradients(self, step: int, model: torch.nn.Module) -> None:
        """After the last micro-batch's backward of step `step`, before clipping and the optimizer."""

    def on_log(self, row: dict[str, Any]) -> None:
        """Each metrics row as logged (on every rank; its numbers are reduced over ranks)."""

    def on_checkpoint(self, step: int, model: torch.nn.Module) -> None:
        """Before a checkpoint captures the model at `step` (on every rank; collectives allowed)."""

    def on_end(self, model: torch.nn.Module) -> None:
        """After the last step and checkpoint (on every rank; collectives allowed)."""
