"""The `miras` command: one subcommand per job, each implemented in its own module."""

from __future__ import annotations

import importlib
import sys

# name -> (help line, "module:function" taking argv and returning an exit code)
COMMANDS = {
    "train": ("train MONETA (same flags as python -m miras.train; see miras train --help)", "miras.train:main"),
    "ckpt": ("inspect checkpoints: miras ckpt verify PATH | miras ckpt ls RUN_DIR", "miras.checkpoint.cli:main"),
    "estimate": ("parameters, checkpoint size, disk, upload/day and GPU memory of a run", "miras.estimate:main"),
    "generate": ("sample text from a checkpoint folder, run folder or storage URL", "miras.generate:main"),
    "eval": ("perplexity, bits/byte, loss by position and lm-eval tasks of a checkpoint", "miras.eval_command:main"),
    "storage": ("synced runs: miras storage ls URL | miras storage pull URL DEST", "miras.checkpoint.cli:storage_main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: miras COMMAND [ARGS]\n\nMONETA (MIRAS) training stack.\n\ncommands:")
        for name, (text, _) in COMMANDS.items():
            print(f"  {name:10s} {text}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"miras: error: unknown command {command!r} (expected one of: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module, function = COMMANDS[command][1].split(":")
    return getattr(importlib.import_module(module), function)(rest)


if __name__ == "__main__":
    sys.exit(main())
