"""`miras storage ls URL` and `miras storage pull URL DEST`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..checkpoint.layout import MANIFEST_NAME
from .base import StorageError, one_line, redact
from .registry import installed_schemes, open_backend, parse_options
from .remote import download_checkpoint, pull_latest, remote_checkpoint_summary

EPILOG = """URLs: a local path, file://, gs://BUCKET/path, s3://BUCKET/path, memory://, rclone://REMOTE/path,
gdrive://FOLDER_ID/path, or any scheme a plugin adds (installed: {schemes}).
Examples:
  miras storage ls rclone://gdrive/research/runs/my-run --checkpoints
  miras storage pull rclone://gdrive/research/runs/my-run runs/my-run          # newest valid checkpoint
  miras storage pull s3://bucket/runs/my-run/checkpoints/step_00012000 ckpt \\
      --storage-option endpoint_url=https://ACCOUNT.r2.cloudflarestorage.com"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miras storage",
        description="List and download what miras synced to a storage destination.",
        epilog=EPILOG.format(schemes=", ".join(installed_schemes())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="miras storage: %(message)s")
    options: dict[str, str] = {}
    try:
        options = parse_options(args.storage_option)
        backend = open_backend(args.url, options)
        if args.action == "ls":
            if args.checkpoints:
                for entry in remote_checkpoint_summary(backend):
                    marks = " milestone" * entry["milestone"] + " <- latest" * entry["latest"]
                    print(f"{entry['key']}  {entry['files']} files  {entry['bytes']} bytes{marks}")
            else:
                for key in backend.list(""):
                    print(key)
            return 0
        keys = backend.list("")
        if MANIFEST_NAME in keys:  # URL is one checkpoint folder
            path = download_checkpoint(backend, "", args.dest)
        else:
            path = pull_latest(backend, args.dest)
            if path is None:
                raise StorageError(f"{args.url}: no valid checkpoint here (neither a checkpoint nor a run folder)")
        print(path)
        return 0
    except Exception as error:  # StorageError, or a backend's own (network, permissions): one line, no traceback
        print(f"miras storage: error: {redact(one_line(error), options)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
