"""Run the demo: `uv run python examples/quickstart.py` (the same as `optuna-rq demo`)."""

from broker.demo import run_demo

if __name__ == "__main__":
    run_demo()
