"""optuna-rq workers."""
