import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import miras
from miras.generate import main
from miras.tokenizer import byte_tokenizer
from tests.trained_xs import latest_checkpoint, trained_xs_run


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A checkpoint-like folder: save_pretrained of a tiny model plus the byte tokenizer."""
    tokenizer = byte_tokenizer()
    config = miras.MonetaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_heads=4,
        intermediate_size=128,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint")
    miras.MonetaForCausalLM(config).save_pretrained(path, max_shard_size="2GB")
    tokenizer.save_pretrained(path)
    return path


def test_generate_prints_the_prompt_and_its_continuation(folder, capsys):
    assert main([str(folder), "--prompt", "Hello", "--max-new-tokens", "12", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("Hello") and len(first.rstrip("\n")) > len("Hello")
    assert main([str(folder), "--prompt", "Hello", "--max-new-tokens", "12", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # --seed makes sampling reproducible


def test_greedy_matches_the_model_and_the_pipeline(folder, capsys):
    assert main([str(folder), "--prompt", "The cat", "--max-new-tokens", "10", "--greedy"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer("The cat", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(out[0], skip_special_tokens=True)
    generator = pipeline("text-generation", model=str(folder))
    result = generator("The cat", max_new_tokens=10, do_sample=False)
    assert result[0]["generated_text"] == text


def test_a_real_training_run_folder_resolves_its_latest_checkpoint(capsys):
    run = trained_xs_run()
    assert main([str(run), "--prompt", "def ", "--max-new-tokens", "5", "--greedy"]) == 0
    via_run = capsys.readouterr().out
    assert main([str(latest_checkpoint(run)), "--prompt", "def ", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out == via_run and via_run.startswith("def ")
    generator = pipeline("text-generation", model=str(latest_checkpoint(run)))
    assert generator("def ", max_new_tokens=5, do_sample=False)[0]["generated_text"] == via_run.rstrip("\n")


def test_an_incomplete_checkpoint_is_refused(tmp_path, capsys):
    copy = tmp_path / "step"
    shutil.copytree(latest_checkpoint(trained_xs_run()), copy)
    next(copy.glob("*.safetensors")).write_bytes(b"truncated")
    assert main([str(copy), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "incomplete checkpoint" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/folder"], "does not exist"),
        (["{tmp}"], "is not a checkpoint folder"),
        (["{folder}", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["{folder}", "--temperature", "0"], "--temperature"),
        (["{folder}", "--top-p", "1.5"], "--top-p"),
        (["{folder}", "--dtype", "fp8"], "--dtype"),
        (["{folder}", "--device", "cuda:7"] if not torch.cuda.is_available() else ["{folder}", "--bogus"], "--"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(args, message, folder, tmp_path, capsys):
    args = [a.format(folder=folder, tmp=tmp_path) for a in args]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and message in captured.err


def test_miras_generate_subcommand_is_wired(tmp_path, capsys):
    from miras.cli import main as cli_main

    assert cli_main(["generate", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"miras generate: error: '{tmp_path / 'missing'}' does not exist (expected a checkpoint folder, a run "
        "folder or a storage URL) (see --help)"
    ]


def upload(folder, url):
    from miras.storage import open_backend

    backend = open_backend(url)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        backend.put(path, path.relative_to(folder).as_posix())


def test_a_storage_url_is_downloaded_verified_and_sampled(tmp_path, capsys):
    run = trained_xs_run()
    local = [str(latest_checkpoint(run)), "--prompt", "def ", "--max-new-tokens", "5", "--greedy"]
    assert main(local) == 0
    expected = capsys.readouterr().out
    upload(run, "memory://miras-test/runs/t")
    cache = tmp_path / "cache"
    for url in ("memory://miras-test/runs/t", f"memory://miras-test/runs/t/checkpoints/{latest_checkpoint(run).name}"):
        assert main([url, *local[1:], "--cache-dir", str(cache)]) == 0
        assert capsys.readouterr().out == expected
    assert main(["memory://miras-test/nothing-here", "--prompt", "x", "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "no valid checkpoint here" in err and len(err.strip().splitlines()) == 1


def test_a_corrupted_remote_checkpoint_is_refused(tmp_path, capsys):
    folder = tmp_path / "step"
    shutil.copytree(latest_checkpoint(trained_xs_run()), folder)
    weights = next(folder.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the sha256 can tell
    weights.write_bytes(bytes(data))
    upload(folder, "memory://miras-test/corrupt/step_00000002")
    url = "memory://miras-test/corrupt/step_00000002"
    assert main([url, "--prompt", "x", "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "does not match its manifest" in err and len(err.strip().splitlines()) == 1
    assert not any((tmp_path / "cache").rglob("*.safetensors"))  # nothing left behind


def test_readme_generate_commands_run_on_a_real_run(capsys):
    """The README's `miras generate` lines, with its run folder replaced by a real one; the lines that
    need a cloud account (rclone://, s3://) are left to the storage tests."""
    import shlex

    from tests.readme import bash_lines

    run = trained_xs_run()
    ran = 0
    for line in bash_lines("Loading and generating"):
        words = shlex.split(line)
        assert words[:2] == ["miras", "generate"]
        if "://" in words[2]:
            continue
        words[2] = words[2].replace("runs/l-run1", str(run)).replace("step_00012000", latest_checkpoint(run).name)
        assert main([*words[2:], "--max-new-tokens", "5"]) == 0, line
        assert capsys.readouterr().out.strip()
        ran += 1
    assert ran == 2
