"""The broker's side of `optuna-rq enqueue` and `optuna-rq delete`: commands that change what a
study holds or whether the broker knows it, rather than how it runs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import optuna

from optuna_rq.errors import ConfigError

if TYPE_CHECKING:
    from optuna_rq.daemon.daemon import Daemon

__all__ = ["delete_study", "enqueue_params"]

log = logging.getLogger("optuna_rq.broker")


def enqueue_params(daemon: Daemon, name: str, param_sets: list[dict[str, Any]]) -> None:
    """Accept `param_sets` for the running study `name`, or refuse them (ConfigError if it is
    not running). The inbox then moves the command onto the study's backlog, in the step that
    trims it, and the loop stores the sets a slice a turn (`daemon.enqueue.EnqueueSets`)."""
    daemon.enqueue_sets.accept(name)


def delete_study(daemon: Daemon, name: str, *, force: bool, purge: bool) -> None:
    """Forget study `name`: its spec and its status. A running study is refused (ConfigError)
    unless `force`, which cancels it first. Its trials stay in its storage unless `purge`,
    which deletes the Optuna study there too."""
    known = name in daemon.specs or bool(daemon.connection.hexists(daemon.keys.studies, name))
    if not known and not daemon.connection.hexists(daemon.keys.status, name):
        raise ConfigError(f"no study {name!r} to delete")
    if name in daemon.dispatcher.runs:
        if not force:
            raise ConfigError(f"study {name!r} is running: cancel it first, or delete --force")
        daemon.on_cancel(name)
    spec = daemon.specs.pop(name, None)
    if purge and spec is not None:
        storage_url = spec.storage or daemon.settings.storage
        try:
            optuna.delete_study(study_name=name, storage=daemon.storages.open(storage_url))
        except KeyError:
            pass  # it never reached its storage (it failed to start)
    daemon.storages.flush()  # the purge is durable before the study is gone from the status
    pipe = daemon.connection.pipeline(transaction=True)
    pipe.hdel(daemon.keys.studies, name)
    pipe.hdel(daemon.keys.status, name)
    pipe.execute()
    log.info("deleted study %r%s", name, " and its trials" if purge else "")
