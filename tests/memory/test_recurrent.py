"""The one-token decoding path reproduces the chunkwise path (float64)."""

import pytest
import torch

from miras.memory import RuleConfig, chunkwise_memory, memory_step

from .helpers import initial_state, memory_inputs, time_slice

ARGS = ("q", "k", "v", "eta", "log_alpha")


def decode(x, state, rule, start, stop, mask=None):
    outputs = []
    for t in range(start, stop):
        token = time_slice(x, t, t + 1)
        y, state = memory_step(
            *(token[n] for n in ARGS), state, x["gamma"], x["beta"], rule, None if mask is None else mask[:, t : t + 1]
        )
        outputs.append(y)
    return torch.cat(outputs, dim=2), state


@pytest.mark.parametrize("channelwise", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_token_by_token_equals_chunkwise(chunk_size, channelwise):
    rule = RuleConfig(chunk_size=chunk_size)
    x = memory_inputs(length=41, channelwise=channelwise)
    y, final = chunkwise_memory(
        *(x[n] for n in ARGS), initial_state(x, chunk_size, channelwise), x["gamma"], x["beta"], rule
    )
    y_steps, state = decode(x, initial_state(x, chunk_size, channelwise), rule, 0, 41)
    torch.testing.assert_close(y_steps, y, rtol=0, atol=1e-10)
    torch.testing.assert_close(state.a1, final.a1, rtol=0, atol=1e-10)
    assert state.buffer_len.tolist() == final.buffer_len.tolist()


@pytest.mark.parametrize("channelwise", [False, True])
@pytest.mark.parametrize("prefill", [0, 21])
def test_decoding_with_a_fixed_input_matrix_equals_chunkwise(prefill, channelwise):
    rule = RuleConfig(chunk_size=8, lq_norm="scale_free", update_input=False)
    x = memory_inputs(length=41, channelwise=channelwise)
    y, final = chunkwise_memory(
        *(x[n] for n in ARGS), initial_state(x, 8, channelwise), x["gamma"], x["beta"], rule
    )
    state = initial_state(x, 8, channelwise)
    if prefill:
        head = time_slice(x, 0, prefill)
        _, state = chunkwise_memory(*(head[n] for n in ARGS), state, x["gamma"], x["beta"], rule)
    y_steps, state = decode(x, state, rule, prefill, 41)
    torch.testing.assert_close(y_steps, y[:, :, prefill:], rtol=0, atol=1e-10)
    torch.testing.assert_close(state.a1, final.a1, rtol=0, atol=1e-10)
    assert torch.equal(state.a2, x["a2"].expand_as(state.a2)) and torch.equal(state.run_a2, state.a2)


@pytest.mark.parametrize("prefill", [3, 16, 21])
def test_decoding_continues_a_chunkwise_prefill(prefill):
    rule = RuleConfig(chunk_size=8)
    x = memory_inputs(length=40)
    y, _ = chunkwise_memory(*(x[n] for n in ARGS), initial_state(x, 8), x["gamma"], x["beta"], rule)
    head = time_slice(x, 0, prefill)
    _, state = chunkwise_memory(*(head[n] for n in ARGS), initial_state(x, 8), x["gamma"], x["beta"], rule)
    y_steps, _ = decode(x, state, rule, prefill, 40)
    torch.testing.assert_close(y_steps, y[:, :, prefill:], rtol=0, atol=1e-10)


def test_rows_with_different_open_chunks_decode_independently():
    """Left padding leaves rows at different chunk positions; each must decode as it would alone."""
    rule = RuleConfig(chunk_size=4)
    x = memory_inputs(length=30)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, :3] = False
    head = time_slice(x, 0, 11)
    _, state = chunkwise_memory(
        *(head[n] for n in ARGS), initial_state(x, 4), x["gamma"], x["beta"], rule, mask[:, :11]
    )
    y_steps, _ = decode(x, state, rule, 11, 30, mask)
    alone = {n: t[1:, :, 3:] for n, t in time_slice(x, 0, 30).items()}
    alone.update(gamma=x["gamma"], beta=x["beta"], a1=x["a1"], a2=x["a2"])
    y_alone, _ = chunkwise_memory(*(alone[n] for n in ARGS), initial_state(alone, 4), x["gamma"], x["beta"], rule)
    torch.testing.assert_close(y_steps[1:], y_alone[:, :, 8:], rtol=0, atol=1e-10)
