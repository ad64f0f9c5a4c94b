"""A cheap objective with a nested search space: what `examples/quickstart.py` optimises.

Workers serve it with `optuna-rq workers --import optuna_rq.examples.rosenbrock`; it ships in
the package, so the demo runs from an installed wheel as from a clone.
"""

from __future__ import annotations

import time


def objective(x: float, y: float, model: dict[str, float | int | str], noise: float) -> float:
    """A shifted Rosenbrock valley plus a penalty from the nested `model` inputs."""
    time.sleep(0.02)  # stand-in for real work, so the trials overlap on the workers
    rosenbrock = (1 - x) ** 2 + 100 * (y - x**2) ** 2
    penalty = abs(float(model["lr"]) - 0.01) * 10 + (0.5 if model["booster"] == "dart" else 0.0)
    return rosenbrock + penalty + noise * int(model["depth"])
