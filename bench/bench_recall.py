"""Does the memory learn? Associative recall: a tiny MONETA trained on key-value pairs, then a query.

Task and trainer: `miras.probes` (recall_batch, train_recall): 2 pairs from 8 keys and 8 values,
6 separators (beyond the convs' reach), then one of the keys, whose value is the answer (chance
12.5%; a memory that keeps the bag of values without binding them to keys scores ~56%).

Model: the model's defaults with only its size fields set: hidden 128, 2 layers, 4 heads (d_h =
32), FFN 256 (the shape of tests/test_modeling_recall.py); AdamW lr 1e-2 with a cosine decay to 10%,
no weight decay, clip 1.0, batch 64, 600 steps; accuracy is the mean over the last 50 steps.

`--mixer` swaps only the memory op, leaving the rest of the model as it is:
- `moneta`: the real memory (the default);
- `off`: the memory read disabled (the mixer passes q on): what local context alone gives;
- `linear-attention`: y_t = q_t + sum_{j<=t} (q_t . k_j) v_j: what a plain linear memory reaches.

Examples:
  python bench/bench_recall.py --seeds 0 1 2 3 4 5
  python bench/bench_recall.py --mixer off
  python bench/bench_recall.py --pairs 4 --keys 16 --steps 800
  python bench/bench_recall.py --model-overrides eta_max=1 eta_init=0.01 value_norm=false
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from bench_lm_quality import parse_overrides

from miras import MonetaConfig
from miras.probes import MIXERS, train_recall

RECALL_MODEL = dict(hidden_size=128, num_hidden_layers=2, num_heads=4, intermediate_size=256)


def run_seed(job: tuple) -> dict:
    args, seed = job
    torch.set_num_threads(args.threads)
    config = MonetaConfig(vocab_size=2 * args.keys + 1, **{**RECALL_MODEL, **parse_overrides(args.model_overrides)})
    log = (lambda line: print(f"seed {seed} {line}", flush=True)) if len(args.seeds) == 1 or args.jobs == 1 else None
    result = train_recall(
        config,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        keys=args.keys,
        pairs=args.pairs,
        gap=args.gap,
        queries=args.queries,
        seed=seed,
        cosine=not args.constant_lr,
        warmup=args.warmup,
        memory=MIXERS[args.mixer],
        log=log,
    )
    return {"seed": seed, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixer", choices=sorted(MIXERS), default="moneta")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--gap", type=int, default=6, help="separator tokens between the pairs and the queries")
    parser.add_argument("--queries", type=int, default=1, help="pairs asked per sequence (more leak, see miras.probes)")
    parser.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained side by side, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per seed")
    parser.add_argument("--constant-lr", action="store_true", help="no cosine decay")
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear lr warmup")
    parser.add_argument(
        "--model-overrides", nargs="*", default=[], metavar="KEY=VALUE", help="MonetaConfig fields, e.g. chunk_size=8"
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.seed is not None:
        args.seeds = [args.seed]

    jobs = [(args, seed) for seed in args.seeds]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(run_seed, jobs))
    else:
        results = [run_seed(job) for job in jobs]
    chance = results[0]["chance"]
    for result in results:
        print(
            f"{args.mixer} seed {result['seed']}: {100 * result['final_accuracy']:.1f}% after {result['steps_run']} "
            f"steps (chance {100 * chance:.1f}%), curve "
            + " ".join(f"{100 * point['accuracy_last50']:.0f}" for point in result["curve"])
        )
    bound = sum(result["final_accuracy"] >= 0.9 for result in results)
    print(f"{args.mixer}: >= 90% on {bound} of {len(results)} seeds")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
