"""Source code parsed into ASTs, for the tests that walk the project's code (the layers, every
site of a rule, the README's examples).

CPython 3.11 builds an AST's Python objects in C and checks that its recursion count is the same
after as before (gh-106905, "AST constructor recursion depth mismatch"). A garbage collection in
between that runs a finalizer (a connection or an engine an earlier test left to the collector)
breaks that check, at random, depending on which tests ran before in the process. So the
collector waits while a source is parsed; every test parses through `parse`."""

from __future__ import annotations

import ast
import gc

__all__ = ["parse"]


def parse(source: str, filename: str = "<unknown>") -> ast.Module:
    """`ast.parse(source, filename)`, with the garbage collector held off meanwhile."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source, filename)
    finally:
        if enabled:
            gc.enable()
