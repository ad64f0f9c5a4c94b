"""The ledger of applied commands: each command is applied once, however often it is pushed.

A signed command proves who sent it, not that this is the first time it arrives: whoever can
write to Redis can copy a `delete --purge` off `<prefix>:commands` and push it again after the
operator resubmitted the study. So every command carries an id and the time it was sent
(`protocol.commands`), and the broker keeps the ids it took for as long as a command can be
accepted at all (the signer's `max_age_s`, a day): one that is older, or from further in the
future than the clocks may differ (`max_skew_s`), is refused as stale; one whose id was taken
already is refused as replayed.

The ids live in the broker's state directory, not in Redis: whoever can write to Redis can also
delete any key there, and with it a ledger kept there. The file is a short append-only log:

    c <sent_at> <id>    a command taken from the inbox
    b <sent_at> <id>    a bulk command taken (`daemon.backlog`: it moves onto its study's backlog)
    -                   every command above was trimmed off the inbox (or moved onto its backlog)

Lines are made durable (`flush`, fsync) before the commands they name are trimmed off the inbox,
so a trimmed command is always in the file. At start the file is compacted to the window. A
broker that stopped between the flush and the trim finds the commands after the last `-` still
in its inbox: they are in doubt, not replays. One of those that is not bulk was applied already
(what it changed is durable before the flush): it is trimmed now, quietly. A bulk one was applied
only if it reached its backlog (the move and the trim are one transaction), which the inbox asks
the backlog (`Backlog.holds`); if it did not, it is applied now, once.

Without a path (a daemon built in a test) the ledger is kept in memory only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from optuna_rq.errors import ConfigError
from optuna_rq.protocol import COMMAND_ID_PATTERN, Command

__all__ = ["Admission", "CommandLedger", "ledger_file"]

log = logging.getLogger("optuna_rq.broker")

_sync = getattr(os, "fdatasync", os.fsync)
_COMPACT_AT_LINES = 10_000
"""A running broker compacts its file once it holds this many lines more than twice the ids in
the window (a broker runs for months; each command costs one line)."""


@dataclass(frozen=True)
class Admission:
    """What the inbox does with a command: apply it, trim it quietly (`in_doubt`: applied before
    a restart or an outage, not yet trimmed), or refuse it (`refused`: the kind it is counted as,
    and `why`)."""

    apply: bool
    in_doubt: bool = False
    refused: str = ""
    why: str = ""


_APPLY = Admission(apply=True)


class CommandLedger:
    """The ids of the commands one broker took, for `window_s`; in `path` if given."""

    def __init__(
        self,
        path: Path | None,
        *,
        window_s: float,
        skew_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.window_s = window_s
        self.skew_s = skew_s
        self.clock = clock
        self._taken: dict[str, float] = {}  # id -> sent_at, for every id in the window
        self._untrimmed: dict[str, bool] = {}  # id -> bulk, taken since the last trim
        self._unwritten: list[str] = []  # lines not yet in the file
        self._lines = 0  # lines in the file
        self._loaded = False
        self.created = False
        """Whether `load` found no file: a broker whose state directory is new (or was lost)."""

    # -- the inbox's side ----------------------------------------------------------------------

    def judge(self, command: Command) -> Admission:
        """Whether to apply `command`, trim it quietly, or refuse it (stale or replayed)."""
        self.load()
        now = self.clock()
        age = now - command.sent_at
        if age > self.window_s or age < -self.skew_s:
            when = f"{age:.0f}s ago" if age > 0 else f"{-age:.0f}s from now"
            why = (
                f"{command.op} command {command.id} sent {when}: only commands sent within "
                f"{self.window_s:.0f}s are accepted (replayed, or a clock far off?)"
            )
            return Admission(apply=False, refused="stale command", why=why)
        if command.id in self._untrimmed:
            return Admission(apply=False, in_doubt=True)
        if command.id in self._taken:
            why = f"{command.op} command {command.id} (sent {age:.0f}s ago) was applied already"
            return Admission(apply=False, refused="replayed command", why=why)
        return _APPLY

    def bulk_in_doubt(self, command: Command) -> bool:
        """Whether `command` is a bulk command taken before the last trim: it was applied only
        if it reached its backlog."""
        return self._untrimmed.get(command.id, False)

    def take(self, command: Command, *, bulk: bool = False) -> None:
        """`command` is applied (or, `bulk`, moves onto its backlog): its id is not applied
        again. Durable with the next `flush`."""
        self.load()
        if self._untrimmed.get(command.id) == bulk:
            return  # taken again while in doubt (the ledger could not be written): noted once
        self._taken[command.id] = command.sent_at
        self._untrimmed[command.id] = bulk
        self._unwritten.append(f"{'b' if bulk else 'c'} {command.sent_at!r} {command.id}\n")

    def flush(self) -> None:
        """Make the ids taken durable: run before the inbox is trimmed. OSError if the file
        cannot be written (the commands then stay in the inbox, in doubt, until it can)."""
        if not self._unwritten or self.path is None:
            self._unwritten.clear()
            return
        self._append("".join(self._unwritten).encode(), sync=True)
        self._lines += len(self._unwritten)
        self._unwritten.clear()

    def trimmed(self) -> None:
        """The commands taken so far are off the inbox: none of them is in doubt any more."""
        if not self._untrimmed:
            return
        self._untrimmed.clear()
        if self.path is not None:
            try:
                self._append(b"-\n", sync=False)  # lost, it leaves a few ids in doubt
                self._lines += 1
            except OSError as exc:
                log.warning("cannot write the command ledger %s: %s", self.path, exc)
        self._forget_expired()

    # -- the file ------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the file (once: at start, else at the first use), keeping the ids still in the
        window, and compact it."""
        if self._loaded or self.path is None:
            return
        try:
            self._read()
        except OSError as exc:
            raise ConfigError(
                f"cannot keep the ledger of applied commands at {str(self.path)!r}: "
                f"{exc.strerror or exc} (it is in the state directory: --state-dir, "
                "OPTUNA_RQ_STATE_DIR)"
            ) from exc
        self._loaded = True
        log.info(
            "command ledger %s: %d commands applied in the last %.0fs (%d in doubt)",
            self.path,
            len(self._taken),
            self.window_s,
            len(self._untrimmed),
        )

    def _read(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created = not self.path.exists()
        with self._open() as fd:
            text = _read_all(fd).decode(errors="replace")
            cutoff = self.clock() - self.window_s
            in_doubt: dict[str, bool] = {}
            for line in text.splitlines():
                parts = line.split()
                if parts == ["-"]:
                    in_doubt.clear()
                    continue
                entry = _parse(parts)
                if entry is None:
                    continue  # a line torn by a crash
                kind, sent_at, command_id = entry
                if sent_at >= cutoff:
                    self._taken[command_id] = sent_at
                in_doubt[command_id] = kind == "b"
            self._untrimmed = {i: bulk for i, bulk in in_doubt.items() if i in self._taken}
            self._rewrite(fd)

    def _forget_expired(self) -> None:
        """Forget the ids out of the window; compact the file once it is mostly those."""
        cutoff = self.clock() - self.window_s
        expired = [i for i, sent_at in self._taken.items() if sent_at < cutoff]
        for command_id in expired:
            del self._taken[command_id]
        if self.path is not None and self._lines > 2 * len(self._taken) + _COMPACT_AT_LINES:
            try:
                with self._open() as fd:
                    self._rewrite(fd)
            except OSError as exc:
                log.warning("cannot compact the command ledger %s: %s", self.path, exc)

    def _rewrite(self, fd: int) -> None:
        """Replace the file (whose lock `fd` holds) with the ids in the window, the ones in doubt
        last: written aside, synced, then renamed over it."""
        assert self.path is not None
        settled = [i for i in self._taken if i not in self._untrimmed]
        lines = [f"c {self._taken[i]!r} {i}\n" for i in settled]
        lines += ["-\n"] if lines else []
        lines += [
            f"{'b' if bulk else 'c'} {self._taken[i]!r} {i}\n"
            for i, bulk in self._untrimmed.items()
        ]
        aside = self.path.with_name(self.path.name + ".new")
        with open(aside, "wb") as out:
            out.write("".join(lines).encode())
            out.flush()
            os.fsync(out.fileno())
        os.replace(aside, self.path)
        _sync_directory(self.path.parent)
        self._lines = len(lines)

    def _append(self, data: bytes, *, sync: bool) -> None:
        """Append whole lines: a write that fails part way is cut off again, so that the next
        line does not run on from half of one."""
        with self._open() as fd:
            size = os.fstat(fd).st_size
            try:
                _write_all(fd, data)
                if sync:
                    _sync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise

    @contextlib.contextmanager
    def _open(self) -> Iterator[int]:
        """The file, open for appending and locked. Two brokers of one prefix on two Redis
        servers may share a state directory: the lock keeps one's compaction from dropping what
        the other appends, and a file replaced while this one waited for the lock is reopened."""
        assert self.path is not None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    current = os.stat(self.path).st_ino
                except FileNotFoundError:
                    current = -1
                if current == os.fstat(fd).st_ino:
                    yield fd
                    return
            finally:
                os.close(fd)  # closing releases the lock


def ledger_file(state: Path, prefix: str) -> Path:
    """Where the broker of `prefix` keeps its ledger in its state directory."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in prefix)
    if safe != prefix:  # two prefixes must not share a file
        safe += "-" + hashlib.blake2b(prefix.encode(), digest_size=4).hexdigest()
    return state / "commands" / f"{safe}.applied"


def _parse(parts: list[str]) -> tuple[str, float, str] | None:
    if len(parts) != 3 or parts[0] not in ("b", "c") or not COMMAND_ID_PATTERN.fullmatch(parts[2]):
        return None
    try:
        return parts[0], float(parts[1]), parts[2]
    except ValueError:
        return None


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _sync_directory(directory: Path) -> None:
    """The rename is durable too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
