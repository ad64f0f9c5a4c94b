"""The status of a study a remote Optimizer runs: published by the Optimizer's own process, as the
broker publishes its studies', so that `optuna-rq status`, `wait` and `best` see it from any
machine that reaches Redis.

The Optimizer drives its study itself (no broker is involved), so the status says so: `driver`
names its process (`host:pid`), and `turn_at_s` is the Redis server's clock at its last turn,
written at least every `TURN_BEAT_S` while it runs. A reader judges the process gone when it has
not turned for `BROKER_GRACE_S` (`protocol.liveness.judge_driver`): `wait` then exits 3, as it
does when a broker dies. The status goes to a hash of its own (`Keys.driven`), sealed with the
front-door key the Optimizer holds as a `driven study status`: the broker neither reads nor
writes that hash, so it neither adopts nor deletes it, and no reader takes it for the broker's.

A name is the broker's first: a run refuses a study name the broker holds (StudyConflictError,
before anything is sent), and a submission of the name of a study whose Optimizer still runs is
refused at the front door (`BrokerClient.refuse_driven`). The status is keyed by the study's
name (`StudyRun.name`), as everything the dispatcher writes per study is.

Counts are the study's, as the broker's are: `n_trials` is the budget units the study had ended
when the run started plus the trials this run asks (a second `await optimizer(...)` shows
`10/20` when it starts where the first one left the study).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import redis

from optuna_rq.dispatch import StudyRun
from optuna_rq.dispatch.summary import study_summary
from optuna_rq.errors import ProtocolError, StudyConflictError
from optuna_rq.protocol import Keys, Signer, StudyState, StudyStatus
from optuna_rq.protocol.liveness import TURN_BEAT_S, judge_driver
from optuna_rq.protocol.status import read_driven_status

__all__ = ["PUBLISH_INTERVAL_S", "DrivenStatus"]

log = logging.getLogger("optuna_rq.optimizer")

PUBLISH_INTERVAL_S = 0.25
"""How often, at most, a change (a trial sent or recorded) is published: the broker's default."""

MAX_SHARE = 0.05
"""At most this share of the run's time goes to reading the study for its status (it walks the
study's whole history): after a slow read, the next waits longer."""


def driver_identity() -> str:
    """`host:pid` of this process: what a driven study's status names as its driver."""
    return f"{socket.gethostname()}:{os.getpid()}"


