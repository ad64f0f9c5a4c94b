"""The lock on a journal file: Optuna's own protocol (`JournalFileSymlinkLock`: whoever creates
the symlink `<journal>.lock` holds it), taken so that a holder that died, or that this broker
took over from, is known and released at once instead of after Optuna's grace period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Collection
from pathlib import Path

from optuna_rq.plumbing.processes import is_process, started_at

__all__ = ["JournalLock"]

log = logging.getLogger("optuna_rq.broker")

_HOLDER = ".holder,"  # host names and float reprs hold no comma


class JournalLock:
    """Optuna's lock on the journal at `path` (`JournalFileSymlinkLock`'s protocol: whoever
    creates the symlink `<path>.lock` holds it), taken so that a holder that died is known.

    Optuna's writers point the symlink at the journal; this lock points it at a file of its own,
    `<path>.lock.holder,<host>,<pid>,<start time>`, which exists while the journal is open (Optuna's
    waiters stat what the symlink points to). Waiting for the lock, a symlink naming a gone
    process of this host is released at once, and so is one naming a broker of `superseded`
    ("host:pid", looked up as it is waited on): a broker that lost its prefix's lock to this
    one, frozen with the journal's lock held. Any other (an Optuna writer's) is released after
    `grace_s` with no change to what it points to, as Optuna's own writers release it. A lock
    taken from a holder that may still run has `acquire` say so: the journal revokes its file
    (`journal_file`), so that nothing the old holder appends reaches a reader.
    """

    def __init__(
        self, path: Path, *, grace_s: float = 30.0, superseded: Collection[str] = ()
    ) -> None:
        self.lock_file = f"{path}.lock"
        self.grace_s = grace_s
        self.superseded = superseded
        started = started_at(os.getpid()) or 0.0
        self.holder = f"{self.lock_file}{_HOLDER}{socket.gethostname()},{os.getpid()},{started!r}"

    def acquire(self) -> bool:
        """Take the lock, waiting for it; whether it was taken from a holder that may still be
        running (its file is to be revoked: `BatchedJournal._revoke`)."""
        if not os.path.exists(self.holder):
            open(self.holder, "w").close()  # what the symlink points to: it must exist
        sleep_s = 0.0005
        seen, unchanged_since = None, time.monotonic()
        broke_live = False
        while True:
            try:
                os.symlink(self.holder, self.lock_file)
                return broke_live
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
                broke_live = True
                continue
            if (target, mtime) != seen:
                seen, unchanged_since = (target, mtime), time.monotonic()
            elif time.monotonic() - unchanged_since > self.grace_s:
                log.warning("%s: held %gs, no write: releasing it", self.lock_file, self.grace_s)
                self._break(target)
                broke_live = True
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
