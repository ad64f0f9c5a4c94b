"""The broker's journal file: Optuna's journal format, replayed from memory, appended without
re-reading, made durable once per batch of changes.

Optuna's `JournalFileBackend` takes the file lock, re-reads what others appended and fsyncs its
own line on every operation, which costs far more than the operation itself. The broker writes
its studies far more than anyone else, so `BatchedJournal` loads the file once, serves
Optuna's replay from memory, and keeps what Optuna appends in a buffer until `flush()` writes it
in one append and one fdatasync. The daemon flushes before anything that acknowledges a change
leaves the broker (`guarded_storages.Storages.flush`): a crash loses only changes that nothing
has acknowledged yet.

The file stays Optuna's, and so does its protocol for many writers: JSON lines exactly as
`JournalFileBackend` writes them, under Optuna's own lock file (`JournalFileSymlinkLock`). So
optuna-dashboard, the `optuna` CLI and `JournalFileBackend` read it as it grows, and a notebook
or a second broker may write to it too. Replay order must be file order (Optuna numbers trials
by it), so the lock is taken with the first buffered change and held until the flush (one loop
turn at most: another writer waits that long), and what others appended is read in first, when
the lock is taken and whenever nothing is buffered. A file that changes under the lock (a writer
that ignores Optuna's lock, or a truncation) raises `JournalConflictError` rather than mixing
two writers' trial ids.

Because the broker holds the lock for a turn, not for one write, a broker killed in a turn
leaves it behind far more often than an Optuna writer would. So it takes the lock itself
(`JournalLock`: Optuna's symlink protocol, the same lock file) and records who holds it in a file
beside it: a lock whose holder is a process of this host that is gone is released at once
(Optuna's own writers wait out a grace period).

Written against Optuna's public `BaseJournalBackend` (`read_logs`, `append_logs`) and the
file protocol of its `JournalFileSymlinkLock` (`<journal>.lock`, a symlink to the journal).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from optuna.storages.journal import BaseJournalBackend

from optuna_rq.errors import JournalConflictError
from optuna_rq.plumbing.processes import is_process, started_at

__all__ = ["BatchedJournal", "JournalLock"]

log = logging.getLogger("optuna_rq.broker")

_sync = getattr(os, "fdatasync", os.fsync)  # an append's new size is data fdatasync keeps


class BatchedJournal(BaseJournalBackend):
    """The journal file at `path`, replayed from memory, written in batches.

    `append_logs` buffers (holding Optuna's lock from the first buffered change); `flush` makes
    the buffer durable and releases the lock; `close` releases the file (what is not flushed is
    dropped: call `flush` first).
    """

    def __init__(self, path: str | Path, *, superseded: Collection[str] = ()) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = JournalLock(self.path, superseded=superseded)  # what Optuna's writers take
        self._locked = False  # whether this journal holds Optuna's lock (while it buffers)
        self._mutex = threading.Lock()  # appends (Optuna's thread) against a flush
        self._fd: int | None = os.open(
            self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666
        )
        self._lines: list[bytes] = []  # every log line, in file order: ours and others'
        self._size = 0  # the bytes of the file `_lines` stand for
        self.others_read = 0  # lines other writers appended, read in since it was opened
        self._pending: list[bytes] = []
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # -- Optuna's BaseJournalBackend -----------------------------------------------------------

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        """The logs from `log_number_from` on, as JournalFileBackend reads them back: parsed from
        their JSON lines (a tuple written comes back a list, as it would from the file). What
        other writers appended comes first, when nothing is buffered."""
        with self._mutex:
            if not self._pending:
                self._read_others(self._check_open())
            lines = self._lines[log_number_from:]
        return (json.loads(line) for line in lines)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        """Buffer `logs` for the next `flush`; they are read back at once. Serialized now, as
        JournalFileBackend does, so a value JSON cannot carry fails this call, not the flush."""
        lines = [json.dumps(entry, separators=(",", ":")).encode("utf-8") for entry in logs]
        with self._mutex:
            fd = self._check_open()
            if not self._locked:
                self._lock.acquire()
                self._locked = True
                try:
                    self._read_others(fd)  # before ours, as they stand in the file
                except BaseException:
                    self._unlock()
                    raise
            self._lines += lines
            self._pending += lines

    # -- durability ------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Logs appended and not yet flushed."""
        return len(self._pending)

    def flush(self) -> int:
        """Write the buffered logs in one append and fdatasync them; how many. Nothing buffered:
        returns 0 at once, touching nothing. On an error nothing of the append stays in the file
        (it is cut back), the buffer and Optuna's lock are kept: close the journal."""
        with self._mutex:
            if not self._pending:
                return 0
            fd = self._check_open()
            pending = self._pending
            data = b"\n".join(pending) + b"\n"
            # Held since the first buffered change; kept on an error, so that nobody appends
            # between what this journal replayed and what it will write (closing releases it).
            assert self._locked
            size = os.fstat(fd).st_size
            if size != self._size:
                raise JournalConflictError(
                    f"journal {self.path} is {size} bytes, not the {self._size} this broker "
                    "read while it held Optuna's lock on it: another process wrote to it "
                    "without taking that lock (use Optuna's JournalFileBackend to write it)"
                )
            _write_all(fd, data, size)
            self._unlock()
            # Outside Optuna's lock: others may append meanwhile; ours is durable once this
            # returns, and nothing is acknowledged before.
            _sync(fd)
            self._size += len(data)
            self._pending = []
            return len(pending)

    def close(self) -> None:
        """Release the file and Optuna's lock. Idempotent."""
        with self._mutex:
            self._unlock()
            self._lock.close()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> int:
        if self._fd is None:
            raise ValueError(f"journal {self.path} is closed")
        return self._fd

    def _unlock(self) -> None:
        if self._locked:
            self._locked = False
            self._lock.release()

    def _read_others(self, fd: int) -> None:
        """Take in the whole lines other writers appended since `_size` (one fstat when there
        are none). A line still being written (no newline yet) waits for the next read."""
        size = os.fstat(fd).st_size
        if size == self._size:
            return
        if size < self._size:
            raise JournalConflictError(
                f"journal {self.path} shrank from {self._size} to {size} bytes under this broker"
            )
        data = os.pread(fd, size - self._size, self._size)
        end = data.rfind(b"\n") + 1
        lines = data[:end].split(b"\n")[:-1]
        self._lines += lines
        self.others_read += len(lines)
        self._size += end

    def _load(self) -> None:
        """The file's lines and the size they end at. A last line without its newline, found
        under Optuna's lock, is an append a crash cut short (never flushed, so never
        acknowledged): Optuna's readers skip it, and it is cut off here, so that the next
        append starts on a line of its own."""
        fd = self._check_open()
        self._lock.acquire()
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0)
            end = data.rfind(b"\n") + 1
            if end < len(data):
                log.warning(
                    "journal %s: cutting off a torn last line of %d bytes (a write interrupted "
                    "by a crash, never acknowledged)",
                    self.path,
                    len(data) - end,
                )
                os.ftruncate(fd, end)
            self._lines = data[:end].split(b"\n")[:-1]
            self._size = end
        finally:
            self._lock.release()


