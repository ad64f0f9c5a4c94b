"""What the operating system says about a process, by pid: the one module that asks (through
psutil, which answers alike on Linux and macOS).

The supervisor, the broker's lock take-over, the embedded Redis's start and stop and the fault
tests all need to know whether a pid still runs, whether it is stopped (SIGSTOP), and which
program it runs: a zombie runs nothing, and neither does a frozen process.
"""

from __future__ import annotations

import psutil

__all__ = [
    "UNKNOWN",
    "exited",
    "is_process",
    "is_running_program",
    "started_at",
    "status",
    "stopped",
]

# What `status` answers for a process that exists but that this user may not look at.
UNKNOWN = "?"

_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
_STOPPED = (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)


def status(pid: int) -> str | None:
    """psutil's status of `pid` (psutil.STATUS_RUNNING, STATUS_SLEEPING, STATUS_STOPPED,
    STATUS_ZOMBIE, ...), None if there is no such process, UNKNOWN ("?") if there is one but the
    system will not say more."""
    if pid <= 0:  # 0 and negatives name process groups, never one process
        return None
    try:
        return psutil.Process(pid).status()
    except psutil.ZombieProcess:  # macOS refuses to describe a zombie
        return psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return UNKNOWN


def exited(pid: int) -> bool:
    """True if `pid` is gone or a zombie: it runs nothing any more."""
    state = status(pid)
    return state is None or state in _GONE


def stopped(pid: int) -> bool:
    """True if `pid` is stopped (SIGSTOP) or traced."""
    return status(pid) in _STOPPED


def is_running_program(pid: int, name: str) -> bool:
    """True if `pid` runs (is not a zombie) and `name` is in its command line.

    Also True for a live process whose command line this user may not read: it exists, and
    taking it for something else could start a second server beside it.
    """
    if exited(pid):
        return False
    try:
        command = " ".join(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:  # exited meanwhile (ZombieProcess is one too)
        return False
    except psutil.AccessDenied:
        return True
    return name in command


def started_at(pid: int) -> float | None:
    """When `pid` started (epoch seconds, as psutil reads it); None if there is no such process
    or this user may not look at it. With the pid it names one process, even after pid reuse."""
    if pid <= 0:
        return None
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_process(pid: int, started: float) -> bool:
    """True if `pid` is the process that started at `started` (`started_at`) and runs on; also
    True for a process this user may not look at (taking it for gone could break its lock)."""
    if exited(pid):
        return False
    try:
        return psutil.Process(pid).create_time() == started
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
