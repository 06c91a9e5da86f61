"""Parameter counts of a configuration, without allocating its weights."""

from __future__ import annotations

import torch

from .configuration import MonetaConfig


def count_parameters(config: MonetaConfig) -> dict[str, int]:
    """Exact counts from a model built on the meta device: total (tied weights once), embedding, non-embedding."""
    from .modeling import MonetaForCausalLM

    with torch.device("meta"):
        model = MonetaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    embedding = model.model.embed_tokens.weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
