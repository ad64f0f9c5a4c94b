"""Leases and deadlines: how a running trial is watched from outside the process running it.

While an attempt runs, its worker holds a lease: a Redis key (`Keys.lease`) that
expires unless renewed. The broker fails an attempt whose lease lapses without a result
(`worker_lost`), so a killed, frozen or cut-off worker costs one lease TTL, not RQ's minutes.

The lease is renewed by the pool's parent process, not by the process running the objective:
an objective stuck in C code holds the GIL, and a renewing thread beside it would stall too.
The child tells the parent, over a pipe, when an attempt starts and ends; the parent renews the
leases of its running children, stops renewing for a child that is stopped (SIGSTOP), kills a
child whose attempt runs past its deadline (`timeout`) or that the broker cancelled (its
`Keys.cancel` mark, read with each renewal: `cancelled`), and reports the attempt of a child that
died mid-trial (`worker_lost`) at once, without waiting for the lease to lapse. A killed child is
restarted by its pool, and serves on.

A cancel mark is acted on only if it is the broker's (`CancelMarks`): with signing on, its value
is sealed by the dispatcher that issued the attempt (`Record.CANCEL`, bound to the attempt's job
id), so a Redis writer without the key cannot kill a trial by setting the key.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import redis

from optuna_rq.errors import ProtocolError
from optuna_rq.plumbing.outages import UNREACHABLE, outage_of
from optuna_rq.plumbing.processes import exited, stopped
from optuna_rq.protocol import (
    AttemptId,
    FailReason,
    Keys,
    Outcome,
    Record,
    Signer,
    TrialRequest,
    TrialResult,
)
from optuna_rq.protocol.counters import count_refused
from optuna_rq.workers.delivery import deliver
from optuna_rq.workers.execute import trial_result

__all__ = [
    "TIMEOUT_GRACE_S",
    "Attempt",
    "CancelMarks",
    "ChildChannel",
    "ChildMessage",
    "Ended",
    "HorseExited",
    "LeaseThread",
    "Retiring",
    "Started",
    "Supervisor",
    "describe_exit",
    "die_with_parent",
]

log = logging.getLogger("optuna_rq.pool")

TIMEOUT_GRACE_S = 1.0
"""How long past its timeout a trial may run before its process is killed: time for RQ's own
alarm to stop Python code, which keeps the worker process alive."""


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One attempt a worker process is running, as its supervisor knows it."""

    job_id: str
    lease: str  # the lease key
    holder: str  # the lease's value: the worker that holds it
    pid: int
    started: float  # time.monotonic(): one clock for every process on the machine
    timeout_s: float | None
    study: str
    incarnation: str
    trial_number: int
    attempt: int
    reply_to: str
    token: str = ""  # the request's: the result the supervisor writes for it gives it back

    @classmethod
    def of(
        cls, request: TrialRequest, *, job_id: str, lease: str, holder: str, timeout_s: float | None
    ) -> Attempt:
        return cls(
            job_id=job_id,
            lease=lease,
            holder=holder,
            pid=os.getpid(),
            started=time.monotonic(),
            timeout_s=timeout_s,
            study=request.study,
            incarnation=request.incarnation,
            trial_number=request.trial_number,
            attempt=request.attempt,
            reply_to=request.reply_to,
            token=request.token,
        )

    @property
    def attempt_id(self) -> AttemptId:
        return AttemptId(
            reply_to=self.reply_to,
            study=self.study,
            incarnation=self.incarnation,
            trial_number=self.trial_number,
            attempt=self.attempt,
        )

    @property
    def cancel_mark(self) -> str:
        """The key the broker sets to cancel this attempt: read only through `CancelMarks`."""
        return Keys.cancel(self.attempt_id)

    @property
    def deadline(self) -> float | None:
        return None if self.timeout_s is None else self.started + self.timeout_s + TIMEOUT_GRACE_S

    def failed(self, reason: FailReason, error: str) -> TrialResult:
        """The result of this attempt, lost or killed: its process cannot report it."""
        return trial_result(
            self, Outcome.FAIL, worker=self.holder, started=self.started, reason=reason, error=error
        )

    def describe(self) -> str:
        return f"study {self.study!r} trial {self.trial_number} (attempt {self.attempt})"


