"""The registry of studies: every study the broker knows, its spec, its state, its storage, and
how it starts and ends.

A study starts (`start`: its storage opened, its trials in flight taken over, its run handed to
the dispatcher) and ends (`end_ended`: finished, failed or faulted) here and nowhere else. A study
that faulted (`dispatch.boundary`) ends FAILED with its fault in its status; since an ended study
is never re-attached, a broker restarted after a fault starts and reads its commands.

What the registry keeps in `<prefix>:studies` is its own: each spec sealed by the broker and bound
to its study's name (`seal_stored_spec`). A stored spec that does not open (unsigned, forged,
copied under another name) is refused wherever it is read back, counted in `<prefix>:refused`
(`spec`) and logged: the broker never starts, cancels or purges a study on its word. A study whose
storage the broker's operator does not allow (`optuna_rq.storage.storage_policy`) is refused at
submit and at re-attach: it ends FAILED with the reason, counted (`storage`), and nothing is opened.
"""

from __future__ import annotations

import logging

import optuna
import redis
from optuna.trial import TrialState

from optuna_rq.daemon.broker_settings import BrokerSettings
from optuna_rq.daemon.run_opening import open_run
from optuna_rq.daemon.status_publisher import StatusPublisher
from optuna_rq.daemon.stopping import StopConditions
from optuna_rq.dispatch import Dispatcher, StudyRun, count_refusal
from optuna_rq.dispatch.boundary import FaultBoundary, Site, passes_through
from optuna_rq.errors import ProtocolError, StudyConflictError, StudyStorageError
from optuna_rq.protocol import (
    FailReason,
    Keys,
    Signer,
    StudySpec,
    StudyState,
    StudyStatus,
    open_stored_spec,
    refuse_if_closed,
    seal_stored_spec,
)
from optuna_rq.protocol.status import read_status
from optuna_rq.storage.continuity import missing_study, moved_default
from optuna_rq.storage.guarded_storages import Storages
from optuna_rq.storage.stored_definitions import definition_conflict
from optuna_rq.study.verdict import Verdict, fail_orphans

__all__ = ["Registry"]

log = logging.getLogger("optuna_rq.broker")


