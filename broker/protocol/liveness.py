"""Is a broker serving the prefix? The turn record the broker keeps, and how the front doors
judge it.

The broker's loop writes `Keys.broker_turn` at most every `TURN_BEAT_S`: a hash naming the broker
(its lock identity, "host:pid since ...") and the time of its turn, taken from the Redis server's
clock (so a reader on another machine compares it with the same clock, whatever the skew between
hosts). The broker writes it through its fenced client (`optuna_rq.daemon.fence`), as every
write of its: conditional on its lock and epoch, so a broker that lost its lock never writes
itself back alive. The record has no TTL: after the broker stopped it tells who ran last and when,
and its absence means no broker ever ran on the prefix.

A reader combines it with the lock (`Keys.broker`): see `BrokerState`. The lock alone would
not do: a SIGKILLed broker leaves its lock for up to its TTL (10 s), and a frozen one keeps it.

A study a remote Optimizer runs has no broker: the Optimizer's process drives it, and its turn
is in the study's own signed status (`StudyStatus.turn_at_s`, the Redis server's clock, written
at least every `TURN_BEAT_S` while it runs). `judge_driver` tells whether that process still
turns, by the same grace as a broker's (`DriverLiveness`).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optuna_rq.protocol.keys import Keys
from optuna_rq.protocol.status import StudyStatus

if TYPE_CHECKING:
    import redis

__all__ = [
    "BROKER_GRACE_S",
    "BROKER_START_GRACE_S",
    "TURN_BEAT_S",
    "BrokerLiveness",
    "BrokerState",
    "DriverLiveness",
    "TurnBeacon",
    "ago",
    "judge_driver",
    "judge_liveness",
    "read_liveness",
    "server_clock_s",
]

TURN_BEAT_S = 1.0
"""How often, at most, the broker's loop writes its turn record."""

BROKER_GRACE_S = 5.0
"""How long a broker may go without a turn before the front doors count it stopped (a turn
normally takes well under a second; this rides out a brief freeze, a slow turn, and a restart
whose new broker takes the lock within it). `wait` and `submit --wait` give up after it."""

BROKER_START_GRACE_S = 30.0
"""How long `wait` and `submit --wait`, before they have seen a broker serve the prefix, wait for
one to start before they give up (a broker launched with the submission takes its lock within
it; a cold start on a loaded machine takes several seconds)."""


class TurnBeacon:
    """The broker's side: `beat()` once per turn of its loop; it writes at most every
    `TURN_BEAT_S`. `connection` is the broker's fenced client: the write lands only while the
    broker holds its lock."""

    def __init__(self, connection: redis.Redis, keys: Keys, *, identity: str) -> None:
        self.connection = connection
        self.keys = keys
        self.identity = identity
        self._last = -TURN_BEAT_S  # the first turn writes at once: `starting` ends with it

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last < TURN_BEAT_S:
            return
        seconds, micros = self.connection.time()  # the server's clock, every reader's too
        record = {"broker": self.identity, "at_s": seconds, "at_us": micros}
        self.connection.hset(self.keys.broker_turn, mapping=record)  # type: ignore[arg-type]
        self._last = now


class BrokerState(str, enum.Enum):
    """What the lock and the turn record say, in `status --json`'s `broker.state`."""

    SERVING = "serving"
    """A broker holds the lock and turned its loop within `BROKER_GRACE_S`."""
    STARTING = "starting"
    """A broker holds the lock but has not turned yet (a new broker, a restart)."""
    STOPPED = "stopped"
    """A broker ran on the prefix, but none holds the lock (it stopped, or died and its lock
    expired), or the one that holds it has not turned for `BROKER_GRACE_S` (killed before its
    lock expired, frozen, or stuck)."""
    NONE = "none"
    """No broker ever ran on the prefix (or Redis lost what it wrote)."""


def where(identity: str) -> str:
    """`host:pid` of a broker identity ("host:pid since ...")."""
    return identity.split(" ", 1)[0]


def ago(seconds: float) -> str:
    """`40s`, `3m`, `2h`, `1d`: how long ago, in its largest whole unit."""
    whole = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"


