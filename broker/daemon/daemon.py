"""The Daemon: one broker process, serving every study submitted on its prefix.

It is the loop and nothing more: each turn it checks Redis kept its data, keeps the lock,
applies the commands (`inbox` -> `command_handlers`; bulk ones a slice a turn, `backlog`), shares
the workers (`fair_share`), drives the dispatcher (refill, poll), checks the stop conditions
(`stopping`), ends the studies that ended (`registry`) and publishes their status
(`status_publisher`). The studies themselves (specs, states, storages, start and end) are the
registry's.

What it does for one study runs under that study's fault guard (`dispatch.boundary`): a study's
fault ends that study FAILED at the end of the turn, and the loop goes on. What reaches the loop
is the process's: an outage (ridden out), a lost lock or a Redis that lost its data (the broker
stops).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
from redis.exceptions import OutOfMemoryError, ReadOnlyError

from optuna_rq.daemon.backlog import Backlog
from optuna_rq.daemon.broker_health import BrokerHealth
from optuna_rq.daemon.broker_metrics import BrokerMetrics
from optuna_rq.daemon.broker_settings import BrokerSettings
from optuna_rq.daemon.catch_up import CatchUp
from optuna_rq.daemon.command_handlers import Commands
from optuna_rq.daemon.enqueue import EnqueueSets
from optuna_rq.daemon.fair_share import FairShare
from optuna_rq.daemon.inbox import CommandInbox
from optuna_rq.daemon.ledger import CommandLedger
from optuna_rq.daemon.lock import BrokerLock, EpochGuard
from optuna_rq.daemon.registry import Registry
from optuna_rq.daemon.standby import Standby
from optuna_rq.daemon.status_publisher import StatusPublisher
from optuna_rq.daemon.stopping import StopConditions
from optuna_rq.dispatch import Dispatcher, OffLoopSampling
from optuna_rq.dispatch.boundary import Site
from optuna_rq.dispatch.publication import TrialPublication
from optuna_rq.errors import (
    BrokerAlreadyRunningError,
    ConfigError,
    RedisDataLostError,
    StudyStorageError,
)
from optuna_rq.plumbing.outages import UNREACHABLE, outage_of
from optuna_rq.plumbing.redis_waits import check_memory_policy, wait_for_redis
from optuna_rq.protocol import Enqueue, Keys, Signer, StudySpec
from optuna_rq.protocol.liveness import TurnBeacon, read_liveness, where
from optuna_rq.storage.continuity import not_resumable
from optuna_rq.storage.guarded_storages import Storages
from optuna_rq.storage.storage_policy import StoragePolicy

__all__ = ["Daemon"]

log = logging.getLogger("optuna_rq.broker")


class Daemon:
    """One broker process. `run()` serves until `stop` is set (SIGTERM/SIGINT in the CLI)."""

    def __init__(
        self,
        connection: redis.Redis,
        settings: BrokerSettings,
        signer: Signer | None = None,
        metrics: BrokerMetrics | None = None,
        health: BrokerHealth | None = None,
        off_loop: OffLoopSampling | None = None,
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.prefix)
        # Every write of this broker goes through the lock's fenced client (`daemon.fence`):
        # conditional on the lock and the epoch, so a broker that lost either writes nothing.
        self.lock = BrokerLock(connection, self.keys, ttl_s=settings.lock_ttl_s)
        connection = self.connection = self.lock.connection
        self.signer = signer or Signer()
        self.metrics = metrics
        self.health = health or BrokerHealth()  # what /healthz and /readyz report
        self._last_metrics = 0.0
        self.epoch_guard = EpochGuard(connection, self.keys, self.lock.fence)
        self.turns = TurnBeacon(connection, self.keys, identity=self.identity)  # for `wait`
        # Journal files are written by this daemon alone: their changes are buffered, and
        # flushed before anything that acknowledges one leaves (`storages.flush`), once the
        # fence holds (`lock.check`).
        # Only the storages its operator allows: the default and `--allow-storage` patterns.
        self.storages = Storages(
            policy=StoragePolicy(settings.storage, settings.allowed_storages),
            before_flush=self.lock.check,
        )
        # Every trial, as it is sent and as it ends, for `optuna-rq trials` on any machine.
        self.publication = TrialPublication(self.keys, self.signer)
        self.dispatcher = Dispatcher(
            connection,
            prefix=settings.prefix,
            reply_to=self.keys.results,
            consumer="broker",  # fixed: a restarted broker reads its predecessor's pending results
            signer=self.signer,
            observer=metrics,
            persist=self.storages.flush,
            off_loop=off_loop,
            wake=self.keys.wake,  # commands wake the loop there (`BrokerClient.send`)
            publication=self.publication,
        )
        self.boundary = self.dispatcher.boundary
        self.fair_share = FairShare(
            connection,
            self.keys,
            self.signer,
            self.dispatcher.sender.queue_name,
            refresh_s=settings.workers_refresh_s,
        )
        self.stopping = StopConditions()  # --timeout, --target, --patience
        self.registry = Registry(
            connection,
            settings,
            dispatcher=self.dispatcher,
            status=StatusPublisher(
                connection,
                self.keys,
                interval_s=settings.status_interval_s,
                storage_url=lambda spec: spec.storage_url(settings.storage),
                boundary=self.boundary,
                signer=self.signer,
                persist=self.storages.flush,
                stopped=self.stopping.reason,
                trials=self.publication,
            ),
            storages=self.storages,
            stopping=self.stopping,
            signer=self.signer,
        )
        self.status = self.registry.status
        # Ended studies whose trials no broker published (an older one ran them).
        self.catch_up = CatchUp(
            connection,
            self.keys,
            self.signer,
            storages=self.storages,
            publication=self.publication,
            storage_url=self.registry.storage_url,
        )
        # Bulk commands, applied a slice a turn (`backlog`): the inbox moves them there.
        self.backlog = Backlog(
            connection,
            self.keys,
            signer=self.signer,
            persist=self.storages.flush,
            kinds={Enqueue: EnqueueSets(self.dispatcher.runs)},
        )
        # The commands applied, kept off Redis (whoever writes to Redis could delete them there),
        # so that each is applied once however often it is pushed.
        self.ledger = CommandLedger(
            settings.command_ledger,
            window_s=self.signer.max_age_s,
            skew_s=self.signer.max_skew_s,
        )
        self.inbox = CommandInbox(
            connection,
            self.keys,
            signer=self.signer,
            handler=Commands(self.registry),
            persist=self.storages.flush,
            backlog=self.backlog,
            ledger=self.ledger,
        )

    @property
    def identity(self) -> str:
        """This broker, as its lock names it: "host:pid since ..."."""
        return self.lock.identity

    @property
    def epoch(self) -> bytes | None:
        return self.epoch_guard.epoch

    @property
    def specs(self) -> dict[str, StudySpec]:
        """The spec of every study this broker started (the registry's)."""
        return self.registry.specs

    # lifecycle

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Become the prefix's broker, and learn the epoch. If another broker is: with
        `settings.standby`, wait until it stops and take over (False if `stop` is set first);
        else raise naming it."""
        if self.settings.standby:
            standby = Standby(
                self.lock,
                self.health,
                max_outage_backoff_s=self.settings.max_outage_backoff_s,
                not_resumable=lambda: not_resumable(
                    self.connection, self.keys, self.signer, self.settings.storage
                ),
            )
            if not standby.wait(stop or threading.Event()):
                return False
        else:
            self.lock.acquire()
        # The prefix's last broker, if not this one, lost its lock to it: a journal's lock it
        # holds (frozen in a turn) is released at once rather than after the journal's grace.
        try:
            previous = read_liveness(self.connection, self.keys).last_broker
        except redis.RedisError:  # an outage: the journal's grace stands
            previous = None
        if previous is not None and previous != self.identity:
            self.storages.superseded.add(where(previous))
        fence = self.lock.fence
        assert fence.epoch is not None and fence.generation is not None  # armed by acquiring
        self.storages.writer = (self.settings.prefix, fence.epoch.decode(), int(fence.generation))
        try:
            self.ledger.load()  # by the prefix's broker alone: what its predecessor applied
        except ConfigError:
            self.lock.release()
            raise
        if self.ledger.created and self.connection.hlen(self.keys.studies):
            log.warning(
                "the ledger of applied commands %s is new, yet prefix %r has studies: the "
                "commands an earlier broker applied in the last %.0f h could be replayed through "
                "Redis (keep the broker's state directory across restarts)",
                self.ledger.path,
                self.settings.prefix,
                self.ledger.window_s / 3600,
            )
        self.epoch_guard.establish()
        check_memory_policy(self.connection)  # warns if a full Redis would evict
        return True

    def release(self) -> None:
        self.lock.release()

    def run(self, stop: threading.Event) -> None:
        try:
            if not self.acquire(stop):  # stopped while standing by: nothing was served
                self.health.stopped("the broker stopped standing by")
                return
        except BrokerAlreadyRunningError as exc:
            self.health.stopped(str(exc))
            raise
        log.info("broker %s serving prefix %r", self.identity, self.settings.prefix)
        data_lost = fenced_out = False
        try:
            self._serve(stop)
        except BrokerAlreadyRunningError as exc:  # another broker took the lock meanwhile
            fenced_out = True  # nothing more is written, to Redis or to a storage
            self.health.stopped(str(exc))
            raise
        except RedisDataLostError:
            # Nothing more goes to this Redis; the storages learn that the trials it held are
            # lost, so none stays RUNNING with no broker left that knows of it.
            data_lost = True
            self.dispatcher.endings.fail_outstanding(
                "Redis lost its data while this trial ran (see the broker log); not retried"
            )
            raise
        finally:
            if self.health.is_serving:  # else its reason is logged already
                self.health.stopped("the broker stopped serving")
            outage = outage_of(self.connection)  # stopped while Redis is away: nothing is sent
            if not data_lost and not fenced_out and not outage.down:
                try:
                    self.dispatcher.flush()
                    self.publish_status(force=True)
                except StudyStorageError as exc:
                    log.error("%s", exc)
                except (BrokerAlreadyRunningError, RedisDataLostError) as exc:  # while stopping
                    log.error("%s", exc)
                    fenced_out = True
                except UNREACHABLE as exc:  # it went away as the broker stopped
                    outage.failed(exc)
            self.dispatcher.stop_sampling()
            if fenced_out:
                self.storages.discard()
            else:
                self.storages.close()  # what is recorded (the trials failed above too) is on disk
            if not data_lost and not fenced_out and outage.down:
                outage.stopping(
                    "the results it told stay unacknowledged in Redis (the next broker reads "
                    "them again; telling is idempotent), the studies' status unpublished, and "
                    f"the broker lock left to expire (within {self.settings.lock_ttl_s:g}s)"
                )
            elif not data_lost and not fenced_out:
                try:
                    self.release()
                except UNREACHABLE as exc:  # it went away as the broker stopped
                    outage.failed(exc)
                    outage.stopping("the broker lock is left to expire")
                log.info("broker stopped; running trials go on and are told by the next broker")

    def _serve(self, stop: threading.Event) -> None:
        """Take over the stored studies, then turn the loop until `stop`."""
        self.registry.reattach()
        self.registry.end_ended()  # those that faulted as they were taken over
        self.catch_up.add(self.registry.ended_at_start)
        self.health.serving()
        while not stop.is_set():
            self._survive(self._turn, stop)

    def _turn(self) -> None:
        with self.lock.connection.proving():  # the fence proven in a turn, its checks take
            self.step()
            # Whatever the turn changed and did not acknowledge yet (a trial asked ahead): a
            # journal holds Optuna's lock while it buffers, so other writers wait a turn at most.
            self.storages.flush()
        self.health.beat()  # a float write: the loop turned

    def _survive(self, work: Callable[[], None], stop: threading.Event) -> None:
        """Run `work`, riding out what is not fatal to the process: an outage of Redis, a study
        storage failing (its studies fail)."""
        try:
            work()
        except StudyStorageError as exc:  # a study storage's, not our Redis's
            self.registry.storage_failed(exc)
        except (redis.ConnectionError, redis.TimeoutError, OutOfMemoryError, ReadOnlyError) as exc:
            self._ride_out_outage(exc, stop)  # a full Redis: `wait_for_memory`
        except redis.ResponseError:  # NOGROUP, say: first ask if Redis lost its data
            self.epoch_guard.check_now()
            raise

    def _ride_out_outage(self, error: Exception, stop: threading.Event) -> None:
        """Wait for Redis with backoff, then carry on: running trials go on meanwhile, their
        results wait in the stream. Raises RedisDataLostError if Redis came back empty."""
        self.health.outage(error)
        waited = wait_for_redis(
            self.connection,
            error,
            stop=stop,
            max_backoff_s=self.settings.max_outage_backoff_s,
            beat=self.health.beat,  # waiting for Redis is alive: a restart would not help
        )
        if waited is None:
            return
        self.epoch_guard.check_now()
        self.lock.keep(force=True)
        self.dispatcher.after_outage()
        self.health.recovered()

    def step(self) -> None:
        """One turn of the loop: check Redis kept its data, keep the lock, apply commands,
        refill, tell results, end the studies that ended."""
        pipe = self.connection.pipeline(transaction=False)
        self.epoch_guard.fetch(pipe)
        self.lock.fetch(pipe)  # after the epoch: the two prove the fence for the turn
        self.inbox.fetch(pipe)
        epoch, holder, raw_commands = pipe.execute()
        self.epoch_guard.check(epoch)
        self.lock.proved(epoch, holder)
        now = time.monotonic()
        self.lock.keep()
        self.turns.beat()  # the front doors see a broker that stops turning (liveness.py)
        self.inbox.apply(raw_commands)
        self.registry.end_ended()  # a command that faulted its study
        runs = self.dispatcher.runs
        self._check_stop_conditions(told=False)  # a --timeout that passed: before any refill
        waiting = set()
        for name, share in self.fair_share.share(runs, self.specs, now).items():
            runs[name].grant(share.slots)
            if runs[name].note_workers(share.waiting_for_workers):
                waiting.add(name)
        if waiting:
            self.status.mark(*waiting)  # a study started or stopped waiting for workers
        self.backlog.drain(  # bulk commands, for up to its turn budget
            [name for name in runs if not self.boundary.faulted(name)],
            guard=lambda name: self.boundary.guard(name, Site.COMMAND),
        )
        if self.dispatcher.refill():
            self.status.mark(*runs)  # `running` changed, before any result
        self._update_metrics(now)  # after refilling: the steady state, not a drained moment
        # Slots the refill left unfilled (its sampling budget spent): read what arrived, then
        # refill again at once.
        behind = self.dispatcher.behind or self.backlog.pending
        told = self.dispatcher.poll(None if behind else self.settings.poll_s)
        if told:
            self.status.mark(*runs)
        self._check_stop_conditions(told=told > 0)
        if self.registry.end_ended():
            self._update_metrics(now, force=True)  # an ended study leaves the gauges at once
        self.publish_status()
        self.catch_up.step()  # an older ended study's trials, one a turn, after a start

    def _check_stop_conditions(self, *, told: bool) -> None:
        """Wind down the studies a stop condition holds for; their status says so at once."""
        stopped = self.stopping.check(
            self.dispatcher.runs,
            self.specs,
            told=told,
            wind_down=self.dispatcher.endings.wind_down,
            guard=lambda name: self.boundary.guard(name, Site.STOP),
        )
        self.status.mark(*stopped)

    def publish_status(self, *, force: bool = False) -> None:
        """Publish the running studies that changed, if the status interval passed (or `force`)."""
        self.status.publish_running(self.dispatcher.runs, self.specs, force=force)

    def _update_metrics(self, now: float, *, force: bool = False) -> None:
        if self.metrics is not None and (force or now - self._last_metrics >= 0.25):
            runs = self.dispatcher.runs.values()
            self.metrics.update(
                runs,
                queue_depth=self.dispatcher.sender.depth(runs),
                live_workers=self.fair_share.live_workers,
                guard=lambda name: self.boundary.guard(name, Site.METRICS),
            )
            self._last_metrics = now
