"""Background upload of a run's checkpoints and files to one or more destinations.

Each destination URL gets its own worker thread and queue (a slow Drive link never holds up a fast bucket);
the run lands under `URL/<run_name>/`, mirroring the local run folder. For each committed checkpoint the
worker uploads every file the manifest lists, then `manifest.json`, then the remote `checkpoints/latest`: a
reader that finds a manifest finds all its files, and `latest` never names a folder still uploading.

Multi-node runs with node-local disks run one Syncer per node (`node=k`). Each uploads only the files its
node wrote (the manifest's "nodes" entry says which), then a confirmation object
`checkpoints/step_X/nodes/node_0000k.json` listing them with their size and sha256. Node 0 publishes: it
uploads its own files, waits until every other node's confirmation is there and lists exactly the manifest's
entries for that node, and only then uploads `manifest.json` and `latest`.

Why a confirmation object rather than listing the folder: every backend's `put` is atomic, so a listed key
is a complete object, but `list` returns names, not sizes or hashes, and an earlier attempt at the same
step (a run that died before publishing it) can have left objects of other content under the same names.
A node puts its confirmation only after all its files went up in this attempt, and its content (sizes and
sha256s) must equal this attempt's manifest; a stale confirmation of other content never matches. If
the contents are equal, so are the files it vouches for.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..storage import StorageBackend, StorageError, check_destination, join_key, open_backend, redact
from ..storage.base import clean_key, one_line
from .latest import read_latest, write_latest
from .layout import CHECKPOINTS_DIR, MANIFEST_NAME, checkpoint_name, parse_step
from .lease import DEFAULT_TIMEOUT, Lease, LeaseHeld
from .manifest import NODES_KEY, ManifestError, read_manifest
from .remote import run_url
from .retention import KEEP_ALL, RetentionPolicy

log = logging.getLogger(__name__)


NODES_DIR = "nodes"  # inside a remote checkpoint folder: one confirmation object per node (multi-node)


def node_marker_name(node: int) -> str:
    return f"node_{int(node):05d}.json"


class _Permanent(Exception):
    """A job that no retry can fix (its local files are gone)."""


class _Superseded(Exception):
    """Node 0 gave up waiting for the other nodes on a checkpoint a newer one replaces."""


@dataclass
class _CheckpointJob:
    folder: Path
    step: int
    milestone: bool
    final: bool
    done: set[str] = field(default_factory=set)  # files already uploaded (a retry continues from here)
    attempts: int = 0

    @property
    def supersedable(self) -> bool:
        return not self.milestone and not self.final


@dataclass
class _FileJob:
    path: Path
    attempts: int = 0


@dataclass
class _Destination:
    url: str
    backend: StorageBackend
    queue: deque = field(default_factory=deque)
    busy: object | None = None  # the job being uploaded right now (not supersedable meanwhile)
    thread: threading.Thread | None = None
    latest_step: int | None = None  # what this session last wrote to the remote `latest`
    milestones: dict[int, bool] = field(default_factory=dict)  # step -> milestone, learned or read remotely
    uploaded: int = 0
    failed: int = 0
    given_up: int = 0
    superseded: int = 0
    bytes: int = 0
    seconds: float = 0.0
    lease: Lease | None = None  # held while this session writes the run there (see lease.py)
    lost_to: str | None = None  # the holder that took the lease over: nothing more goes there


class Syncer:
    """Uploads a run's checkpoints and run-level files in background threads, one per destination.

    Training never waits: `submit_*` only queue work. Failed uploads are retried with exponential back-off
    (`backoff`, doubling, at most `max_retries` retries per job); a newer checkpoint supersedes a queued
    non-milestone one (milestones and the final checkpoint are never skipped); with `milestones_only`
    only milestones and the final checkpoint go up. After each checkpoint upload the remote keeps what the
    `retention` policy keeps (the local one's), never the one remote `latest` names; a failed delete is
    logged, not fatal.

    Multi-node: with a run folder every node shares, only global rank 0 constructs a Syncer (every rank's
    files are in the folder it uploads). With node-local disks each node constructs one with `node` set (see
    the module docstring): node k > 0 uploads its files and its confirmation; node 0 also waits for every
    confirmation (polling, `poll` seconds doubling up to `max_poll`) before the manifest and `latest`, and
    alone prunes the remote. `max_retries=None` retries failed uploads forever (with back-off).
    """

    def __init__(
        self,
        destinations: list[str],
        run_name: str,
        run_dir: Path,
        options: dict[str, str] | None = None,
        retention: RetentionPolicy = KEEP_ALL,
        milestones_only: bool = False,
        max_retries: int | None = 10,
        backoff: float = 2.0,
        max_backoff: float = 300.0,
        node: int | None = None,
        poll: float = 0.2,
        max_poll: float = 10.0,
    ):
        if not destinations:
            raise StorageError("Syncer needs at least one destination URL")
        self.run_name = clean_key(run_name)
        if not self.run_name:
            raise StorageError(f"bad run name {run_name!r} for syncing")
        self.run_dir = Path(run_dir)
        self.options = dict(options or {})
        self.retention = retention
        self.milestones_only = milestones_only
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.node, self.poll, self.max_poll = node, poll, max_poll
        self._lock = threading.Condition()
        self._closing = False
        self._abort = threading.Event()
        self._last_error: str | None = None
        self._heartbeat: threading.Thread | None = None
        self._destinations: list[_Destination] = []
        for url in dict.fromkeys(check_destination(url) for url in destinations):
            # Opening checks the scheme and options now (one-line StorageError), before training starts.
            self._destinations.append(_Destination(url=url, backend=open_backend(run_url(url, self.run_name), options)))
        self._scratch = Path(tempfile.mkdtemp(prefix="miras-sync-"))  # after every check: nothing left on failure
        for dest in self._destinations:
            dest.thread = threading.Thread(
                target=self._worker, args=(dest,), name=f"miras-sync:{dest.url}", daemon=True
            )
            dest.thread.start()

    # -- public API
    @property
    def destinations(self) -> list[str]:
        return [d.url for d in self._destinations]

    def probe(self) -> None:
        """Write, read back and delete a small object at every destination; StorageError with a one-line reason."""
        payload = f"miras probe {uuid.uuid4().hex}\n".encode()
        for dest in self._destinations:
            key = f".miras-probe-{uuid.uuid4().hex[:12]}"
            local = self._scratch / key
            local.write_bytes(payload)
            try:
                dest.backend.put(local, key)
                dest.backend.get(key, self._scratch / (key + ".back"))
                if (self._scratch / (key + ".back")).read_bytes() != payload:
                    raise StorageError("the object read back differs from the one written")
                dest.backend.delete(key)
            except Exception as error:
                reason = redact(one_line(error), self.options)
                raise StorageError(
                    f"cannot use sync destination {run_url(dest.url, self.run_name)}: {reason}"
                ) from None
            finally:
                local.unlink(missing_ok=True)
                (self._scratch / (key + ".back")).unlink(missing_ok=True)

    def hold_leases(self, owner: str, takeover: bool = False, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """Take the run's lease at every destination (LeaseHeld, one line, when another machine holds one),
        then renew them every timeout/4 seconds until close(). Returns notes on leases taken over."""
        notes, where = [], ""
        try:
            for dest in self._destinations:
                # A backend of its own: the heartbeat must not wait behind (or share state with) an upload.
                backend = open_backend(run_url(dest.url, self.run_name), self.options)
                where = redact(run_url(dest.url, self.run_name), self.options)
                lease = Lease(backend, owner, self.run_dir, timeout, where=where)
                note = lease.acquire(takeover)
                dest.lease = lease
                notes += [note] if note else []
        except LeaseHeld:
            self._release_leases()
            raise
        except Exception as error:
            self._release_leases()
            raise StorageError(f"cannot take the lease at {where}: {redact(one_line(error), self.options)}") from None
        self._heartbeat = threading.Thread(target=self._beat, args=(timeout / 4,), name="miras-lease", daemon=True)
        self._heartbeat.start()
        return notes

    def _beat(self, interval: float) -> None:
        while not self._abort.wait(interval):  # beats on while close() still uploads
            for dest in self._destinations:
                if dest.lease is None or dest.lost_to:
                    continue
                try:
                    held = dest.lease.renew()
                except Exception as error:  # the next beat tries again; the lease lasts `timeout`
                    log.warning("sync %s: could not renew the lease: %s", dest.lease.where,
                                redact(one_line(error), self.options))  # fmt: skip
                    continue
                if not held:
                    self._lose(dest, dest.lease.holder())

    def _lose(self, dest: _Destination, holder: str) -> None:
        with self._lock:
            dest.lost_to = holder
            dest.queue.clear()
            self._last_error = f"{dest.lease.where}: the lease was taken over by {holder}"
            self._lock.notify_all()
        log.error("sync %s: %s took the run over (--takeover); nothing more is uploaded there",
                  dest.lease.where, holder)  # fmt: skip

    def _release_leases(self) -> None:
        for dest in self._destinations:
            if dest.lease is not None and not dest.lost_to:
                try:
                    dest.lease.release()
                except Exception as error:  # it expires by itself
                    log.warning("sync %s: could not release the lease: %s", dest.lease.where,
                                redact(one_line(error), self.options))  # fmt: skip
            dest.lease = None

    def submit_checkpoint(self, folder: Path, step: int, milestone: bool, final: bool = False) -> None:
        """Queue a committed checkpoint folder (non-blocking)."""
        if self.milestones_only and not milestone and not final:
            return
        with self._lock:
            self._check_open()
            for dest in self._destinations:
                if dest.lost_to:
                    continue
                kept = deque()
                for job in dest.queue:
                    if isinstance(job, _CheckpointJob) and job.supersedable and job is not dest.busy:
                        dest.superseded += 1
                        log.info("sync %s: step %d superseded by step %d before upload", dest.url, job.step, step)
                    else:
                        kept.append(job)
                dest.queue = kept
                dest.queue.append(_CheckpointJob(Path(folder), int(step), bool(milestone), bool(final)))
            self._lock.notify_all()

    def submit_file(self, path: Path) -> None:
        """Queue a run-level file (config.json, metrics.jsonl); the content at upload time is what goes up."""
        path = Path(path)
        with self._lock:
            self._check_open()
            for dest in self._destinations:
                if dest.lost_to:
                    continue
                if not any(isinstance(j, _FileJob) and j.path == path and j is not dest.busy for j in dest.queue):
                    dest.queue.append(_FileJob(path))
            self._lock.notify_all()

    def status(self) -> dict:
        with self._lock:
            seconds = sum(d.seconds for d in self._destinations)
            return {
                "sync_queued": sum(len(d.queue) for d in self._destinations),
                "sync_uploaded": sum(d.uploaded for d in self._destinations),
                "sync_failed": sum(d.failed for d in self._destinations),  # failed attempts, retried or not
                "sync_gave_up": sum(d.given_up for d in self._destinations),  # jobs dropped after every retry
                "sync_bytes_per_second": (sum(d.bytes for d in self._destinations) / seconds) if seconds else 0.0,
                "sync_last_error": self._last_error,
            }

    def close(self, timeout: float) -> bool:
        """Upload what is queued, for at most `timeout` seconds; True if everything submitted went up."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        for dest in self._destinations:
            dest.thread.join(max(0.0, deadline - time.monotonic()))
        self._abort.set()  # stragglers stop at their next step; a put in flight can't be interrupted
        with self._lock:
            self._lock.notify_all()
            complete = all(not d.queue and not d.thread.is_alive() and not d.given_up and not d.lost_to
                           for d in self._destinations)  # fmt: skip
        if not complete:
            log.warning("sync: not everything went up: %s", self.unfinished())
        if self._heartbeat is not None:
            self._heartbeat.join()
        self._release_leases()
        shutil.rmtree(self._scratch, ignore_errors=True)
        return complete

    def unfinished(self) -> str:
        """What is not uploaded, in words: per destination what is still queued or was given up, and why."""
        parts = []
        with self._lock:
            for dest in self._destinations:
                checkpoints = sorted(j.step for j in dest.queue if isinstance(j, _CheckpointJob))
                files = sorted({j.path.name for j in dest.queue if isinstance(j, _FileJob)})
                what = [f"checkpoint{'s' * (len(checkpoints) > 1)} {', '.join(map(checkpoint_name, checkpoints))}"]
                what = (what if checkpoints else []) + ([", ".join(files)] if files else [])
                if what:
                    parts.append(f"{' and '.join(what)} still to upload to {dest.url}")
                if dest.given_up:
                    parts.append(f"{dest.given_up} upload(s) to {dest.url} given up after every retry")
                if dest.lost_to:
                    parts.append(f"{dest.url}: the run was taken over by {dest.lost_to}")
            if parts and self._last_error:
                parts.append(f"the last failure: {self._last_error}")
        return "; ".join(parts) or "an upload was still running when the time ran out"

    # -- worker
    def _check_open(self) -> None:
        if self._closing:
            raise StorageError("Syncer is closed")

    def _worker(self, dest: _Destination) -> None:
        try:  # Linux: a thread is a task with its own nice value; uploads yield the CPU to the training loop
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while True:
            with self._lock:
                while not dest.queue and not self._closing and not self._abort.is_set():
                    self._lock.wait()
                if self._abort.is_set() or not dest.queue or dest.lost_to:
                    return
                job = dest.busy = dest.queue[0]
            try:
                started = time.monotonic()
                sent = self._run(dest, job)
                with self._lock:
                    dest.bytes += sent
                    dest.seconds += time.monotonic() - started
                    dest.uploaded += 1
                    dest.busy = None
                    if dest.queue and dest.queue[0] is job:
                        dest.queue.popleft()
            except _Superseded:
                with self._lock:
                    dest.superseded += 1
                    dest.busy = None
                    if job in dest.queue:
                        dest.queue.remove(job)
            except Exception as error:
                self._failed(dest, job, error)

    def _failed(self, dest: _Destination, job, error: Exception) -> None:
        job.attempts += 1
        what = f"step {job.step}" if isinstance(job, _CheckpointJob) else job.path.name
        message = redact(f"{dest.url}: {what}: {one_line(error)}", self.options)
        give_up = isinstance(error, _Permanent) or (self.max_retries is not None and job.attempts > self.max_retries)
        with self._lock:
            dest.failed += 1
            dest.busy = None
            self._last_error = message
            if give_up:
                dest.given_up += 1
                if job in dest.queue:
                    dest.queue.remove(job)
        if give_up:
            log.error("sync gave up after %d attempt(s): %s", job.attempts, message)
            return
        delay = min(self.backoff * 2 ** (job.attempts - 1), self.max_backoff)
        log.warning("sync attempt %d failed (retrying in %.1f s): %s", job.attempts, delay, message)
        self._abort.wait(delay)

    def _run(self, dest: _Destination, job) -> int:
        if isinstance(job, _FileJob):
            return self._upload_file(dest, job)
        return self._upload_checkpoint(dest, job)

    def _upload_file(self, dest: _Destination, job: _FileJob) -> int:
        if not job.path.is_file():
            raise _Permanent(f"local file {job.path} is gone")
        try:
            key = job.path.resolve().relative_to(self.run_dir.resolve()).as_posix()
        except ValueError:
            key = job.path.name
        # Snapshot first: the file may be appended to while it uploads; a .jsonl keeps whole lines only.
        snapshot = self._scratch / f"{uuid.uuid4().hex}-{job.path.name}"
        shutil.copyfile(job.path, snapshot)
        if job.path.suffix == ".jsonl":
            data = snapshot.read_bytes()
            if data and not data.endswith(b"\n"):
                snapshot.write_bytes(data[: data.rfind(b"\n") + 1])
        try:
            size = snapshot.stat().st_size
            dest.backend.put(snapshot, key)
            return size
        finally:
            snapshot.unlink(missing_ok=True)

    def _upload_checkpoint(self, dest: _Destination, job: _CheckpointJob) -> int:
        name = job.folder.name if parse_step(job.folder.name) == job.step else checkpoint_name(job.step)
        prefix = f"{CHECKPOINTS_DIR}/{name}"
        try:
            manifest = read_manifest(job.folder)
        except ManifestError as error:
            raise _Permanent(f"local checkpoint unusable: {error}") from None
        nodes = manifest.get(NODES_KEY) if self.node is not None else None
        mine = sorted(manifest["files"]) if not nodes else sorted(nodes.get(str(self.node), []))
        sent = 0
        for rel in mine:  # files first ...
            if rel in job.done:
                continue
            if self._abort.is_set():
                raise StorageError("sync aborted at close")
            local = job.folder / rel
            if not local.is_file():
                raise _Permanent(f"local checkpoint lost {rel} before it was uploaded (pruned?)")
            dest.backend.put(local, join_key(prefix, rel))
            job.done.add(rel)
            sent += local.stat().st_size
        if nodes and self.node != 0:  # ... this node's confirmation; node 0 publishes
            entries = {rel: manifest["files"][rel] for rel in mine}
            marker = self._scratch / f"marker-{uuid.uuid4().hex}.json"
            marker.write_text(json.dumps({"node": self.node, "step": job.step, "files": entries}, sort_keys=True))
            try:
                dest.backend.put(marker, join_key(prefix, NODES_DIR, node_marker_name(self.node)))
            finally:
                marker.unlink(missing_ok=True)
            return sent
        if nodes:
            self._await_nodes(dest, job, prefix, manifest, nodes)
        dest.backend.put(job.folder / MANIFEST_NAME, join_key(prefix, MANIFEST_NAME))  # ... then the manifest ...
        sent += (job.folder / MANIFEST_NAME).stat().st_size
        dest.milestones[job.step] = job.milestone
        if dest.latest_step is None or job.step >= dest.latest_step:  # ... then `latest` (never backwards)
            write_latest(dest.backend, name)
            dest.latest_step = job.step
        try:
            self._retain(dest, current=job.step)
        except Exception as error:  # retention is housekeeping: never fail the upload for it
            log.warning("sync %s: remote retention failed: %s", dest.url, redact(one_line(error), self.options))
        return sent

    def _await_nodes(self, dest: _Destination, job: _CheckpointJob, prefix: str, manifest: dict, nodes: dict) -> None:
        """Node 0: return once every other node's confirmation for this checkpoint is up and matches the
        manifest; _Superseded when a newer checkpoint is queued behind a supersedable one meanwhile."""
        wanted = {
            int(node): {rel: manifest["files"][rel] for rel in files} for node, files in nodes.items() if int(node)
        }
        confirmed: set[int] = set()
        delay, told = self.poll, False
        while True:
            listed = set(dest.backend.list(join_key(prefix, NODES_DIR)))
            for node, entries in wanted.items():
                key = join_key(prefix, NODES_DIR, node_marker_name(node))
                if node not in confirmed and key in listed and self._marker_files(dest, key) == entries:
                    confirmed.add(node)
            if confirmed == set(wanted):
                return
            if self._abort.is_set():
                raise StorageError(f"sync aborted at close, waiting for node(s) {sorted(set(wanted) - confirmed)}")
            with self._lock:
                newer = any(isinstance(j, _CheckpointJob) and j.step > job.step for j in dest.queue)
            if newer and job.supersedable:
                log.info("sync %s: step %d superseded while waiting for the other nodes", dest.url, job.step)
                raise _Superseded()
            if not told:
                log.info("sync %s: step %d waits for node(s) %s", dest.url, job.step, sorted(set(wanted) - confirmed))
                told = True
            self._abort.wait(delay)
            delay = min(delay * 2, self.max_poll)

    def _marker_files(self, dest: _Destination, key: str) -> dict | None:
        local = self._scratch / f"marker-{uuid.uuid4().hex}.json"
        try:
            dest.backend.get(key, local)
            return json.loads(local.read_text()).get("files")
        except (FileNotFoundError, ValueError, AttributeError):
            return None
        finally:
            local.unlink(missing_ok=True)

    # -- retention
    def _milestone(self, dest: _Destination, name: str) -> bool:
        step = parse_step(name)
        if step not in dest.milestones:
            local = self._scratch / f"manifest-{uuid.uuid4().hex}.json"
            try:
                dest.backend.get(f"{CHECKPOINTS_DIR}/{name}/{MANIFEST_NAME}", local)
                dest.milestones[step] = bool(json.loads(local.read_text()).get("milestone"))
            except (FileNotFoundError, ValueError):
                dest.milestones[step] = False
            finally:
                local.unlink(missing_ok=True)
        return dest.milestones[step]

    def _retain(self, dest: _Destination, current: int) -> None:
        if self.retention.keeps_all:
            return
        folders: dict[str, list[str]] = {}
        for key in dest.backend.list(CHECKPOINTS_DIR):
            parts = key.split("/", 2)
            if len(parts) == 3 and parse_step(parts[1]) is not None:
                folders.setdefault(parts[1], []).append(key)
        complete = sorted((n for n, keys in folders.items() if f"{CHECKPOINTS_DIR}/{n}/{MANIFEST_NAME}" in keys),
                          key=parse_step)  # fmt: skip
        protect = {current, parse_step(read_latest(dest.backend) or "")} - {None}
        kept = self.retention.kept([(parse_step(n), self._milestone(dest, n)) for n in complete], protect)
        keep = {checkpoint_name(step) for step in kept}
        doomed = [n for n in complete if n not in keep]
        # Unfinished uploads older than the checkpoint just completed (a previous instance died mid-upload).
        doomed += [n for n in folders if n not in complete and parse_step(n) < current and n not in keep]
        for name in doomed:
            keys = sorted(folders[name], key=lambda k: not k.endswith("/" + MANIFEST_NAME))  # manifest first:
            for key in keys:  # the folder stops being a checkpoint before any of its files go
                try:
                    dest.backend.delete(key)
                except Exception as error:
                    log.warning(
                        "sync %s: could not delete %s: %s", dest.url, key, redact(one_line(error), self.options)
                    )
                    break
            else:
                log.info("sync %s: removed remote %s (retention)", dest.url, name)
                dest.milestones.pop(parse_step(name), None)


def estimated_daily_bytes(checkpoint_bytes: int, seconds_between_checkpoints: float) -> float:
    """Upload volume per day of a run that syncs a checkpoint of this size at this interval."""
    return checkpoint_bytes * 86400.0 / max(seconds_between_checkpoints, 1.0)


DRIVE_DAILY_UPLOAD_CAP = 750 * 10**9  # Google Drive: 750 GB uploaded per user (or service account) per day


def drive_cap_warning(destinations: list[str], daily_bytes: float) -> str | None:
    """A warning when a Drive destination (gdrive://, or an rclone remote of type drive set by environment
    variables) would receive more than Drive's 750 GB/day upload cap; None otherwise."""
    drive_urls = []
    for url in destinations:
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        remote = url.split("://", 1)[1].split("/", 1)[0] if scheme == "rclone" else ""
        if scheme == "gdrive" or (remote and os.environ.get(f"RCLONE_CONFIG_{remote.upper()}_TYPE") == "drive"):
            drive_urls.append(url)
        elif scheme == "rclone" and "drive" in remote.lower():
            drive_urls.append(url)
    if not drive_urls or daily_bytes <= DRIVE_DAILY_UPLOAD_CAP:
        return None
    return (
        f"syncing about {daily_bytes / 1e9:.0f} GB/day to {', '.join(drive_urls)}: over Google Drive's 750 GB/day "
        "upload cap (uploads fail for the rest of the day once it is reached); sync less often, use "
        "--sync-milestones-only, or a bucket"
    )
