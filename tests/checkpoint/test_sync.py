"""The Syncer (background uploads, retries, supersession, remote retention) and remote resume helpers."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from miras.checkpoint.latest import read_latest
from miras.checkpoint.layout import checkpoint_name
from miras.checkpoint.manifest import build_manifest, verify_folder, write_manifest
from miras.checkpoint.remote import download_checkpoint, find_remote_checkpoints, pull_latest
from miras.checkpoint.retention import RetentionPolicy
from miras.checkpoint.sync import Syncer, drive_cap_warning
from miras.storage import StorageError, open_backend, redact

FAST = {"max_retries": 3, "backoff": 0.01}


def make_checkpoint(run_dir: Path, step: int, milestone: bool = False, size: int = 3000) -> Path:
    """A committed checkpoint folder as the checkpoint code writes it: files, nested trainer/, manifest last."""
    folder = run_dir / "checkpoints" / checkpoint_name(step)
    (folder / "trainer").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(size))
    (folder / "config.json").write_text(json.dumps({"step": step}))
    (folder / "trainer" / "trainer_state.json").write_text(json.dumps({"step": step, "milestone": milestone}))
    write_manifest(folder, build_manifest(folder, step, milestone))
    (run_dir / "checkpoints" / "latest").write_text(folder.name)
    return folder


def remote_steps(url_run: str, options=None) -> list[int]:
    return [step for step, _ in find_remote_checkpoints(url_run, options)]


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        time.sleep(0.01)


def wait_idle(syncer: Syncer, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while syncer.status()["sync_queued"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert syncer.status()["sync_queued"] == 0, syncer.status()


@pytest.fixture
def run_dir(tmp_path):
    path = tmp_path / "runs" / "r1"
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"lr": 0.001}')
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    return path


def test_two_destinations_receive_everything_and_resume_from_either(run_dir, tmp_path):
    dests = [str(tmp_path / "remote-a"), "memory://miras-sync/" + tmp_path.name]
    syncer = Syncer(dests, "r1", run_dir, **FAST)
    syncer.probe()
    syncer.submit_file(run_dir / "config.json")
    for step in (10, 20):
        syncer.submit_checkpoint(make_checkpoint(run_dir, step, milestone=step == 10), step, step == 10)
        wait_idle(syncer)
    syncer.submit_file(run_dir / "metrics.jsonl")
    assert syncer.close(timeout=30)
    status = syncer.status()
    assert status["sync_uploaded"] == 2 * 4 and status["sync_failed"] == 0 and status["sync_last_error"] is None
    assert status["sync_bytes_per_second"] > 0
    for url in dests:
        run_url = f"{url}/r1"
        assert remote_steps(run_url) == [10, 20]
        assert read_latest(open_backend(run_url)) == "step_00000020"
        assert sorted(open_backend(run_url).list("")) == sorted(
            ["config.json", "metrics.jsonl", "checkpoints/latest"]
            + [f"checkpoints/step_000000{s}/{f}" for s in (10, 20)
               for f in ("config.json", "manifest.json", "model.safetensors", "trainer/trainer_state.json")]
        )  # fmt: skip
        fresh = tmp_path / "fresh" / url.replace("/", "_").replace(":", "")
        pulled = pull_latest(run_url, fresh)
        assert pulled == fresh / "checkpoints" / "step_00000020" and verify_folder(pulled) == []
        assert (pulled / "model.safetensors").read_bytes() == (
            run_dir / "checkpoints/step_00000020/model.safetensors"
        ).read_bytes()
        assert (fresh / "checkpoints" / "latest").read_text().strip() == "step_00000020"
        assert (fresh / "metrics.jsonl").read_text() == (run_dir / "metrics.jsonl").read_text()


def test_upload_order_is_files_then_manifest_then_latest(run_dir, tmp_path):
    journal = tmp_path / "journal"
    syncer = Syncer([f"testfs://{tmp_path}/remote"], "r1", run_dir, options={"journal": str(journal)}, **FAST)
    syncer.submit_checkpoint(make_checkpoint(run_dir, 5), 5, False)
    assert syncer.close(30)
    puts = [line.split(" ", 1)[1] for line in journal.read_text().splitlines() if line.startswith("put ")]
    assert puts[-2:] == ["checkpoints/step_00000005/manifest.json", "checkpoints/latest"]  # under URL/r1
    assert len(puts) == 5  # 3 files + manifest + latest


def test_destination_failing_the_first_puts_ends_up_with_every_checkpoint(run_dir, tmp_path):
    url = f"testfs://{tmp_path}/remote"
    syncer = Syncer([url], "r1", run_dir, options={"fail_puts": "5"}, max_retries=5, backoff=0.01)
    for step in (1, 2, 3):
        syncer.submit_checkpoint(make_checkpoint(run_dir, step, milestone=True), step, True)  # never superseded
    syncer.submit_file(run_dir / "metrics.jsonl")
    assert syncer.close(timeout=30)
    status = syncer.status()
    assert status["sync_failed"] == 5 and status["sync_uploaded"] == 4 and status["sync_gave_up"] == 0
    assert "injected failure" in status["sync_last_error"]
    assert remote_steps(f"{url}/r1") == [1, 2, 3]
    for step in (1, 2, 3):
        got = download_checkpoint(f"{url}/r1", f"checkpoints/{checkpoint_name(step)}", tmp_path / "dl" / str(step))
        assert verify_folder(got) == []


def test_destination_down_for_the_whole_run(run_dir, tmp_path, caplog):
    url = f"testfs://{tmp_path}/remote"
    syncer = Syncer([url], "r1", run_dir, options={"down": "true"}, max_retries=2, backoff=0.01)
    with pytest.raises(StorageError) as caught:
        syncer.probe()
    assert "\n" not in str(caught.value) and "is down" in str(caught.value)
    folders = [make_checkpoint(run_dir, step, milestone=True) for step in (1, 2)]
    for step, folder in zip((1, 2), folders):
        syncer.submit_checkpoint(folder, step, True)  # only queues: training never waits for an upload
    assert syncer.status()["sync_queued"] >= 1 and syncer.status()["sync_uploaded"] == 0
    with caplog.at_level(logging.ERROR, logger="miras.checkpoint.sync"):
        assert syncer.close(timeout=10) is False
    status = syncer.status()
    assert status["sync_uploaded"] == 0 and status["sync_failed"] == 6 and status["sync_gave_up"] == 2
    assert "is down" in status["sync_last_error"]
    assert all(verify_folder(f) == [] for f in folders)  # local checkpoints intact
    assert "gave up" in caplog.text


def test_close_is_bounded_when_uploads_take_longer(run_dir, tmp_path):
    """Each put takes 60 s: close(0.3) returns (False) long before one of them could finish."""
    import threading

    syncer = Syncer([f"testfs://{tmp_path}/remote"], "r1", run_dir, options={"delay": "60"}, **FAST)
    syncer.submit_checkpoint(make_checkpoint(run_dir, 1, milestone=True), 1, True)
    returned = []
    closing = threading.Thread(target=lambda: returned.append(syncer.close(timeout=0.3)), daemon=True)
    closing.start()
    closing.join(30)
    assert returned == [False] and syncer.status()["sync_uploaded"] == 0


def test_newer_checkpoint_supersedes_queued_non_milestones_but_never_milestones(run_dir, tmp_path):
    url = f"testfs://{tmp_path}/remote"
    journal, gate = tmp_path / "journal", tmp_path / "gate"
    syncer = Syncer([url], "r1", run_dir, options={"gate": str(gate), "journal": str(journal)}, **FAST)
    folders = {step: make_checkpoint(run_dir, step, milestone=step == 3) for step in (1, 2, 3, 4, 5)}
    syncer.submit_checkpoint(folders[1], 1, False)
    wait_for(lambda: journal.exists() and journal.read_text())  # step 1 is uploading: too late to supersede it
    for step in (2, 3, 4, 5):  # queued behind step 1's first put, which waits for the gate
        syncer.submit_checkpoint(folders[step], step, step == 3)
    gate.touch()
    assert syncer.close(timeout=30)
    assert remote_steps(f"{url}/r1") == [1, 3, 5]
    assert read_latest(open_backend(f"{url}/r1")) == "step_00000005"


def test_milestones_only_uploads_milestones_and_the_final_checkpoint(run_dir, tmp_path):
    url = f"testfs://{tmp_path}/remote"
    syncer = Syncer([url], "r1", run_dir, milestones_only=True, **FAST)
    for step in (1, 2, 3):
        syncer.submit_checkpoint(make_checkpoint(run_dir, step, milestone=step == 2), step, step == 2)
        wait_idle(syncer)
    syncer.submit_checkpoint(make_checkpoint(run_dir, 4), 4, False, final=True)
    assert syncer.close(timeout=30)
    assert remote_steps(f"{url}/r1") == [2, 4]


def test_remote_retention_keeps_last_n_and_last_m_milestones(run_dir, tmp_path):
    url = f"testfs://{tmp_path}/remote"
    syncer = Syncer([url], "r1", run_dir, retention=RetentionPolicy(2, 1), **FAST)
    for step in range(1, 7):
        syncer.submit_checkpoint(make_checkpoint(run_dir, step, milestone=step in (2, 4)), step, step in (2, 4))
        wait_idle(syncer)
    assert syncer.close(timeout=30)
    assert remote_steps(f"{url}/r1") == [4, 5, 6]
    leftover = {k.split("/")[1] for k in open_backend(f"{url}/r1").list("checkpoints") if "/" in k[12:]}
    assert leftover == {"step_00000004", "step_00000005", "step_00000006"}  # deleted folders left no files


def test_retention_reads_milestone_flags_from_remote_manifests_and_never_removes_latest(run_dir, tmp_path):
    url = f"testfs://{tmp_path}/remote"
    first = Syncer([url], "r1", run_dir, **FAST)
    for step in (1, 2, 3):
        first.submit_checkpoint(make_checkpoint(run_dir, step, milestone=step == 2), step, step == 2)
        wait_idle(first)
    assert first.close(10)
    # A new instance (say, after a preemption) knows nothing of steps 1-3 but the remote manifests.
    second = Syncer([url], "r1", run_dir, retention=RetentionPolicy(1, 1), **FAST)
    second.submit_checkpoint(make_checkpoint(run_dir, 4), 4, False)
    assert second.close(10)
    assert remote_steps(f"{url}/r1") == [2, 4]
    # keep nothing: the checkpoint `latest` names still stays.
    third = Syncer([url], "r1", run_dir, retention=RetentionPolicy(0, 0), **FAST)
    third.submit_checkpoint(make_checkpoint(run_dir, 5), 5, False)
    assert third.close(10)
    assert remote_steps(f"{url}/r1") == [5]
    assert read_latest(open_backend(f"{url}/r1")) == "step_00000005"


def test_run_file_snapshot_keeps_whole_jsonl_lines_and_latest_content(run_dir, tmp_path):
    url = str(tmp_path / "remote")
    syncer = Syncer([url], "r1", run_dir, **FAST)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # a writer mid-line
    syncer.submit_file(metrics)
    assert syncer.close(10)
    assert (tmp_path / "remote" / "r1" / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_pull_latest_skips_a_corrupt_remote_checkpoint(run_dir, tmp_path, caplog):
    remote = tmp_path / "remote"
    syncer = Syncer([str(remote)], "r1", run_dir, **FAST)
    for step in (1, 2):
        syncer.submit_checkpoint(make_checkpoint(run_dir, step, milestone=True), step, True)
    syncer.submit_file(run_dir / "metrics.jsonl")
    assert syncer.close(10)
    shard = remote / "r1" / "checkpoints" / "step_00000002" / "model.safetensors"
    shard.write_bytes(b"flipped" + shard.read_bytes()[7:])  # same size, different bytes
    fresh = tmp_path / "fresh"
    with caplog.at_level(logging.WARNING, logger="miras.checkpoint.remote"):
        pulled = pull_latest(str(remote / "r1"), fresh)
    assert pulled == fresh / "checkpoints" / "step_00000001" and verify_folder(pulled) == []
    assert "step_00000002" in caplog.text and "sha256" in caplog.text
    assert sorted(p.name for p in (fresh / "checkpoints").iterdir()) == ["latest", "step_00000001"]  # no .tmp
    assert (fresh / "checkpoints" / "latest").read_text().strip() == "step_00000001"


def test_unfinished_remote_upload_is_not_a_checkpoint(run_dir, tmp_path):
    remote = tmp_path / "remote"
    folder = make_checkpoint(run_dir, 7)
    backend = open_backend(str(remote / "r1"))
    backend.put(folder / "model.safetensors", "checkpoints/step_00000007/model.safetensors")  # no manifest
    assert find_remote_checkpoints(str(remote / "r1")) == []
    assert pull_latest(str(remote / "r1"), tmp_path / "fresh") is None
    with pytest.raises(StorageError, match="no manifest.json"):
        download_checkpoint(backend, "checkpoints/step_00000007", tmp_path / "dl")
    assert not (tmp_path / "dl").exists() and not (tmp_path / "dl.tmp").exists()


def test_bad_destination_fails_at_construction_with_installed_schemes(run_dir):
    with pytest.raises(StorageError) as caught:
        Syncer(["ftp://host/x"], "r1", run_dir)
    assert "'ftp'" in str(caught.value) and "gdrive" in str(caught.value) and "rclone" in str(caught.value)


def test_probe_failure_is_one_line_and_secret_options_are_redacted(run_dir, s3_endpoint):
    secret = "super-secret-value-123"
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": secret}
    syncer = Syncer(["s3://no-such-bucket-x/runs"], "r1", run_dir, options=options, max_retries=0)
    with pytest.raises(StorageError) as caught:
        syncer.probe()
    message = str(caught.value)
    assert "s3://no-such-bucket-x/runs/r1" in message and "\n" not in message and secret not in message
    syncer.close(1)
    assert redact(f"failed with secret={secret} and key=testing", options) == "failed with secret=*** and key=***"


def test_drive_cap_warning(monkeypatch):
    monkeypatch.setenv("RCLONE_CONFIG_MYDRIVE_TYPE", "drive")
    assert drive_cap_warning(["gs://b/x"], 5e12) is None
    assert drive_cap_warning(["gdrive://abc/runs"], 1e11) is None
    assert "750 GB/day" in drive_cap_warning(["gdrive://abc/runs"], 1e12)
    assert "rclone://mydrive/x" in drive_cap_warning(["rclone://mydrive/x", "gs://b"], 1e12)


def node_parts(run_dirs, step):
    """One checkpoint written on two nodes with their own disks: each folder holds its node's files and the
    manifest of all of them (as the node-local commit writes it)."""
    from miras.checkpoint.manifest import file_entries

    folders = []
    for node, run in enumerate(run_dirs):
        folder = run / "checkpoints" / checkpoint_name(step)
        (folder / "trainer").mkdir(parents=True)
        (folder / "trainer" / f"rank_0000{node}.pt").write_bytes(os.urandom(200 + node))
        if node == 0:
            (folder / "model.safetensors").write_bytes(os.urandom(3000))
        folders.append(folder)
    entries = [file_entries(folder) for folder in folders]
    nodes = {str(node): sorted(part) for node, part in enumerate(entries)}
    manifest = build_manifest(None, step, False, {"nodes": nodes}, files={**entries[0], **entries[1]})
    for folder in folders:
        write_manifest(folder, manifest)
    return folders


def test_node_local_uploads_publish_only_after_every_node_confirmed_its_own_files(tmp_path):
    remote = tmp_path / "remote"
    runs = [tmp_path / "node0" / "r1", tmp_path / "node1" / "r1"]
    folders = node_parts(runs, 2)
    # An earlier attempt at step 2 left node 1's confirmation of other content: it must not count.
    stale = remote / "r1" / "checkpoints" / "step_00000002" / "nodes" / "node_00001.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"files": {"trainer/rank_00001.pt": {"size": 201, "sha256": "0" * 64}}}))
    poll = {"poll": 0.01, "max_poll": 0.05, **FAST}
    node0 = Syncer([str(remote)], "r1", runs[0], node=0, **poll)
    node0.submit_checkpoint(folders[0], 2, False)
    wait_for((remote / "r1" / "checkpoints" / "step_00000002" / "model.safetensors").exists)
    assert remote_steps(str(remote / "r1")) == [] and node0.status()["sync_queued"] == 1  # waiting for node 1

    # Node 1's destination fails more puts than FAST's 3 retries: a node keeps retrying (max_retries=None).
    node1 = Syncer([f"testfs://{remote}"], "r1", runs[1], {"fail_puts": "5"}, node=1, **{**poll, "max_retries": None})
    node1.submit_checkpoint(folders[1], 2, False)
    assert node1.close(timeout=20) and node0.close(timeout=20)
    assert node1.status()["sync_failed"] == 5 and node1.status()["sync_gave_up"] == 0
    assert remote_steps(str(remote / "r1")) == [2]
    assert read_latest(open_backend(str(remote / "r1"))) == "step_00000002"
    assert verify_folder(remote / "r1" / "checkpoints" / "step_00000002") == []
    assert json.loads(stale.read_text())["files"]["trainer/rank_00001.pt"]["size"] == 201


def test_node_0_stops_waiting_for_a_checkpoint_a_newer_one_supersedes(tmp_path):
    remote = tmp_path / "remote"
    runs = [tmp_path / "node0" / "r1", tmp_path / "node1" / "r1"]
    old, new = node_parts(runs, 2), node_parts(runs, 4)
    poll = {"poll": 0.01, "max_poll": 0.05, **FAST}
    node0 = Syncer([str(remote)], "r1", runs[0], node=0, **poll)
    node0.submit_checkpoint(old[0], 2, False)
    wait_for((remote / "r1" / "checkpoints" / "step_00000002" / "trainer" / "rank_00000.pt").exists)
    node0.submit_checkpoint(new[0], 4, False)  # step 2's own files are up: it waits for node 1 now
    node1 = Syncer([str(remote)], "r1", runs[1], node=1, **poll)
    node1.submit_checkpoint(new[1], 4, False)  # node 1 skipped step 2 (superseded before it started)
    assert node1.close(timeout=20) and node0.close(timeout=20)
    assert remote_steps(str(remote / "r1")) == [4]
    assert node0._destinations[0].superseded == 1


def test_a_refused_destination_leaves_no_temporary_folder(run_dir, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    for bad in (["", str(tmp_path / "ok")], [str(tmp_path / "ok"), "ftp://host/x"]):
        with pytest.raises(StorageError):
            Syncer(bad, "r1", run_dir)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_close_names_what_did_not_go_up_in_words(run_dir, tmp_path):
    syncer = Syncer([f"testfs://{tmp_path}/remote"], "r1", run_dir, options={"down": "true"}, max_retries=0)
    syncer.submit_checkpoint(make_checkpoint(run_dir, 1, milestone=True), 1, True)
    assert syncer.close(timeout=10) is False
    words = syncer.unfinished()
    assert "given up after every retry" in words and "is down" in words and "None" not in words
