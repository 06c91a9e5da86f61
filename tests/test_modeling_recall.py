"""The memory learns with the model's defaults: a tiny MONETA trained on associative recall.

The task and the trainer are `miras.probes` (also what bench/bench_recall.py runs): 2 pairs from 8
keys and 8 values, 6 separators (beyond the convs' 7-token reach), then ONE of the keys, whose value
is the answer (chance 1/8; a memory that keeps the bag of values but not which key each belongs to
scores ~56%). The model: MonetaConfig with only its size fields set (hidden 128, 2 layers, 4 heads
of d_h = 32, FFN 256): every memory setting is the default. AdamW lr 1e-2, cosine decay to 10% over
600 steps, batch 64; accuracy = mean over the last 50 steps.

bench/RESULTS.md ("Memory defaults") has the seeds 0-5 of these defaults (>= 90% within 600 steps on 5 of
them, seed 2 the miss at 84%); here seeds 4 and 1 must bind (both well past the bag of values, one to
>= 90% within the 600 steps; a run stops once it gets to 90%), and the same model with its memory read
off must stay below twice chance over the whole budget.
"""

from __future__ import annotations

from miras import MonetaConfig
from miras.probes import query_only, train_recall

SIZE = dict(vocab_size=17, hidden_size=128, num_hidden_layers=2, num_heads=4, intermediate_size=256)
BUDGET = dict(steps=600, lr=1e-2, batch_size=64, keys=8, pairs=2, gap=6, queries=1)


def test_default_memory_binds_keys_to_values_on_two_seeds():
    # Each seed must pass the bag of values (~56%) by a wide margin, and one must reach 90%: which
    # seed of a 600-step run crosses 90% first depends on float rounding that differs between CPUs
    # and thread counts (bench/RESULTS.md has the seed table), binding itself does not.
    first = train_recall(MonetaConfig(**SIZE), seed=4, stop_at=0.9, **BUDGET)
    # Once one seed is at 90%, the other needs only to pass 75%: stop it there (CI time).
    second = train_recall(
        MonetaConfig(**SIZE), seed=1, stop_at=0.75 if first["best_accuracy"] >= 0.9 else 0.9, **BUDGET
    )
    results = [first, second]
    best = [result["best_accuracy"] for result in results]
    assert min(best) >= 0.75 and max(best) >= 0.9, [result["curve"] for result in results]


def test_the_default_memory_binds_across_a_chunk_commit():
    """Chunks of 8: the pairs are written in the first chunk and the key is asked in the second, so the read
    goes through a committed memory and its recomputed l_q normaliser. The default scale-free normaliser binds
    there; with the paper's (lq_norm="inverse", both matrices written) this run ends at 31% (seed 1) and 20%
    (seed 2), below the bag of values (bench/RESULTS.md, "Memory across chunk commits"). Stopped at 75%, well
    past the bag of values (CI time)."""
    result = train_recall(MonetaConfig(**SIZE, chunk_size=8), seed=1, stop_at=0.75, **BUDGET)
    assert result["best_accuracy"] >= 0.75, result["curve"]


def test_recall_with_the_memory_read_off_stays_below_twice_chance():
    result = train_recall(MonetaConfig(**SIZE), seed=0, memory=query_only, **BUDGET)
    assert result["final_accuracy"] < 2 * result["chance"], result["curve"]
