"""The Daemon: one broker process, serving every study submitted on its prefix.

It composes the broker lock and epoch guard (`lock`), the command inbox (`inbox`), fair share
(`fair_share`) and the status publisher (`status`, which moves studies only as `lifecycle`
allows) around one Dispatcher, and owns the studies it serves: their specs, their storages, their
start and end.
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
from optuna_rq.daemon.admin import delete_study, enqueue_params
from optuna_rq.daemon.fair_share import FairShare
from optuna_rq.daemon.inbox import CommandInbox
from optuna_rq.daemon.lock import BrokerLock, EpochGuard
from optuna_rq.daemon.settings import BrokerSettings
from optuna_rq.daemon.status import StatusPublisher
from optuna_rq.daemon.stopping import StopConditions
from optuna_rq.daemon.storages import Storages
from optuna_rq.dispatch import Dispatcher, OffLoopSampling, StudyRun
from optuna_rq.errors import (
    BrokerAlreadyRunningError,
    ConfigError,
    ProtocolError,
    RedisDataLostError,
    StudyConflictError,
    StudyStorageError,
)
from optuna_rq.health import BrokerHealth
from optuna_rq.metrics import BrokerMetrics
from optuna_rq.protocol import Keys, Signer, StudySpec, StudyState
from optuna_rq.studies import journal_path, make_pruner, make_sampler

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
        self.client = BrokerClient(connection, settings.prefix, signer=self.signer)
        self.epoch_guard = EpochGuard(connection, self.keys, self.lock.fence)
        # Journal files are written by this daemon alone: their changes are buffered, and
        # flushed before anything that acknowledges one leaves (`storages.flush`), once the
        # fence holds (`lock.check`).
        self.storages = Storages(before_flush=self.lock.check)
        self.dispatcher = Dispatcher(
            connection,
            prefix=settings.prefix,
            reply_to=self.keys.results,
            consumer="broker",  # fixed: a restarted broker reads its predecessor's pending results
            signer=self.signer,
            observer=metrics,
            persist=self.storages.flush,
            off_loop=off_loop,
        )
        self.inbox = CommandInbox(
            connection, self.keys, signer=self.signer, handler=self, persist=self.storages.flush
        )
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
            persist=self.storages.flush,
        )
        self.specs: dict[str, StudySpec] = {}
        self.stopping = StopConditions()  # --timeout, --target, --patience

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
        try:
            self.acquire()
        except BrokerAlreadyRunningError as exc:
            self.health.stopped(str(exc))
            raise
        log.info("broker %s serving prefix %r", self.identity, self.settings.prefix)
        data_lost = fenced_out = False
        try:
            self._reattach()
            self.health.serving()
            while not stop.is_set():
                try:
                    self.step()
                    # Whatever the turn changed and did not acknowledge yet (a trial asked
                    # ahead): a journal holds Optuna's lock while it buffers, so other writers
                    # of the file wait one turn at most.
                    self.storages.flush()
                    self.health.beat()  # a float write: the loop turned
                except StudyStorageError as exc:  # a study storage's, not our Redis's
                    self._storage_failed(exc)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    self._ride_out_outage(exc, stop)
                except redis.ResponseError:  # NOGROUP, say: first ask if Redis lost its data
                    self.epoch_guard.check_now()
                    raise
        except BrokerAlreadyRunningError as exc:  # another broker took the lock meanwhile
            fenced_out = True  # nothing more is written, to Redis or to a storage
            self.health.stopped(str(exc))
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
            if self.health.is_serving:  # else its reason is said already
                self.health.stopped("the broker stopped serving")
            if not data_lost and not fenced_out:
                try:
                    self.dispatcher.flush()
                    self.publish_status(force=True)
                except StudyStorageError as exc:
                    log.error("%s", exc)
                except (BrokerAlreadyRunningError, RedisDataLostError) as exc:  # while stopping
                    log.error("%s", exc)
                    fenced_out = True
            self.dispatcher.stop_sampling()
            if fenced_out:
                self.storages.discard()
            else:
                self.storages.close()  # what is told (the trials failed above too) is on disk
            if not data_lost and not fenced_out:
                self.release()
                log.info("broker stopped; running trials go on and are told by the next broker")

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
        if self.dispatcher.refill():
            self.status.mark(*self.dispatcher.runs)  # `running` changed, before any result
        self._update_metrics(now)  # after refilling: the steady state, not a drained moment
        # Slots the refill left unfilled (its sampling budget spent): read what arrived, then
        # refill again at once.
        told = self.dispatcher.poll(None if self.dispatcher.behind else self.settings.poll_s)
        if told:
            self.status.mark(*self.dispatcher.runs)
        wind_down = self.dispatcher.wind_down
        self.stopping.check(self.dispatcher.runs, self.specs, told=told > 0, wind_down=wind_down)
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
            self.status.lifecycle.learn(spec.name, None if status is None else status.state)
            if status is not None and status.state.ended:
                continue
            self._start(spec, resumed=True)

    def _storage_url(self, spec: StudySpec) -> str:
        return spec.storage or self.settings.storage

    def _start(self, spec: StudySpec, *, resumed: bool = False) -> None:
        url = self._storage_url(spec)
        try:
            study = optuna.create_study(
                storage=self.storages.open(url),
                study_name=spec.name,
                directions=spec.directions,  # type: ignore[arg-type]  # checked by StudySpec
                sampler=make_sampler(
                    spec.sampler, spec.seed, constant_liar=spec.uses_constant_liar
                ),
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
                ask_ahead=spec.ask_ahead,
            )
            journal = journal_path(url)
            run.journal = None if journal is None else str(journal)
            run.reattach()
        except StudyStorageError as exc:
            self.specs[spec.name] = spec
            self._storage_failed(exc, starting=spec)
            return
        except Exception as exc:  # whatever a submission breaks, it breaks for itself alone
            log.error("study %r cannot start: %s", spec.name, exc)
            if self.status.lifecycle.state(spec.name) in (None, StudyState.QUEUED):
                self.specs[spec.name] = spec
                self.status.publish(spec, None, state=StudyState.FAILED, error=str(exc))
            else:  # an ended study keeps its result: only its status says the resubmission failed
                self.status.annotate(spec, f"resubmission failed: {exc}")
            return
        self.specs[spec.name] = spec
        self.dispatcher.add(run)
        self.stopping.watch(spec.name)
        log.info(
            "%s study %r: %s, %d of %d trials done, cap %d",
            "resumed" if resumed else "started",
            spec.name,
            spec.objective,
            run.asked - len(run.outstanding),
            spec.n_trials,
            spec.concurrency,
        )
        self.status.publish(spec, run, state=StudyState.RUNNING)  # now: `wait` sees it taken

    def _storage_failed(self, error: StudyStorageError, starting: StudySpec | None = None) -> None:
        """A study storage failed: every study on it (and `starting`, the one that found out)
        ends FAILED with the cause in its status; the others go on. Its trials still running
        cannot be told: they stay RUNNING in that storage, and their results are dropped."""
        self.storages.forget(error.url)
        failed = [starting] if starting is not None else []
        for name, run in list(self.dispatcher.runs.items()):
            spec = self.specs[name]
            if self._storage_url(spec) == error.url:
                self.dispatcher.abandon(run)
                failed.append(spec)
        for spec in failed:
            log.error("study %r failed: %s", spec.name, error)
            # Not flushed first: it says what failed, and acknowledges nothing on the others.
            self.status.publish(spec, None, state=StudyState.FAILED, error=str(error), flush=False)
        if not failed:  # a storage no running study uses any more
            log.error("%s", error)

    def _finish_done_runs(self) -> bool:
        """End the studies that told their whole budget (finished), and those whose trials
        cannot run (failed); True if any ended."""
        ended = [run for run in self.dispatcher.runs.values() if run.done or run.cannot_run]
        for run in ended:
            name = run.name
            self.dispatcher.remove(name)
            if run.cannot_run and not run.done:
                self.dispatcher.cancel(run, why=f"the study failed: {run.cannot_run}")
                self.status.publish(
                    self.specs[name], run, state=StudyState.FAILED, error=run.cannot_run
                )
                log.error("study %r failed: %s", name, run.cannot_run)
                continue
            stopped = self.stopping.reason(name)  # a stop condition held: named in the status
            self.status.publish(self.specs[name], run, state=StudyState.FINISHED, error=stopped)
            # run.asked: every trial of its budget, a resumed study's earlier ones included
            log.info("study %r finished: %d trials", name, run.asked)
        return bool(ended)

    # commands (the inbox's CommandHandler)

    def _known_spec(self, name: str) -> StudySpec | None:
        """The spec the study was last submitted with: held, or stored by an earlier broker."""
        if name in self.specs:
            return self.specs[name]
        raw: Any = self.connection.hget(self.keys.studies, name)
        if raw is None:
            return None
        try:
            return StudySpec.decode(raw)
        except ProtocolError as exc:
            log.error("replacing the unreadable stored spec of study %r: %s", name, exc)
            return None

    def _learn_state(self, name: str) -> StudyState | None:
        """The study's state, read from its published status if this broker does not know it."""
        if name not in self.dispatcher.runs:
            status = self.client.status(name)
            self.status.lifecycle.learn(name, None if status is None else status.state)
        return self.status.lifecycle.state(name)

    def on_submit(self, spec: StudySpec) -> None:
        """Start the study; or, if it exists with the same definition, take the new budget, cap,
        priority, timeout and retries, and run it on (an ended one too) to its new budget. A
        different definition under its name is refused (StudyConflictError), changing nothing."""
        known = self._known_spec(spec.name)
        differences = [] if known is None else known.differences(spec)
        if differences:
            raise StudyConflictError(
                f"study {spec.name!r} exists with another definition: "
                f"{'; '.join(differences)} (submit it under another --study-name)"
            )
        if spec.name in self.dispatcher.runs:
            self.on_change(spec.name, _resubmitted(spec))
            return
        self._learn_state(spec.name)
        self.connection.hset(self.keys.studies, spec.name, spec.encode())
        self._start(spec)

    def on_cancel(self, name: str) -> None:
        """End the study CANCELLED: its queued trials are withdrawn and its running ones stopped
        on their workers; all end FAIL (cancelled). An ended study is left as it is
        (StudyConflictError)."""
        run = self.dispatcher.remove(name)
        if run is not None:
            self.dispatcher.cancel(run)
            self.status.publish(self.specs[name], run, state=StudyState.CANCELLED)
            log.info("cancelled study %r", name)
            return
        spec = self._known_spec(name)
        if spec is None:
            raise ConfigError(f"no study {name!r} to cancel")
        state = self._learn_state(name)
        if state is not None and state.ended:
            raise StudyConflictError(f"study {name!r} is {state.value} already: not cancelled")
        self.status.publish(spec, None, state=StudyState.CANCELLED)

    def on_change(self, name: str, changes: dict[str, Any]) -> None:
        """Apply `changes` to a running study's spec (stored too) and to its run. An ended study
        is left as it is (StudyConflictError): resubmitting it runs it on."""
        spec = self.specs.get(name)
        if spec is None:
            raise ConfigError(f"no study {name!r} to change")
        run = self.dispatcher.runs.get(name)
        if run is None:
            state = self._learn_state(name)
            raise StudyConflictError(
                f"study {name!r} is {state.value if state else 'not running'}: not changed "
                "(resubmit it to run it on)"
            )
        spec = spec.with_changes(**changes)
        self.specs[name] = spec
        self.connection.hset(self.keys.studies, name, spec.encode())
        run.concurrency = spec.concurrency
        run.n_trials = max(spec.n_trials, run.asked)
        run.trial_timeout_s = spec.trial_timeout_s
        run.max_retries = spec.max_retries
        run.ask_ahead = spec.ask_ahead
        log.info("study %r changed: %s", name, changes)
        self.status.mark(name)

    def on_enqueue(self, name: str, param_sets: list[dict[str, Any]]) -> None:
        """Run these parameter sets next, each once (`daemon.admin.enqueue_params`)."""
        enqueue_params(self, name, param_sets)

    def on_delete(self, name: str, *, force: bool, purge: bool) -> None:
        """Forget the study (`daemon.admin.delete_study`)."""
        delete_study(self, name, force=force, purge=purge)


def _resubmitted(spec: StudySpec) -> dict[str, Any]:
    """What a resubmission of a running study changes: everything but its definition."""
    fields = ("n_trials", "concurrency", "priority", "trial_timeout_s", "max_retries", "ask_ahead")
    return {**{name: getattr(spec, name) for name in fields}, "submitted_at": spec.submitted_at}
