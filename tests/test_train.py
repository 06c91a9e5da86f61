"""The training entry point: the README's main job, dry run, 2-process DDP on gloo, accumulation, bad input from
the real command line (tests/test_bad_input.py has every case in this process)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miras.train import main

TINY = [
    "--model-size",
    "xs",
    "--dataset",
    "builtin",
    "--seq-len",
    "64",
    "--batch-size",
    "2",
    "--device",
    "cpu",
    "--log-every",
    "1",
    "--eval-batches",
    "1",
    "--no-grad-checkpoint",
]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; in-process runs with other settings need it reset."""
    from accelerate.state import AcceleratorState

    saved = dict(os.environ)  # Accelerator also exports its settings as ACCELERATE_* variables
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.clear()
    os.environ.update(saved)


def run_module(args, env=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=timeout)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def readme_main_job() -> list[str]:
    """The quick start's main-job command, read from README.md so the test runs what users paste."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("python -m miras.train --model-size xs"))
    return shlex.split(line)[2:]


def test_readme_main_job_trains_and_the_loss_falls(tmp_path):
    result = run_module([*readme_main_job(), "--output-dir", str(tmp_path), "--log-every", "1"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_metrics(tmp_path / "demo")
    assert rows[-1]["step"] == 30 and rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert "eval_loss" in rows[-1]
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert config["world_size"] == 1 and config["versions"]["torch"] == torch.__version__
    # secrets are masked in config.json, token ids and counts are not (their names hold "token")
    assert config["tokens_per_step"] == 4 * 128 and config["model_config"]["eos_token_id"] == 256
    assert config["model_config"]["bos_token_id"] == 256 and config["model_config"]["pad_token_id"] == 257


def test_the_command_line_names_every_size_and_memory_implementation():
    """args.py writes them out so that parsing imports no torch; they must stay those of the model."""
    from miras.configuration import MODEL_SIZES
    from miras.memory.dispatch import IMPLEMENTATIONS
    from miras.memory.rule import LQ_NORMS as RULE_LQ_NORMS
    from miras.train.args import LQ_NORMS, MEMORY_IMPLS, MODEL_SIZE_NAMES, PAPER_TOKEN_BUDGET

    assert MODEL_SIZE_NAMES == tuple(MODEL_SIZES) == tuple(PAPER_TOKEN_BUDGET)
    assert MEMORY_IMPLS == IMPLEMENTATIONS
    assert LQ_NORMS == RULE_LQ_NORMS


def test_dry_run_is_quick_and_writes_nothing(tmp_path):
    assert main(["--dry-run", "--output-dir", str(tmp_path)]) == 0
    assert not any(tmp_path.iterdir())


def test_moneta_checkpoint_group_reaches_the_model_config(tmp_path):
    args = [*TINY, "--max-steps", "1", "--moneta-checkpoint-group", "2", "--output-dir", str(tmp_path)]
    args += ["--run-name", "g"]
    assert main(args) == 0
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert config["model_config"]["memory_checkpoint_group"] == 2


@pytest.mark.parametrize("lq_norm, update_input, alpha", [("inverse", True, 0.99), ("scale_free", False, 0.9999)])
def test_the_memory_form_on_the_command_line_reaches_the_model_config(tmp_path, lq_norm, update_input, alpha):
    flag = "--moneta-update-input" if update_input else "--no-moneta-update-input"
    args = [*TINY, "--max-steps", "1", "--moneta-lq-norm", lq_norm, flag, "--moneta-alpha-init", str(alpha)]
    assert main([*args, "--output-dir", str(tmp_path), "--run-name", "n"]) == 0
    config = json.loads((tmp_path / "n" / "config.json").read_text())
    assert config["model_config"]["lq_norm"] == lq_norm
    assert config["model_config"]["memory_update_input"] is update_input
    assert config["model_config"]["alpha_init"] == alpha


@pytest.mark.parametrize("alpha", ["1", "0", "-0.5", "high"])
def test_a_retention_outside_0_1_is_one_line_and_exit_2(alpha, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*TINY, "--max-steps", "1", "--moneta-alpha-init", alpha])
    assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and alpha in err[0] and "(0, 1)" in err[0], err


def test_memory_impl_reaches_the_model_config(tmp_path):
    args = [*TINY, "--max-steps", "1", "--memory-impl", "torch", "--output-dir", str(tmp_path), "--run-name", "i"]
    assert main(args) == 0
    config = json.loads((tmp_path / "i" / "config.json").read_text())
    assert config["model_config"]["memory_impl"] == "torch"


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_bf16_and_fp32_both_run(tmp_path, precision):
    args = [*TINY, "--precision", precision, "--max-steps", "2", "--output-dir", str(tmp_path), "--run-name", "p"]
    assert main(args) == 0


def test_accumulated_gradients_equal_one_large_batch(tmp_path, monkeypatch):
    """4 micro-batches of 2 rows give the gradients of one batch of the same 8 rows (each micro-batch's loss
    divided by 4), before clipping; a missing or wrong division would make them 4x off."""
    from accelerate.state import AcceleratorState

    from tests.hooked_train import Recorder

    gradients = {}
    for name, batch, accum in (("big", "8", "1"), ("accum", "2", "4")):
        AcceleratorState._reset_state(reset_partial_state=True)
        for variable in [v for v in os.environ if v.startswith("ACCELERATE_")]:
            monkeypatch.delenv(variable)
        args = [*TINY, "--batch-size", batch, "--grad-accum", accum, "--max-steps", "1", "--output-dir",
                str(tmp_path), "--run-name", name]  # fmt: skip
        assert main(args, hooks=Recorder(tmp_path / name, gradients_at_step=1)) == 0
        gradients[name] = torch.load(tmp_path / name / "gradients_rank0.pt")
    assert gradients["big"].keys() == gradients["accum"].keys() and len(gradients["big"]) > 10
    for key, value in gradients["big"].items():
        torch.testing.assert_close(gradients["accum"][key], value, rtol=1e-4, atol=1e-7)
    assert sum(float(g.norm()) for g in gradients["big"].values()) > 1e-3  # real gradients, not zeros


def test_two_process_gloo_run_really_has_two_ranks(tmp_path):
    from tests.test_train_checkpoints import record, run

    result = run([*TINY, "--max-steps", "3", "--output-dir", str(tmp_path), "--run-name", "ddp"], procs=2,
                 hooks=record(tmp_path / "rec"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / "rec" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    rows = [{tuple(row) for row in r["rows"]} for r in records]
    assert rows[0] and not (rows[0] & rows[1])  # disjoint data
    weights = [torch.load(tmp_path / "rec" / f"weights_rank{r}.pt") for r in (0, 1)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key  # identical after the steps


def test_bad_input_from_the_command_line_exits_2_without_a_traceback(tmp_path):
    base = ["--dataset", "builtin", "--device", "cpu", "--max-steps", "1", "--output-dir", str(tmp_path)]
    for bad in (["--model-size", "xxl"], ["--tokenizer", "no-such-tokenizer-xyz"]):  # argparse's, then ours
        result = run_module(["miras.train", *base, *bad])
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert not any(tmp_path.iterdir())


def test_wandb_offline_keeps_its_files_in_the_run_folder_and_reuses_the_id(tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_API_KEY": "x" * 40}
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[variable] = ""
    args = [*TINY, "--max-steps", "2", "--output-dir", str(tmp_path), "--run-name", "wb", "--wandb"]
    args += ["--ckpt-every-steps", "1", "--resume", "auto"]
    ids = []
    # The first start is killed after its first checkpoint; the second resumes the same run (and wandb run).
    for fault in ("after_commit:kill@1", ""):
        result = run_module(["miras.train", *args], env={**env, "MIRAS_TEST_FAULT": fault})
        assert result.returncode == (-9 if fault else 0), result.stderr[-2000:]
        ids.append((tmp_path / "wb" / "wandb_id").read_text().strip())
    state_file = tmp_path / "wb" / "checkpoints" / "step_00000002" / "trainer" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["wandb_id"] == ids[0]
    assert ids[0] == ids[1]
    offline_runs = list((tmp_path / "wb" / "wandb").rglob(f"offline-run-*-{ids[0]}"))
    assert offline_runs, "wandb's files are not inside the run folder"
    config_text = (tmp_path / "wb" / "config.json").read_text()
    assert "x" * 40 not in config_text and "x" * 40 not in result.stdout + result.stderr


def test_the_readme_two_process_cpu_command_really_runs_two_processes(tmp_path):
    """The README's 2-process CPU command, run as written (MIRAS_EXPECT_WORLD_SIZE makes a 1-process run fail)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("ACCELERATE_USE_CPU=1 MIRAS_EXPECT_WORLD_SIZE=2 torchrun")
    command = readme[start : readme.index("```", start)].replace("\\\n", " ").strip()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    from tests.test_train_checkpoints import free_port

    port = command.replace("torchrun", f"torchrun --master_port {free_port()}", 1)
    result = subprocess.run(port, shell=True, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "runs" / "cpu-ddp" / "config.json").read_text())
    assert config["world_size"] == 2 and (tmp_path / "runs" / "cpu-ddp" / "finished").exists()


