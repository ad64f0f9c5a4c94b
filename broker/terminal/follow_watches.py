"""What a follower of a study watches to know when to give up: the prefix's broker
(`BrokerWatch`), or, for a study a remote Optimizer runs, that Optimizer's process
(`DriverWatch`). Each reads the liveness that process publishes, by the Redis server's clock.
"""

from __future__ import annotations

import time

from optuna_rq.client import BrokerClient
from optuna_rq.protocol import StudyStatus, liveness
from optuna_rq.protocol.liveness import (
    BROKER_GRACE_S,
    BrokerLiveness,
    BrokerState,
    DriverLiveness,
    judge_driver,
    server_clock_s,
)
from optuna_rq.terminal.believed_status import Believed

__all__ = ["BrokerWatch", "DriverWatch"]


class BrokerWatch:
    """Whether a follower should give up on the prefix's broker. `gone()` reads the broker's
    liveness, and returns what was read once the follower should give up, else None.

    Once it has seen a broker serve the prefix, it gives up when none has turned for `grace_s`
    (by the Redis server's clock): a brief freeze, a slow turn or a quick restart rides it out.
    Until then, no broker may have started yet (it was launched with the submission, or just
    before it, while the previous broker's last turn is long past): it gives up after
    `start_grace_s` by its own clock since `since` (default: its first look)."""

    def __init__(
        self,
        client: BrokerClient,
        *,
        grace_s: float = BROKER_GRACE_S,
        start_grace_s: float | None = None,
        since: float | None = None,
    ) -> None:
        self.client = client
        self.grace_s = grace_s
        self.start_grace_s = (
            liveness.BROKER_START_GRACE_S if start_grace_s is None else start_grace_s
        )
        self.since = since
        self.seen_serving = False
        self.last: BrokerLiveness | None = None

    def gone(self) -> BrokerLiveness | None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        live = self.last = self.client.liveness(grace_s=self.grace_s)
        if live.serves:
            self.seen_serving = True
            return None
        if live.state is not BrokerState.NONE and (live.last_turn_age_s or 0.0) < self.grace_s:
            return None  # it stopped within the grace: a restart may take its place
        if self.seen_serving or now - self.since >= self.start_grace_s:
            return live
        return None

    waiting = "waiting for a broker"
    """What the bar shows while no broker serves the prefix."""

    def no_more(self, snap: StudyStatus) -> str:
        """Why the follower gives up (what `gone` last read), and what to do."""
        assert self.last is not None  # `gone` read it
        return _no_broker(self.last, snap)

    def change(self, *, waiting: bool) -> str:
        """What `--wait-for-broker` prints when it starts `waiting` for a broker, or stops."""
        return _broker_change(self.last if waiting else None, self)


class DriverWatch:
    """Whether a follower of a study a remote Optimizer runs should give up on that process:
    `gone()` returns its liveness once it has not turned for `grace_s` (by the Redis server's
    clock), else None. Nothing but an Optimizer's process moves such a study: once it is gone
    (killed, or its machine lost), no broker will."""

    waiting = "waiting for its Optimizer"

    def __init__(
        self, client: BrokerClient, believed: Believed, *, grace_s: float = BROKER_GRACE_S
    ) -> None:
        self.client = client
        self.believed = believed
        self.grace_s = grace_s
        self.last: DriverLiveness | None = None

    def gone(self) -> DriverLiveness | None:
        snap = self.believed.last
        live = judge_driver(
            snap, now_s=server_clock_s(self.client.connection), grace_s=self.grace_s
        )
        if live is None:  # no longer a driven study's status
            return None
        self.last = live
        return None if live.alive else live

    def no_more(self, snap: StudyStatus) -> str:
        """Why the follower gives up (what `gone` last read), and what to do."""
        gone = "its Optimizer stopped" if self.last is None else self.last.describe()
        return (
            f"{gone}; study {snap.name!r} is still {snap.state.value}, and nothing moves it "
            "until an Optimizer runs it again (--wait-for-broker waits for one)"
        )

    def change(self, *, waiting: bool) -> str:
        """What `--wait-for-broker` prints when it starts `waiting` for the study's Optimizer,
        or stops."""
        name = self.believed.name
        now = "" if self.last is None else f": {self.last.describe()}"
        if not waiting:
            return f"an Optimizer runs study {name!r} again{now}"
        return f"waiting for an Optimizer to run study {name!r}{now}"


def _no_broker(gone: BrokerLiveness, snap: StudyStatus) -> str:
    """Why a follower gives up: no broker, and what to do."""
    if gone.state is BrokerState.NONE:
        return (
            f"{gone.describe()} (study {snap.name!r} is {snap.state.value}; "
            "--wait-for-broker waits for one)"
        )
    return (
        f"no broker: {gone.describe()}; study {snap.name!r} is still {snap.state.value}, and "
        f"nothing moves it until a broker runs on prefix {gone.prefix!r}: start one with "
        "`optuna-rq broker` (--wait-for-broker waits for one)"
    )


def _broker_change(gone: BrokerLiveness | None, watch: BrokerWatch) -> str:
    """The line `--wait-for-broker` prints when it starts waiting for a broker, or stops."""
    if gone is None:
        back = "" if watch.last is None else f": {watch.last.describe()}"
        return f"a broker serves prefix {watch.client.prefix!r} again{back}"
    if gone.state is BrokerState.NONE:
        return f"waiting for a broker: {gone.describe()}"
    return f"waiting for a broker on prefix {gone.prefix!r}: {gone.describe()}"
