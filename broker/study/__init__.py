"""How a trial ends in its Optuna study, and the Optuna internals that takes (quarantined here)."""
