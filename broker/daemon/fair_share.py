"""Fair share: how many of the live workers each study may keep busy."""

from __future__ import annotations

import math
from collections.abc import Mapping

import redis
from rq import Queue, Worker

from optuna_rq.dispatch import StudyRun
from optuna_rq.protocol import StudySpec

__all__ = ["FairShare", "fair_shares"]


def fair_shares(demands: dict[str, tuple[int, float]], capacity: int) -> dict[str, int]:
    """Split `capacity` worker slots among studies by weight, none above its demand.

    `demands` maps a study to (slots it could use, priority weight). When everything fits, each
    gets its demand. Otherwise every study gets at least one slot (a large study cannot starve a
    small one) and the rest go, one at a time, to the study furthest below its weighted share.
    """
    active = {name: d for name, d in demands.items() if d[0] > 0}
    if sum(cap for cap, _ in active.values()) <= capacity:
        return {name: cap for name, (cap, _) in demands.items()}
    shares = {name: (1 if name in active else 0) for name in demands}
    spare = capacity - len(active)
    while spare > 0:
        hungry = [n for n, (cap, _) in active.items() if shares[n] < cap]
        if not hungry:
            break
        neediest = min(hungry, key=lambda n: (shares[n] / active[n][1], n))
        shares[neediest] += 1
        spare -= 1
    return shares


class FairShare:
    """Sets each run's `slots` to its fair share of the workers live on `queue`.

    The live-worker count is RQ's, read at most every `refresh_s` seconds.
    """

    def __init__(self, connection: redis.Redis, queue: Queue, *, refresh_s: float) -> None:
        self.connection = connection
        self.queue = queue
        self.refresh_s = refresh_s
        self.live_workers = 0
        self._last_refresh = -math.inf

    def share(
        self, runs: Mapping[str, StudyRun], specs: Mapping[str, StudySpec], now: float
    ) -> None:
        """Give every run in `runs` its slots, weighted by its spec's priority."""
        if now - self._last_refresh >= self.refresh_s:
            self.live_workers = Worker.count(connection=self.connection, queue=self.queue)
            self._last_refresh = now
        demands = {n: (r.demand, specs[n].priority) for n, r in runs.items()}
        # Without any live worker, queue up to each cap: the first workers find work waiting.
        shares = fair_shares(demands, self.live_workers) if self.live_workers else {}
        for name, run in runs.items():
            run.slots = shares.get(name)
