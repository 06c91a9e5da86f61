"""Training: `python -m miras.train`, `miras train`, `accelerate launch -m miras.train`.

args.py    the command line (flags grouped as --help shows them, seed aliases, validation)
build.py   what the recipe builds before its loop (accelerator, data, model, optimizer, checkpoint settings)
loop.py    the recipe and its loop: train(args, hooks)
state.py   TrainState, what the Checkpointer captures and restores
checks.py  resume checks, run-folder housekeeping, exit codes
nodes.py   several nodes: topology, shared or node-local run folder
hooks.py   observers a caller (the tests) attaches to the loop
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None, hooks=None) -> int:
    from .args import parse_args

    args = parse_args(argv)
    # A hub dataset without the hub, or a path that is no corpus, is said before the loop's imports
    # (accelerate, datasets, the model: seconds) and before anything is written.
    from ..data_sources import DataError, HubUnreachable, check_source

    try:
        check_source(args.dataset, args.random_tokens or args.dry_run)
    except DataError as error:
        print(f"miras train: error: {error}", file=sys.stderr, flush=True)
        return 1 if isinstance(error, HubUnreachable) else 2
    from .loop import run

    return run(args, hooks)