class CancelMarks:
    """How a worker reads the cancel marks of one prefix's attempts: the one place a mark's value
    is judged. A mark holds if it is the broker's: with signing on, sealed as a cancel mark for
    the attempt's job id (`Record.CANCEL`); without signing, any value, as anyone may write one
    anyway. Any other value is not acted on: it is counted in `<prefix>:refused` as `cancel`
    (once per attempt and value: it stays there, read again at every renewal), and logged once
    per process."""

    _logged = False  # a refused mark was logged by this process

    def __init__(self, connection: redis.Redis, signer: Signer, keys: Keys) -> None:
        self.connection = connection
        self.signer = signer
        self.keys = keys
        self._counted: dict[str, bytes] = {}  # job id -> the refused value last counted

    def holds(self, attempt: Attempt, value: object) -> bool:
        """Whether `value`, read at `attempt.cancel_mark` (None: no mark), cancels it. A key
        Redis could not GET (a Redis writer made it a list) is a mark that is not the broker's:
        refused like a forged one, and the other attempts' renewals and marks go on."""
        if value is None:
            return False
        job_id = Keys.job_id(attempt.attempt_id)  # from the signed request, not from RQ
        try:
            if not isinstance(value, bytes):
                raise ProtocolError(f"the cancel mark of job {job_id!r} is not a string: {value}")
            self.signer.open(Record.CANCEL, value, bound_to=job_id)
        except ProtocolError as exc:
            seen = value if isinstance(value, bytes) else b"(not a string)"
            if self._counted.get(job_id) != seen:
                self._counted[job_id] = seen
                count_refused(self.connection, self.keys, "cancel")
            if not CancelMarks._logged:
                CancelMarks._logged = True
                log.warning(
                    "%s: not acting on its cancel mark, which is not the broker's (logged once; "
                    "counted in %s): %s",
                    attempt.describe(),
                    self.keys.refused,
                    exc,
                )
            return False
        return True

    def forget(self, attempt: Attempt) -> None:
        """`attempt` ended: nothing of its marks is kept."""
        self._counted.pop(Keys.job_id(attempt.attempt_id), None)


# What a child tells its supervising parent, over a multiprocessing Pipe (so: picklable values,
# defined at module level).


@dataclass(frozen=True)
class Started:
    """`attempt` started in the child, or in its work horse: renew its lease, watch its
    deadline."""

    attempt: Attempt


@dataclass(frozen=True)
class Ended:
    """The attempt of RQ job `job_id` ended, its result delivered: stop renewing its lease."""

    job_id: str


@dataclass(frozen=True)
class Retiring:
    """The child took its `--max-trials-per-child` (`trials`) and exits: replace it."""

    trials: int


@dataclass(frozen=True)
class HorseExited:
    """The child's forked work horse `pid` exited abnormally (`exitcode`, as multiprocessing
    gives it: negative for a signal); its worker reaped it and lives on."""

    pid: int
    exitcode: int


ChildMessage = Started | Ended | HorseExited | Retiring


class ChildChannel:
    """The child's end of the pipe to its supervising parent."""

    def __init__(self, writer: multiprocessing.connection.Connection) -> None:
        self._writer = writer

    def started(self, attempt: Attempt) -> None:
        self._writer.send(Started(attempt))

    def ended(self, attempt: Attempt) -> None:
        self._writer.send(Ended(attempt.job_id))

    def exited(self, pid: int, exitcode: int) -> None:
        """A forked work horse `pid` exited abnormally (its worker reaped it)."""
        self._writer.send(HorseExited(pid, exitcode))

    def retiring(self, trials: int) -> None:
        """This child took its last trial (`--max-trials-per-child`) and exits."""
        self._writer.send(Retiring(trials))


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
                outage_of(self._connection).failed(exc)  # said once per outage, not per renewal
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
        # said and left to its lease, rather than holding the stop until Redis is back.
        self.stopping = threading.Event()

    def receive(self, index: int, message: ChildMessage) -> None:
        """Take in what child `index` said. Stale news (the end of an attempt no longer running,
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
                # Its worker reaps it and says how it ended (HorseExited); if it does not say so
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
            outage_of(self.connection).failed(exc)  # said once per outage, not per renewal
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