_HOLDER = ".holder,"  # host names and float reprs hold no comma


class JournalLock:
    """Optuna's lock on the journal at `path` (`JournalFileSymlinkLock`'s protocol: whoever
    creates the symlink `<path>.lock` holds it), taken so that a holder that died is known.

    Optuna's writers point the symlink at the journal; this lock points it at a file of its own,
    `<path>.lock.holder,<host>,<pid>,<start time>`, which exists while the journal is open (Optuna's
    waiters stat what the symlink points to). Waiting for the lock, a symlink naming a gone
    process of this host is released at once, and so is one naming a broker of `superseded`
    ("host:pid", looked up as it is waited on): a broker that lost its prefix's lock to this
    one, frozen with the journal's lock held, writes nothing more (its flush is fenced); any
    other (an Optuna writer's) after `grace_s` with no change to what it points to, as
    Optuna's own writers release it.
    """

    def __init__(
        self, path: Path, *, grace_s: float = 30.0, superseded: Collection[str] = ()
    ) -> None:
        self.lock_file = f"{path}.lock"
        self.grace_s = grace_s
        self.superseded = superseded
        started = started_at(os.getpid()) or 0.0
        self.holder = f"{self.lock_file}{_HOLDER}{socket.gethostname()},{os.getpid()},{started!r}"

    def acquire(self) -> None:
        if not os.path.exists(self.holder):
            open(self.holder, "w").close()  # what the symlink points to: it must exist
        sleep_s = 0.0005
        seen, unchanged_since = None, time.monotonic()
        while True:
            try:
                os.symlink(self.holder, self.lock_file)
                return
            except FileExistsError:
                pass
            try:
                target = os.readlink(self.lock_file)
                mtime = os.stat(self.lock_file).st_mtime
            except OSError:  # released meanwhile
                continue
            if _died_here(target, self.lock_file):
                log.warning("%s: releasing the lock of a process that died", self.lock_file)
                self._break(target)
                continue
            if _holder_of(target, self.lock_file) in self.superseded:
                log.warning(
                    "%s: releasing the lock of the broker this one took over from",
                    self.lock_file,
                )
                self._break(target)
                continue
            if (target, mtime) != seen:
                seen, unchanged_since = (target, mtime), time.monotonic()
            elif time.monotonic() - unchanged_since > self.grace_s:
                log.warning("%s: held %gs, no write: releasing it", self.lock_file, self.grace_s)
                self._break(target)
                continue
            time.sleep(sleep_s)
            sleep_s = min(sleep_s * 2, 0.05)  # held for a turn (milliseconds), not for long

    def release(self) -> None:
        self._break(self.holder)

    def close(self) -> None:
        """The journal closes: its holder file goes (after `release`)."""
        try:
            os.unlink(self.holder)
        except FileNotFoundError:
            pass

    def _break(self, target: str) -> None:
        """Remove the lock if it points to `target`, as Optuna's release removes it (renamed
        first: atomic). Taken by someone else meanwhile, it is put back."""
        renamed = f"{self.lock_file}{uuid.uuid4()}.rename"
        try:
            os.rename(self.lock_file, renamed)
        except FileNotFoundError:
            return
        try:
            if os.readlink(renamed) != target:
                try:
                    os.link(renamed, self.lock_file, follow_symlinks=False)
                except FileExistsError:
                    pass
            elif target != self.holder and target.startswith(f"{self.lock_file}{_HOLDER}"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)  # a dead holder's file goes with its lock
        finally:
            os.unlink(renamed)


def _holder_of(target: str, lock_file: str) -> str | None:
    """ "host:pid" of the lock's `target`, if it names one (as `JournalLock.holder` does)."""
    prefix = f"{lock_file}{_HOLDER}"
    if not target.startswith(prefix):
        return None
    host, _, rest = target[len(prefix) :].partition(",")
    return f"{host}:{rest.partition(',')[0]}"


def _died_here(target: str, lock_file: str) -> bool:
    """Whether the lock's `target` names (as `JournalLock.holder` does) a process of this host
    that is gone."""
    prefix = f"{lock_file}{_HOLDER}"
    if not target.startswith(prefix):
        return False  # an Optuna writer's: it points at the journal
    try:
        host, pid, started = target[len(prefix) :].split(",")
        return host == socket.gethostname() and not is_process(int(pid), float(started))
    except ValueError:
        return False


def _write_all(fd: int, data: bytes, size: int) -> None:
    """Append `data` to `fd` (opened O_APPEND, `size` bytes long), or leave it `size` bytes."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        raise
