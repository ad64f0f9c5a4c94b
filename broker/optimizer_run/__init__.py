"""How an `Optimizer` runs: its objective checked, and its study dispatched to workers from the
caller's process."""