class DrivenStatus:
    """Publishes the status of `run`'s study while a remote Optimizer runs it: `claim` once
    before the run, `mark` after each trial recorded, `turn` once per turn of the dispatcher's loop,
    `end` when the run ends. `on_status` (the progress bar) sees every status it makes.

    Publishing never stops the run: a status Redis refuses (a Redis user without the right to
    write `Keys.driven`) is logged once and no more is published; a lost connection is the
    dispatcher's to ride out."""

    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys,
        signer: Signer,
        *,
        run: StudyRun,
        driver: str | None = None,
    ) -> None:
        self.connection = connection
        self.keys = keys
        self.signer = signer
        self.run = run
        self.driver = driver or driver_identity()
        self.submitted_at = time.time()
        self.on_status: Callable[[StudyStatus], None] | None = None
        self.publishing = True
        self.latest: StudyStatus | None = None
        self._base = 0  # budget units the study had ended before this run
        self._summary: dict[str, Any] = {}
        self._dirty = True
        self._last_read = -float("inf")
        self._last_write = -float("inf")
        self._interval_s = PUBLISH_INTERVAL_S

    @property
    def name(self) -> str:
        return self.run.name

    def claim(self) -> None:
        """Take the study's name on the prefix and publish it RUNNING. StudyConflictError if
        the broker holds a study of that name (its status or spec). If another Optimizer's
        process still runs a study of that name (one storage, two processes), this run
        publishes nothing: that one's status stays what `status` shows."""
        pipe = self.connection.pipeline(transaction=False)
        pipe.hexists(self.keys.status, self.name)
        pipe.hexists(self.keys.studies, self.name)
        pipe.time()
        published, stored, (now_s, now_us) = pipe.execute()
        if published or stored:
            raise StudyConflictError(
                f"study {self.name!r} is a broker study on prefix {self.keys.prefix!r} "
                f"(`optuna-rq status {self.name}`): nothing was sent. Give the Optimizer's "
                "study another name (optuna.create_study(study_name=...)), or delete the "
                f"broker's (`optuna-rq delete {self.name}`)"
            )
        try:
            other = read_driven_status(self.connection, self.keys, self.signer, self.name)
        except ProtocolError:
            other = None  # not a status anyone signed: ours replaces it
        if other is not None and other.driver != self.driver and not other.state.ended:
            live = judge_driver(other, now_s=now_s + now_us / 1e6)
            if live is not None and live.alive:
                log.warning(
                    "study %r is run by the Optimizer on %s too: its status is what `optuna-rq "
                    "status` shows; this run's is not published",
                    self.name,
                    other.driver,
                )
                self.publishing = False
        self._base = int(study_summary(self.run.study)["ended"])
        self.turn(force=True)

    def mark(self) -> None:
        """A trial was recorded: the next due turn reads the study again."""
        self._dirty = True

    def turn(self, *, force: bool = False) -> None:
        """Publish the study RUNNING if it changed and `PUBLISH_INTERVAL_S` (or longer, after a
        slow read: `MAX_SHARE`) has passed, and at least every `TURN_BEAT_S` anyway: the
        process's liveness."""
        now = time.monotonic()
        due_read = self._dirty and now - self._last_read >= self._interval_s
        running = len(self.run.outstanding)
        changed = self.latest is None or running != self.latest.running
        due = force or due_read or now - self._last_write >= TURN_BEAT_S
        if not due and not (changed and now - self._last_write >= PUBLISH_INTERVAL_S):
            return
        if force or due_read:
            self._read()
        self._publish(StudyState.RUNNING, running=running)

    def end(self, state: StudyState, error: str | None = None) -> StudyStatus:
        """Publish the study's end (`state`, and why: `error`) and return it. Never raises: a
        run's end is reported by the run, whatever became of its status."""
        try:
            self._read()
        except Exception as exc:  # the study's storage failed: the last figures read stand
            log.warning("study %r: its figures could not be read at its end: %s", self.name, exc)
        try:
            return self._publish(state, running=0, error=error)
        except Exception as exc:
            log.warning("study %r: its end (%s) was not published: %s", self.name, state, exc)
            assert self.latest is not None  # claimed: one was made
            return self.latest

    def _read(self) -> None:
        started = time.monotonic()
        self._dirty = False
        self._summary = study_summary(self.run.study)
        self._last_read = time.monotonic()
        self._interval_s = max(PUBLISH_INTERVAL_S, (self._last_read - started) / MAX_SHARE)

    def _publish(self, state: StudyState, *, running: int, error: str | None = None) -> StudyStatus:
        run = self.run
        turn_at_s = None
        if self.publishing:
            seconds, micros = self.connection.time()  # the server's clock: every reader's too
            turn_at_s = float(seconds) + micros / 1e6
        status = StudyStatus(
            name=self.name,
            state=state,
            objective=run.spec.objective,
            directions=[d.name.lower() for d in run.study.directions],
            n_trials=self._base + run.budget.n_trials,
            concurrency=run.spec.concurrency,
            priority=1.0,
            storage="",
            error=error,
            submitted_at=self.submitted_at,
            queue=run.spec.queue,
            waiting_for_workers=run.waiting_for_workers and not state.ended,
            driver=self.driver,
            turn_at_s=turn_at_s,
            **{**self._summary, "running": running},
        )
        if self.publishing:
            try:
                self.connection.hset(self.keys.driven, self.name, status.sealed(self.signer))
            except (redis.ConnectionError, redis.TimeoutError):
                raise  # an outage: the dispatcher rides it out, and the next turn publishes
            except redis.RedisError as exc:
                self.publishing = False
                log.warning(
                    "study %r: its status cannot be published, so `optuna-rq status` and "
                    "`wait` will not see it (%s); the run goes on",
                    self.name,
                    exc,
                )
        self._last_write = time.monotonic()
        self.latest = status
        if self.on_status is not None:
            self.on_status(status)
        return status
