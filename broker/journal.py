"""The broker's journal file: Optuna's journal format, replayed from memory, appended without
re-reading, made durable once per batch of changes.

Optuna's `JournalFileBackend` serves any number of writers, so every operation takes the file
lock, re-reads what others appended and fsyncs its own line: about 2 ms per trial here, against
0.1 ms in memory. A broker is the only writer of its studies (it holds its prefix's lock, and
workers reach the studies only through it), so `SoleWriterJournal` loads the file once, serves
Optuna's replay from memory, and keeps what Optuna appends in a buffer until `flush()` writes it
in one append and one fdatasync. The daemon flushes before anything that acknowledges a change
leaves the broker (`daemon.storages.Storages.flush`): a crash loses only changes nobody was told.

The file stays Optuna's: JSON lines exactly as `JournalFileBackend` writes them, appended under
Optuna's own lock file (`JournalFileSymlinkLock`: a reader or writer that follows Optuna's
protocol stays safe), so optuna-dashboard, the `optuna` CLI and `JournalFileBackend` read it as
it grows. Two writers that do not re-read would give trials the same ids, so a second
`SoleWriterJournal` on the file (another broker: another prefix with the same state directory,
say) is refused by an exclusive flock held while the journal is open, and an append by a plain
Optuna writer is noticed at the next flush (the file is not the size it was left at); both
raise `JournalConflictError` rather than write on.

Written against Optuna's public `BaseJournalBackend` (`read_logs`, `append_logs`) and
`JournalFileSymlinkLock` only.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from optuna.storages.journal import BaseJournalBackend, JournalFileSymlinkLock

from optuna_rq.errors import JournalConflictError

__all__ = ["SoleWriterJournal"]

log = logging.getLogger("optuna_rq.broker")

_sync = getattr(os, "fdatasync", os.fsync)  # an append's new size is data fdatasync keeps


class SoleWriterJournal(BaseJournalBackend):
    """The journal file at `path`, for the one process that writes it.

    `append_logs` buffers; `flush` makes the buffer durable; `close` releases the file (what is
    not flushed is dropped: call `flush` first). JournalConflictError if another
    SoleWriterJournal holds the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = JournalFileSymlinkLock(str(self.path))  # what Optuna's writers take
        self._mutex = threading.Lock()  # appends (Optuna's thread) against a flush
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalConflictError(
                f"journal {self.path} is open in another broker, which writes it without "
                "re-reading: give each broker its own --storage (or --state-dir)"
            ) from None
        self._fd: int | None = fd
        try:
            self._lines, self._size = self._load(fd)
        except BaseException:
            self.close()
            raise
        self._pending: list[bytes] = []

    # -- Optuna's BaseJournalBackend -----------------------------------------------------------

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        """The logs from `log_number_from` on, as JournalFileBackend reads them back: parsed from
        their JSON lines (a tuple written comes back a list, as it would from the file)."""
        with self._mutex:
            lines = self._lines[log_number_from:]
        return (json.loads(line) for line in lines)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        """Buffer `logs` for the next `flush`; they are read back at once. Serialized now, as
        JournalFileBackend does, so a value JSON cannot carry fails this call, not the flush."""
        lines = [json.dumps(entry, separators=(",", ":")).encode("utf-8") for entry in logs]
        with self._mutex:
            self._check_open()
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
        (it is cut back) and the buffer is kept."""
        if not self._pending:
            return 0
        with self._mutex:
            fd = self._check_open()
            pending = self._pending
            data = b"\n".join(pending) + b"\n"
            with self._locked():
                size = os.fstat(fd).st_size
                if size != self._size:
                    raise JournalConflictError(
                        f"journal {self.path} is {size} bytes, not the {self._size} this broker "
                        "left it at: another process wrote to it. A broker is the only writer of "
                        "its journal; give other writers a storage of their own"
                    )
                _write_all(fd, data, size)
            # Outside Optuna's lock: others may append meanwhile; ours is durable once this
            # returns, and nothing is acknowledged before.
            _sync(fd)
            self._size += len(data)
            self._pending = []
            return len(pending)

    def close(self) -> None:
        """Release the file (and its flock). Idempotent."""
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> int:
        if self._fd is None:
            raise ValueError(f"journal {self.path} is closed")
        return self._fd

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    def _load(self, fd: int) -> tuple[list[bytes], int]:
        """The file's lines and the size they end at. A last line without its newline is an
        append a crash cut short (never flushed, so never acknowledged): Optuna's readers skip
        it, and it is cut off here, so that the next append starts on a line of its own."""
        with self._locked():
            with open(self.path, "rb") as file:
                data = file.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                log.warning(
                    "journal %s: cutting off a torn last line of %d bytes (a write interrupted "
                    "by a crash, never acknowledged)",
                    self.path,
                    len(data) - end,
                )
                os.ftruncate(fd, end)
        return data[:end].split(b"\n")[:-1], end


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
