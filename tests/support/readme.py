"""The README's own text, for tests that run what it says: its sections and their code blocks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    language: str  # what follows the opening fence: bash, python, yaml, or ""
    text: str


def section(heading: str) -> str:
    """The README's text under `## heading` (its `###` subsections too), up to the next `## `."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match is not None, f"README.md has no section '## {heading}'"
    return match.group(1)


def blocks(heading: str, language: str | None = None) -> list[Block]:
    """The fenced code blocks of a section, in order (only those of `language`, if given)."""
    found = [Block(m.group(1), m.group(2)) for m in _FENCE.finditer(section(heading))]
    return [b for b in found if language is None or b.language == language]


def commands(block: Block) -> list[str]:
    """The shell commands of a block, one a line, each without its trailing comment."""
    lines = []
    for line in block.text.splitlines():
        command = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
        if command and not command.startswith("#"):
            lines.append(command)
    return lines
