"""Objectives that ship with optuna-rq: the demo's, so it runs from a wheel as from a clone."""
