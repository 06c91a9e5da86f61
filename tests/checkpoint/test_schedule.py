"""Triggers, milestones and retention, driven by an injected clock through a long simulated run."""

import pytest

from miras.checkpoint import build_manifest, checkpoint_name, write_manifest
from miras.checkpoint.catalog import catalog
from miras.checkpoint.latest import write_latest
from miras.checkpoint.retention import RetentionPolicy, prune
from miras.checkpoint.schedule import CheckpointSchedule


def commit_fake(folder, step, milestone):
    path = folder / checkpoint_name(step)
    (path / "trainer").mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w" * 64)
    (path / "trainer" / "optimizer.bin").write_bytes(b"o" * 128)
    write_manifest(path, build_manifest(path, step, milestone))
    write_latest(folder, path.name)


def simulate(folder, hours, seconds_per_step, keep_last, keep_milestones, weights_only=False, log=print):
    """Train for `hours` of clock time, committing whenever the schedule says so, pruning after each commit."""
    schedule = CheckpointSchedule(every_seconds=300, milestone_every_seconds=3600)
    clock, step, expected_milestones = 0.0, 0, []
    while clock < hours * 3600:
        step += 1
        clock += seconds_per_step
        if schedule.due(step, clock):
            milestone = schedule.is_milestone(clock)
            schedule.record(clock, milestone)
            commit_fake(folder, step, milestone)
            expected_milestones.append(milestone)
            prune(folder, RetentionPolicy(keep_last, keep_milestones), weights_only, log=log)
    return step


def test_time_and_step_triggers_and_milestones():
    schedule = CheckpointSchedule(every_seconds=300, every_steps=7, milestone_every_seconds=3600)
    assert not schedule.due(1, 299.0) and schedule.due(1, 300.0) and schedule.due(7, 10.0)
    assert not schedule.is_milestone(3599.0) and schedule.is_milestone(3600.0)
    schedule.record(3600.0, milestone=True)
    assert not schedule.due(8, 3899.0) and schedule.due(8, 3900.0)
    assert not schedule.is_milestone(7199.0) and schedule.is_milestone(7200.0)
    restored = CheckpointSchedule()
    restored.load_clock_state(schedule.clock_state())
    assert restored.last_milestone_time == 3600.0


def test_the_retention_policy_keeps_the_union_of_the_two_sets_plus_the_protected():
    entries = [(s, s % 4 == 0) for s in range(1, 21)]
    assert RetentionPolicy(3, 2).kept(entries, protect={1}) == {18, 19, 20, 16, 1}  # milestones 20 and 16
    assert RetentionPolicy(1, 3).kept(entries) == {20, 16, 12}
    assert RetentionPolicy(0, 0).kept(entries) == set()
    assert RetentionPolicy(None, None).kept(entries) == set(range(1, 21))
    assert RetentionPolicy(None, 0).kept(entries) == set(range(1, 21))


