"""Start, supervise and stop N worker processes that serve trials from their RQ queues.

Each process runs an RQ worker that refuses any job but ours (`workers.rq_worker`), in the
isolation mode the settings choose: trials in the worker process itself, or a fork per trial. It
listens to one queue per resource class (`--queue`, in priority order) and served module
(`Keys.trial_queue`), so it only ever takes trials it serves. With `--gpus`, child i gets device
set i in CUDA_VISIBLE_DEVICES (`workers.gpus`), across restarts. The parent keeps the pool's
heartbeat (`workers.pool_heartbeat`), and with `--autoscale` grows and shrinks the pool
(`workers.autoscale`).

The parent imports the served modules first, so a typo stops the command at once, then keeps N
children alive (`workers.worker_process`, each spawned with the pool's `WorkerSettings`), and
supervises their trials (`workers.supervision`): it renews their leases, kills a trial past its
timeout, and reports the trial of a process that died. A child that dies is restarted, with a
growing backoff if it keeps dying (Redis down, say), so nothing spins.

With `--max-trials-per-child N` (Celery's --max-tasks-per-child), a child leaves after its Nth
trial and is replaced at once by a fresh process, which imports the objectives again: how an
edited objective is picked up, and how memory an objective leaks is given back.

The first SIGTERM or Ctrl-C (SIGINT) is a warm shutdown, passed on once: each child finishes its
running trial (its lease still renewed), then exits; an idle child exits at once. The pool says
what the next one does: a second SIGTERM or Ctrl-C is a cold shutdown, which kills the children
at once; their trials are reported lost, naming the signal, and the broker retries them. A child
told to stop that runs no trial and is still there `STUCK_AFTER_S` later is stuck (an idle RQ
worker leaves at once): its threads' stacks go to the log (`faulthandler`, on SIGUSR1), then it
is killed, so a warm stop always ends.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from types import FrameType
from typing import Any

import redis

from optuna_rq.plumbing import failpoints
from optuna_rq.plumbing.connection import connect
from optuna_rq.plumbing.outages import UNREACHABLE, outage_of
from optuna_rq.protocol import Keys
from optuna_rq.workers import loader
from optuna_rq.workers.autoscale import Autoscaler
from optuna_rq.workers.child_messages import ChildMessage, Retiring
from optuna_rq.workers.pool_children import Child, forget_rq_worker, signal_group
from optuna_rq.workers.pool_health import PoolLiveness
from optuna_rq.workers.pool_heartbeat import Heartbeat
from optuna_rq.workers.pool_settings import STUCK_AFTER_S, WorkerSettings
from optuna_rq.workers.supervision import Supervisor
from optuna_rq.workers.worker_process import DUMP_SIGNAL, child_main, put_on_path

__all__ = ["STUCK_AFTER_S", "WorkerPool", "WorkerSettings"]

log = logging.getLogger("optuna_rq.pool")

_DUMP_TIME_S = 0.5  # for a stuck child to write its stacks before it is killed


class WorkerPool:
    """N supervised worker processes. `run()` blocks until stopped by signals or `stop()`."""

    # A child that lived this long before dying is restarted at once; one that dies sooner is
    # restarted after a backoff that doubles each time (to max_restart_backoff_s).
    HEALTHY_AFTER_S = 30.0

    def __init__(self, settings: WorkerSettings, liveness: PoolLiveness | None = None) -> None:
        self.settings = settings
        # Beaten at every turn of the loop; `--health-port` serves it (`workers.pool_health`).
        self.liveness = liveness or PoolLiveness()
        self._context = multiprocessing.get_context("spawn")
        self._children: dict[int, Child] = {}
        self._restart_at: dict[int, float] = {}
        self._backoff: dict[int, float] = {}
        self._retiring: set[int] = set()  # told to stop by the autoscaler: not restarted
        self._idle_since: dict[int, float] = {}  # children not running a trial, since when
        self._generation = 0
        self._stopping: str | None = None  # what started the warm shutdown ("Ctrl-C")
        self._cold: str | None = None  # why the cold shutdown ("a second Ctrl-C")
        self._signer = settings.signer()
        # The parent sends nothing that blocks, so it waits for no reply longer than half a
        # lease TTL: a Redis that stopped answering (frozen, a lost peer) is an outage it rides
        # out and a stop it can act on, not a read that never returns.
        self._connection = connect(
            settings.redis_url,
            password=settings.redis_password,
            socket_timeout_s=max(1.0, settings.lease_ttl_s / 2),
        )
        keys = Keys(settings.prefix)
        self.supervisor = Supervisor(
            self._connection, self._signer, settings.lease_ttl_s, keys=keys
        )
        self.heartbeat = Heartbeat(
            self._connection,
            keys,
            self._signer,
            queues=settings.rq_queues,
            ttl_s=settings.lease_ttl_s,
        )
        self.autoscaler = (
            None
            if settings.autoscale is None
            else Autoscaler(
                self._connection,
                keys,
                self._signer,
                pool_id=self.heartbeat.pool_id,
                queues=settings.rq_queues,
                minimum=settings.autoscale[0],
                maximum=settings.autoscale[1],
                scale_down_after_s=settings.scale_down_after_s,
            )
        )

    @property
    def _scaling(self) -> bool:
        """An autoscaled pool runs on with no children (MIN 0) until it is stopped."""
        return self.autoscaler is not None and not self._stopping

    @property
    def size(self) -> int:
        """Worker processes running or due to restart, not counting those retiring."""
        return len((set(self._children) | set(self._restart_at)) - self._retiring)

    def start(self) -> None:
        put_on_path(self.settings.paths)
        loader.serve(self.settings.modules)  # fail here, in the command, not in N children
        if self._stopping:  # stopped while importing: nothing was started, nothing to stop
            return
        first = self.settings.count if self.autoscaler is None else self.autoscaler.minimum
        for index in range(first):
            self._start_child(index)
        log.info("listening to %s", ", ".join(self.settings.rq_queues))

    def _start_child(self, index: int) -> None:
        if self._stopping:  # a child started now would never be told to stop
            return
        self._generation += 1
        name = f"{socket.gethostname()}.{os.getpid()}.{index}.{self._generation}"
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=child_main,
            args=(self.settings, index, name, writer),
            name=f"optuna-rq-worker-{index}",
        )
        process.start()
        writer.close()  # the child holds the only writing end: EOF when it dies
        child = self._children[index] = Child(process, reader, name, time.monotonic())
        self._idle_since[index] = time.monotonic()
        gpus = "" if self.settings.gpus is None else f", GPUs {self.settings.gpus[index]}"
        log.info("worker %d started (pid %s%s)", index, process.pid, gpus)
        if self._stopping:  # the stop came while it was being spawned, and missed it
            self._tell_to_stop(child)

    def stop(self, signum: int | None = None) -> None:
        """First call: a warm shutdown, each child finishes its running trial, then exits.
        Second call: a cold shutdown, the children are killed now and their trials reported
        lost. `signum`: the signal that asked for it, named in what the pool logs."""
        what = _signal_words(signum)
        if self._stopping:
            if not self._cold:
                self._cold = f"a second {what}" if what == self._stopping else what
                log.warning(
                    "%s: cold shutdown, killing %s now; the broker retries their trials",
                    self._cold,
                    _workers(len(self._children)),
                )
                for child in self._children.values():
                    signal_group(child.process, signal.SIGKILL)
            return
        self._stopping = what
        self.supervisor.stopping.set()
        self._restart_at.clear()
        busy = len(self.supervisor.running)
        count = len(self._children)
        if not count:
            which = "no worker started yet"
        elif not busy:
            which = f"{_workers(count)} idle, stopping now"
        elif busy == 1:
            which = f"{_workers(count)} stopping, 1 once its running trial ends"
        else:
            which = f"{_workers(count)} stopping, {busy} once their running trials end"
        again = "press Ctrl-C again" if signum == signal.SIGINT else "a second SIGTERM or Ctrl-C"
        log.info(
            "%s: warm shutdown, %s; %s for a cold shutdown (kills them now; the broker retries "
            "their trials)",
            what,
            which,
            again,
        )
        for child in self._children.values():
            self._tell_to_stop(child)

    def _tell_to_stop(self, child: Child) -> None:
        """SIGTERM: the child finishes its running trial, then exits (RQ's warm shutdown)."""
        child.told_to_stop = time.monotonic()
        signal_group(child.process, signal.SIGTERM, group=False)

    def _kill_stuck(self, now: float) -> None:
        """Kill the children told to stop that run no trial and are still there after
        `stuck_after_s`, their stacks logged first."""
        for index, child in self._children.items():
            if child.told_to_stop is None or index in self.supervisor.running:
                continue
            if child.dumped_at is not None:
                if now - child.dumped_at >= _DUMP_TIME_S:
                    signal_group(child.process, signal.SIGKILL)
            elif now - child.told_to_stop >= self.settings.stuck_after_s:
                log.warning(
                    "worker %d (pid %s) runs no trial and is still up %gs after it was told to "
                    "stop: stuck; its threads' stacks follow, then it is killed",
                    index,
                    child.process.pid,
                    self.settings.stuck_after_s,
                )
                child.dumped_at = now
                signal_group(child.process, DUMP_SIGNAL, group=False)

    def run(self) -> int:
        """Start the children and supervise them until stopped; returns an exit code (0 after a
        warm stop, 1 after a cold one)."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop(signum)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while self._children or self._restart_at or self._scaling:
                self._supervise_once()
                failpoints.hit("pool_turn")  # the fault tests' stuck loop
                self.liveness.beat()
            log.info("all workers stopped")
            return 1 if self._cold else 0
        finally:
            if not self.heartbeat.stop() and outage_of(self._connection).down:
                outage_of(self._connection).stopping(
                    "the pool's heartbeat is left to expire on its own (within its lease TTL, "
                    f"{self.settings.lease_ttl_s:g}s)"
                )
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._connection.close()

    def _supervise_once(self) -> None:
        now = time.monotonic()
        timeout = min(self.supervisor.next_wakeup(now), self.heartbeat.next_wakeup(now), 1.0)
        if self._restart_at:
            timeout = min(timeout, max(0.0, min(self._restart_at.values()) - now))
        waitables: list[Any] = [c.process.sentinel for c in self._children.values()]
        waitables += [c.channel for c in self._children.values()]
        ready = set(multiprocessing.connection.wait(waitables, timeout=timeout))
        for index, child in list(self._children.items()):
            if child.channel in ready or child.process.sentinel in ready:
                self._read_messages(index, child)
            if not child.process.is_alive():
                self._child_died(index, child)
        now = time.monotonic()
        for index, due in list(self._restart_at.items()):
            if now >= due and not self._stopping:
                del self._restart_at[index]
                self._start_child(index)
        self.supervisor.tick(now, {i: c.process.pid or 0 for i, c in self._children.items()})
        for index in self._children:
            if index in self.supervisor.running:
                self._idle_since.pop(index, None)
            else:
                self._idle_since.setdefault(index, now)
        if not self._cold:
            self._kill_stuck(now)
        if self.heartbeat.next_wakeup(now) == 0 and not self._stopping:
            self._scale(now)
            self.heartbeat.beat(now, workers=self.size, busy=len(self.supervisor.running))

    def _scale(self, now: float) -> None:
        """Grow to the autoscaler's target at once; shrink by retiring idle children."""
        if self.autoscaler is None:
            return
        try:
            target = self.autoscaler.target()
        except UNREACHABLE as exc:
            outage_of(self._connection).failed(exc)  # the pool stays as it is meanwhile
            return
        except redis.RedisError as exc:
            log.debug("autoscale: cannot read the demand: %s", exc)
            return
        size = self.size
        if target > size:
            taken = set(self._children) | set(self._restart_at)
            free = [i for i in range(self.autoscaler.maximum) if i not in taken]
            for index in free[: target - size]:
                self._retiring.discard(index)
                self._start_child(index)
            log.info("autoscale: %d -> %d workers", size, self.size)
        elif target < size:
            idle = {
                i: since
                for i, since in self._idle_since.items()
                if i in self._children and i not in self._retiring
            }
            retire = self.autoscaler.to_retire(target, idle, size, now)
            for index in retire:
                self._retiring.add(index)
                self._tell_to_stop(self._children[index])
            if retire:
                log.info("autoscale: %d -> %d workers (retiring idle ones)", size, self.size)

    def _read_messages(self, index: int, child: Child) -> None:
        try:
            while child.channel.poll():
                message: ChildMessage = child.channel.recv()
                if isinstance(message, Retiring):
                    child.retired_after = message.trials
                else:
                    self.supervisor.receive(index, message)
        except (EOFError, OSError):
            pass  # the child is gone; its sentinel says so

    def _child_died(self, index: int, child: Child) -> None:
        child.process.join()
        self._read_messages(index, child)  # what it reported before dying
        child.channel.close()
        del self._children[index]
        code = child.process.exitcode
        self.supervisor.child_exited(index, code, cold=self._cold)
        forget_rq_worker(self._connection, child.name)
        self._idle_since.pop(index, None)
        if self._stopping or index in self._retiring:
            self._retiring.discard(index)
            log.info("worker %d (pid %s) stopped", index, child.process.pid)
            return
        if child.retired_after is not None and code == 0:
            log.info(
                "worker %d (pid %s) took its %d trials (--max-trials-per-child): replacing it",
                index,
                child.process.pid,
                child.retired_after,
            )
            self._start_child(index)
            return
        lived = time.monotonic() - child.started
        backoff = 0.0 if lived >= self.HEALTHY_AFTER_S else self._backoff.get(index, 0.0)
        self._backoff[index] = min(
            max(backoff * 2, self.settings.restart_backoff_s), self.settings.max_restart_backoff_s
        )
        log.warning(
            "worker %d (pid %s) exited with code %s; restarting it%s",
            index,
            child.process.pid,
            code,
            f" in {backoff:g}s" if backoff else "",
        )
        self._restart_at[index] = time.monotonic() + backoff


def _workers(count: int) -> str:
    return f"{count} worker{'' if count == 1 else 's'}"


def _signal_words(signum: int | None) -> str:
    """How the pool names what stopped it: `Ctrl-C` for SIGINT (a terminal's), the signal's name
    otherwise, `stop()` when called."""
    if signum is None:
        return "stop()"
    if signum == signal.SIGINT:
        return "Ctrl-C"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
