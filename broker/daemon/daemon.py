"""The Daemon: one broker process, serving every study submitted on its prefix.

It composes the broker lock and epoch guard (`lock`), the command inbox (`inbox`), fair share
(`fair_share`) and the status publisher (`status`) around one Dispatcher, and owns the studies
it serves: their specs, their storages, their start and end.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import optuna
import redis

from optuna_rq.client import BrokerClient
from optuna_rq.connection import wait_for_redis
from optuna_rq.daemon.fair_share import FairShare
from optuna_rq.daemon.inbox import CommandInbox
from optuna_rq.daemon.lock import BrokerLock, EpochGuard
from optuna_rq.daemon.settings import BrokerSettings
from optuna_rq.daemon.status import StatusPublisher
from optuna_rq.dispatch import Dispatcher, StudyRun
from optuna_rq.errors import ConfigError, OptunaRQError, ProtocolError, RedisDataLostError
from optuna_rq.metrics import BrokerMetrics
from optuna_rq.protocol import Keys, Signer, StudySpec, StudyState
from optuna_rq.studies import make_pruner, make_sampler, open_storage

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
    ) -> None:
        self.connection = connection
        self.signer = signer or Signer()
        self.metrics = metrics
        self._last_metrics = 0.0
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.client = BrokerClient(connection, settings.prefix, signer=self.signer)
        self.lock = BrokerLock(connection, self.keys, ttl_s=settings.lock_ttl_s, client=self.client)
        self.epoch_guard = EpochGuard(connection, self.keys)
        self.dispatcher = Dispatcher(
            connection,
            prefix=settings.prefix,
            reply_to=self.keys.results,
            consumer="broker",  # fixed: a restarted broker reads its predecessor's pending results
            signer=self.signer,
            observer=metrics,
        )
        self.inbox = CommandInbox(connection, self.keys, signer=self.signer, handler=self)
        self.fair_share = FairShare(
            connection,
            self.keys,
            self.signer,
            self.dispatcher.sender.queue_name,
            refresh_s=settings.workers_refresh_s,
        )
        self.status = StatusPublisher(
            connection,
            self.keys,
            interval_s=settings.status_interval_s,
            storage_url=self._storage_url,
        )
        self.specs: dict[str, StudySpec] = {}
        self._storages: dict[str, optuna.storages.BaseStorage] = {}

    @property
    def identity(self) -> str:
        """This broker, as its lock names it: "host:pid since ..."."""
        return self.lock.identity

    @property
    def epoch(self) -> bytes | None:
        return self.epoch_guard.epoch

    # lifecycle

    def acquire(self) -> None:
        """Become the prefix's broker (or raise naming the one that is), and learn the epoch."""
        self.lock.acquire()
        self.epoch_guard.establish()

    def release(self) -> None:
        self.lock.release()

    def run(self, stop: threading.Event) -> None:
        self.acquire()
        log.info("broker %s serving prefix %r", self.identity, self.settings.prefix)
        data_lost = False
        try:
            self._reattach()
            while not stop.is_set():
                try:
                    self.step()
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    self._ride_out_outage(exc, stop)
                except redis.ResponseError:  # NOGROUP, say: first ask if Redis lost its data
                    self.epoch_guard.check_now()
                    raise
        except RedisDataLostError:
            # Nothing more goes to this Redis; the storages learn that the trials it held are
            # lost, so none stays RUNNING with no broker left that knows of it.
            data_lost = True
            self.dispatcher.fail_outstanding(
                "Redis lost its data while this trial ran (see the broker log); not retried"
            )
            raise
        finally:
            if not data_lost:
                self.dispatcher.flush()
                self.publish_status(force=True)
                self.release()
                log.info("broker stopped; running trials go on and are told by the next broker")

    def _ride_out_outage(self, error: Exception, stop: threading.Event) -> None:
        """Wait for Redis with backoff, then carry on: running trials go on meanwhile, their
        results wait in the stream. Raises RedisDataLostError if Redis came back empty."""
        waited = wait_for_redis(
            self.connection, error, stop=stop, max_backoff_s=self.settings.max_outage_backoff_s
        )
        if waited is None:
            return
        self.epoch_guard.check_now()
        self.lock.keep(force=True)
        self.dispatcher.after_outage()

    def step(self) -> None:
        """One turn of the loop: check Redis kept its data, keep the lock, apply commands,
        refill, tell results."""
        pipe = self.connection.pipeline(transaction=False)
        self.epoch_guard.fetch(pipe)
        self.inbox.fetch(pipe)
        epoch, raw_commands = pipe.execute()
        self.epoch_guard.check(epoch)
        now = time.monotonic()
        self.lock.keep()
        self.inbox.apply(raw_commands)
        waiting = self.fair_share.share(self.dispatcher.runs, self.specs, now)
        if waiting:
            self.status.mark(*waiting)  # a study started or stopped waiting for workers
        self.dispatcher.refill()
        self._update_metrics(now)  # after refilling: the steady state, not a drained moment
        told = self.dispatcher.poll(self.settings.poll_s)
        if told:
            self.status.mark(*self.dispatcher.runs)
        if self._finish_done_runs():
            self._update_metrics(now, force=True)  # an ended study leaves the gauges at once
        self.publish_status()

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
            )
            self._last_metrics = now

    # studies

    def _reattach(self) -> None:
        stored: dict[bytes, bytes] = self.connection.hgetall(self.keys.studies)  # type: ignore[assignment]
        for name, raw in stored.items():
            try:
                spec = StudySpec.decode(raw)
            except ProtocolError as exc:
                log.error("ignoring stored study %r: %s", name, exc)
                continue
            status = self.client.status(spec.name)
            if status is not None and status.state.ended:
                continue
            self._start(spec, resumed=True)

    def _storage_url(self, spec: StudySpec) -> str:
        return spec.storage or self.settings.storage

    def _storage(self, url: str) -> optuna.storages.BaseStorage:
        if url not in self._storages:
            self._storages[url] = open_storage(url)
        return self._storages[url]

    def _start(self, spec: StudySpec, *, resumed: bool = False) -> None:
        url = self._storage_url(spec)
        try:
            study = optuna.create_study(
                storage=self._storage(url),
                study_name=spec.name,
                directions=spec.directions,  # type: ignore[arg-type]  # checked by StudySpec
                sampler=make_sampler(spec.sampler, spec.seed),
                pruner=make_pruner(spec.pruner),
                load_if_exists=True,
            )
            if [d.name.lower() for d in study.directions] != spec.directions:
                raise ConfigError(
                    f"study {spec.name!r} exists with directions "
                    f"{[d.name.lower() for d in study.directions]}, not {spec.directions}"
                )
            run = StudyRun(
                study=study,
                objective=spec.objective,
                inputs=spec.inputs,
                concurrency=spec.concurrency,
                n_trials=spec.n_trials,
                trial_timeout_s=spec.trial_timeout_s,
                max_retries=spec.max_retries,
                queue=spec.queue,
            )
            run.reattach()
        except (OptunaRQError, ValueError, optuna.exceptions.OptunaError) as exc:
            log.error("study %r cannot start: %s", spec.name, exc)
            self.specs[spec.name] = spec
            self.status.publish(spec, None, state=StudyState.FAILED, error=str(exc))
            return
        self.specs[spec.name] = spec
        self.dispatcher.add(run)
        log.info(
            "%s study %r: %s, %d of %d trials done, cap %d",
            "resumed" if resumed else "started",
            spec.name,
            spec.objective,
            run.asked - len(run.outstanding),
            spec.n_trials,
            spec.concurrency,
        )
        self.status.mark(spec.name)

    def _finish_done_runs(self) -> bool:
        """End the studies that told their whole budget; True if any did."""
        finished = [name for name, run in self.dispatcher.runs.items() if run.done]
        for name in finished:
            run = self.dispatcher.runs.pop(name)
            self.status.publish(self.specs[name], run, state=StudyState.FINISHED)
            log.info("study %r finished: %d trials", name, run.told)
        return bool(finished)

    # commands (the inbox's CommandHandler)

    def on_submit(self, spec: StudySpec) -> None:
        """Start the study, or, if it runs already, take the new budget, cap and priority."""
        if spec.name in self.dispatcher.runs:
            changes = {"n_trials": spec.n_trials, "concurrency": spec.concurrency}
            self.on_change(spec.name, {**changes, "priority": spec.priority})
            return
        self.connection.hset(self.keys.studies, spec.name, spec.encode())
        self._start(spec)

    def on_cancel(self, name: str) -> None:
        """End the study CANCELLED: its queued and running trials fail (cancelled)."""
        run = self.dispatcher.runs.pop(name, None)
        if run is not None:
            self.dispatcher.cancel(run)
            self.status.publish(self.specs[name], run, state=StudyState.CANCELLED)
            log.info("cancelled study %r", name)
        elif name in self.specs or self.connection.hexists(self.keys.studies, name):
            stored_spec: Any = self.connection.hget(self.keys.studies, name)
            spec = self.specs.get(name) or StudySpec.decode(stored_spec or b"")
            self.status.publish(spec, None, state=StudyState.CANCELLED)

    def on_change(self, name: str, changes: dict[str, Any]) -> None:
        """Apply `changes` to the study's spec (stored too) and to its run, if it runs."""
        spec = self.specs.get(name)
        if spec is None:
            raise ConfigError(f"no study {name!r} to change")
        spec = spec.with_changes(**changes)
        self.specs[name] = spec
        self.connection.hset(self.keys.studies, name, spec.encode())
        run = self.dispatcher.runs.get(name)
        if run is not None:
            run.concurrency = spec.concurrency
            run.n_trials = max(spec.n_trials, run.asked)
        log.info("study %r changed: %s", name, changes)
        self.status.mark(name)
