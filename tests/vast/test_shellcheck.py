import os
import shutil
import subprocess

import pytest

from tests.vast.helpers import VAST

SCRIPTS = sorted(VAST.glob("*.sh"))


def test_vast_scripts_pass_shellcheck():
    """CI installs shellcheck (.ci/run) and sets MIRAS_REQUIRE_SHELLCHECK=1, so there a missing one fails."""
    if shutil.which("shellcheck") is None:
        if os.environ.get("MIRAS_REQUIRE_SHELLCHECK") == "1":
            pytest.fail("shellcheck is not installed (apt-get install -y shellcheck)")
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck); CI requires it")
    assert len(SCRIPTS) >= 4
    result = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_executable_bash(script):
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
