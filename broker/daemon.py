"""The broker daemon: serves many submitted studies at once from one Redis prefix.

Everything it knows lives in Redis and in the study storages, so a restarted broker picks up
where the last one stopped: submitted studies are in `<prefix>:studies`, commands wait in
`<prefix>:commands`, results wait in the `<prefix>:results` stream until acknowledged.

The keys it uses are `optuna_rq.protocol.keys.Keys`.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import optuna
import redis
from optuna.trial import TrialState
from rq import Worker

from optuna_rq.client import BrokerClient
from optuna_rq.connection import wait_for_redis
from optuna_rq.dispatch import Dispatcher, StudyRun, count_refusal
from optuna_rq.errors import (
    BrokerAlreadyRunningError,
    ConfigError,
    OptunaRQError,
    ProtocolError,
    RedisDataLostError,
)
from optuna_rq.metrics import BrokerMetrics
from optuna_rq.processes import exited
from optuna_rq.protocol import (
    Cancel,
    Change,
    Keys,
    Signer,
    StudySpec,
    StudyState,
    StudyStatus,
    Submit,
    decode_command,
)
from optuna_rq.studies import make_pruner, make_sampler, open_storage
from optuna_rq.verdict import FAIL_REASON_ATTR

__all__ = [
    "BrokerSettings",
    "Daemon",
    "fair_shares",
]

log = logging.getLogger("optuna_rq.broker")


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    prefix: str
    storage: str  # the default storage URL for studies that name none
    poll_s: float = 0.2
    lock_ttl_s: float = 10.0
    status_interval_s: float = 0.25
    workers_refresh_s: float = 1.0
    max_outage_backoff_s: float = 5.0


def _died_here(holder: str) -> bool:
    """True if the lock's `holder` ("host:pid since ...") ran on this host and is gone: its pid
    is not running, or is our own (a restarted container reuses pid 1)."""
    where = holder.split(" ", 1)[0]
    host, _, pid_text = where.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    return pid == os.getpid() or exited(pid)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- fair share ------------------------------------------------------------------------------------


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


# -- the daemon ------------------------------------------------------------------------------------


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
        self.identity = f"{socket.gethostname()}:{os.getpid()} since {_now()}"
        self.dispatcher = Dispatcher(
            connection,
            prefix=settings.prefix,
            queue=self.keys.queue,
            reply_to=self.keys.results,
            consumer="broker",  # fixed: a restarted broker reads its predecessor's pending results
            signer=self.signer,
            observer=metrics,
        )
        self.specs: dict[str, StudySpec] = {}
        self._storages: dict[str, optuna.storages.BaseStorage] = {}
        self._dirty: set[str] = set()
        self._last_status = 0.0
        self._last_workers = -math.inf
        self._live_workers = 0
        self._lock = connection.lock(
            self.keys.broker, timeout=settings.lock_ttl_s, blocking=False, thread_local=False
        )
        self._last_lock = 0.0
        self.epoch: bytes | None = None

    # lifecycle

    def acquire(self) -> None:
        """Become the prefix's broker, or raise naming the one that is. A lock left by a broker
        that died on this machine (its pid is gone, or is ours: a restarted container) is taken
        over at once rather than after its TTL."""
        if not self._lock.acquire(token=self.identity.encode()):
            holder = self.client.broker_holder() or "another broker"
            if not (_died_here(holder) and self._take_over(holder)):
                raise BrokerAlreadyRunningError(
                    f"a broker is already running on prefix {self.settings.prefix!r}: {holder}; "
                    "stop it first, or use another --prefix"
                )
        self._last_lock = time.monotonic()
        self.connection.set(self.keys.epoch, secrets.token_hex(8), nx=True)
        self.epoch = self.connection.get(self.keys.epoch)  # type: ignore[assignment]

    def _take_over(self, holder: str) -> bool:
        """Delete the dead broker's lock (only if it still names that broker) and take it."""
        deleted = self.connection.eval(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end "
            "return 0",
            1,
            self.keys.broker,
            holder,
        )
        if deleted and self._lock.acquire(token=self.identity.encode()):
            log.warning("took over the lock of a broker that died here: %s", holder)
            return True
        return False

    def release(self) -> None:
        try:
            self._lock.release()
        except redis.exceptions.LockError:
            pass

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
                    self._check_epoch()
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
        self._check_epoch()
        self._keep_lock(force=True)
        self.dispatcher.after_outage()

    def _check_epoch(self, current: Any = None, *, fetched: bool = False) -> None:
        """Raise RedisDataLostError unless Redis still holds our epoch (`current`, when the
        caller already `fetched` it in a pipeline)."""
        if not fetched:
            current = self.connection.get(self.keys.epoch)
        if current != self.epoch:
            raise RedisDataLostError(
                f"Redis lost its data: the key {self.keys.epoch!r} the broker set at start is "
                f"{'gone' if current is None else 'different'}. The server restarted without "
                "persistence, was flushed, or failed over to an empty replica. The broker stops "
                "rather than write on: submitted studies, queued trials and unread results are "
                "gone from Redis (trials told so far are safe in their storages). Turn on "
                "persistence (appendonly yes), then start the broker again and resubmit."
            )

    def _keep_lock(self, *, force: bool = False) -> None:
        """Renew the broker lock; take it again if it lapsed (an outage longer than its TTL)."""
        now = time.monotonic()
        if not force and now - self._last_lock <= self.settings.lock_ttl_s / 3:
            return
        try:
            renewed = self._lock.reacquire()
        except redis.exceptions.LockNotOwnedError:
            renewed = bool(self._lock.acquire(token=self.identity.encode()))
        if not renewed:
            holder = self.client.broker_holder() or "another broker"
            raise BrokerAlreadyRunningError(f"lost the broker lock: {holder} took over")
        self._last_lock = now

    def step(self) -> None:
        """One turn of the loop: check Redis kept its data, keep the lock, apply commands,
        refill, tell results."""
        pipe = self.connection.pipeline(transaction=False)
        pipe.get(self.keys.epoch)
        pipe.lrange(self.keys.commands, 0, 99)
        epoch, raw_commands = pipe.execute()
        self._check_epoch(epoch, fetched=True)
        now = time.monotonic()
        self._keep_lock()
        self._apply_commands(raw_commands)
        self._share_workers(now)
        self.dispatcher.refill()
        self._update_metrics(now)  # after refilling: the steady state, not a drained moment
        told = self.dispatcher.poll(self.settings.poll_s)
        if told:
            self._dirty.update(self.dispatcher.runs)
        if self._finish_done_runs():
            self._update_metrics(now, force=True)  # an ended study leaves the gauges at once
        self.publish_status()

    def _update_metrics(self, now: float, *, force: bool = False) -> None:
        if self.metrics is not None and (force or now - self._last_metrics >= 0.25):
            self.metrics.update(
                self.dispatcher.runs.values(),
                queue_depth=self.dispatcher.queue.count,
                live_workers=self._live_workers,
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
            )
            run.reattach()
        except (OptunaRQError, ValueError, optuna.exceptions.OptunaError) as exc:
            log.error("study %r cannot start: %s", spec.name, exc)
            self.specs[spec.name] = spec
            self._publish(spec, None, state=StudyState.FAILED, error=str(exc))
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
        self._dirty.add(spec.name)

    def _apply_commands(self, raw_commands: list[bytes]) -> None:
        if not raw_commands:
            return
        for raw in raw_commands:
            try:
                body = self.signer.open(raw, what="command")
                self._apply(decode_command(body, max_bytes=self.signer.max_message_bytes))
            except ProtocolError as exc:
                log.error("refused a command: %s", exc)
                count_refusal(self.connection, self.settings.prefix, "command")
            except (ConfigError, KeyError, TypeError) as exc:
                log.error("refused a command: %s", exc)
        # Commands are idempotent, so trimming after applying loses none if we die in between.
        self.connection.ltrim(self.keys.commands, len(raw_commands), -1)

    def _apply(self, command: Submit | Cancel | Change) -> None:
        match command:
            case Submit(spec=spec):
                if spec.name in self.dispatcher.runs:
                    changes = {"n_trials": spec.n_trials, "concurrency": spec.concurrency}
                    self._set(spec.name, {**changes, "priority": spec.priority})
                    return
                self.connection.hset(self.keys.studies, spec.name, spec.encode())
                self._start(spec)
            case Cancel(study=name):
                run = self.dispatcher.runs.pop(name, None)
                if run is not None:
                    self.dispatcher.cancel(run)
                    self._publish(self.specs[name], run, state=StudyState.CANCELLED)
                    log.info("cancelled study %r", name)
                elif name in self.specs or self.connection.hexists(self.keys.studies, name):
                    stored_spec: Any = self.connection.hget(self.keys.studies, name)
                    spec = self.specs.get(name) or StudySpec.decode(stored_spec or b"")
                    self._publish(spec, None, state=StudyState.CANCELLED)
            case Change(study=name):
                self._set(name, command.changes())

    def _set(self, name: str, changes: dict[str, Any]) -> None:
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
        self._dirty.add(name)

    def _share_workers(self, now: float) -> None:
        if now - self._last_workers >= self.settings.workers_refresh_s:
            self._live_workers = Worker.count(
                connection=self.connection, queue=self.dispatcher.queue
            )
            self._last_workers = now
        runs = self.dispatcher.runs
        demands = {n: (r.demand, self.specs[n].priority) for n, r in runs.items()}
        # Without any live worker, queue up to each cap: the first workers find work waiting.
        shares = fair_shares(demands, self._live_workers) if self._live_workers else {}
        for name, run in runs.items():
            run.slots = shares.get(name)

    def _finish_done_runs(self) -> bool:
        """End the studies that told their whole budget; True if any did."""
        finished = [name for name, run in self.dispatcher.runs.items() if run.done]
        for name in finished:
            run = self.dispatcher.runs.pop(name)
            self._publish(self.specs[name], run, state=StudyState.FINISHED)
            log.info("study %r finished: %d trials", name, run.told)
        return bool(finished)

    # status

    def publish_status(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_status < self.settings.status_interval_s:
            return
        self._last_status = now
        for name in list(self._dirty):
            run = self.dispatcher.runs.get(name)
            if run is not None:
                self._publish(self.specs[name], run, state=StudyState.RUNNING)
        self._dirty.clear()

    def _publish(
        self,
        spec: StudySpec,
        run: StudyRun | None,
        *,
        state: StudyState,
        error: str | None = None,
    ) -> None:
        summary = (
            {} if run is None else {**_study_summary(run.study), "running": len(run.outstanding)}
        )
        status = StudyStatus(
            name=spec.name,
            state=state,
            objective=spec.objective,
            directions=list(spec.directions),
            n_trials=spec.n_trials,
            concurrency=spec.concurrency,
            priority=spec.priority,
            storage=self._storage_url(spec),
            error=error,
            **summary,
        )
        self.connection.hset(self.keys.status, spec.name, status.to_json())


def _study_summary(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    by_state = {state: 0 for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    reasons: dict[str, int] = {}
    for trial in trials:
        if trial.state in by_state:
            by_state[trial.state] += 1
        if trial.state is TrialState.FAIL:
            reason = str(trial.user_attrs.get(FAIL_REASON_ATTR, "unknown"))
            reasons[reason] = reasons.get(reason, 0) + 1
    summary: dict[str, Any] = {
        "complete": by_state[TrialState.COMPLETE],
        "pruned": by_state[TrialState.PRUNED],
        "failed": by_state[TrialState.FAIL],
        "fail_reasons": reasons,
    }
    if not by_state[TrialState.COMPLETE]:
        return summary
    if len(study.directions) == 1:
        best = study.best_trial
        summary.update(best_value=best.value, best_params=best.params)
    else:  # the Pareto front
        summary["best_values"] = [t.values for t in study.best_trials]
        summary["best_params"] = [t.params for t in study.best_trials]
    return summary
