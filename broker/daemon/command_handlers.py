"""What each command does to the studies: one handler per command (the inbox's
`CommandHandler`), acting on the registry.

A handler refuses a command by raising ConfigError or StudyConflictError (or KeyError, TypeError
or ValueError: a change that does not apply); it is logged and the broker moves on. Each command
runs under its study's fault guard (`Site.COMMAND`): whatever else a handler raises fails that
study alone.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna

from optuna_rq.daemon.registry import Registry
from optuna_rq.dispatch import RunSpec, StudyRun
from optuna_rq.dispatch.boundary import Site
from optuna_rq.errors import ConfigError, StudyConflictError, StudyStorageError
from optuna_rq.protocol import (
    Cancel,
    Change,
    Command,
    Delete,
    Enqueue,
    StudySpec,
    StudyState,
    Submit,
)

__all__ = ["Commands"]

log = logging.getLogger("optuna_rq.broker")

RESUBMITTED = (
    "n_trials",
    "concurrency",
    "priority",
    "trial_timeout_s",
    "max_retries",
    "ask_ahead",
    "batch",
)
"""What a resubmission of a running study changes: everything but its definition."""


class Commands:
    """The broker's side of submit, cancel, set, enqueue and delete."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def apply(self, command: Command) -> None:
        """Apply `command`, under its study's fault guard; log it if it is refused."""
        name = command.spec.name if isinstance(command, Submit) else command.study
        boundary = self.registry.boundary
        with boundary.guard(name, Site.COMMAND):
            try:
                self._dispatch(command)
            except (ConfigError, StudyConflictError, KeyError, TypeError, ValueError) as exc:
                log.error("refused a command: %s", exc)
        if boundary.faulted(name) and isinstance(command, Submit):
            # A submission that faulted before its study was known: its spec says what failed.
            self.registry.specs.setdefault(name, command.spec)

    def _dispatch(self, command: Command) -> None:
        match command:
            case Submit(spec=spec):
                self.on_submit(spec)
            case Cancel(study=name):
                self.on_cancel(name)
            case Change(study=name):
                self.on_change(name, command.changes())
            case Enqueue(study=name, params=param_sets):
                self.on_enqueue(name, param_sets)
            case Delete(study=name, force=force, purge=purge):
                self.on_delete(name, force=force, purge=purge)

    def on_submit(self, spec: StudySpec) -> None:
        """Start the study; or, if it exists with the same definition, take the new budget, cap,
        priority, timeout and retries, and run it on (an ended one too) to its new budget. A
        different definition under its name is refused (StudyConflictError), changing nothing.
        A storage the broker's operator does not allow fails the study, storing nothing."""
        registry = self.registry
        known = registry.stored_spec(spec.name)
        if known is not None:
            known.refuse_redefinition(spec)
        run = registry.runs.get(spec.name)
        if run is not None:
            changes = {name: getattr(spec, name) for name in RESUBMITTED}
            # It reopens as an ended study would: a stop condition that was winding it down is
            # checked afresh, its clock counting from this submission.
            registry.stopping.watch(spec.name)
            self._apply(run, {**changes, "submitted_at": spec.submitted_at})
            return
        why = registry.storage_refusal(spec)
        if why is not None:  # nothing of it is kept: submitted again elsewhere, it is new
            registry.refuse_storage(spec, why)
            return
        state = registry.state(spec.name)  # ended: it runs on as a new incarnation
        spec = spec.incarnated(None if state is not None and state.ended else known)
        registry.store(spec)
        registry.start(spec)

    def on_cancel(self, name: str) -> None:
        """End the study CANCELLED: its queued trials are withdrawn and its running ones stopped
        on their workers; all end FAIL (cancelled). An ended study is left as it is
        (StudyEndedError, `protocol.status.refuse_if_closed`)."""
        registry = self.registry
        run = registry.runs.get(name)
        if run is not None:
            registry.dispatcher.endings.cancel(run)
            if registry.boundary.faulted(name):
                return  # it ends FAILED with its fault, at the end of the turn
            registry.dispatcher.remove(name)
            registry.status.publish(registry.specs[name], run, state=StudyState.CANCELLED)
            log.info("cancelled study %r", name)
            return
        spec = registry.stored_spec(name)
        if spec is None:
            raise ConfigError(f"no study {name!r} to cancel")
        registry.refuse_if_closed(name, "cancel")
        registry.status.publish(spec, None, state=StudyState.CANCELLED)

    def on_change(self, name: str, changes: dict[str, Any]) -> None:
        """Apply `changes` to a running study's spec (stored too) and to its run. An ended
        study, or one a stop condition is winding down, is left as it is (StudyEndedError,
        `protocol.status.refuse_if_closed`): resubmitting it runs it on."""
        registry = self.registry
        if registry.specs.get(name) is None:
            raise ConfigError(f"no study {name!r} to change")
        registry.refuse_if_closed(name, "set")
        run = registry.runs.get(name)
        if run is None:
            raise StudyConflictError(
                f"study {name!r} is not running: not changed (resubmit it to run it on)"
            )
        self._apply(run, changes)

    def _apply(self, run: StudyRun, changes: dict[str, Any]) -> None:
        """Change the running study's spec (stored too) and its run. A budget below the trials
        it has asked winds it down: it asks no more, its running trials finish, and its budget
        becomes what it asked (its status never shows more done than its budget)."""
        registry, name = self.registry, run.name
        requested = changes.get("n_trials")
        if requested is not None and requested < run.budget.asked:
            changes = {**changes, "n_trials": run.budget.asked}
            log.info(
                "study %r: --n-trials %d is below the %d trials it has started: it starts no "
                "more, and finishes once they end",
                name,
                requested,
                run.budget.asked,
            )
        spec = registry.specs[name].with_changes(**changes)
        registry.store(spec)
        run.change(RunSpec.of(spec), spec.n_trials)
        log.info("study %r changed: %s", name, changes)
        registry.status.mark(name)

    def on_enqueue(self, name: str, param_sets: list[dict[str, Any]]) -> None:
        """Accept `param_sets` for the running study `name` (ConfigError if it is not running:
        nothing would run them). The inbox then moves the command onto the study's backlog, in
        the transaction that trims it, and the loop stores the sets a slice a turn, each unless
        the study has it already (`daemon.backlog`, `daemon.enqueue`)."""
        if name not in self.registry.runs:
            raise ConfigError(f"cannot enqueue trials for study {name!r}: it is not running")

    def on_delete(self, name: str, *, force: bool, purge: bool) -> None:
        """Forget study `name`: its spec, its status and its published trials. A running study
        is refused (ConfigError) unless `force`, which cancels it first. Its trials stay in its
        storage unless `purge`, which deletes the Optuna study there too."""
        registry = self.registry
        connection, keys = registry.connection, registry.keys
        known = name in registry.specs or bool(connection.hexists(keys.studies, name))
        if not known and not connection.hexists(keys.status, name):
            raise ConfigError(f"no study {name!r} to delete")
        if name in registry.runs:
            if not force:
                raise ConfigError(f"study {name!r} is running: cancel it first, or delete --force")
            self.on_cancel(name)
            if registry.boundary.faulted(name):
                return  # not deleted: it ends FAILED with its fault, and can be deleted then
        spec = registry.stored_spec(name)
        if purge and spec is not None:
            try:
                storage = registry.storages.open(registry.storage_url(spec))
                optuna.delete_study(study_name=name, storage=storage)
            except KeyError:
                pass  # it never reached its storage (it failed to start)
            except StudyStorageError as exc:  # refused, not retried every turn: say so
                raise ConfigError(
                    f"study {name!r} was not deleted: its storage cannot purge it ({exc}); "
                    "delete it without --purge, or when its storage is back"
                ) from exc
        registry.specs.pop(name, None)
        registry.storages.flush()  # the purge is durable before the study is gone from the status
        registry.dispatcher.publication.forget(name)
        pipe = connection.pipeline(transaction=True)
        pipe.hdel(keys.studies, name)
        pipe.hdel(keys.status, name)
        # Its published trials go with it; resubmitted, it publishes again what its storage
        # kept, when it is taken over.
        pipe.delete(keys.trials_of(name))
        pipe.execute()
        registry.status.lifecycle.learn(name, None)
        log.info("deleted study %r%s", name, " and its trials" if purge else "")
