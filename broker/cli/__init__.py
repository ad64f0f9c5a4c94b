"""The `optuna-rq` command: its app, options, checks and the commands it serves."""
