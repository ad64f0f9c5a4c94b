"""A module whose import leaves a mark: tests check that refused objectives never import it."""

import os

_mark = os.environ.get("OPTUNA_RQ_TEST_IMPORT_MARK")
if _mark:
    with open(_mark, "a") as f:
        f.write(f"imported by {os.getpid()}\n")


def objective(x: float) -> float:
    return x
