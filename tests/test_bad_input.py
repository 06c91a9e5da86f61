"""Every user mistake of the `miras` commands is one line naming the bad value and what is accepted, with
exit code 2 (1 where the fault is the network, not the input), no traceback, and nothing written.

One table; each row builds its inputs in a temporary folder, runs the real command in this process (a
subprocess would spend seconds importing torch per row; tests/test_train.py runs the real process once) and
checks the folder holds nothing but those inputs afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.servers import free_port

TRAIN = ["--dataset", "builtin", "--device", "cpu", "--max-steps", "1", "--output-dir", "runs"]


def jsonl(*rows: str):
    return lambda folder: (folder / "data.jsonl").write_text("".join(row + "\n" for row in rows))


def raw(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def earlier_checkpoint(folder: Path) -> None:  # what the earlier train.py's torch.save wrote
    torch.save({"model": {"w": torch.zeros(2)}, "step": 10}, folder / "latest.pt")


def unreachable_hub(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there


def unresolvable_gcs(monkeypatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://storage.miras-test.invalid")  # .invalid never resolves


# (id, command and arguments, inputs to create, environment change, text the one line holds, exit code)
CASES = [
    # miras train: data
    ("jsonl-row-without-text", ["train", *TRAIN, "--dataset", "data.jsonl"], jsonl('{"text": "a"}', '{"title": "b"}'),
     None, "1 of 2 rows have no text in field 'text' (the first is row 2)", 2),
    ("jsonl-null-text", ["train", *TRAIN, "--dataset", "data.jsonl"],
     jsonl('{"text": "a"}', '{"text": null}', '{"text": "c"}'), None, "rows have no text in field 'text'", 2),
    ("jsonl-text-not-a-string", ["train", *TRAIN, "--dataset", "data.jsonl"],
     jsonl('{"text": 1}', '{"text": 2}'), None, "field 'text' holds int64 values, not text", 2),
    ("empty-file", ["train", *TRAIN, "--dataset", "data.jsonl"], raw("data.jsonl", b""), None,
     "data.jsonl is empty", 2),
    ("binary-file", ["train", *TRAIN, "--dataset", "data.txt"], raw("data.txt", b"ok\n\x7fELF\x02\x01\xd0\x00\n"),
     None, "line 2: byte 0xd0 is not UTF-8 text", 2),
    ("malformed-jsonl", ["train", *TRAIN, "--dataset", "data.jsonl"], jsonl('{"text": "a"}', '{"text": "b"'),
     None, "line 2: not valid JSON", 2),
    ("not-parquet", ["train", *TRAIN, "--dataset", "data.parquet"], raw("data.parquet", b"PAR0 not parquet"),
     None, "is not a parquet file", 2),
    ("file-of-another-kind", ["train", *TRAIN, "--dataset", "./program"], raw("program", b"\x7fELF\x02\x01\x01"), None,
     "is a suffix-less file (accepted: .txt, .jsonl, .json or .parquet", 2),
    ("missing-path", ["train", *TRAIN, "--dataset", "./corpus"], None, None, "'./corpus': no such file or folder", 2),
    ("missing-file", ["train", *TRAIN, "--dataset", "no/such/file.jsonl"], None, None, "no such file", 2),
    ("hub-switched-off", ["train", *TRAIN, "--dataset", "HuggingFaceFW/fineweb-edu"], None, None,
     "which HF_HUB_OFFLINE=1 switches off; offline, train on --dataset builtin or on local files", 2),
    ("hub-unreachable", ["train", *TRAIN, "--dataset", "HuggingFaceFW/fineweb-edu"], None, unreachable_hub,
     "cannot be reached", 1),
    ("bad-tokenizer", ["train", *TRAIN, "--tokenizer", "no-such-tokenizer-xyz"], None, None,
     "--tokenizer 'no-such-tokenizer-xyz'", 2),
    # miras train: sizes, precision, folders, destinations, checkpoints
    ("huge-seq-len", ["train", *TRAIN, "--seq-len", "1000000000"], None, None,
     "--seq-len 1000000000 x --batch-size 1: one micro-batch's logits alone take", 2),
    ("huge-batch", ["train", *TRAIN, "--seq-len", "4096", "--batch-size", "1000000000"], None, None,
     "logits alone take", 2),
    ("huge-dry-run-model", ["train", "--dry-run", "--dry-run-dim", "100000000"], None, None,
     "--dry-run-dim 100000000 --dry-run-n-layers 2: the fp32 weights alone take", 2),
    ("model-size", ["train", *TRAIN, "--model-size", "xxl"], None, None, "argument --model-size: invalid choice", 2),
    ("zero-seq-len", ["train", *TRAIN, "--seq-len", "0"], None, None, "argument --seq-len: 0 is not positive", 2),
    ("negative-batch", ["train", *TRAIN, "--batch-size", "-1"], None, None, "-1 is not positive", 2),
    ("fp16-on-cpu", ["train", *TRAIN, "--precision", "fp16"], None, None, "--precision fp16 needs a CUDA GPU", 2),
    ("output-dir-is-a-file", ["train", *TRAIN, "--output-dir", "data.txt"], raw("data.txt", b"x"), None,
     "'data.txt' is a file, not a folder", 2),
    ("output-dir-under-a-file", ["train", *TRAIN, "--output-dir", "data.txt/runs"], raw("data.txt", b"x"), None,
     "which is a file, not a folder", 2),
    ("output-dir-unwritable", ["train", *TRAIN, "--output-dir", "/proc/miras-runs"], None, None,
     "cannot create a folder in '/proc'", 2),
    ("sync-to-s3-without-bucket", ["train", *TRAIN, "--sync-to", "s3://"], None, None,
     "names no bucket; expected s3://BUCKET/path", 2),
    ("sync-to-rclone-without-remote", ["train", *TRAIN, "--sync-to", "rclone://"], None, None,
     "names no remote; expected rclone://REMOTE/path", 2),
    ("resume-earlier-trainer-file", ["train", *TRAIN, "--resume", "latest.pt"], earlier_checkpoint, None,
     "'latest.pt' is a checkpoint file of the earlier train.py", 2),
    ("resume-missing-pt", ["train", *TRAIN, "--resume", "step_00000100.pt", "--run-name", "r"], None, None,
     "'step_00000100.pt' does not exist, and no checkpoint folder goes by its name", 2),
    # miras generate
    ("generate-device", ["generate", "runs/x", "--device", "tpu"], None, None,
     "'tpu' is not a device (expected auto, cpu, cuda, cuda:N or mps)", 2),
    ("generate-missing-checkpoint", ["generate", "runs/x", "--cache-dir", "cache"], None, None, "does not exist", 2),
    # miras storage, miras ckpt
    ("storage-without-action", ["storage"], None, None, "the following arguments are required", 2),
    ("storage-ls-missing-path", ["storage", "ls", "runs/none"], None, None, "runs/none: nothing there", 2),
    ("storage-unknown-scheme", ["storage", "ls", "ftp://host/x"], None, None, "unknown storage scheme 'ftp'", 2),
    ("storage-option-without-value", ["storage", "ls", "memory://x", "--storage-option", "novalue"], None, None,
     "expected KEY=VALUE", 2),
    ("storage-rclone-style-url", ["storage", "ls", "gdrive:research"], None, None, "rclone://gdrive/research", 2),
    ("storage-pull-no-checkpoint", ["storage", "pull", ".", "dest"], raw("x.txt", b"x"), None,
     "no valid checkpoint here", 2),
    ("storage-gs-offline", ["storage", "ls", "gs://bucket/runs"], None, unresolvable_gcs,
     "cannot reach storage.miras-test.invalid", 1),
    ("storage-s3-offline", ["storage", "ls", "s3://bucket/runs", "--storage-option", "endpoint_url=http://s3.miras-test.invalid"],
     None, None, "cannot reach s3.miras-test.invalid", 1),
    ("ckpt-verify-missing", ["ckpt", "verify", "runs/none"], None, None, "no such folder", 2),
    ("unknown-command", ["fly"], None, None, "unknown command 'fly'", 2),
]  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    saved = dict(os.environ)  # Accelerator exports its settings as ACCELERATE_* variables
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.clear()
    os.environ.update(saved)


def files_under(folder: Path) -> set[Path]:
    return {path.relative_to(folder) for path in folder.rglob("*")}


@pytest.mark.parametrize("argv, inputs, environment, message, code", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])  # fmt: skip
def test_a_mistake_is_one_line_with_its_exit_code_and_nothing_written(
    tmp_path, capsys, monkeypatch, argv, inputs, environment, message, code
):
    from miras.cli import main

    (tmp_path / "inputs").mkdir()
    if inputs:
        inputs(tmp_path / "inputs")
    if environment:
        environment(monkeypatch)
    monkeypatch.chdir(tmp_path / "inputs")
    before = files_under(tmp_path)
    try:
        result = main(list(argv))
    except SystemExit as exit:  # argparse's own errors
        result = exit.code
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert result == code, stderr
    assert len(lines) == 1 and message in lines[0], stderr
    assert "Traceback" not in stderr
    assert files_under(tmp_path) == before  # no run folder, no cache, no partial download


def test_every_case_is_distinct():
    assert len({case[0] for case in CASES}) == len(CASES)
