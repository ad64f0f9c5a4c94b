"""optuna-rq broker."""
