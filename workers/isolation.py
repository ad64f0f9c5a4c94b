"""How a worker process runs its trials: the choices of `optuna-rq workers --isolation`.

Apart from the RQ workers that implement each (`rq_worker.ISOLATION`), so that the command line
lists them without importing RQ.
"""

from __future__ import annotations

import enum

__all__ = ["Isolation"]


class Isolation(str, enum.Enum):
    """--isolation: how a worker process runs its trials (the CLI's choices)."""

    PROCESS = "process"
    FORK = "fork"

    def __str__(self) -> str:
        return str(self.value)
