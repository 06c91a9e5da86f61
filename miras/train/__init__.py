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


def main(argv: list[str] | None = None, hooks=None) -> int:
    from .loop import main as run

    return run(argv, hooks)
