"""Every test that parses source does it through `tests.support.source_trees.parse`, which holds
off the garbage collector that breaks CPython 3.11's AST check at random (see there)."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
HELPER = TESTS / "support" / "source_trees.py"


def test_no_test_parses_source_but_through_the_helper() -> None:
    direct = re.compile(r"\bast\.parse\(|from ast import[^\n]*\bparse\b")
    found = [
        f"{path.relative_to(TESTS)}:{number}"
        for path in sorted(TESTS.rglob("*.py"))
        if path != HELPER and path != Path(__file__).resolve()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if direct.search(line)
    ]
    assert not found, f"parse through tests.support.source_trees.parse: {found}"
