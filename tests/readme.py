"""Sections and command blocks of README.md, for tests that run the README's commands."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    """The text under `## title` up to the next `## ` heading."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def bash_lines(title: str) -> list[str]:
    """Every command line of the section's ```bash blocks (comments and blank lines dropped)."""
    lines = []
    for block in section(title).split("```bash\n")[1:]:
        for line in block.split("```")[0].splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines
