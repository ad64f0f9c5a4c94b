"""Search spaces: the flytekitplugins.optuna declarations and `process()`, and space files."""
