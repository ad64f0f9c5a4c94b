"""Fair share: how many of the live workers on its queue each study may keep busy, and so how
many trials it may have outstanding (a worker's worth is its batch: `StudySpec.batch`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from optuna_rq.dispatch import StudyRun
from optuna_rq.protocol import Keys, PoolHeartbeat, Signer, StudySpec, live_pools, workers_on

__all__ = ["FairShare", "Share", "fair_shares"]


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


@dataclass(frozen=True, slots=True)
class Share:
    """What fair share gives one run: its slots (`StudyRun.grant`; None: its cap alone), and
    whether no live worker listens to its queue (`StudyRun.note_workers`)."""

    slots: int | None
    waiting_for_workers: bool


class FairShare:
    """Works out each run's fair share of the live workers that listen to its queue, and which
    runs no live worker listens to; the daemon hands each run its `Share`.

    Live means a pool's heartbeat has not expired (`protocol.heartbeat`), read at most every
    `refresh_s` seconds; then the demand of each queue (the workers its studies could keep
    busy) is written to `Keys.demand`, for `workers --autoscale`.

    Studies whose queues share live workers (a pool listening to both) share those workers
    fairly; each study gets at most the workers listening to its own queue.
    """

    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys,
        signer: Signer,
        queue_of: Callable[[StudyRun], str],
        *,
        refresh_s: float,
    ) -> None:
        self.connection = connection
        self.keys = keys
        self.signer = signer
        self.queue_of = queue_of  # a run's RQ queue
        self.refresh_s = refresh_s
        self.pools: list[PoolHeartbeat] = []
        self._last_refresh = -math.inf

    @property
    def live_workers(self) -> dict[str, int]:
        """Live workers by resource class (a worker on several classes counts in each)."""
        counts: dict[str, int] = {}
        for pool in self.pools:
            for cls in {self.keys.queue_class(q) for q in pool.queues} - {None}:
                counts[str(cls)] = counts.get(str(cls), 0) + pool.workers
        return counts

    def share(
        self, runs: Mapping[str, StudyRun], specs: Mapping[str, StudySpec], now: float
    ) -> dict[str, Share]:
        """Every run's share of `runs`, weighted by its spec's priority."""
        if now - self._last_refresh >= self.refresh_s:
            self.pools = live_pools(self.connection, self.keys, self.signer, prune=True)
            self._publish_demand(runs)
            self._last_refresh = now
        queues = {name: self.queue_of(run) for name, run in runs.items()}
        capacity = {q: workers_on(self.pools, q) for q in set(queues.values())}
        # Without a live worker, queue up to the cap: the first workers find work waiting.
        slots: dict[str, int | None] = dict.fromkeys(runs)
        for group in _sharing_groups(self.pools, set(q for q, n in capacity.items() if n)):
            members = {n: r for n, r in runs.items() if queues[n] in group}
            # Shared in workers: a worker keeps one job of a study busy, which carries up to
            # its batch of trials (`StudySpec.batch`).
            demands = {
                n: (min(-(-r.demand // r.spec.batch), capacity[queues[n]]), specs[n].priority)
                for n, r in members.items()
            }
            workers = sum(p.workers for p in self.pools if group.intersection(p.queues))
            for n, share in fair_shares(demands, workers).items():
                slots[n] = min(share * members[n].spec.batch, members[n].demand)
        return {
            name: Share(slots=slots[name], waiting_for_workers=capacity[queues[name]] == 0)
            for name in runs
        }

    def _publish_demand(self, runs: Mapping[str, StudyRun]) -> None:
        demand: dict[Any, int] = {}  # redis-py types its mapping keys narrowly
        for run in runs.values():
            queue = self.queue_of(run)
            workers = -(-max(0, run.demand) // run.spec.batch)  # a worker runs a whole batch
            demand[queue] = demand.get(queue, 0) + workers
        pipe = self.connection.pipeline(transaction=True)
        pipe.delete(self.keys.demand)
        if demand:
            pipe.hset(self.keys.demand, mapping=demand)
        pipe.execute()


def _sharing_groups(pools: list[PoolHeartbeat], queues: set[str]) -> list[set[str]]:
    """`queues` split into groups that share workers: two queues are in one group when some
    pool listens to both (transitively)."""
    groups: list[set[str]] = [{q} for q in sorted(queues)]
    for pool in pools:
        joined = [g for g in groups if g.intersection(pool.queues)]
        if len(joined) > 1:
            merged = set().union(*joined)
            groups = [g for g in groups if g not in joined] + [merged]
    return groups
