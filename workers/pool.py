"""Start, supervise and stop N worker processes that serve trials from their RQ queues.

Each process runs an RQ worker that refuses any job but ours (`workers.rq_worker`), in the
isolation mode the settings choose: trials in the worker process itself, or a fork per trial. It
listens to one queue per resource class (`--queue`, in priority order) and served module
(`Keys.trial_queue`), so it only ever takes trials it serves. With `--gpus`, child i gets device
set i in CUDA_VISIBLE_DEVICES (`workers.gpus`), across restarts. The parent keeps the pool's
heartbeat (`workers.heartbeat`), and with `--autoscale` grows and shrinks the pool
(`workers.autoscale`).

The parent imports the served modules first, so a typo stops the command at once, then keeps N
children alive, and supervises their trials (`workers.supervision`): it renews their leases,
kills a trial past its timeout, and reports the trial of a process that died. A child that dies
is restarted, with a growing backoff if it keeps dying (Redis down, say), so nothing spins.

The first SIGTERM/SIGINT is passed on once: each child finishes its running trial (its lease
still renewed), then exits. A second one kills the children at once; their trials are reported
lost, and the broker retries them. A child told to stop that runs no trial and is still there
`STUCK_AFTER_S` later is stuck (an idle RQ worker leaves at once): its threads' stacks go to the
log (`faulthandler`, on SIGUSR1), then it is killed, so a warm stop always ends.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import redis
from rq import Worker

from optuna_rq import failpoints
from optuna_rq.connection import DEFAULT_PREFIX, connect, wait_for_redis
from optuna_rq.errors import ConfigError
from optuna_rq.protocol import (
    DEFAULT_LEASE_TTL_S,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_QUEUE,
    Keys,
    MsgpackSerializer,
    Role,
    Signer,
    check_queue_name,
)
from optuna_rq.workers import context, loader
from optuna_rq.workers.autoscale import Autoscaler
from optuna_rq.workers.gpus import VISIBLE_DEVICES
from optuna_rq.workers.heartbeat import Heartbeat
from optuna_rq.workers.metrics import WorkerMetrics
from optuna_rq.workers.rq_worker import ISOLATION, new_worker
from optuna_rq.workers.supervision import ChildChannel, ChildMessage, Supervisor, die_with_parent

__all__ = ["WorkerPool", "WorkerSettings"]

log = logging.getLogger("optuna_rq.pool")

STUCK_AFTER_S = 10.0
"""How long a child told to stop may go on running no trial before it counts as stuck."""
_DUMP_TIME_S = 0.5  # for a stuck child to write its stacks before it is killed
DUMP_SIGNAL = signal.SIGUSR1
"""Makes a child write every thread's stack to stderr (`faulthandler`): what a stuck one was
doing."""

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """What a pool of workers serves and where it listens."""

    redis_url: str
    modules: tuple[str, ...]
    redis_password: str | None = field(default=None, repr=False)  # apart from the URL
    prefix: str = DEFAULT_PREFIX
    queues: tuple[str, ...] = (DEFAULT_QUEUE,)  # resource classes, in priority order
    count: int = 1  # with `autoscale`, the pool starts at its MIN instead
    paths: tuple[str, ...] = ()  # put first on sys.path (parent and children) before imports
    gpus: tuple[str, ...] | None = None  # child i's CUDA_VISIBLE_DEVICES: gpus[i]
    autoscale: tuple[int, int] | None = None  # (MIN, MAX) worker processes
    scale_down_after_s: float = 30.0  # an autoscaled pool retires workers idle this long
    log_level: str = "INFO"
    restart_backoff_s: float = 1.0
    secret: bytes | None = field(default=None, repr=False)  # a shared secret signs, when set
    key: str | None = field(default=None, repr=False)  # or the worker role key (KeyRing token)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    metrics_port: int | None = None  # worker i serves Prometheus metrics on metrics_port + i
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S
    max_restart_backoff_s: float = 10.0
    isolation: str = "process"  # or "fork": see ISOLATION
    stuck_after_s: float = STUCK_AFTER_S  # a child told to stop, running no trial: then killed

    def signer(self) -> Signer:
        """The signer of this pool and its children, as a worker."""
        return Signer.load(
            Role.WORKER,
            secret=self.secret,
            key=self.key,
            max_message_bytes=self.max_message_bytes,
        )

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION:
            raise ConfigError(f"--isolation {self.isolation!r}: choose {' or '.join(ISOLATION)}")
        if not self.queues:
            raise ConfigError("give at least one --queue")
        for queue in self.queues:
            check_queue_name(queue)
        if len(set(self.queues)) != len(self.queues):
            raise ConfigError(f"--queue names a queue twice: {list(self.queues)}")
        if self.gpus is not None and self.max_workers > len(self.gpus):
            raise ConfigError(
                f"{self.max_workers} worker processes but {len(self.gpus)} GPU device sets "
                f"({' '.join(self.gpus)}): each worker process gets its own; "
                "give fewer --count (or a lower --autoscale MAX), or more --gpus"
            )

    @property
    def max_workers(self) -> int:
        return self.count if self.autoscale is None else self.autoscale[1]

    @property
    def rq_queues(self) -> list[str]:
        """The RQ queues the workers listen to, first served first: every served module in the
        first resource class, then in the next."""
        keys = Keys(self.prefix)
        return [keys.trial_queue(m, q) for q in self.queues for m in self.modules]


def _put_on_path(paths: tuple[str, ...]) -> None:
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)


def _child_main(
    settings: WorkerSettings,
    index: int,
    name: str,
    channel: multiprocessing.connection.Connection,
) -> None:
    """One worker process: its own process group, so a terminal's Ctrl-C reaches only the parent,
    which then stops each child exactly once (a second signal would be RQ's cold shutdown), and
    so a timeout kills whatever the objective started too."""
    os.setpgid(0, 0)
    die_with_parent()
    faulthandler.register(DUMP_SIGNAL, all_threads=True)
    if settings.gpus is not None:  # before anything imports CUDA
        os.environ[VISIBLE_DEVICES] = settings.gpus[index]
    _put_on_path(settings.paths)
    logging.basicConfig(level=settings.log_level, format=_LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("rq").setLevel(logging.WARNING)  # one line per trial is ours to write
    served = loader.serve(settings.modules)
    metrics = (
        None if settings.metrics_port is None else WorkerMetrics(settings.metrics_port + index)
    )
    context.install(
        context.WorkerContext(
            served=served,
            signer=settings.signer(),
            channel=ChildChannel(channel),
            lease_ttl_s=settings.lease_ttl_s,
            metrics=metrics,
        )
    )
    connection = connect(settings.redis_url, password=settings.redis_password)
    _wait_for_redis(connection)
    worker = new_worker(settings.isolation, connection, settings.rq_queues, name=name)
    worker.work(logging_level="WARNING")
    failpoints.hit("worker_stopped")  # the fault tests' stuck child: out of RQ, not yet gone


def _wait_for_redis(connection: redis.Redis) -> None:
    """Block until Redis answers, backing off: a worker started during an outage waits for it
    instead of dying and being restarted in a loop."""
    try:
        connection.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        wait_for_redis(connection, exc, max_backoff_s=10.0)


@dataclass
class _Child:
    process: multiprocessing.process.BaseProcess
    channel: multiprocessing.connection.Connection  # the parent's reading end
    name: str
    started: float
    told_to_stop: float | None = None  # time.monotonic() of the SIGTERM that stops it
    dumped_at: float | None = None  # stuck: when it was asked for its stacks


class WorkerPool:
    """N supervised worker processes. `run()` blocks until stopped by signals or `stop()`."""

    # A child that lived this long before dying is restarted at once; one that dies sooner is
    # restarted after a backoff that doubles each time (to max_restart_backoff_s).
    HEALTHY_AFTER_S = 30.0

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._children: dict[int, _Child] = {}
        self._restart_at: dict[int, float] = {}
        self._backoff: dict[int, float] = {}
        self._retiring: set[int] = set()  # told to stop by the autoscaler: not restarted
        self._idle_since: dict[int, float] = {}  # children not running a trial, since when
        self._generation = 0
        self._stopping = False
        self._cold = False
        self._signer = settings.signer()
        self._connection = connect(settings.redis_url, password=settings.redis_password)
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
        _put_on_path(self.settings.paths)
        loader.serve(self.settings.modules)  # fail here, in the command, not in N children
        first = self.settings.count if self.autoscaler is None else self.autoscaler.minimum
        for index in range(first):
            self._start_child(index)
        log.info("listening to %s", ", ".join(self.settings.rq_queues))

    def _start_child(self, index: int) -> None:
        self._generation += 1
        name = f"{socket.gethostname()}.{os.getpid()}.{index}.{self._generation}"
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_child_main,
            args=(self.settings, index, name, writer),
            name=f"optuna-rq-worker-{index}",
        )
        process.start()
        writer.close()  # the child holds the only writing end: EOF when it dies
        self._children[index] = _Child(process, reader, name, time.monotonic())
        self._idle_since[index] = time.monotonic()
        gpus = "" if self.settings.gpus is None else f", GPUs {self.settings.gpus[index]}"
        log.info("worker %d started (pid %s%s)", index, process.pid, gpus)

    def stop(self, *_: object) -> None:
        """First call: each child finishes its running trial, then exits. Second call: kill the
        children now; their trials are reported lost."""
        if self._stopping:
            if not self._cold:
                self._cold = True
                log.warning("stopping now: killing %d workers", len(self._children))
                for child in self._children.values():
                    _signal_group(child.process, signal.SIGKILL)
            return
        self._stopping = True
        self._restart_at.clear()
        log.info("stopping %d workers after their running trials", len(self._children))
        for child in self._children.values():
            self._tell_to_stop(child)

    def _tell_to_stop(self, child: _Child) -> None:
        """SIGTERM: the child finishes its running trial, then exits (RQ's warm shutdown)."""
        child.told_to_stop = time.monotonic()
        _signal_group(child.process, signal.SIGTERM, group=False)

    def _kill_stuck(self, now: float) -> None:
        """Kill the children told to stop that run no trial and are still there after
        `stuck_after_s`, their stacks logged first."""
        for index, child in self._children.items():
            if child.told_to_stop is None or index in self.supervisor.running:
                continue
            if child.dumped_at is not None:
                if now - child.dumped_at >= _DUMP_TIME_S:
                    _signal_group(child.process, signal.SIGKILL)
            elif now - child.told_to_stop >= self.settings.stuck_after_s:
                log.warning(
                    "worker %d (pid %s) runs no trial and is still up %gs after it was told to "
                    "stop: stuck; its threads' stacks follow, then it is killed",
                    index,
                    child.process.pid,
                    self.settings.stuck_after_s,
                )
                child.dumped_at = now
                _signal_group(child.process, DUMP_SIGNAL, group=False)

    def run(self) -> int:
        """Start the children and supervise them until stopped; returns an exit code (0 after a
        warm stop, 1 after a cold one)."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while self._children or self._restart_at or self._scaling:
                self._supervise_once()
            log.info("all workers stopped")
            return 1 if self._cold else 0
        finally:
            self.heartbeat.stop()
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

    def _read_messages(self, index: int, child: _Child) -> None:
        try:
            while child.channel.poll():
                message: ChildMessage = child.channel.recv()
                self.supervisor.receive(index, message)
        except (EOFError, OSError):
            pass  # the child is gone; its sentinel says so

    def _child_died(self, index: int, child: _Child) -> None:
        child.process.join()
        self._read_messages(index, child)  # what it said before dying
        child.channel.close()
        del self._children[index]
        code = child.process.exitcode
        self.supervisor.child_exited(index, code, cold=self._cold)
        _forget_rq_worker(self._connection, child.name)
        self._idle_since.pop(index, None)
        if self._stopping or index in self._retiring:
            self._retiring.discard(index)
            log.info("worker %d (pid %s) stopped", index, child.process.pid)
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


def _signal_group(
    process: multiprocessing.process.BaseProcess, signum: int, *, group: bool = True
) -> None:
    """Signal a child (and, with `group`, everything in its process group)."""
    if process.pid is None or not process.is_alive():
        return
    try:
        if group:
            os.killpg(process.pid, signum)
        else:
            os.kill(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _forget_rq_worker(connection: redis.Redis, name: str) -> None:
    """Remove a dead child's RQ registration, so worker counts (and fair shares) see it gone
    now rather than when its heartbeat key expires."""
    try:
        worker = Worker.find_by_key(
            Worker.redis_worker_namespace_prefix + name,
            connection=connection,
            serializer=MsgpackSerializer,
        )
        if worker is not None:
            worker.register_death()  # type: ignore[no-untyped-call]
    except redis.RedisError as exc:
        log.debug("could not unregister RQ worker %s: %s", name, exc)
