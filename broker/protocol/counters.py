"""The counters of refused and dropped messages, by kind: `<prefix>:refused` and
`<prefix>:dropped` (`Keys.refused`, `Keys.dropped`), Redis hashes anyone who reads the prefix
sees (`redis-cli hgetall <prefix>:refused`, the metrics).

A message is refused when it does not verify or does not decode: an attack or a bug. It is
dropped when it is valid but stale or repeated: a worker that came back, an answer to a call
no longer waited for. The broker and the workers count in the same hashes, each kind once, and
only here: whoever counts names the prefix's `Keys`, never a key of its own making.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from optuna_rq.protocol.keys import Keys

if TYPE_CHECKING:
    import redis

__all__ = ["count_dropped", "count_refused"]


def count_refused(connection: redis.Redis, keys: Keys, kind: str) -> None:
    """Count one refused message of `kind` (`request`, `reply`, `call`...) in `<prefix>:refused`."""
    connection.hincrby(keys.refused, kind, 1)


def count_dropped(connection: redis.Redis, keys: Keys, kind: str) -> None:
    """Count one dropped message of `kind` (`result`, `reply`...) in `<prefix>:dropped`."""
    connection.hincrby(keys.dropped, kind, 1)