@dataclass(frozen=True, kw_only=True)
class BrokerLiveness:
    """The prefix's broker as read at one moment. `holder`: who holds the lock now;
    `last_broker` and `last_turn_age_s`: the broker of the last turn record, and how long ago
    (by the Redis server's clock) it turned."""

    prefix: str
    state: BrokerState
    holder: str | None = None
    last_broker: str | None = None
    last_turn_age_s: float | None = None
    read_at_s: float | None = None
    """The Redis server's clock when this was read: what a driven study's turn is judged
    against in the same listing (`judge_driver`)."""

    @property
    def serves(self) -> bool:
        return self.state in (BrokerState.SERVING, BrokerState.STARTING)

    def describe(self) -> str:
        """One line: `the broker on host:12 stopped 40s ago`, `no broker is running on prefix
        'p': start one with ...`, `the broker on host:12 is serving`."""
        match self.state:
            case BrokerState.SERVING:
                return f"the broker on {where(self.holder or '?')} is serving"
            case BrokerState.STARTING:
                return f"the broker on {where(self.holder or '?')} is starting"
            case BrokerState.STOPPED:
                return (
                    f"the broker on {where(self.last_broker or '?')} stopped "
                    f"{ago(self.last_turn_age_s or 0.0)} ago"
                )
            case BrokerState.NONE:
                return (
                    f"no broker is running on prefix {self.prefix!r}: "
                    "start one with `optuna-rq broker`"
                )

    def note(self) -> str | None:
        """What a queued or running study's state is shown with, None while a broker serves:
        `no broker: the broker on host:12 stopped 40s ago`."""
        if self.serves:
            return None
        if self.state is BrokerState.NONE:
            return self.describe()
        return f"no broker: {self.describe()}"

    def to_dict(self) -> dict[str, Any]:
        """`status --json`'s `broker` object."""
        return {
            "state": self.state.value,
            "holder": self.holder,
            "last_broker": self.last_broker,
            "last_turn_age_s": (
                None if self.last_turn_age_s is None else round(self.last_turn_age_s, 3)
            ),
        }


def judge_liveness(
    prefix: str,
    *,
    holder: str | None,
    last_broker: str | None,
    last_turn_age_s: float | None,
    grace_s: float = BROKER_GRACE_S,
    read_at_s: float | None = None,
) -> BrokerLiveness:
    """The state the lock's `holder` and the last turn record give (see `BrokerState`)."""
    if holder is None:
        state = BrokerState.NONE if last_broker is None else BrokerState.STOPPED
    elif last_broker != holder or last_turn_age_s is None:
        state = BrokerState.STARTING
    elif last_turn_age_s > grace_s:
        state = BrokerState.STOPPED
    else:
        state = BrokerState.SERVING
    return BrokerLiveness(
        prefix=prefix,
        state=state,
        holder=holder,
        last_broker=last_broker,
        last_turn_age_s=last_turn_age_s,
        read_at_s=read_at_s,
    )


def read_liveness(
    connection: redis.Redis, keys: Keys, *, grace_s: float = BROKER_GRACE_S
) -> BrokerLiveness:
    """The lock, the turn record and the server's clock, read in one round trip, judged."""
    pipe = connection.pipeline(transaction=False)
    pipe.get(keys.broker)
    pipe.hmget(keys.broker_turn, ["broker", "at_s", "at_us"])
    pipe.time()
    raw_holder, (raw_broker, at_s, at_us), (now_s, now_us) = pipe.execute()
    age_s = None
    if raw_broker is not None and at_s is not None and at_us is not None:
        age_s = max(0.0, (now_s - int(at_s)) + (now_us - int(at_us)) / 1e6)
    return judge_liveness(
        keys.prefix,
        holder=_text(raw_holder),
        last_broker=_text(raw_broker),
        last_turn_age_s=age_s,
        grace_s=grace_s,
        read_at_s=now_s + now_us / 1e6,
    )


def server_clock_s(connection: redis.Redis) -> float:
    """The Redis server's clock, in seconds: the one clock every machine reads alike."""
    seconds, micros = connection.time()
    return float(seconds) + micros / 1e6


@dataclass(frozen=True, kw_only=True)
class DriverLiveness:
    """The process that runs a driven study (a remote Optimizer), as judged at one moment:
    `driver` (`host:pid`), how long ago (by the Redis server's clock) it last turned, and
    whether that is within `grace_s`."""

    driver: str
    turn_age_s: float | None
    grace_s: float = BROKER_GRACE_S

    @property
    def alive(self) -> bool:
        return self.turn_age_s is not None and self.turn_age_s <= self.grace_s

    def describe(self) -> str:
        """`the Optimizer on host:12 is running`, `the Optimizer on host:12 stopped 40s ago`."""
        if self.alive:
            return f"the Optimizer on {self.driver} is running"
        if self.turn_age_s is None:
            return f"the Optimizer on {self.driver} never turned"
        return f"the Optimizer on {self.driver} stopped {ago(self.turn_age_s)} ago"

    def to_dict(self) -> dict[str, Any]:
        """`status --json`'s `driver_liveness` object."""
        return {
            "driver": self.driver,
            "state": "running" if self.alive else "stopped",
            "last_turn_age_s": None if self.turn_age_s is None else round(self.turn_age_s, 3),
        }


def judge_driver(
    status: StudyStatus, *, now_s: float, grace_s: float = BROKER_GRACE_S
) -> DriverLiveness | None:
    """Whether the process driving `status`'s study turned within `grace_s` of `now_s` (the
    Redis server's clock: `server_clock_s`, `BrokerLiveness.read_at_s`); None for a study the
    broker runs."""
    if status.driver is None:
        return None
    age = None if status.turn_at_s is None else max(0.0, now_s - status.turn_at_s)
    return DriverLiveness(driver=status.driver, turn_age_s=age, grace_s=grace_s)


def _text(raw: Any) -> str | None:
    return None if raw is None else bytes(raw).decode(errors="replace")
