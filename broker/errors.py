"""The error tree: every error optuna-rq raises on purpose derives from `OptunaRQError`."""

from __future__ import annotations


class OptunaRQError(Exception):
    """Base for every error optuna-rq raises on purpose."""


class ConfigError(OptunaRQError, ValueError):
    """A bad argument or setting, caught before anything runs.

    It is also a `ValueError` because flytekitplugins.optuna raises `ValueError` for the same
    mistakes, and code written against it catches that.
    """


class ProtocolError(OptunaRQError):
    """A message that is not a valid optuna-rq message."""


class RedisUnavailableError(OptunaRQError):
    """Redis cannot be reached or started."""