class Registry:
    """The studies of one broker. `specs` holds the spec of every study it started (running or
    ended since); `dispatcher.runs` the running ones."""

    def __init__(
        self,
        connection: redis.Redis,
        settings: BrokerSettings,
        *,
        dispatcher: Dispatcher,
        status: StatusPublisher,
        storages: Storages,
        stopping: StopConditions,
        signer: Signer,
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.signer = signer
        self.keys = Keys(settings.prefix)
        self.dispatcher = dispatcher
        self.status = status
        self.storages = storages
        self.stopping = stopping
        self.specs: dict[str, StudySpec] = {}
        self.ended_at_start: list[StudySpec] = []
        """The stored studies `reattach` found ended: their trials may need publishing
        (`daemon.catch_up`)."""

    @property
    def boundary(self) -> FaultBoundary:
        return self.dispatcher.boundary

    @property
    def runs(self) -> dict[str, StudyRun]:
        return self.dispatcher.runs

    def storage_url(self, spec: StudySpec) -> str:
        """The storage a study's trials are in: its own, or the broker's default."""
        return spec.storage_url(self.settings.storage)

    # -- what is stored ------------------------------------------------------------------------

    def stored_spec(self, name: str) -> StudySpec | None:
        """The spec the study was last submitted with: held, or stored by an earlier broker.
        None if there is none, or if the one stored does not open (refused: `_open_stored`)."""
        if name in self.specs:
            return self.specs[name]
        try:
            return StudySpec.read_stored(self.connection, self.keys, self.signer, name)
        except ProtocolError as exc:
            self._refuse_stored(name, exc)
            return None

    def _open_stored(self, name: str, raw: bytes) -> StudySpec | None:
        """The spec stored under `name`, if it opens; else None, refused: logged and counted."""
        try:
            return open_stored_spec(self.signer, name, raw)
        except ProtocolError as exc:
            self._refuse_stored(name, exc)
            return None

    def _refuse_stored(self, name: str, exc: ProtocolError) -> None:
        """Log and count the refusal of the stored spec of study `name` (`exc` says why)."""
        hint = ""
        if self.signer.enabled:
            # A spec stored before signing was turned on is unsigned too: its owner can
            # resubmit it (a new spec replaces the refused one) or delete it.
            hint = (
                "; a study stored before signing was turned on is refused the same way: "
                f"if it is yours, submit it again (`optuna-rq submit ... --study-name "
                f"{name}`, the same definition runs on in its storage) or `optuna-rq "
                f"delete {name}`"
            )
        log.error("study %r: refused its stored spec, nothing of it is done: %s%s", name, exc, hint)
        count_refusal(self.connection, self.keys.prefix, "spec")

    def store(self, spec: StudySpec) -> None:
        """Keep `spec` as the study's, here and in Redis (for the next broker), sealed."""
        self.specs[spec.name] = spec
        self.connection.hset(self.keys.studies, spec.name, seal_stored_spec(self.signer, spec))

    def storage_refusal(self, spec: StudySpec) -> str | None:
        """Why the broker may not open `spec`'s storage (None: it may)."""
        return self.storages.policy.refusal(self.storage_url(spec))

    def refuse_storage(self, spec: StudySpec, why: str) -> None:
        """`spec` is not started: its storage is not one the broker's operator allows (`why`).
        Logged, counted, and stated in its status (FAILED; an ended study keeps its result, and
        its status says why the resubmission failed)."""
        log.error("study %r refused: %s", spec.name, why)
        count_refusal(self.connection, self.keys.prefix, "storage")
        self._publish_failed(spec, why)

    def _publish_failed(self, spec: StudySpec, why: str) -> None:
        """Say in the status of `spec`'s study, not started, why: FAILED (an ended study keeps
        its result, and its status says why the resubmission failed)."""
        state = self.state(spec.name)
        try:
            if state is not None and state.ended:
                self.status.annotate(spec, why)
            else:
                self.status.publish_failed(spec, None, error=why)
        except StudyConflictError as exc:  # a state nobody can move it from: logged, not fatal
            log.error("study %r: %s", spec.name, exc)

    def state(self, name: str) -> StudyState | None:
        """The study's state, read from its published status if this broker does not run it.
        A status that does not open (with signing on: one this broker's key did not sign, such
        as a forged `finished` that would keep a study from being re-attached) says nothing: it
        is counted in `<prefix>:refused` as `status`, and logged (`count_refusal`)."""
        if name not in self.runs:
            status = self._published(name)
            self.status.lifecycle.learn(name, None if status is None else status.state)
        return self.status.lifecycle.state(name)

    def _published(self, name: str) -> StudyStatus | None:
        """The study's published status, if it opens (else refused: counted and logged)."""
        try:
            return read_status(self.connection, self.keys, self.signer, name)
        except ProtocolError as exc:
            why = f"ignoring it, for study {name!r}: {exc}"
            count_refusal(self.connection, self.keys.prefix, "status", why)
            return None

    def refuse_if_closed(self, name: str, command: str) -> None:
        """StudyEndedError if study `name` takes no `command` (`cancel`, `set`) as this broker
        holds it: the front doors' rule (`protocol.status.refuse_if_closed`), applied to a
        command sent before the study ended or a stop condition held."""
        state: StudyState | None = StudyState.RUNNING
        stopped = self.stopping.reason(name)
        if name not in self.runs:
            status = self._published(name)
            self.status.lifecycle.learn(name, None if status is None else status.state)
            state = self.status.lifecycle.state(name)
            stopped = None if status is None else status.stopped
        refuse_if_closed(name, state, stopped=stopped, command=command)

    # -- start ---------------------------------------------------------------------------------

    def reattach(self) -> None:
        """Run on every stored study that has not ended (a broker restarted, or took over)."""
        stored: dict[bytes, bytes] = self.connection.hgetall(self.keys.studies)  # type: ignore[assignment]
        for key, raw in stored.items():
            name = key.decode(errors="replace")
            spec = self._open_stored(name, raw)
            if spec is None:
                continue
            state = self.state(spec.name)
            if state is not None and state.ended:
                self.ended_at_start.append(spec)
                continue
            why = self.storage_refusal(spec)
            if why is not None:
                self.refuse_storage(spec, why)
                continue
            ran = self._published(spec.name)
            why = moved_default(spec, ran, self.settings.storage)
            if why is not None:
                self._not_resumed(spec, why)
                continue
            self.start(spec, resumed=True, ran=ran)

    def _not_resumed(self, spec: StudySpec, why: str) -> None:
        """`spec`'s study is not resumed: its storage is not the one it ran in (`continuity`)."""
        log.error("%s", why)
        self._publish_failed(spec, why)

    def start(
        self, spec: StudySpec, *, resumed: bool = False, ran: StudyStatus | None = None
    ) -> None:
        """Open the study's storage, take over its trials in flight, and dispatch it. A study
        that cannot start fails (an ended one keeps its result: its status says why the
        resubmission failed); its storage failing fails every study on that storage. A study
        `resumed` whose storage holds none of the trials its last status (`ran`) counts is not
        resumed there (`continuity`)."""
        self.specs[spec.name] = spec
        self.boundary.forget(spec.name)  # a resubmission starts with a clean slate
        run: StudyRun | None = None
        conflict: str | None = None
        try:
            with self.boundary.guard(spec.name, Site.START):
                storage = self.storages.open(self.storage_url(spec))
                if resumed and (why := missing_study(spec, ran, storage, storage.url)):
                    self._not_resumed(spec, why)
                    return
                conflict = definition_conflict(storage, spec)
                if conflict is None:
                    run = open_run(
                        spec,
                        self.storages,
                        self.storage_url(spec),
                        self.dispatcher,
                        self.connection,
                    )
        except StudyStorageError as exc:
            self.storage_failed(exc, starting=spec)
            return
        if conflict is not None:  # its storage holds another definition's trials: untouched
            log.error("study %r not started: %s", spec.name, conflict)
            self._publish_failed(spec, conflict)
            return
        if self.boundary.faulted(spec.name):  # `end_ended` ends it, and says so
            if run is not None:
                self.dispatcher.add(run)  # so that its trials end with it
            else:
                self._fail_orphans(spec)
            return
        assert run is not None
        self.dispatcher.add(run)
        self.stopping.watch(spec.name)
        log.info(
            "%s study %r: %s, %d of %d trials done, cap %d",
            "resumed" if resumed else "started",
            spec.name,
            spec.objective,
            run.budget.asked - len(run.outstanding),
            spec.n_trials,
            spec.concurrency,
        )
        with self.boundary.guard(spec.name, Site.STATUS):
            self.status.publish(spec, run, state=StudyState.RUNNING)  # now: `wait` sees it

    def _fail_orphans(self, spec: StudySpec) -> None:
        """A study that faulted before its run was built (its sampler could not be made, say)
        may hold trials a previous broker left RUNNING: they end FAIL with it, if its storage
        holds it at all."""
        try:
            study = optuna.load_study(
                study_name=spec.name,
                storage=self.storages.open(self.storage_url(spec)),
                sampler=optuna.samplers.RandomSampler(),  # not the one that failed
            )
        except Exception as exc:  # never created, or its storage is down: nothing of it runs
            log.info("study %r: no trials of it to end (%s)", spec.name, exc)
            return
        why = f"the study failed: {self.boundary.faults[spec.name]}"
        ended = fail_orphans(
            study, Verdict(state=TrialState.FAIL, fail_reason=FailReason.CANCELLED, error=why)
        )
        if ended:
            self.dispatcher.observer.ended(
                spec.name, TrialState.FAIL.name, FailReason.CANCELLED, count=ended
            )
        self.storages.flush()  # then published as failed, as they are now
        self.dispatcher.publication.reconcile(self.connection, study)

    # -- end -----------------------------------------------------------------------------------

    def end_ended(self) -> bool:
        """End the studies that faulted, cannot run (failed), or recorded their whole budget
        (finished); True if any ended."""
        ended = False
        for name in list(self.boundary.faults):
            self._end_faulted(name)
            ended = True
        for run in [run for run in self.runs.values() if run.done or run.cannot_run]:
            ended = True
            name = run.name
            with self.boundary.guard(name, Site.END):
                state, error = self._end(run)
            if not self.boundary.faulted(name):
                with self.boundary.guard(name, Site.STATUS):
                    self.status.publish(self.specs[name], run, state=state, error=error)
            if self.boundary.faulted(name):
                self._end_faulted(name)
                continue
            self.dispatcher.remove(name)
            if state is StudyState.FAILED:
                log.error("study %r failed: %s", name, error)
            else:  # run.budget.asked: every trial of its budget, a resumed study's earlier ones too
                stopped = self.stopping.reason(name)
                log.info(
                    "study %r finished: %d trials%s",
                    name,
                    run.budget.asked,
                    f" ({stopped})" if stopped else "",
                )
        return ended

    def _end(self, run: StudyRun) -> tuple[StudyState, str | None]:
        """How `run`, done or unable to run, ends: its state, and why (for its status)."""
        if run.cannot_run and not run.done:
            self.dispatcher.endings.cancel(run, why=f"the study failed: {run.cannot_run}")
            return StudyState.FAILED, run.cannot_run
        return StudyState.FINISHED, None  # its status says if a stop condition ended it

    def _end_faulted(self, name: str) -> None:
        """End the study `name` FAILED with its fault: its trials in flight end FAIL (if its
        storage still takes a tell; else they are only withdrawn), its status says why."""
        fault = self.boundary.faults[name]
        run = self.runs.get(name)
        if run is not None:
            self.dispatcher.remove(name)
            try:
                self.dispatcher.endings.cancel(run, why=f"the study failed: {fault}", orphans=True)
            except Exception as exc:
                if passes_through(exc) and not isinstance(exc, StudyStorageError):
                    raise
                log.error("study %r: its trials in flight were not told: %s", name, exc)
                self.dispatcher.endings.abandon(run)
        self.boundary.forget(name)  # after the cancel: what it met is the same fault's
        spec = self.specs.get(name) or self.stored_spec(name)
        if spec is None:
            return
        state = self.state(name) if run is None else self.status.lifecycle.state(name)
        try:
            if state is not None and state.ended:  # it ended already: it keeps its result
                self.status.annotate(spec, f"the broker failed acting on it: {fault}")
            else:
                self.status.publish_failed(spec, run, error=str(fault))
        except StudyConflictError as exc:  # a state nobody can move it from: logged, not fatal
            log.error("study %r: %s", name, exc)

    def storage_failed(self, error: StudyStorageError, starting: StudySpec | None = None) -> None:
        """A study storage failed: every study on it (and `starting`, the one that found out)
        ends FAILED with the cause in its status; the others go on. Its trials still running
        cannot be recorded: they stay RUNNING in that storage, and their results are dropped."""
        self.storages.forget(error.url)
        failed: list[tuple[StudySpec, StudyRun | None]] = []
        if starting is not None:
            failed.append((starting, None))
        for name, running in list(self.runs.items()):
            spec = self.specs[name]
            if self.storage_url(spec) == error.url:
                self.dispatcher.endings.abandon(running)
                failed.append((spec, running))
        for spec, run in failed:
            log.error("study %r failed: %s", spec.name, error)
            # Not flushed first: it says what failed, and acknowledges nothing on the others.
            held = self.storages.read_back(
                error.url, spec.name
            )  # its figures: what its storage kept
            self.status.publish_failed(spec, run, error=str(error), flush=False, held=held)
        if not failed:  # a storage no running study uses any more
            log.error("%s", error)
