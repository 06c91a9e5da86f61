"""The checkpoint commands: `miras ckpt verify PATH` (a checkpoint against its manifest), `miras ckpt ls RUN_DIR`,
and `miras storage ls URL` / `miras storage pull URL DEST` for what a run synced to a destination."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..storage import StorageError, installed_schemes, open_backend, parse_options, redact
from ..storage.base import one_line
from ..storage.fsspec_backend import unreachable_host
from .catalog import committed, describe
from .files import checkpoints_dir
from .latest import read_latest
from .layout import MANIFEST_NAME
from .manifest import ManifestError, verify_folder
from .remote import download_checkpoint, pull_latest, remote_checkpoint_summary
from .resolve import holds_checkpoint


class _Parser(argparse.ArgumentParser):
    """argparse with its error in one line (no usage dump) and exit code 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
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


EPILOG = """URLs: a local path, file://, gs://BUCKET/path, s3://BUCKET/path, memory://, rclone://REMOTE/path,
gdrive://FOLDER_ID/path, or any scheme a plugin adds (installed: {schemes}).
Examples:
  miras storage ls rclone://gdrive/research/runs/my-run --checkpoints
  miras storage pull rclone://gdrive/research/runs/my-run runs/my-run          # newest valid checkpoint
  miras storage pull s3://bucket/runs/my-run/checkpoints/step_00012000 ckpt \\
      --storage-option endpoint_url=https://ACCOUNT.r2.cloudflarestorage.com"""


def build_storage_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="miras storage",
        description="List and download what miras synced to a storage destination.",
        epilog=EPILOG.format(schemes=", ".join(installed_schemes())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    option_help = "backend option KEY=VALUE (repeatable), e.g. endpoint_url=http://127.0.0.1:9000"
    ls = sub.add_parser("ls", help="list the files under URL (recursively)")
    ls.add_argument("url", metavar="URL")
    ls.add_argument("--checkpoints", action="store_true", help="list the complete checkpoints of a run folder instead")
    ls.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help=option_help)
    pull = sub.add_parser(
        "pull",
        help="download a run's newest valid checkpoint (URL = run folder) or one checkpoint (URL = its folder), "
        "verified against its manifest",
    )
    pull.add_argument("url", metavar="URL")
    pull.add_argument("dest", metavar="DEST", type=Path, help="local run folder (or checkpoint folder)")
    pull.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help=option_help)
    return parser


# Third-party loggers that report each retry (with its traceback) of a request that then fails: the command
# says what failed in one line instead.
_CHATTY_LOGGERS = ("gcsfs", "s3fs", "aiobotocore", "botocore", "aiohttp", "urllib3", "google", "fsspec")


def storage_main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input (URL, scheme, option, nothing there, no valid checkpoint), 1 a failure
    of the storage itself (network, permissions)."""
    args = build_storage_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="miras storage: %(message)s")
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    options: dict[str, str] = {}

    def fail(message: str, code: int) -> int:
        print(f"miras storage {args.action}: error: {redact(one_line(message), options)}", file=sys.stderr)
        return code

    try:
        options = parse_options(args.storage_option)
    except StorageError as error:
        return fail(str(error), 2)
    unreachable = unreachable_host(args.url, options)  # before the client looks for credentials on the network
    if unreachable:
        return fail(f"{args.url}: {unreachable}", 1)
    try:
        backend = open_backend(args.url, options)
    except StorageError as error:  # the URL, its scheme or an option
        return fail(str(error), 2)
    try:
        if args.action == "ls":
            keys = backend.list("")
            if not keys:
                return fail(f"{args.url}: nothing there (expected a run folder or checkpoint folder URL)", 2)
            if not args.checkpoints:
                print("\n".join(keys))
                return 0
            for entry in remote_checkpoint_summary(backend):
                marks = " milestone" * entry["milestone"] + " <- latest" * entry["latest"]
                print(f"{entry['key']}  {entry['files']} files  {entry['bytes']} bytes{marks}")
            return 0
        if holds_checkpoint(backend):  # URL is one checkpoint folder
            path = download_checkpoint(backend, "", args.dest)
        else:
            path = pull_latest(backend, args.dest)
            if path is None:
                return fail(f"{args.url}: no valid checkpoint here (neither a checkpoint nor a run folder)", 2)
        print(path)
        return 0
    except Exception as error:  # StorageError, or a backend's own (network, permissions): one line, no traceback
        return fail(str(error), 1)
