"""`--sync-to` for `miras train`: the Syncer started after a probe, uploads after each commit, remote resume.

Global rank 0 uploads, except on multi-node runs with node-local disks, where each node's local rank 0 runs
a Syncer for its node's files (miras.train_nodes, miras.storage.sync).
"""

from __future__ import annotations

from pathlib import Path

from .configuration import MonetaConfig
from .train_checks import TrainingStopped, check_checkpoint_argument


def is_url(text: str) -> bool:
    return "://" in str(text)


def storage_options(args) -> dict[str, str]:
    from .storage import StorageError, parse_options

    try:
        return parse_options(args.storage_option)
    except StorageError as error:
        raise TrainingStopped(f"--storage-option: {error}") from None


def start_syncer(args, run_dir: Path, node: int | None = None):
    """The background uploader for --sync-to, after a probe of every destination (fail fast, one line).
    `node`: this node's index on a multi-node run with node-local disks (uploads retry forever there: a
    checkpoint is complete only once every node's files are up)."""
    if not args.sync_to:
        return None
    from .checkpoint.retention import KEEP_ALL, RetentionPolicy
    from .checkpoint.sync import Syncer, drive_cap_warning, estimated_daily_bytes
    from .storage import StorageError

    keep_last = args.remote_keep_last if args.remote_keep_last is not None else args.ckpt_keep_last
    keep_milestones = args.remote_keep_milestones
    if keep_milestones is None:
        keep_milestones = args.ckpt_keep_milestones
    retention = KEEP_ALL if args.no_ckpt_prune else RetentionPolicy(keep_last, keep_milestones)
    try:
        syncer = Syncer(
            args.sync_to,
            args.run_name,
            run_dir,
            storage_options(args),
            retention=retention,
            milestones_only=args.sync_milestones_only,
            node=node,
            max_retries=None if node is not None else 10,
        )
    except StorageError as error:
        raise TrainingStopped(f"--sync-to: {error}") from None
    try:
        syncer.probe()
    except StorageError as error:
        if not args.sync_optional:
            syncer.close(0)
            raise TrainingStopped(f"{error} (pass --sync-optional to train anyway)") from None
        print(f"miras train: warning: {error}; training anyway (--sync-optional), uploads will be retried", flush=True)
    interval = args.ckpt_milestone_every_seconds if args.sync_milestones_only else args.ckpt_every_seconds
    one_checkpoint = checkpoint_bytes_estimate(args)
    if interval and one_checkpoint:
        warning = drive_cap_warning(syncer.destinations, estimated_daily_bytes(one_checkpoint, interval))
        if warning:
            print(f"miras train: warning: {warning}", flush=True)
    print(f"miras train: syncing to {', '.join(syncer.destinations)} (under <url>/{args.run_name}/)", flush=True)
    return syncer


def checkpoint_bytes_estimate(args) -> int:
    """fp32 weights + AdamW's two moments for the chosen size (the gpt2 vocabulary when it is unknown yet)."""
    try:
        from .parameters import count_parameters

        config = MonetaConfig.from_size(args.model_size, vocab_size=50257)
        return int(count_parameters(config)["total"]) * 12
    except Exception:
        return 0


def pull_remote(args, run_dir: Path) -> Path | None:
    from .checkpoint.remote import pull_latest, run_url
    from .storage import StorageError

    options = storage_options(args)
    for url in args.sync_to:
        try:
            found = pull_latest(run_url(url, args.run_name), run_dir, options)
        except StorageError as error:
            print(f"miras train: warning: could not read {run_url(url, args.run_name)}: {error}", flush=True)
            continue
        if found is not None:
            print(f"miras train: pulled {found.name} from {run_url(url, args.run_name)} (verified)", flush=True)
            return found
    return None


