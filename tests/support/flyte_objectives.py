"""A flytekit task the test workers serve (`--import tests.support.flyte_objectives`)."""

from __future__ import annotations

import flytekit


@flytekit.task
async def task_quadratic(x: float, depth: int) -> float:
    return (x - 3.0) ** 2 + depth
