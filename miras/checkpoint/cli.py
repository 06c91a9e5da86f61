"""`miras ckpt verify PATH` (a checkpoint against its manifest) and `miras ckpt ls RUN_DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .catalog import committed, describe
from .files import checkpoints_dir, read_latest
from .layout import MANIFEST_NAME
from .manifest import ManifestError, verify_folder


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="miras ckpt", description="Inspect miras checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    verify = commands.add_parser("verify", help="check every file of a checkpoint against its manifest")
    verify.add_argument("path", help="a checkpoint folder (runs/RUN/checkpoints/step_XXXXXXXX)")
    ls = commands.add_parser("ls", help="list a run's checkpoints with step, time, milestone flag and size")
    ls.add_argument("run", help="a run folder (runs/RUN) or its checkpoints folder")
    args = parser.parse_args(argv)
    return _verify(Path(args.path)) if args.command == "verify" else _list(Path(args.run))


def _verify(path: Path) -> int:
    if not path.is_dir():
        print(f"miras ckpt verify: error: {path}: no such folder (expected a checkpoint folder)", file=sys.stderr)
        return 2
    problems = verify_folder(path)
    if problems:
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        print(f"miras ckpt verify: {path}: INVALID ({len(problems)} problem(s))", file=sys.stderr)
        return 1
    info = describe(path)
    print(f"{path}: ok (step {info.step}, {_size(info.size)}, {'milestone' if info.milestone else 'regular'})")
    return 0


def _list(run: Path) -> int:
    folder = run if (run / MANIFEST_NAME).exists() or run.name == "checkpoints" else checkpoints_dir(run)
    if not folder.is_dir():
        print(f"miras ckpt ls: error: {run}: no checkpoints folder (expected a run folder)", file=sys.stderr)
        return 2
    latest = read_latest(folder)
    print(f"{'checkpoint':16s} {'step':>10s} {'created (UTC)':25s} {'kind':10s} {'size':>10s}")
    for path in committed(folder):
        try:
            info = describe(path)
        except ManifestError as error:
            print(f"{path.name:16s} {'?':>10s} {'':25s} {'invalid':10s} {'':>10s}  ({error})")
            continue
        kind = "weights" if info.weights_only else ("milestone" if info.milestone else "regular")
        mark = "  <- latest" if path.name == latest else ""
        print(f"{path.name:16s} {info.step:10d} {info.created:25s} {kind:10s} {_size(info.size):>10s}{mark}")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
