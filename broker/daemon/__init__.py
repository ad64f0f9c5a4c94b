"""The broker daemon: serves many submitted studies at once from one Redis prefix.

Everything it knows lives in Redis and in the study storages, so a restarted broker picks up
where the last one stopped: submitted studies are in `<prefix>:studies`, commands wait in
`<prefix>:commands`, results wait in the `<prefix>:results` stream until acknowledged. The one
thing it keeps on its own disk is what Redis must not be trusted with: the ids of the commands it
applied (`ledger`, in its state directory), so that a command replayed through Redis is refused.

The keys it uses are `optuna_rq.protocol.keys.Keys`. Its parts: `lock` (one broker per prefix,
and the epoch guard), `inbox` (commands, each applied once: `ledger`), `fair_share` (workers
among studies), `status_publisher` (what the broker publishes), composed by `daemon.Daemon`.

Its names are imported when first asked for (PEP 562): the command line reads the light modules
beside them (`broker_health`) for its defaults and help, without the daemon's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna_rq.daemon.broker_settings import BrokerSettings
    from optuna_rq.daemon.daemon import Daemon
    from optuna_rq.daemon.fair_share import fair_shares

__all__ = ["BrokerSettings", "Daemon", "fair_shares"]

_HOME = {
    "BrokerSettings": "optuna_rq.daemon.broker_settings",
    "Daemon": "optuna_rq.daemon.daemon",
    "fair_shares": "optuna_rq.daemon.fair_share",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
