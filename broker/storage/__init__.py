"""The broker's Optuna storages: which it may open, its journal file, and how a study's storage is
guarded."""
