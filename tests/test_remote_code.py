"""Self-contained model folders: the modeling code and auto_map saved beside the weights load with
trust_remote_code=True in a Python that cannot import miras, to the same logits; with miras imported the
registered classes load them without remote code."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.dynamic_module_utils import get_imports

import miras
from miras.remote_code import AUTO_MAP, flattened_sources
from miras.tokenizer import byte_tokenizer
from tests.trained_xs import latest_checkpoint, trained_xs_run

# Runs in a fresh interpreter where `import miras` fails: the folder's own code is all there is.
WITHOUT_MIRAS = textwrap.dedent("""
    import sys
    sys.modules["miras"] = None  # any import of miras now raises ImportError
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    folder, probe, out = sys.argv[1], torch.load(sys.argv[2]), sys.argv[3]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        logits = model(probe).logits
    tokenizer = AutoTokenizer.from_pretrained(folder)
    generator = pipeline("text-generation", model=folder, trust_remote_code=True)
    text = generator("def ", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    model.save_pretrained(out)  # saved again from the remote code: still self-contained
    torch.save({"logits": logits, "text": text, "padding_side": tokenizer.padding_side}, out + "/result.pt")
""")


def without_miras(folder, probe, tmp_path):
    torch.save(probe, tmp_path / "probe.pt")
    out = tmp_path / "resaved"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", WITHOUT_MIRAS, str(folder), str(tmp_path / "probe.pt"), str(out)],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "result.pt"), out


def test_a_training_checkpoint_loads_without_miras_to_the_same_logits(tmp_path):
    folder = latest_checkpoint(trained_xs_run())
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and (folder / "modeling_moneta.py").is_file()
    probe = torch.arange(70).remainder(config["vocab_size"]).view(1, 70)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # miras imported: its registered classes
    assert type(model) is miras.MonetaForCausalLM
    with torch.no_grad():
        expected = model(probe).logits
    result, resaved = without_miras(folder, probe, tmp_path)
    torch.testing.assert_close(result["logits"], expected, rtol=0, atol=0)
    assert result["text"].startswith("def ") and result["padding_side"] == "left"
    assert json.loads((resaved / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].endswith(
        "MonetaForCausalLM"
    )
    again = AutoModelForCausalLM.from_pretrained(resaved).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(probe).logits, expected, rtol=0, atol=0)


def test_save_pretrained_writes_the_code_and_refuses_pickled_weights(tmp_path):
    config = miras.MonetaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=2, intermediate_size=64)
    model = miras.MonetaForCausalLM(config)
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert set(flattened_sources()) <= {p.name for p in (tmp_path / "m").iterdir()}
    try:
        model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    except ValueError as error:
        assert "safe_serialization=False" in str(error) and "safetensors only" in str(error)
    else:
        raise AssertionError("safe_serialization=False was accepted")
    assert not (tmp_path / "bin").exists()


def test_the_saved_code_needs_only_torch_and_transformers(tmp_path):
    """transformers refuses remote code whose imports are missing: triton (optional, GPU) must not be required."""
    for name, text in flattened_sources().items():
        (tmp_path / name).write_text(text)
        imports = set(get_imports(tmp_path / name)) - set(sys.stdlib_module_names)
        assert imports <= {"torch", "transformers"}, (name, imports)
        assert "from miras" not in text and "import miras" not in text, name


def test_a_tokenizer_pads_on_the_left_with_its_own_pad_token(tmp_path):
    tokenizer = byte_tokenizer()
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id) and len(tokenizer) == 258
    batch = tokenizer(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2 and batch["attention_mask"][0] == [0, 0, 1, 1]
    checkpoint = AutoTokenizer.from_pretrained(latest_checkpoint(trained_xs_run()))
    assert checkpoint.padding_side == "left" and checkpoint.model_max_length == 64  # the run's --seq-len
    assert checkpoint.pad_token_id == len(checkpoint) - 1 != checkpoint.eos_token_id
