"""Local autoscaling: `optuna-rq workers --autoscale MAX,MIN` (Celery's spelling; either order).

The broker writes each queue's demand to `Keys.demand`: the workers its studies could keep busy
(the sum of min(cap, trials left)), not its queue length, which a capped broker keeps near empty.
A pool's target is that demand on its queues, less the workers other live pools run on them,
within MIN and MAX. Below it, the pool starts workers at once; above it, it retires workers that
have been idle for `scale_down_after_s`, never one running a trial.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis

from optuna_rq.errors import ConfigError
from optuna_rq.protocol import Keys, Signer, live_pools

__all__ = ["Autoscaler", "parse_autoscale"]


def parse_autoscale(text: str) -> tuple[int, int]:
    """(MIN, MAX) from `--autoscale MAX,MIN`, Celery's spelling, or `MIN,MAX`: the smaller of
    the two is the minimum, as min <= max says which is which. A single number N means N,1."""
    parts = [p.strip() for p in text.split(",")]
    try:
        numbers = sorted(int(p) for p in parts)
    except ValueError:
        numbers = []
    if len(numbers) == 1 and numbers[0] >= 1:
        numbers = [1, numbers[0]]
    if len(numbers) != 2 or numbers[0] < 0 or numbers[1] < 1:
        raise ConfigError(
            f"--autoscale {text!r}: give MAX,MIN worker processes (or MIN,MAX), two whole "
            "numbers with MIN >= 0 and MAX >= 1, for example 8,1"
        )
    return numbers[0], numbers[1]


class Autoscaler:
    """Decides how many workers a pool should run, from its queues' demand."""

    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys,
        signer: Signer,
        *,
        pool_id: str,
        queues: list[str],
        minimum: int,
        maximum: int,
        scale_down_after_s: float,
    ) -> None:
        self.connection = connection
        self.keys = keys
        self.signer = signer
        self.pool_id = pool_id
        self.queues = queues
        self.minimum = minimum
        self.maximum = maximum
        self.scale_down_after_s = scale_down_after_s

    def target(self) -> int:
        """Workers this pool should run now (MIN..MAX). Raises redis errors to the caller."""
        raw = self.connection.hmget(self.keys.demand, self.queues)
        demand = sum(int(v) for v in raw if v is not None)
        others = sum(
            p.workers
            for p in live_pools(self.connection, self.keys, self.signer)
            if p.pool != self.pool_id and set(p.queues).intersection(self.queues)
        )
        return max(self.minimum, min(self.maximum, demand - others))

    def to_retire(
        self, target: int, idle_since: Mapping[int, float], running: int, now: float
    ) -> list[int]:
        """The children (by index) to retire to come down to `target` from `running`: only
        those idle for `scale_down_after_s`, the longest idle first."""
        idle = sorted(
            (since, index)
            for index, since in idle_since.items()
            if now - since >= self.scale_down_after_s
        )
        return [index for _since, index in idle[: max(0, running - target)]]
