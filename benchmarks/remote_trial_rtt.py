"""Round-trip time of a remote trial's `should_prune` and `suggest_float`, seen by the worker,
against the same calls in-process (the "Remote trial" table of `benchmarks.run`, on its own).

    uv run python -m benchmarks.remote_trial_rtt
"""

from __future__ import annotations

import optuna

from benchmarks.redis_server import embedded_redis
from benchmarks.run import remote_trial


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with embedded_redis("rtt") as url:
        figures = remote_trial(url, 3)
    for name, ms in figures.items():
        print(f"{name}: {ms:.3f}")


if __name__ == "__main__":
    main()
