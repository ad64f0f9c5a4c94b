"""Run the demo from a clone: `uv run python examples/quickstart.py` (same as `optuna-rq demo`)."""

from optuna_rq.cli.demo import run_demo

if __name__ == "__main__":
    run_demo()
