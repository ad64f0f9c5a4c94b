"""Checks the command line makes before anything is sent: inputs a broker would only refuse
later, after the study was queued (a storage URL, a trial timeout RQ cannot hold)."""

from __future__ import annotations

import os
from pathlib import Path

from optuna_rq.errors import ConfigError
from optuna_rq.plumbing.locations import redact_url

__all__ = ["check_storage_url", "check_trial_timeout"]


def check_trial_timeout(seconds: float | None) -> int | None:
    """`--trial-timeout` as whole seconds; ConfigError for a fraction or a value below 1
    (the rule is the protocol's, which the remote Optimizer's `trial_timeout` follows too)."""
    from optuna_rq.protocol import check_trial_timeout as whole_seconds

    return whole_seconds(seconds, option="--trial-timeout")


def check_storage_url(url: str) -> None:
    """ConfigError naming `url` if no broker could open it: an unknown scheme, a driver that is
    not installed, a file path whose directory cannot be created or written. Servers are not
    contacted (the broker may reach what this machine cannot)."""
    shown = redact_url(url)
    if url == "memory" or url.startswith(("redis://", "rediss://")):
        return
    if url.startswith("journal://"):
        _check_writable_file(Path(url.removeprefix("journal://")), shown)
        return
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = sqlalchemy.engine.make_url(url)
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise ConfigError(
            f"--storage {shown!r} is not a storage URL optuna-rq can open ({exc}); use "
            "journal:///path, sqlite:///path, postgresql://..., mysql://... or memory"
        ) from exc
    except ImportError as exc:
        raise ConfigError(f"--storage {shown!r}: its database driver is missing: {exc}") from exc
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        _check_writable_file(Path(parsed.database), shown)


def _check_writable_file(path: Path, shown: str) -> None:
    if not path.name:
        raise ConfigError(f"--storage {shown!r} names no file")
    parent = path.expanduser().absolute().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--storage {shown!r}: cannot create {str(parent)!r} ({str(existing)!r} is not a "
            "writable directory)"
        )
