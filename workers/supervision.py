"""Leases and deadlines: how a running trial is watched from outside the process running it.

While an attempt runs, its worker holds a lease: a Redis key (`Keys.lease`) that
expires unless renewed. The broker fails an attempt whose lease lapses without a result
(`worker_lost`), so a killed, frozen or cut-off worker costs one lease TTL, not RQ's minutes.

The lease is renewed by the pool's parent process, not by the process running the objective:
an objective stuck in C code holds the GIL, and a renewing thread beside it would stall too.
The child reports to the parent, over a pipe (`workers.child_messages`), when an attempt
(`workers.running_attempt`) starts and ends; the parent renews the leases of its running
children, stops renewing for a child that is stopped (SIGSTOP), kills a child whose attempt runs
past its deadline (`timeout`) or that the broker cancelled (its `Keys.cancel` mark, read with
each renewal and judged by `workers.cancel_marks`: `cancelled`), and reports the attempt of a
child that died mid-trial (`worker_lost`) at once, without waiting for the lease to lapse. A
killed child is restarted by its pool, and serves on.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading

import redis

from optuna_rq.plumbing.outages import UNREACHABLE, outage_of
from optuna_rq.plumbing.processes import exited, stopped
from optuna_rq.protocol import FailReason, Keys, Record, Signer
from optuna_rq.workers.cancel_marks import CancelMarks
from optuna_rq.workers.child_messages import ChildMessage, Ended, HorseExited, Started
from optuna_rq.workers.delivery import deliver
from optuna_rq.workers.running_attempt import Attempt

__all__ = ["LeaseThread", "Supervisor", "describe_exit", "die_with_parent"]

log = logging.getLogger("optuna_rq.pool")


class LeaseThread:
    """Renews one lease from a thread: for a worker run without a supervising parent (tests, or
    an RQ worker started by hand). It stalls while C code holds the GIL; the pool's parent does
    not."""

    def __init__(self, connection: redis.Redis, attempt: Attempt, ttl_s: float) -> None:
        self._connection = connection
        self._attempt = attempt
        self._ttl_ms = int(ttl_s * 1000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def __enter__(self) -> LeaseThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._ttl_ms / 4000):
            try:
                pipe = self._connection.pipeline(transaction=False)
                _renew_on(pipe, self._attempt, self._ttl_ms)
                _renewed(pipe.execute(raise_on_error=False))
            except UNREACHABLE as exc:
                outage_of(self._connection).failed(exc)  # logged once per outage, not per renewal
                continue
            except redis.RedisError as exc:
                log.warning("cannot renew the lease of %s: %s", self._attempt.describe(), exc)
                continue
            outage_of(self._connection).recovered()


class Supervisor:
    """The parent's view of its children's running attempts: renews their leases, kills the ones
    past their deadline, and reports the attempts of children that died."""

    def __init__(
        self, connection: redis.Redis, signer: Signer, lease_ttl_s: float, *, keys: Keys
    ) -> None:
        self.connection = connection
        self.signer = signer
        self.cancel_marks = CancelMarks(connection, signer, keys)
        self.ttl_ms = int(lease_ttl_s * 1000)
        self.renew_every_s = lease_ttl_s / 4
        self.running: dict[int, Attempt] = {}  # child index -> its attempt
        self.timed_out: set[int] = set()  # children killed for their deadline
        self.cancelled: set[int] = set()  # children killed because the broker cancelled
        self._gone_since: dict[int, float] = {}  # attempts whose process exited, unexplained
        self._next_renewal = 0.0
        self._renew_failing = False
        # Set when the pool stops: a lost attempt it cannot report while Redis is away is then
        # logged and left to its lease, rather than holding the stop until Redis is back.
        self.stopping = threading.Event()

    def receive(self, index: int, message: ChildMessage) -> None:
        """Take in what child `index` reported. Stale news (the end of an attempt no longer running,
        the exit of a process that is not running it) changes nothing."""
        current = self.running.get(index)
        match message:
            case Started(attempt):
                self.running[index] = attempt
                self.timed_out.discard(index)  # flags of an earlier attempt that ended anyway
                self.cancelled.discard(index)
            case Ended(job_id):
                if current is not None and current.job_id == job_id:
                    del self.running[index]
                    self.cancel_marks.forget(current)
            case HorseExited(pid, exitcode):
                if current is not None and current.pid == pid:
                    self._report(index, exitcode)

    def next_wakeup(self, now: float) -> float:
        """Seconds until something is due: a renewal or a deadline."""
        due = [self._next_renewal] if self.running else []
        due += [a.deadline for a in self.running.values() if a.deadline is not None]
        return max(0.0, min(due) - now) if due else 1.0

    def tick(self, now: float, children: dict[int, int]) -> None:
        """Renew due leases, kill the attempts past their deadline, and report the ones whose
        process died while its worker lives on (a forked work horse). `children` maps each child
        index to its pid: a child's own death is reported by `child_exited`, with its exit code.
        """
        for index, attempt in list(self.running.items()):
            if attempt.pid != children.get(index) and exited(attempt.pid):
                # Its worker reaps it and reports how it ended (HorseExited); if it does not do so
                # within a second, report it without the exit code.
                if now - self._gone_since.setdefault(index, now) >= 1.0:
                    self._report(index, None)
                continue
            deadline = attempt.deadline
            if deadline is not None and now >= deadline and index not in self.timed_out:
                log.warning(
                    "%s ran past its %gs timeout: killing its process %d",
                    attempt.describe(),
                    attempt.timeout_s,
                    attempt.pid,
                )
                self.timed_out.add(index)
                _kill_group(attempt.pid)  # it leads its own process group
        if self.running and now >= self._next_renewal:
            self._renew()
            self._next_renewal = now + self.renew_every_s

    def _renew(self) -> None:
        """Renew the leases of the running attempts, and stop the ones the broker cancelled."""
        pipe = self.connection.pipeline(transaction=False)
        renewed = []
        for index, attempt in self.running.items():
            if stopped(attempt.pid):  # a frozen worker must not hold on to its trial
                continue
            _renew_on(pipe, attempt, self.ttl_ms)
            pipe.get(attempt.cancel_mark)
            renewed.append(index)
        try:
            replies = pipe.execute(raise_on_error=False)
            for i in range(len(renewed)):
                _renewed(replies[3 * i : 3 * i + 2])
        except UNREACHABLE as exc:
            outage_of(self.connection).failed(exc)  # logged once per outage, not per renewal
            return
        except redis.RedisError as exc:
            if not self._renew_failing:
                log.warning("cannot renew trial leases (will keep trying): %s", exc)
            self._renew_failing = True
            return
        outage_of(self.connection).recovered()
        if self._renew_failing:
            log.info("renewing trial leases again")
        self._renew_failing = False
        for index, mark in zip(renewed, replies[2::3], strict=True):
            attempt = self.running[index]
            if (
                index not in self.cancelled
                and index not in self.timed_out
                and self.cancel_marks.holds(attempt, mark)
            ):
                log.warning(
                    "%s was cancelled: killing its process %d", attempt.describe(), attempt.pid
                )
                self.cancelled.add(index)
                _kill_group(attempt.pid)

    def child_exited(self, index: int, exitcode: int | None, *, cold: str | None = None) -> None:
        """Report the attempt a dead child was running, if any. `cold`: the pool killed it in a
        cold shutdown, for this reason ("a second Ctrl-C")."""
        self._report(index, exitcode, cold=cold)

    def _report(self, index: int, exitcode: int | None, *, cold: str | None = None) -> None:
        """FAIL `timeout` if we killed it for its deadline, `cancelled` if for the broker, else
        `worker_lost` (the broker retries it). Once per attempt: it leaves `running` here."""
        attempt = self.running.pop(index, None)
        timed_out = index in self.timed_out
        cancelled = index in self.cancelled
        self.timed_out.discard(index)
        self.cancelled.discard(index)
        self._gone_since.pop(index, None)
        if attempt is None:
            return
        self.cancel_marks.forget(attempt)
        if cancelled:
            result = attempt.failed(
                FailReason.CANCELLED,
                f"the study was cancelled; the worker process {attempt.pid} running the trial "
                "was killed",
            )
        elif timed_out:
            result = attempt.failed(
                FailReason.TIMEOUT,
                f"the trial ran past its {attempt.timeout_s:g}s timeout; "
                f"its worker process {attempt.pid} was killed",
            )
        else:
            how = (
                describe_exit(exitcode)
                if cold is None
                else f"was killed by its pool's cold shutdown ({cold})"
            )
            result = attempt.failed(
                FailReason.WORKER_LOST,
                f"the worker process {attempt.pid} running the trial {how}",
            )
        log.warning("%s: %s", attempt.describe(), result.error)
        delivered = deliver(
            self.connection,
            attempt.reply_to,
            self.signer.seal(Record.RESULT, result.encode()),
            attempt.lease,
            lease_ttl_s=self.ttl_ms / 1000,
            what=attempt.describe(),
            beat=self._renew,  # the other children's leases, while this result waits for room
            stop=self.stopping,
        )
        if not delivered:
            log.warning(
                "%s: NOT reported (Redis is unreachable and the pool is stopping); the broker "
                "finds its lease lapsed and runs the trial again",
                attempt.describe(),
            )


def _renew_on(pipe: redis.client.Pipeline, attempt: Attempt, ttl_ms: int) -> None:
    """Queue the renewal of `attempt`'s lease: SET, so that a lease that lapsed during an outage
    comes back, and PEXPIRE, which a full Redis still serves when it refuses the SET."""
    pipe.set(attempt.lease, attempt.holder, px=ttl_ms)
    pipe.pexpire(attempt.lease, ttl_ms)


def _renewed(replies: list[object]) -> None:
    """Raise what made a renewal fail (the replies of `_renew_on`, as `execute` gives them with
    `raise_on_error=False`), unless one of its two commands kept the lease."""
    set_reply, pexpire_reply = replies
    if isinstance(pexpire_reply, Exception):
        raise pexpire_reply
    if isinstance(set_reply, Exception) and not pexpire_reply:
        raise set_reply  # refused, and the lease is gone: it cannot come back until Redis can


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "died"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _kill_group(pgid: int) -> None:
    """SIGKILL a worker process and whatever it started (it leads its own process group)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:  # not a group leader after all: the process alone
        try:
            os.kill(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def die_with_parent(*, check_parent: bool = True) -> None:
    """Without its supervising parent nobody renews this worker's leases: every trial it ran
    would be retried elsewhere. So it dies with the parent: the kernel kills it on Linux (even
    inside C code); elsewhere a thread watches the parent and exits. A forked work horse passes
    `check_parent=False`: its parent is an RQ worker, not a multiprocessing parent."""
    parent = multiprocessing.parent_process() if check_parent else None
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) == 0:
            if parent is not None and not parent.is_alive():  # it died before we asked
                os._exit(1)
            return
    if parent is not None:

        def watch() -> None:
            multiprocessing.connection.wait([parent.sentinel])
            os._exit(1)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
