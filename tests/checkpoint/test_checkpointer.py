"""The Checkpointer in one process with a tiny model: a failed milestone is retried at the next step as a
milestone, a success clears the count, three failures in a row stop, a failed final checkpoint is an error,
and a restored trainer continues from exactly what was saved."""

from __future__ import annotations

import pytest
import torch

import miras
from miras.checkpoint.catalog import committed, describe
from miras.checkpoint.checkpointer import Checkpointer, CheckpointError, CheckpointSettings
from miras.tokenizer import byte_tokenizer
from miras.train.state import TrainState


class Stream:
    def __init__(self):
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def trainer(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    config = miras.MonetaConfig(hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=len(tokenizer))
    model = miras.MonetaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return TrainState(model, optimizer, scheduler, Stream(), tokenizer, {"seq_len": 16})


def step(state: TrainState) -> None:
    ids = torch.randint(0, 200, (1, 16))
    state.model(ids, labels=ids).loss.backward()
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    state.step += 1
    state.training_time += 1.0
    state.stream.position += 16


def checkpointer(tmp_path, **settings) -> Checkpointer:
    said = []
    ckpt = Checkpointer(CheckpointSettings(run_dir=tmp_path / "run", run_name="run", **settings), log=said.append)
    ckpt.said = said
    return ckpt


def test_a_failed_milestone_is_retried_at_the_next_step_as_a_milestone(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRAS_TEST_FAULT", "files_written:enospc@1")
    ckpt, state = checkpointer(tmp_path, every_seconds=0, milestone_every_seconds=1.5), trainer()
    ckpt.open()
    step(state)
    step(state)  # 2 s of training: a milestone is due when a checkpoint is (1 s later, the next would not be)
    assert ckpt.due(state.step, state.training_time) == (False, True)
    ckpt.save(state, milestone=True)
    ckpt.wait()  # the commit thread failed: booked
    assert "was not saved: the disk is full" in ckpt.said[-1] and "retrying at the next step" in ckpt.said[-1]
    step(state)
    assert ckpt.due(state.step, state.training_time) == (True, True)  # retried now, still a milestone
    ckpt.save(state, milestone=True)
    ckpt.close(finished=True)
    (folder,) = committed(tmp_path / "run" / "checkpoints")
    assert describe(folder).step == 3 and describe(folder).milestone
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    assert (tmp_path / "run" / "finished").read_text().strip() == folder.name


def test_three_failures_in_a_row_stop_and_a_success_clears_the_count(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRAS_TEST_FAULT", "files_written:enospc@1,files_written:enospc@2,files_written:fail@4,"
                       "files_written:enospc@5,files_written:enospc@6,files_written:enospc@7")  # fmt: skip
    ckpt, state = checkpointer(tmp_path), trainer()
    ckpt.open()
    for _ in range(6):  # failure, failure, success (resets), failure (not a full disk), failure, failure
        step(state)
        ckpt.save(state, milestone=False)
    with pytest.raises(CheckpointError) as stopped:
        step(state)
        ckpt.save(state, milestone=False)
    assert not stopped.value.disk_full  # the third in a row, but one of them was not for a full disk
    assert "3 checkpoints in a row failed; the newest checkpoint is step_00000003" in str(stopped.value)
    ckpt.close()


def test_a_final_checkpoint_that_fails_is_an_error_and_no_finished_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRAS_TEST_FAULT", "before_rename:enospc@2")
    ckpt, state = checkpointer(tmp_path), trainer()
    ckpt.open()
    step(state)
    ckpt.save(state, milestone=False)
    step(state)
    ckpt.save(state, milestone=False, final=True)
    with pytest.raises(CheckpointError) as stopped:
        ckpt.close(finished=True)
    assert stopped.value.disk_full and "the final checkpoint step_00000002 was not saved" in str(stopped.value)
    assert "step_00000001 stays the newest checkpoint" in str(stopped.value)
    assert not (tmp_path / "run" / "finished").exists()


def test_a_restored_trainer_continues_from_what_was_saved(tmp_path):
    ckpt, state = checkpointer(tmp_path), trainer()
    ckpt.open()
    for _ in range(3):
        step(state)
    ckpt.save(state, milestone=False)
    ckpt.close()
    expected = {k: v.clone() for k, v in state.optimizer.state_dict()["state"][0].items()}
    again = checkpointer(tmp_path)
    start = again.open(resume="auto")
    assert start.resume.name == "step_00000003" and start.trainer_state["world_size"] == 1
    restored = trainer(seed=1)
    restored.model = miras.MonetaForCausalLM.from_pretrained(start.weights)
    restored.optimizer = torch.optim.AdamW(restored.model.parameters(), lr=1e-3)
    restored.scheduler = torch.optim.lr_scheduler.LambdaLR(restored.optimizer, lambda step: 1.0)
    again.restore(restored)
    assert (restored.step, restored.training_time, restored.stream.position) == (3, 3.0, 48)
    assert restored.scheduler.last_epoch == 3
    for key, value in restored.optimizer.state_dict()["state"][0].items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    again.close()


def test_the_committer_thread_never_parses_code_once_the_checkpointer_exists(tmp_path, monkeypatch):
    # ast.parse in the background commit, while the loop ran, once failed a save under load ("AST constructor
    # recursion depth mismatch"): the model code is read and parsed when the Checkpointer is made, on this thread.
    from miras import remote_code

    remote_code._flattened.cache_clear()
    ckpt, state = checkpointer(tmp_path), trainer()

    def no_reading(module):
        raise AssertionError(f"{module} read after the Checkpointer was made")

    monkeypatch.setattr(remote_code, "_source_path", no_reading)
    ckpt.open()
    step(state)
    ckpt.save(state, milestone=False)
    ckpt.close(finished=True)
    (folder,) = committed(tmp_path / "run" / "checkpoints")
    assert (folder / "modeling_moneta.py").is_file() and (folder / "configuration_moneta.py").is_file()
