"""The embedded redis-server a benchmark runs against, in a state directory of its own."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from optuna_rq.plumbing.embedded import ensure_embedded, stop_embedded

__all__ = ["embedded_redis"]


@contextmanager
def embedded_redis(name: str) -> Iterator[str]:
    """A fresh embedded redis-server's URL, stopped and its directory removed afterwards."""
    state = Path(tempfile.mkdtemp(prefix=f"orq-{name}-", dir="/tmp"))
    try:
        yield ensure_embedded(state)
    finally:
        stop_embedded(state)
        shutil.rmtree(state, ignore_errors=True)
