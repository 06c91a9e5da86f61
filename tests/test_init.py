"""`import miras` is cheap, and "moneta" reaches transformers' Auto classes whichever is imported first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = Path(__file__).parent / "data" / "moneta_v1_tiny"  # a saved MonetaForCausalLM folder
HEAVY = ("torch", "transformers", "datasets", "accelerate")


def python(code: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_import_miras_the_cli_and_the_storage_plugins_load_no_torch_or_transformers():
    """What `miras --help`, `miras train --help`, `miras storage` and a plugin import before doing anything."""
    code = (
        "import contextlib, io, sys\n"
        "import miras, miras.cli, miras.storage, miras.train.args, miras.data_sources, miras.checkpoint.cli\n"
        "import miras_rclone, miras_gdrive\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    miras.cli.main(['--help'])\n"
        "    miras.train.args.build_parser().format_help()\n"
        f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))"
    )
    assert python(code) == "[]"


@pytest.mark.parametrize(
    "imports",
    [
        "import miras\nfrom transformers import AutoModelForCausalLM",  # the README's order
        "from transformers import AutoModelForCausalLM\nimport miras",  # Auto classes already loaded
        "from miras.modeling import MonetaForCausalLM\nfrom transformers import AutoModelForCausalLM",  # a submodule
    ],
    ids=["miras-first", "transformers-first", "submodule-first"],
)
def test_auto_classes_load_a_checkpoint_whichever_is_imported_first(imports):
    code = f"{imports}\nprint(type(AutoModelForCausalLM.from_pretrained({str(TINY)!r})).__name__)"
    assert python(code) == "MonetaForCausalLM"


def test_public_names_load_on_first_use():
    import miras

    assert set(miras.__all__) <= set(dir(miras))
    assert miras.MonetaConfig.model_type == "moneta" and callable(miras.count_parameters)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        miras.Nope  # noqa: B018
