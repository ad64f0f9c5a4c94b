"""What the operating system says about a process, by pid: one place reads /proc.

The supervisor, the broker's lock take-over and the fault tests all need to know whether a pid
still runs, and whether it is stopped (SIGSTOP): a zombie runs nothing, and neither does a
frozen process.
"""

from __future__ import annotations

import os

__all__ = ["exited", "process_state", "stopped"]


def process_state(pid: int) -> str | None:
    """The state letter of `pid` (R, S, D, T, t, Z, X, ...), None if there is no such process,
    "?" if it exists but this system has no /proc to say more."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[-1].split()
        return fields[0].decode() if fields else "?"
    except FileNotFoundError:
        return None
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return "?"
    return "?"


def exited(pid: int) -> bool:
    """True if `pid` is gone or a zombie: it runs nothing any more."""
    return process_state(pid) in (None, "Z", "X")


def stopped(pid: int) -> bool:
    """True if `pid` is stopped (SIGSTOP) or traced."""
    return process_state(pid) in ("T", "t")
