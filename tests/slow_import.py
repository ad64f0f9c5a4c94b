"""A module whose import waits for a gate file (env OPTUNA_RQ_TEST_IMPORT_GATE), leaving
`<gate>.importing` first: a pool stopped while it still imports what it serves."""

import os
import time

_gate = os.environ.get("OPTUNA_RQ_TEST_IMPORT_GATE")
if _gate:
    open(f"{_gate}.importing", "w").close()
    _deadline = time.monotonic() + 60
    while not os.path.exists(_gate) and time.monotonic() < _deadline:
        time.sleep(0.02)


def objective(x: float) -> float:
    return x