def test_a_long_simulated_run_keeps_exactly_the_expected_checkpoints(tmp_path):
    # 10 hours, a step every 7 s: a checkpoint every 301 s (43 steps), a milestone once an hour has passed.
    simulate(tmp_path, hours=10, seconds_per_step=7.0, keep_last=4, keep_milestones=3)
    infos = catalog(tmp_path)
    all_steps = [43 * k for k in range(1, 10 * 3600 // 301 + 1)]
    # milestone k is the first checkpoint at or after k hours: clock 301*j >= 3600*k  -> j = ceil(3600k/301)
    milestones = []
    last = 0.0
    for step in all_steps:
        if step * 7.0 - last >= 3600:
            milestones.append(step)
            last = step * 7.0
    assert [i.step for i in infos] == sorted(set(all_steps[-4:]) | set(milestones[-3:]))
    assert {i.step for i in infos if i.milestone} == set(milestones[-3:])
    assert (tmp_path / "latest").read_text().strip() == checkpoint_name(all_steps[-1])


def test_a_failing_delete_is_logged_and_retried_at_the_next_prune(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        commit_fake(tmp_path, step, False)
    messages = []
    monkeypatch.setenv("MIRAS_TEST_FAULT", "prune_delete:fail@1")
    assert prune(tmp_path, RetentionPolicy(1, 0), log=messages.append) == [2]  # step 1's delete failed, step 2's worked
    assert "could not delete" in messages[0] and [i.step for i in catalog(tmp_path)] == [1, 3]
    assert prune(tmp_path, RetentionPolicy(1, 0), log=messages.append) == [1]


def test_milestones_outside_keep_last_keep_only_the_model(tmp_path):
    from miras.checkpoint import verify_folder

    for step, milestone in ((1, True), (2, False), (3, False)):
        commit_fake(tmp_path, step, milestone)
    prune(tmp_path, RetentionPolicy(2, 5), weights_only_milestones=True)
    slim = tmp_path / checkpoint_name(1)
    assert not (slim / "trainer").exists() and (slim / "model.safetensors").exists()
    assert verify_folder(slim) == []
    assert [i.weights_only for i in catalog(tmp_path)] == [True, False, False]


def test_latest_is_never_pruned(tmp_path):
    for step in (1, 2, 3):
        commit_fake(tmp_path, step, False)
    write_latest(tmp_path, checkpoint_name(1))  # e.g. pointing at a resumed-from checkpoint
    prune(tmp_path, RetentionPolicy(1, 0))
    assert [i.step for i in catalog(tmp_path)] == [1, 3]


@pytest.mark.parametrize("keep_last", [0, 1])
def test_keep_nothing_still_keeps_latest(tmp_path, keep_last):
    for step in (1, 2):
        commit_fake(tmp_path, step, False)
    prune(tmp_path, RetentionPolicy(keep_last, 0))
    assert [i.step for i in catalog(tmp_path)] == [2]


def test_bf16_weights_only_milestones_load_with_from_pretrained_and_an_interrupted_swap_is_undone(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    import miras
    from miras.checkpoint import verify_folder
    from miras.checkpoint.commit import remove_stale_tmp
    from miras.checkpoint.retention import strip_trainer_state

    model = miras.MonetaForCausalLM(miras.MonetaConfig.from_size("xs", vocab_size=300, num_hidden_layers=1))
    folder = tmp_path / checkpoint_name(7)
    model.save_pretrained(folder, max_shard_size="2MB")
    (folder / "trainer").mkdir()
    (folder / "trainer" / "optimizer.bin").write_bytes(b"o" * 4096)
    write_manifest(folder, build_manifest(folder, 7, True))
    before = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    strip_trainer_state(folder, bf16=True)
    assert verify_folder(folder) == [] and not (folder / "trainer").exists()
    assert sum(p.stat().st_size for p in folder.glob("*.safetensors")) < 0.6 * before
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.dtype == torch.bfloat16
    ids = torch.arange(40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits.float(), model(ids).logits, atol=0.1, rtol=0.05)
    # killed between "original -> .old.tmp" and "slim -> step_X": the original comes back at the next start
    folder.rename(folder.with_name(folder.name + ".old.tmp"))
    remove_stale_tmp(tmp_path)
    assert verify_folder(folder) == []


def test_resume_says_in_words_why_it_does_not_take_what_latest_names(tmp_path):
    from miras.checkpoint.catalog import find_resumable

    for step in (1, 2):
        commit_fake(tmp_path, step, False)
    (tmp_path / "latest").write_bytes(b"\x00\xffgarbage that is not a folder name")
    said = []
    assert find_resumable(tmp_path, warn=said.append).name == "step_00000002"
    assert said == [f"{tmp_path / 'latest'} does not hold a checkpoint name; resuming from step_00000002, the "
                    "newest valid checkpoint"]  # fmt: skip
    commit_fake(tmp_path, 3, False)
    (tmp_path / "step_00000003" / "model.safetensors").write_bytes(b"cut")
    said.clear()
    assert find_resumable(tmp_path, warn=said.append).name == "step_00000002"
    assert "step_00000003: model.safetensors: size 3" in said[0]
    assert "names step_00000003, which is not a valid checkpoint" in said[1]
