"""BrokerSettings: what one broker process is given at start (the CLI builds it from options)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["BrokerSettings"]


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    prefix: str
    storage: str  # the default storage URL for studies that name none
    # What else a study's storage may be: `broker --allow-storage` patterns (storage_policy.py).
    allowed_storages: tuple[str, ...] = ()
    poll_s: float = 0.2
    lock_ttl_s: float = 10.0
    status_interval_s: float = 0.25
    workers_refresh_s: float = 1.0
    max_outage_backoff_s: float = 5.0
    standby: bool = False
    """While another broker holds the prefix's lock, wait to take over (`daemon.standby`)
    instead of refusing to start."""
    command_ledger: Path | None = None
    """The file of the commands applied (`daemon.ledger`), in the broker's state directory, so
    that a command replayed through Redis is refused after a restart too; None: in memory."""
