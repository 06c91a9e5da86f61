"""Held-out loss by position: the whole-window view and the one with each prediction's context cut short."""

import math

import pytest
import torch

from miras import MonetaConfig, MonetaForCausalLM
from miras.evaluation import PositionLoss, evaluate_positions, evaluate_positions_limited, next_token_losses
from miras.probes import memory_read_off

EDGES = (0, 8, 16, 32, 64)


def tiny_model(seed: int = 0) -> MonetaForCausalLM:
    torch.manual_seed(seed)
    config = MonetaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64,
                          chunk_size=8, memory_read_gain_init=1.0)  # fmt: skip
    return MonetaForCausalLM(config).double()


def windows(count: int = 3, length: int = 64) -> torch.Tensor:
    return torch.randint(0, 40, (count, length), generator=torch.Generator().manual_seed(1))


def test_position_loss_buckets_every_prediction_once():
    losses = torch.arange(1.0, 64.0)[None]  # position t (the token at index t predicted) has loss t
    result = PositionLoss(EDGES)
    result.add(losses)
    assert result.tokens() == {"0-8": 8, "8-16": 8, "16-32": 16, "32-64": 31}
    assert result.by_bucket()["0-8"] == pytest.approx(4.5)
    assert result.mean() == pytest.approx(32.0)


def test_limited_context_beyond_the_window_is_the_whole_window():
    model, data = tiny_model(), windows()
    full = evaluate_positions(model, data, 2, EDGES)
    limited = evaluate_positions_limited(model, data, 2, context=64, edges=EDGES)
    assert limited.tokens() == full.tokens()
    for name, value in full.by_bucket().items():
        assert limited.by_bucket()[name] == pytest.approx(value, rel=1e-12)


def test_limited_context_scores_each_position_with_its_last_tokens():
    """Position p >= context is predicted from tokens [s - context, p] with s = p - p % context: checked against
    the model run on exactly that stretch, for every position of one window."""
    model, data = tiny_model(), windows(count=1)
    context = 8
    limited = evaluate_positions_limited(model, data, 1, context=context, edges=(0, 64))
    expected = []
    with torch.no_grad():
        for p in range(63):
            start = max(0, p - p % context - context) if p >= context else 0
            piece = data[:, start : p + 2]
            expected.append(next_token_losses(model(input_ids=piece).logits, piece)[0, -1])
    assert limited.tokens() == {"0-64": 63}
    assert limited.mean() == pytest.approx(float(torch.stack(expected).double().mean()), rel=1e-6)  # fp32 losses


def test_a_model_without_memory_loses_nothing_to_a_limited_context_and_moneta_does_not_match_it():
    """The read-off twin sees only the conv's few tokens, so cutting its context to 8..16 tokens changes nothing;
    MONETA's state carries the window, so the same cut changes its late losses."""
    model, data = tiny_model(), windows()
    read_off = tiny_model()
    with memory_read_off(read_off):
        full = evaluate_positions(read_off, data, 3, EDGES).by_bucket()
        limited = evaluate_positions_limited(read_off, data, 3, context=8, edges=EDGES).by_bucket()
    for name in full:
        assert limited[name] == pytest.approx(full[name], rel=1e-6)
    full = evaluate_positions(model, data, 3, EDGES).by_bucket()
    limited = evaluate_positions_limited(model, data, 3, context=8, edges=EDGES).by_bucket()
    assert limited["0-8"] == pytest.approx(full["0-8"], rel=1e-12)
    assert not math.isclose(limited["32-64"], full["32-64"], rel_tol=1e-6)
