import json
import shlex

import pytest
import torch

import miras
from miras.configuration import MODEL_SIZES
from miras.estimate import GB, checkpoint_bytes, estimate, main
from tests.trained_xs import latest_checkpoint, trained_xs_run


def folder_bytes(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_predicted_checkpoint_size_is_within_5_percent_of_a_real_xs_training_checkpoint():
    folder = latest_checkpoint(trained_xs_run())
    config = miras.MonetaConfig.from_pretrained(folder)
    predicted = checkpoint_bytes(config)["total"]
    real = folder_bytes(folder)
    assert abs(predicted - real) / real < 0.05, (predicted, real)


def test_predicted_checkpoint_size_is_within_5_percent_of_a_real_s_checkpoint(tmp_path):
    """The s model checkpointed by the real Checkpointer (weights, tokenizer, optimizer after one AdamW step,
    trainer state, manifest), as training does."""
    from miras.checkpoint.checkpointer import Checkpointer, CheckpointSettings
    from miras.tokenizer import byte_tokenizer
    from miras.train.state import TrainState

    class Position:
        def state_dict(self):
            return {"position": 0}

    tokenizer = byte_tokenizer()
    config = miras.MonetaConfig.from_size("s", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    model = miras.MonetaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for parameter in model.parameters():  # gradients of the right shape; a backward pass would add nothing here
        parameter.grad = torch.full_like(parameter, 1e-3)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = TrainState(model, optimizer, scheduler, Position(), tokenizer, step=1)
    checkpointer = Checkpointer(CheckpointSettings(run_dir=tmp_path, run_name="s"), log=lambda message: None)
    checkpointer.open()
    checkpointer.save(state, milestone=False)
    checkpointer.close()
    folder = latest_checkpoint(tmp_path)
    predicted = checkpoint_bytes(config)["total"]
    real = folder_bytes(folder)
    assert abs(predicted - real) / real < 0.05, (predicted, real)


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_each_size_counts_parameters_and_sizes_the_disk(size, capsys):
    assert main(["--model-size", size, "--json", "--no-measure"]) == 0
    result = json.loads(capsys.readouterr().out)
    params = miras.count_parameters(miras.MonetaConfig.from_size(size, vocab_size=50257))["total"]
    assert result["parameters"] == params
    # fp32 weights + two fp32 AdamW moments: 12 bytes a parameter, plus small files
    assert 12 * params < result["checkpoint"]["total"] < 12 * params * 1.01 + 5e6
    checkpoints = (12 + 24 + 1) * result["checkpoint"]["total"]
    assert result["disk"]["total"] == pytest.approx(1.1 * checkpoints + 30 * GB)
    assert result["disk_gb"] * GB >= result["disk"]["total"]
    every = result["upload"]["every_checkpoint"]
    assert every["bytes_per_day"] == pytest.approx(288 * result["checkpoint"]["total"])
    assert result["upload"]["milestones_only"]["bytes_per_day"] == pytest.approx(24 * result["checkpoint"]["total"])


def test_l_replaces_the_seed_rule_of_thumb():
    result = estimate("l", measure=False)
    assert 10.0 * GB < result["checkpoint"]["total"] < 10.3 * GB  # the seed guessed 7-9 GB
    assert result["upload"]["every_checkpoint"]["fraction_of_drive_cap"] > 1  # 5-minute uploads exceed 750 GB/day
    assert result["upload"]["milestones_only"]["fraction_of_drive_cap"] < 1


def test_retention_flags_change_the_disk():
    small = estimate("s", ckpt_keep_last=2, ckpt_keep_milestones=3, headroom_gb=0, measure=False)
    assert small["disk"]["total"] == pytest.approx(1.1 * 6 * small["checkpoint"]["total"])
    lean = estimate(
        "s", ckpt_keep_last=2, ckpt_keep_milestones=3, headroom_gb=0, milestone_weights_only=True, measure=False
    )
    expected = 1.1 * (3 * small["checkpoint"]["total"] + 3 * small["checkpoint"]["weights_only"])
    assert lean["disk"]["total"] == pytest.approx(expected)
    assert "growth_per_day_without_pruning" in estimate("s", no_ckpt_prune=True, measure=False)["disk"]


def test_gpu_memory_is_measured_and_checkpointing_saves_memory():
    short = estimate("xs", seq_len=1024)["gpu_memory"]
    long = estimate("xs", seq_len=4096)["gpu_memory"]
    assert short["activation_bytes_per_token_per_layer"] > 0 and short["activation_bytes_per_token_head"] > 0
    assert long["with_checkpointing"] < long["without_checkpointing"]
    assert short["without_checkpointing"] < long["without_checkpointing"]
    fp32 = estimate("xs", seq_len=1024, precision="fp32")["gpu_memory"]
    assert fp32["activation_bytes_per_token_per_layer"] > short["activation_bytes_per_token_per_layer"]


def test_table_and_train_args(capsys):
    assert main(["--model-size", "xs", "--no-measure"]) == 0
    table = capsys.readouterr().out
    for text in ("parameters", "checkpoint: total", "recommended --disk", "750 GB/day"):
        assert text in table
    train_args = "--model-size s --seq-len 1024 --run-name r --lr 1e-3 --ckpt-keep-last 4"
    assert main(["--train-args", train_args, "--json", "--no-measure"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["model_size"], result["seq_len"], result["retention"]["keep_last"]) == ("s", 1024, 4)
    assert main(["--train-args", train_args, "--field", "disk_gb"]) == 0
    assert int(capsys.readouterr().out) == result["disk_gb"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model-size", "q"], "--model-size"),
        (["--seq-len", "0"], "--seq-len"),
        (["--ckpt-keep-last", "-1"], "--ckpt-keep-last"),
        (["--ckpt-every-seconds", "soon"], "--ckpt-every-seconds"),
        (["--precision", "fp8"], "--precision"),
        (["--train-args", "--seq-len 'x"], "--train-args"),
        (["--field", "nope", "--no-measure"], "--field"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(args, message, capsys):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and message in captured.err


def test_miras_estimate_subcommand_is_wired(capsys):
    from miras.cli import main as cli_main

    assert cli_main(["estimate", "--batch-size", "many"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "miras estimate: error: argument --batch-size/--microbatch-size: 'many' is not an integer "
        "(expected a positive integer) (see --help)"
    ]
    assert cli_main(["estimate", "--model-size", "s", "--field", "parameters"]) == 0
    assert (
        int(capsys.readouterr().out)
        == miras.count_parameters(miras.MonetaConfig.from_size("s", vocab_size=50257))["total"]
    )


def test_the_user_guide_estimate_commands_run_and_its_numbers_hold(capsys):
    from tests.readme import USER_GUIDE, bash_lines, section

    lines = bash_lines("Estimates / disk", USER_GUIDE)
    assert len(lines) == 4
    for line in lines:
        words = shlex.split(line)
        assert words[:2] == ["miras", "estimate"]
        assert main([*words[2:], "--no-measure"]) == 0, line  # the memory measurement is tested above
        assert capsys.readouterr().out.strip()
    text = section("Estimates / disk", USER_GUIDE)
    default = estimate("l", measure=False)
    lean = estimate("l", ckpt_keep_last=6, ckpt_keep_milestones=12, measure=False)
    assert f"{default['parameters'] / 1e6:.1f}M parameters" in text
    assert f"{default['checkpoint']['total'] / GB:.1f} GB per checkpoint" in text
    assert f"**{default['disk_gb']} GB**" in text and f": {lean['disk_gb']} GB)" in text
    assert f"{default['upload']['milestones_only']['bytes_per_day'] / GB:.0f} GB a day" in text
