"""The memory learns: a tiny MONETA trained on associative recall, against the same model with the read off.

The task and the training loop are the benchmark's (`bench/bench_recall.py`, loaded from the
file so the numbers in bench/RESULTS.md and this test come from one loop): 2 pairs from 8 keys and
8 values, 6 separators (beyond the convs' 7-token reach), then ONE of the keys, whose value is the
answer (chance 1/8). One query, because with both keys asked the second answer is "the value not
given yet", which a memory that never binds keys to values gets right (bench/RESULTS.md, associative recall).

Settings: hidden 128, 2 layers, 4 heads of d_h = 32, chunk 16; AdamW lr 1e-2 with a cosine decay
to 10%, batch 64, 600 steps, seed 0; accuracy = mean over the last 50 steps. The memory is
MONETA's own rule (p = 3, q = 4, the 2-layer LayerNorm'd MLP, chunkwise) with strong writes and
reads in some heads: per-head eta 0.3-1.5 of a maximum of 3 and memory LayerNorm gains 0.1-1
(the model's defaults are eta 0.001-0.1 and gain 0.1).

On seeds 0-2 these settings end at 94.7%, 99.7% and 99.9% (bench/RESULTS.md, associative recall); with
p = 2, q = 2 and `memory_out_init_scale=0.3` at 96.8-100% on seeds 0-5. What made binding reliable
is the width: at hidden 64 (4 heads of 16, or 2 of 32) the same settings bind on some runs and
settle at the bag of values (~55%: both values kept, not which key each belongs to) on others. With
the defaults' weak writes this task ends at the bag of values (56.5% at this width, seed 0); that
gap is measured in bench/RESULTS.md, not hidden here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_recall.py"
RECALL_MODEL = dict(
    hidden_size=128,
    intermediate_size=256,
    num_heads=4,
    p=3,
    q=4,
    memory_gain_init=0.3162,
    memory_gain_init_spread=3.162,
    eta_max=3.0,
    eta_init=1.0,
)
BUDGET = dict(steps=600, lr=1e-2, batch_size=64, keys=8, pairs=2, gap=6, queries=1, seed=0)


@pytest.fixture(scope="module")
def bench_recall():
    spec = importlib.util.spec_from_file_location("bench_recall", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_learns_associative_recall_to_90_percent(bench_recall):
    result = bench_recall.train_recall("moneta", model_overrides=RECALL_MODEL, **BUDGET)
    assert result["final_accuracy"] >= 0.9, result["curve"]


def test_recall_with_the_memory_read_off_stays_below_twice_chance(bench_recall):
    result = bench_recall.train_recall("off", model_overrides=RECALL_MODEL, **BUDGET)
    assert result["final_accuracy"] < 2 * result["chance"], result["curve"]
