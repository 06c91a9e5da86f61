"""`miras eval` on a real training run: its loss is the training's held-out loss, bits per byte and the position
buckets add up, lm-evaluation-harness (its command line on the saved folder with trust_remote_code, and
`--tasks`) gives the model's own log-likelihoods, `--plot` draws, bad input is one line."""

import json
import math
import os
import shutil
import subprocess
import sys

import lm_eval  # noqa: F401  (miras[test] installs it: missing is a failure, not a skip)
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from miras.eval_command import main
from tests.trained_xs import latest_checkpoint, trained_xs_run

# (lm-eval moves a context's trailing spaces into the continuation: none here, so both sides score the same tokens.)
EXAMPLES = [("def main(", "):\n    return 0"), ("The quick brown", " fox jumps"), ("import", " os")]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_loss_is_the_training_runs_held_out_loss(tmp_path, capsys):
    run = trained_xs_run()
    assert main([str(run), "--windows", "1", "--no-progress", "--plot", str(tmp_path / "loss.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    # The run evaluated one window of 64 tokens of the same held-out documents after its last step.
    assert result["windows"] == 1 and result["seq_len"] == 64  # the tokenizer's model_max_length: the run's window
    assert result["loss"] == pytest.approx(metrics(run)[-1]["eval_loss"], abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["bytes"] == result["tokens"] == 63  # byte tokenizer, no end-of-text in the first window
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2))
    fine = result["loss_by_position_fine"]
    assert list(fine) == ["0-1", "1-2", "2-4", "4-8", "8-16", "16-32", "32-64"]
    counts = {name: min(int(name.split("-")[1]), 63) - int(name.split("-")[0]) for name in fine}  # positions 1..63
    weighted = sum(fine[name] * counts[name] for name in fine) / 63
    assert weighted == pytest.approx(result["loss"], rel=1e-9)  # the buckets partition the 63 predicted tokens
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_json_output_with_several_windows_and_batches(tmp_path, capsys):
    folder = latest_checkpoint(trained_xs_run())
    out = tmp_path / "r.json"
    assert main([str(folder), "--windows", "3", "--batch-size", "2", "--seq-len", "32", "--output", str(out)]) == 0
    assert "eval: 100%" in capsys.readouterr().err  # the progress bar
    result = json.loads(out.read_text())
    assert result["windows"] == 3 and result["tokens"] == 3 * 31 and result["loss_by_position"].keys() == {"0-64"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--windows", "0"], "argument --windows: 0 is not positive"),
        (["--plot", "x.pdf"], "--plot 'x.pdf': expected a .png file name"),
        (["--dataset", "missing.txt"], "--dataset 'missing.txt': no such file"),
        (["--seq-len", "9000000"], "--seq-len 9000000: the first 32 documents of 'builtin' hold only"),
        (["--include-path", "nowhere"], "--include-path 'nowhere': no such folder"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(args, message, capsys):
    assert main([str(latest_checkpoint(trained_xs_run())), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("miras eval: error: ") and message in err[0], err


def own_loglikelihoods(folder):
    """log p(continuation | context) from the model itself, summed over the continuation's tokens."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    values = []
    for context, continuation in EXAMPLES:
        ids = torch.tensor([tokenizer(context + continuation)["input_ids"]])
        labels = ids.clone()
        labels[:, : len(tokenizer(context)["input_ids"])] = -100
        with torch.no_grad():
            loss = model(ids, labels=labels).loss
        values.append(-float(loss) * int((labels[:, 1:] != -100).sum()))
    return values


def task_folder(tmp_path):
    """A local lm-eval task over a local JSON file: log-likelihood of each continuation given its context."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in EXAMPLES))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "miras_ll.yaml").write_text(
        "task: miras_ll\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
    )
    return tasks


def test_the_lm_eval_command_line_scores_a_checkpoint_with_its_remote_code(tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(latest_checkpoint(trained_xs_run()), folder)
    tasks = task_folder(tmp_path)
    executable = shutil.which("lm_eval", path=os.path.dirname(sys.executable)) or "lm_eval"
    command = [executable, "--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True",
               "--tasks", str(tasks / "miras_ll.yaml"), "--device", "cpu", "--batch_size", "1",
               "--output_path", str(tmp_path / "out"), "--log_samples"]  # fmt: skip
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_miras_ll_*.jsonl")).open()]
    assert sorted(sample["doc_id"] for sample in samples) == [0, 1, 2]
    theirs = {sample["doc_id"]: float(sample["resps"][0][0][0]) for sample in samples}
    for index, value in enumerate(own_loglikelihoods(folder)):
        assert theirs[index] == pytest.approx(value, abs=1e-4)


def test_miras_eval_tasks_hands_the_model_to_lm_eval(tmp_path, capsys):
    folder = latest_checkpoint(trained_xs_run())
    tasks = task_folder(tmp_path)
    args = [str(folder), "--windows", "1", "--no-progress", "--tasks", "miras_ll", "--include-path", str(tasks)]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    expected = math.exp(-sum(own_loglikelihoods(folder)) / len(EXAMPLES))
    assert result["tasks"]["miras_ll"]["perplexity,none"] == pytest.approx(expected, rel=1e-4)
    assert main([*args[:-4], "--tasks", "no_such_task", "--include-path", str(tasks)]) == 2
    assert "--tasks: unknown task 'no_such_task'" in capsys.readouterr().err


def test_a_storage_url_is_downloaded_verified_and_scored(tmp_path, capsys):
    from tests.test_generate import upload

    folder = latest_checkpoint(trained_xs_run())
    assert main([str(folder), "--windows", "1", "--no-progress"]) == 0
    local = json.loads(capsys.readouterr().out)
    upload(folder, f"memory://miras-eval-test/{folder.name}")
    url = f"memory://miras-eval-test/{folder.name}"
    assert main([url, "--windows", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote["loss"] == local["loss"] and remote["checkpoint"] == url


def test_miras_eval_subcommand_is_wired(tmp_path, capsys):
    from miras.cli import main as cli_main

    assert cli_main(["eval", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
