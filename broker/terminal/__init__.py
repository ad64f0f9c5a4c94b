"""How studies read on a terminal: progress bars and status lines, for the CLI and the Optimizer."""
