"""Held-out loss of a causal LM, overall and by position in the window (the long-context view).

A recurrent memory earns its place where a token's context lies beyond the local window: its loss
at late positions falls below that of the same model without the memory. `PositionLoss` keeps
per-token next-token losses summed into position buckets (0-64, 64-512, 512-2048, 2048-4096 and
on), so one pass over held-out windows gives both the mean loss and its profile along the window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)
# Bucket edges in tokens: the conv's reach, a short context, the usual training lengths, beyond.
POSITION_EDGES: tuple[int, ...] = (0, 64, 512, 2048, 4096, 16384, 65536)


def next_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss (nats) of predicting labels[:, t + 1] from logits[:, t]: (B, T - 1), NaN where ignored."""
    targets = labels[:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
    ).view_as(targets)
    return losses.masked_fill(targets == -100, math.nan)


class PositionLoss:
    """Sums of next-token losses by position bucket; position t is the token predicted at index t + 1."""

    def __init__(self, edges: Sequence[int] = POSITION_EDGES):
        self.edges = tuple(edges)
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, losses: torch.Tensor) -> None:
        """losses: (B, T) from next_token_losses; NaN entries (ignored labels) are skipped."""
        positions = torch.arange(1, losses.shape[1] + 1)
        for low, high in zip(self.edges[:-1], self.edges[1:]):
            if low >= losses.shape[1] + 1:
                break
            part = losses[:, (positions > low) & (positions <= high)] if low else losses[:, positions <= high]
            valid = part[~torch.isnan(part)]
            if valid.numel():
                name = f"{low}-{high}"
                self.sums[name] = self.sums.get(name, 0.0) + float(valid.double().sum())
                self.counts[name] = self.counts.get(name, 0) + valid.numel()

    def mean(self) -> float:
        """The mean loss over every counted token (nats)."""
        total = sum(self.counts.values())
        return sum(self.sums.values()) / total if total else math.nan

    def by_bucket(self) -> dict[str, float]:
        """{"0-64": mean loss in nats, ...} for the buckets that saw tokens, in position order."""
        return {name: self.sums[name] / self.counts[name] for name in self.sums}

    def tokens(self) -> dict[str, int]:
        return dict(self.counts)


@torch.no_grad()
def evaluate_positions(model, windows: torch.Tensor, batch_size: int, edges: Sequence[int] = POSITION_EDGES):
    """PositionLoss of a causal LM over (N, T) token windows (labels = inputs), in eval mode, no cache."""
    was_training = model.training
    model.eval()
    result = PositionLoss(edges)
    try:
        for batch in windows.split(batch_size):
            logits = model(input_ids=batch, use_cache=False).logits
            result.add(next_token_losses(logits, batch))
    finally:
        model.train(was_training)
    return result


@torch.no_grad()
def evaluate_positions_limited(
    model, windows: torch.Tensor, batch_size: int, context: int, edges: Sequence[int] = POSITION_EDGES
):
    """PositionLoss as evaluate_positions, but each prediction sees at most the last 2 * context tokens.

    The window is scored in blocks of `context` positions; the block starting at s runs from token s - context,
    so a prediction at position p >= context sees between context + 1 and 2 * context tokens (all of them below
    context). Against evaluate_positions on the same windows this says how much of the loss at late positions
    comes from tokens further back than that: for a recurrent model, what its state carries across thousands
    of tokens, for a model without one (a local window), nothing. Costs about two forward passes per window.
    """
    was_training = model.training
    model.eval()
    result = PositionLoss(edges)
    length = windows.shape[1]
    try:
        for batch in windows.split(batch_size):
            losses = torch.full((batch.shape[0], length - 1), math.nan)
            first = batch[:, : context + 1]
            losses[:, : first.shape[1] - 1] = next_token_losses(model(input_ids=first, use_cache=False).logits, first)
            for start in range(context, length - 1, context):
                piece = batch[:, start - context : start + context + 1]
                scored = next_token_losses(model(input_ids=piece, use_cache=False).logits, piece)[:, context:]
                losses[:, start : start + scored.shape[1]] = scored
            result.add(losses)
    finally:
        model.train(was_training)
    return result
