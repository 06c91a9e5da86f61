"""The CI script installs as the README says and fails on a resolver that backtracks."""

from __future__ import annotations

from pathlib import Path

from tests.readme import bash_lines, section

CI = Path(__file__).resolve().parents[1] / ".ci" / "run"
CPU_INDEX = " --index-url https://download.pytorch.org/whl/cpu"


def test_ci_runs_the_readme_install_commands_line_for_line():
    text = CI.read_text()
    block = text[text.index('# README "Install" begin\n') : text.index('# README "Install" end')]
    ci = [line.strip() for line in block.splitlines()[1:] if line.strip()]
    readme = bash_lines("Install")
    assert len(ci) == len(readme) == 3
    # The one difference, which the README states: CI's machine holds the CPU wheel on disk and cannot reach
    # PyTorch's index, so its torch line is the README's without --index-url.
    torch_line = next(i for i, line in enumerate(readme) if line.startswith("pip install torch"))
    assert readme[torch_line] == ci[torch_line] + CPU_INDEX
    assert [line for i, line in enumerate(readme) if i != torch_line] == [
        line for i, line in enumerate(ci) if i != torch_line
    ]
    assert f"`{ci[torch_line]}`" in section("Install")
    assert "looking at multiple versions" in text and "pytest -q --durations=15" in text
    # The one test that needs a system package says how to get it, and CI gets it the same way.
    assert "apt-get install -y shellcheck" in section("Install") and "apt-get install -y -qq shellcheck" in text