def remote_candidates(args) -> list[tuple[str, str]]:
    """Complete remote checkpoints of this run as (destination URL, step folder name), in the order
    `pull_latest` tries them: per destination, the one remote `latest` names, then the others newest first."""
    from .checkpoint.remote import remote_candidates as candidates
    from .checkpoint.remote import run_url
    from .storage import open_backend
    from .storage.base import one_line, redact

    options = storage_options(args)
    found = []
    for url in args.sync_to:
        try:
            names = candidates(open_backend(run_url(url, args.run_name), options))
        except Exception as error:
            reason = redact(one_line(error), options)
            print(f"miras train: warning: could not read {run_url(url, args.run_name)}: {reason}", flush=True)
            continue
        found += [(url, name) for name in names]
    return found


def fetch_remote_checkpoint(args, run_dir: Path, url: str, name: str, run_files: bool) -> Path:
    """One remote checkpoint into this node's run folder, verified (files already here with the right sha256
    are kept), `latest` pointed at it; with `run_files`, metrics.jsonl too when it is missing here."""
    from .checkpoint.files import checkpoints_dir
    from .checkpoint.latest import write_latest
    from .checkpoint.layout import CHECKPOINTS_DIR
    from .checkpoint.remote import RUN_FILES, download_checkpoint, run_url
    from .storage import open_backend

    backend = open_backend(run_url(url, args.run_name), storage_options(args))
    ckpt_dir = checkpoints_dir(run_dir)
    path = download_checkpoint(backend, f"{CHECKPOINTS_DIR}/{name}", ckpt_dir / name, reuse_local=True)
    write_latest(ckpt_dir, name)
    for run_file in RUN_FILES if run_files else ():
        if not (run_dir / run_file).exists():
            try:
                backend.get(run_file, run_dir / run_file)
            except FileNotFoundError:
                pass
    return path


def download_explicit(url: str, ckpt_dir: Path, args, reuse_local: bool = False) -> Path:
    """--resume URL: the named remote checkpoint folder, downloaded and verified against its manifest."""
    from .checkpoint.resolve import CheckpointNotFound, FetchFailed, resolve_checkpoint

    try:
        path = resolve_checkpoint(url, ckpt_dir, storage_options(args))
    except CheckpointNotFound as error:
        raise TrainingStopped(f"--resume {url!r}: {error}") from None
    except FetchFailed as error:
        raise TrainingStopped(f"--resume: {error}", 1) from None
    check_checkpoint_argument(str(path), "--resume")
    return path


def fetch_init_from(args, run_dir: Path) -> str:
    from .checkpoint.resolve import CheckpointNotFound, FetchFailed, resolve_checkpoint

    try:
        path = resolve_checkpoint(args.init_from, run_dir / "init_from", storage_options(args))
    except CheckpointNotFound as error:
        raise TrainingStopped(f"--init-from {args.init_from!r}: {error}") from None
    except FetchFailed as error:
        raise TrainingStopped(f"--init-from: {error}", 1) from None
    return str(path)


def sync_hook(syncer, run_dir: Path):
    def after_commit(folder: Path, step: int, milestone: bool, final: bool) -> None:
        syncer.submit_checkpoint(folder, step, milestone, final=final)
        for name in ("config.json", "metrics.jsonl"):
            if (run_dir / name).exists():
                syncer.submit_file(run_dir / name)

    return after_commit


def close_syncer(syncer, timeout: float, run_dir: Path, node_local: bool = False) -> None:
    if syncer is None:
        return
    for name in ("config.json", "metrics.jsonl"):
        if (run_dir / name).exists():
            syncer.submit_file(run_dir / name)
    done = syncer.close(timeout)
    status = syncer.status()
    if done:
        print(f"miras train: sync: all uploads done ({status['sync_uploaded']} uploaded)", flush=True)
    elif node_local:
        print(
            f"miras train: warning: sync: this node's uploads not finished within --sync-timeout {timeout:g}s "
            f"({status['sync_queued']} queued, last error: {status['sync_last_error']}); with node-local disks a "
            "checkpoint is complete only remotely: the next start with --resume auto continues from the newest "
            "complete remote checkpoint",
            flush=True,
        )
    else:
        print(
            f"miras train: warning: sync: uploads not finished within --sync-timeout {timeout:g}s "
            f"({status['sync_queued']} queued, last error: {status['sync_last_error']}); local checkpoints are "
            "intact and the next start with --resume auto uploads again",
            flush=True,
        )