def test_eval_every_evaluates_between_log_rows_and_a_bad_eval_dataset_is_one_line(tmp_path, capsys):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(2)))
    args = [*TINY, "--max-steps", "3", "--log-every", "5", "--eval-every", "2", "--eval-dataset", str(held_out)]
    assert main([*args, "--output-dir", str(tmp_path), "--run-name", "e"]) == 0
    rows = read_metrics(tmp_path / "e")
    assert [row["step"] for row in rows if "eval_loss" in row] == [2, 3]  # every 2 steps and at the end
    missing = str(tmp_path / "missing.txt")
    capsys.readouterr()
    assert main([*args, "--eval-dataset", missing, "--output-dir", str(tmp_path), "--run-name", "m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"miras train: error: --eval-dataset {missing!r}: no such file")
    assert not (tmp_path / "m").exists()


def test_the_earlier_train_py_checkpoint_names_mean_miras_folders(tmp_path, capsys, monkeypatch):
    """`--resume .../latest.pt` (the earlier trainer's habit) resumes from the checkpoint `latest` names, bare
    `latest.pt` from the run's own; `step_X.pt` means the folder step_X; the resolver then finds the folder."""
    from miras.checkpoint.resolve import resolve_checkpoint
    from miras.train.args import earlier_checkpoint_name

    checkpoints = tmp_path / "runs" / "r" / "checkpoints"
    step = checkpoints / "step_00000002"
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    (step / "model.safetensors").write_bytes(b"")
    (checkpoints / "latest").write_text("step_00000002\n")
    monkeypatch.chdir(tmp_path)
    given = earlier_checkpoint_name(str(checkpoints / "latest.pt"), None, "--resume")
    assert resolve_checkpoint(given) == step
    assert resolve_checkpoint(earlier_checkpoint_name("latest.pt", Path("runs/r"), "--resume")).resolve() == step
    assert "the checkpoint" in capsys.readouterr().out  # one note says what latest.pt was taken to mean
    assert earlier_checkpoint_name(str(checkpoints / "step_00000002.pt"), None, "--resume") == str(step)
    assert earlier_checkpoint_name(str(step), None, "--resume") == str(step)  # miras names pass unchanged
    assert earlier_checkpoint_name("auto", None, "--resume") == "auto"


def test_compile_compiles_each_block_in_place_and_keeps_the_state_dict():
    """--compile: each block one graph (torch.compile, fullgraph), compiled on the first step; the module tree and
    its state-dict keys are unchanged (checkpoints stay loadable)."""
    from miras import MonetaConfig, MonetaForCausalLM
    from miras.checkpoint.checkpointer import Start
    from miras.train.args import build_parser
    from miras.train.build import build_model

    args = build_parser().parse_args([*TINY, "--compile", "--memory-impl", "compiled"])
    config = MonetaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=48)
    model = build_model(args, config, Start(), compile_blocks=True)
    assert all(block._compiled_call_impl is not None for block in model.model.layers)
    assert model.config.memory_impl == "compiled"
    assert list(model.state_dict()) == list(MonetaForCausalLM(config).state_dict())
