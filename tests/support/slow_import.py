"""A module whose import waits for a gate file, leaving `<gate>.importing` first: a pool stopped
while it still imports what it serves. OPTUNA_RQ_TEST_IMPORT_GATE gates the pool's own import,
OPTUNA_RQ_TEST_CHILD_IMPORT_GATE its worker processes' (spawned: they have a parent process)."""

import multiprocessing
import os
import time

_variable = (
    "OPTUNA_RQ_TEST_IMPORT_GATE"
    if multiprocessing.parent_process() is None
    else "OPTUNA_RQ_TEST_CHILD_IMPORT_GATE"
)
_gate = os.environ.get(_variable)
if _gate:
    open(f"{_gate}.importing", "w").close()
    _deadline = time.monotonic() + 60
    while not os.path.exists(_gate) and time.monotonic() < _deadline:
        time.sleep(0.02)


def objective(x: float) -> float:
    return x
