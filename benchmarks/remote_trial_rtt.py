"""Round-trip time of a remote trial's `should_prune` and `suggest_float`, seen by the worker,
against the same calls in-process (the "Remote trial" table of `benchmarks.run`, on its own).

    uv run python -m benchmarks.remote_trial_rtt
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import optuna

from benchmarks.run import remote_trial
from optuna_rq.plumbing.embedded import ensure_embedded, stop_embedded


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    state = Path(tempfile.mkdtemp(prefix="orq-rtt-", dir="/tmp"))
    url = ensure_embedded(state)
    try:
        figures = remote_trial(url, 3)
    finally:
        stop_embedded(state)
        shutil.rmtree(state, ignore_errors=True)
    for name, ms in figures.items():
        print(f"{name}: {ms:.3f}")


if __name__ == "__main__":
    main()
