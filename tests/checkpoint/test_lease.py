"""The remote lease: a second machine is refused naming the holder; an expired lease, --takeover and the same
machine restarting take it; a holder whose lease was taken over stops uploading there."""

from __future__ import annotations

import time

import pytest

from miras.checkpoint.lease import LEASE_NAME, Lease, LeaseHeld, owner_id
from miras.checkpoint.sync import Syncer
from miras.storage import open_backend

from .test_sync import make_checkpoint, remote_steps


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def lease(url, run_dir, clock, timeout=300.0):
    return Lease(open_backend(url), owner_id(run_dir), run_dir, timeout, clock=clock)


def test_a_second_machine_is_refused_in_one_line_naming_the_holder(tmp_path):
    clock, url = Clock(), str(tmp_path / "remote" / "r")
    first = lease(url, tmp_path / "machine-a" / "r", clock)
    assert first.acquire() is None
    clock.now += 100
    with pytest.raises(LeaseHeld) as refused:
        lease(url, tmp_path / "machine-b" / "r", clock).acquire()
    message = str(refused.value)
    assert "\n" not in message and "held by" in message and str(tmp_path / "machine-a" / "r") in message
    assert "last heartbeat 100 s ago" in message and "200 s from now" in message and "--takeover" in message
    assert first.renew()  # the holder keeps it


def test_an_expired_lease_or_takeover_is_taken_and_the_old_holder_learns_it(tmp_path):
    clock, url = Clock(), str(tmp_path / "remote" / "r")
    first = lease(url, tmp_path / "a" / "r", clock)
    first.acquire()
    second = lease(url, tmp_path / "b" / "r", clock)
    clock.now += 10
    assert "--takeover" in second.acquire(takeover=True)
    assert not first.renew()  # its heartbeat finds another holder: it must stop writing there
    clock.now += 301  # the second machine died: its lease expires
    third = lease(url, tmp_path / "c" / "r", clock)
    assert "its last heartbeat was 301 s ago" in third.acquire()


def test_the_same_machine_restarting_takes_its_own_lease_back_at_once(tmp_path):
    clock, url, run_dir = Clock(), str(tmp_path / "remote" / "r"), tmp_path / "a" / "r"
    lease(url, run_dir, clock).acquire()  # and then the process is killed: no release
    assert lease(url, run_dir, clock).acquire() is None  # the run folder keeps the id
    other = lease(url, tmp_path / "b" / "r", clock)
    other.release()  # not its lease: left alone
    assert open_backend(url).list("") == [LEASE_NAME]
    lease(url, run_dir, clock).release()
    assert open_backend(url).list("") == []


def test_a_garbled_lease_is_not_a_holder(tmp_path):
    clock, url = Clock(), str(tmp_path / "remote" / "r")
    (tmp_path / "remote" / "r").mkdir(parents=True)
    (tmp_path / "remote" / "r" / LEASE_NAME).write_text("{not json")
    assert lease(url, tmp_path / "a" / "r", clock).acquire() is None


def test_a_syncer_whose_lease_is_taken_over_stops_uploading_there(tmp_path):
    remote, first_run, second_run = tmp_path / "remote", tmp_path / "a" / "r1", tmp_path / "b" / "r1"
    first = Syncer([str(remote)], "r1", first_run, max_retries=0)
    first.hold_leases(owner_id(first_run), timeout=4.0)  # a heartbeat every second
    first.submit_checkpoint(make_checkpoint(first_run, 1), 1, False)
    second = Syncer([str(remote)], "r1", second_run, max_retries=0)
    with pytest.raises(LeaseHeld):
        second.hold_leases(owner_id(second_run), timeout=300)
    # Take over just after one of the first's heartbeats, far from its next one: storage has no compare-and-
    # swap, so a heartbeat landing between the takeover's write and its read-back would win it back.
    beat = Lease(open_backend(str(remote / "r1")), "reader", tmp_path).read()["heartbeat"]
    deadline = time.monotonic() + 20
    while Lease(open_backend(str(remote / "r1")), "reader", tmp_path).read()["heartbeat"] == beat:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second.hold_leases(owner_id(second_run), takeover=True, timeout=300)
    deadline = time.monotonic() + 20
    while not first.status()["sync_last_error"] and time.monotonic() < deadline:
        time.sleep(0.01)  # until the first one's heartbeat has seen the takeover
    assert "taken over by" in first.status()["sync_last_error"]
    first.submit_checkpoint(make_checkpoint(first_run, 2), 2, False)  # ignored: the run is not its own there
    assert first.close(10) is False and "the run was taken over by" in first.unfinished()
    assert 2 not in remote_steps(str(remote / "r1"))
    assert second.close(10) and open_backend(str(remote / "r1")).list(LEASE_NAME) == []
