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
(`journal_lock.JournalLock`: Optuna's symlink protocol, the same lock file) and records who
holds it in a file beside it: a lock whose holder is a process of this host that is gone is
released at once (Optuna's own writers wait out a grace period).

A lock taken from a holder that may still live (a broker this one took over from, frozen in
its turn; any writer silent past the grace period) does not stop that holder: woken, it may be
past every check it makes and about to append. So whoever takes such a lock first revokes the
file (`_revoke`): it puts a copy of the file's whole lines in its place, under the lock, before
anything else is read or written. The old holder's descriptor still names the file it opened,
which is no longer the journal, so what it appends afterwards reaches no reader. Every
`BatchedJournal` reopens the path when it finds another file there (`_follow_path`).

Written against Optuna's public `BaseJournalBackend` (`read_logs`, `append_logs`) and the
file protocol of its `JournalFileSymlinkLock` (`<journal>.lock`, a symlink to the journal).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from optuna.storages.journal import BaseJournalBackend

from optuna_rq.errors import JournalConflictError
from optuna_rq.storage.journal_lock import JournalLock

__all__ = ["BatchedJournal"]

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
                revoke = self._lock.acquire()
                self._locked = True
                try:
                    if revoke:
                        self._revoke()
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
        fd = self._follow_path(fd)
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

    def _follow_path(self, fd: int) -> int:
        """The descriptor of the file at `path` now: `fd`, or, if the file was revoked (another
        file stands at the path), the new file's, opened in its place. The new file begins
        with every whole line of the old one, so what was read from `fd` stays valid; that its
        last line read stands where it did is checked (one read), so that a line read from
        the old file after it was copied (the old holder's, woken in between) fails loudly
        instead of shifting every line after it."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return fd  # removed under the journal: nothing to follow
        held = os.fstat(fd)
        if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return fd
        log.warning(
            "journal %s: another file took its place (revoked): reading that one", self.path
        )
        fresh = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        if self._lines:
            last = self._lines[-1] + b"\n"
            if os.pread(fresh, len(last), self._size - len(last)) != last:
                os.close(fresh)
                raise JournalConflictError(
                    f"journal {self.path} was replaced by a file that does not hold what this "
                    "broker read from it: close the journal and open it again"
                )
        self._fd = fresh
        os.close(fd)
        return fresh

    def _revoke(self) -> None:
        """Put a copy of the journal's whole lines in the place of the file at `path` (see the
        module): whoever held the lock before may still append to the file it opened, and
        nobody reads that file any more. Called holding the lock, before anything is read."""
        source = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            mode = os.fstat(source).st_mode & 0o7777
            data = _read_all(source)
        finally:
            os.close(source)
        data = data[: data.rfind(b"\n") + 1]  # a torn last line is the old holder's, unsent
        fresh = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.revoked")
        target = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            try:
                _write_all(target, data, 0)
                os.fsync(target)
            finally:
                os.close(target)
            os.replace(fresh, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fresh)
            raise
        _sync_directory(self.path.parent)
        log.warning(
            "journal %s: took the lock from a holder that may still be running: the file was "
            "replaced by a copy, so nothing it appends from now on reaches a reader",
            self.path,
        )

    def _load(self) -> None:
        """The file's lines and the size they end at. A last line without its newline, found
        under Optuna's lock, is an append a crash cut short (never flushed, so never
        acknowledged): Optuna's readers skip it, and it is cut off here, so that the next
        append starts on a line of its own."""
        fd = self._check_open()
        revoke = self._lock.acquire()
        try:
            if revoke:
                self._revoke()
            fd = self._follow_path(fd)
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


def _read_all(fd: int) -> bytes:
    chunks, at = [], 0
    while chunk := os.pread(fd, 1 << 20, at):
        chunks.append(chunk)
        at += len(chunk)
    return b"".join(chunks)


def _sync_directory(path: Path) -> None:
    """Make a rename in `path` durable (where the platform allows a directory to be synced)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
