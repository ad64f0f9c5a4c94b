"""Where a process finds its Redis: the environment variables that name it, the state directory
of the embedded server, and URLs made safe to show."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DEFAULT_PREFIX",
    "ENV_PREFIX",
    "ENV_REDIS_PASSWORD",
    "ENV_REDIS_PASSWORD_FILE",
    "ENV_REDIS_URL",
    "ENV_STATE_DIR",
    "FIX_NO_REDIS",
    "redact_url",
    "state_dir",
    "state_path",
]

ENV_REDIS_URL = "OPTUNA_RQ_REDIS_URL"
ENV_REDIS_PASSWORD = "OPTUNA_RQ_REDIS_PASSWORD"
ENV_REDIS_PASSWORD_FILE = "OPTUNA_RQ_REDIS_PASSWORD_FILE"
ENV_PREFIX = "OPTUNA_RQ_PREFIX"
ENV_STATE_DIR = "OPTUNA_RQ_STATE_DIR"
DEFAULT_PREFIX = "optuna-rq"

FIX_NO_REDIS = f"start redis-server or set {ENV_REDIS_URL} / --redis-url"


def state_dir(explicit: str | Path | None = None) -> Path:
    """The directory holding the embedded Redis's socket, data and log; created 0o700 if missing
    (`state_path` says where it is without creating it)."""
    path = state_path(explicit)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def state_path(explicit: str | Path | None = None) -> Path:
    """Where the state directory is, created or not: `explicit`, else `$OPTUNA_RQ_STATE_DIR`,
    else `$XDG_STATE_HOME/optuna-rq`, else `~/.local/state/optuna-rq`."""
    if explicit is not None and str(explicit):
        path = Path(explicit)
    elif os.environ.get(ENV_STATE_DIR):
        path = Path(os.environ[ENV_STATE_DIR])
    elif os.environ.get("XDG_STATE_HOME"):
        path = Path(os.environ["XDG_STATE_HOME"]) / "optuna-rq"
    else:
        path = Path.home() / ".local" / "state" / "optuna-rq"
    return path.expanduser().absolute()


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`, safe to log and to put in errors.

    Textual rather than parsed, so that a malformed URL (an unescaped "/" in the password)
    is redacted too: everything between the user name and the last "@" goes.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, hostpart = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.partition(':')[0]}:***@{hostpart}"
    base, qmark, query = rest.partition("?")
    if qmark:
        items = query.split("&")
        for i, item in enumerate(items):
            name, eq, _ = item.partition("=")
            if eq and name.lower().endswith("password"):  # sentinel_password, ssl_password
                items[i] = f"{name}=***"
        rest = f"{base}?{'&'.join(items)}"
    return f"{scheme}{sep}{rest}"
