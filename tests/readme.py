"""Sections and command blocks of README.md and docs/, for tests that run the commands they show."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
USER_GUIDE = ROOT / "docs" / "user-guide.md"


def section(title: str, document: Path = README) -> str:
    """The text under `## title` up to the next `## ` heading."""
    text = document.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def bash_lines(title: str, document: Path = README) -> list[str]:
    """Every command line of the section's ```bash blocks (comments and blank lines dropped)."""
    lines = []
    for block in section(title, document).split("```bash\n")[1:]:
        for line in block.split("```")[0].splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines
