"""The `miras` command: `miras train ...` (more subcommands arrive with checkpoints and storage)."""

from __future__ import annotations

import sys

COMMANDS = {"train": "train MONETA (same flags as python -m miras.train; see miras train --help)"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: miras COMMAND [ARGS]\n\nMONETA (MIRAS) training stack.\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:10s} {text}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as train_main

        return train_main(rest)
    print(f"miras: error: unknown command {command!r} (expected one of: {', '.join(COMMANDS)})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
