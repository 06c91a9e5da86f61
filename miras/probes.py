"""Probes of the memory: does a model bind keys to values, and what does it do without its memory?

- `recall_batch`: associative recall. PAIRS distinct keys drawn from KEYS key tokens, each followed
  by a random value token, then GAP separators, then QUERIES of the keys (one by default), each
  followed by its value. Only the values after the queried keys are labelled (chance 1 / KEYS).
  The gap (6 by default) is beyond the short convs' reach (two layers of a kernel-4 conv see 7
  tokens), so only the memory can carry a value to its query. With one query, a memory that keeps
  the bag of values but not which key each belongs to scores ~56% (50%, plus pairs whose values
  coincide); with two, the second answer is "the value not given yet", which the convs read off the
  first answer, so more queries leak.
- `train_recall`: trains a fresh model on that task (AdamW, cosine decay to 10%, clip 1) and
  returns its accuracy curve: what `bench/bench_recall.py` and `tests/test_modeling_recall.py` run.
- `linear_attention`: a plain linear memory in the memory op's place, the reference a memory should reach.
- `memory_replaced` / `memory_read_off`: the memory op of every mixer of a model replaced for a
  while (forward and backward), for ablations: read off, the mixer passes its query on, so the
  model keeps its projections, conv, gates, norms and output gate but only local context.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch

from .configuration import MonetaConfig
from .modeling import MonetaForCausalLM, MonetaMixer


def recall_batch(batch_size: int, keys: int, pairs: int, generator: torch.Generator, gap: int = 6, queries: int = 1):
    """(ids, labels): keys are tokens [0, keys), values [keys, 2 keys), the separator 2 keys."""
    if not 1 <= queries <= pairs <= keys:
        raise ValueError(f"queries={queries}, pairs={pairs}, keys={keys}: expected 1 <= queries <= pairs <= keys")
    separator = 2 * keys
    chosen = torch.stack([torch.randperm(keys, generator=generator)[:pairs] for _ in range(batch_size)])
    values = torch.randint(0, keys, (batch_size, pairs), generator=generator) + keys
    context = torch.stack([chosen, values], -1).reshape(batch_size, -1)
    order = torch.stack([torch.randperm(pairs, generator=generator)[:queries] for _ in range(batch_size)])
    asked = torch.stack([chosen.gather(1, order), values.gather(1, order)], -1).reshape(batch_size, -1)
    ids = torch.cat([context, torch.full((batch_size, gap), separator), asked], 1)
    labels = torch.full_like(ids, -100)
    answers = torch.arange(context.shape[1] + gap + 1, ids.shape[1], 2)
    labels[:, answers] = ids[:, answers]
    return ids, labels


# memory(q, k, v, eta, log_alpha, state, mask, decoding, keep_intermediates) -> (reads y, new state), as
# MonetaMixer.read_memory.
MemoryFunction = Callable[..., tuple[torch.Tensor, object]]


def query_only(q, k, v, eta, log_alpha, state, mask=None, decoding=False, keep_intermediates=False):
    """No memory: the read is the query itself (v kept in the graph, so every parameter gets a gradient)."""
    return q + 0 * v, state


def linear_attention(q, k, v, eta, log_alpha, state, mask=None, decoding=False, keep_intermediates=False):
    """y_t = q_t + sum_{j<=t} (q_t . k_j) v_j: what a plain linear memory (no gates, no decay) reaches."""
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
    return q + ((q @ k.transpose(-1, -2)) * causal) @ v, state


# The memory ops a bench can swap in (None: the model's own).
MIXERS: dict[str, MemoryFunction | None] = {"moneta": None, "off": query_only, "linear-attention": linear_attention}


@contextlib.contextmanager
def memory_replaced(model: torch.nn.Module, memory: MemoryFunction):
    """Every MonetaMixer of `model` reads through `memory` instead of its memory op, until the block ends."""
    mixers = [module for module in model.modules() if isinstance(module, MonetaMixer)]
    for mixer in mixers:
        mixer.read_memory = memory
    try:
        yield model
    finally:
        for mixer in mixers:
            del mixer.read_memory  # back to the class's method


def memory_read_off(model: torch.nn.Module):
    """The ablation "memory read off": local context only (see the module docstring)."""
    return memory_replaced(model, query_only)


def train_recall(
    config: MonetaConfig,
    *,
    steps: int = 600,
    lr: float = 1e-2,
    batch_size: int = 64,
    keys: int = 8,
    pairs: int = 2,
    gap: int = 6,
    queries: int = 1,
    seed: int = 0,
    cosine: bool = True,
    warmup: int = 0,
    memory: MemoryFunction | None = None,
    stop_at: float | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train a fresh MonetaForCausalLM(config) on recall; its accuracy (mean of the last 50 steps) along the way.

    config.vocab_size must be at least 2 keys + 1. `memory` replaces the memory op (an ablation or
    another memory). `stop_at`: stop once the last-50 accuracy, checked every 50 steps, reaches it
    (the schedule is that of the full `steps`, so the trajectory up to there is the same).
    """
    if config.vocab_size < 2 * keys + 1:
        raise ValueError(f"vocab_size={config.vocab_size}: the task needs at least 2 * keys + 1 = {2 * keys + 1}")
    torch.manual_seed(seed)
    model = MonetaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:
        # Linear warmup, then cosine decay to 10% of lr, so the last steps, over which the accuracy
        # is averaged, are not bound by lr noise.
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed + 1)
    accuracies, curve, started = [], [], time.perf_counter()
    with memory_replaced(model, memory) if memory is not None else contextlib.nullcontext():
        for step in range(1, steps + 1):
            ids, labels = recall_batch(batch_size, keys, pairs, generator, gap, queries)
            out = model(ids, labels=labels, use_cache=False)
            optimizer.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            predicted, target = out.logits[:, :-1].argmax(-1), labels[:, 1:]
            answered = target != -100
            accuracies.append((predicted[answered] == target[answered]).float().mean().item())
            if step % 50 == 0 or step == steps:
                recent = sum(accuracies[-50:]) / len(accuracies[-50:])
                curve.append({"step": step, "loss": out.loss.item(), "accuracy_last50": recent})
                if log is not None:
                    log(f"step {step:5d}  loss {out.loss.item():.3f}  recall accuracy (last 50) {recent:.3f}")
                if stop_at is not None and recent >= stop_at:
                    break
    return {
        "chance": 1.0 / keys,
        "final_accuracy": curve[-1]["accuracy_last50"],
        "best_accuracy": max(point["accuracy_last50"] for point in curve),
        "steps_run": curve[-1]["step"],
        "seconds": time.perf_counter() - started,
        "curve": curve,
    }
