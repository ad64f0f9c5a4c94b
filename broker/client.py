"""BrokerClient: what the front doors (CLI, demo, scripts) say to a broker, and read back from it.

It is the only writer of commands and the only reader of status and of published trials. The
broker need not be running: commands wait in Redis until one starts. With signing on, a status
(or a published trial) is believed only if the broker signed it (`protocol.status.read_status`,
`protocol.trial_summary.read_trial_summaries`): one that does not open is refused, saying so.

A front door writes two keys only: the command inbox (`Keys.commands`) and the wake stream
(`Keys.wake`); everything else it reads (deploy/redis/redis-acl.conf gives its Redis user
exactly that). So a study the broker has not taken yet has no published status: it shows as
`queued`, made here from its submission waiting in the inbox, or from its spec once the broker
stored it and has not published it yet.

A study a remote Optimizer runs is shown from the status that Optimizer's process publishes
(`Keys.driven`, `StudyStatus.driver`), under a name the broker does not hold: a name is the
broker's first. No command reaches the broker for it (`send` refuses, naming the process that
runs it), and a submission may not take the name of one whose process still runs.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from optuna_rq.errors import ConfigError, ProtocolError, StudyConflictError
from optuna_rq.protocol import (
    WAKE_FIELD,
    WAKE_MAXLEN,
    BulkReceipt,
    Cancel,
    Change,
    Command,
    Enqueue,
    Keys,
    Record,
    Role,
    Signer,
    StudySpec,
    StudyState,
    StudyStatus,
    Submit,
    decode_command,
    enqueue_commands,
    live_pools,
    open_stored_spec,
    read_receipts,
    sendable,
)
from optuna_rq.protocol.liveness import (
    BROKER_GRACE_S,
    BrokerLiveness,
    judge_driver,
    read_liveness,
    server_clock_s,
)
from optuna_rq.protocol.status import (
    RefusedStatus,
    read_driven_status,
    read_driven_statuses,
    read_status,
    read_statuses,
)
from optuna_rq.protocol.trial_summary import RefusedTrial, TrialSummary, read_trial_summaries

__all__ = ["BrokerClient", "queued_status"]

log = logging.getLogger("optuna_rq.client")


class BrokerClient:
    """Submit, change and cancel studies on one prefix, and read their status.

    `signer` seals every command (default: from `OPTUNA_RQ_SECRET`, as the broker reads it).
    """

    def __init__(
        self, connection: redis.Redis, prefix: str, *, signer: Signer | None = None
    ) -> None:
        self.connection = connection
        self.keys = Keys(prefix)
        self.signer = signer or Signer.from_env(Role.CLIENT)

    @property
    def prefix(self) -> str:
        return self.keys.prefix

    # -- commands ----------------------------------------------------------------------------

    def send(self, *commands: Command) -> None:
        """Queue `commands` for the broker, sealed, in one push (the broker takes them in one
        batch, in order), and wake the broker's loop to take them now (else they would be taken
        when the loop next turns: up to its poll interval). ConfigError, sending none, if one is
        over a limit the broker's decoder enforces (`sendable`): it would be dropped there.
        StudyConflictError, sending nothing, for a command about a study a remote Optimizer
        runs (`refuse_driven`)."""
        bodies = [sendable(c, max_bytes=self.signer.max_message_bytes) for c in commands]
        checked: set[str] = set()
        for command in commands:  # the first command about a study decides (a Submit first)
            name = command.spec.name if isinstance(command, Submit) else command.study
            if name not in checked:
                checked.add(name)
                self.refuse_driven(command)
        pipe = self.connection.pipeline(transaction=False)
        pipe.rpush(self.keys.commands, *(self.signer.seal(Record.COMMAND, b) for b in bodies))
        pipe.xadd(self.keys.wake, {WAKE_FIELD: b""}, maxlen=WAKE_MAXLEN, approximate=False)
        pipe.execute()

    def refuse_driven(self, command: Command) -> None:
        """StudyConflictError if `command` is about a study a remote Optimizer runs (what
        `status` shows under its name is that Optimizer's): the broker holds no such study, and
        only that process can stop or change it. A submission is refused only while that process
        runs: once it ended (or died), the name is free for the broker, which then shows."""
        name = command.spec.name if isinstance(command, Submit) else command.study
        try:
            shown = self.status(name)
        except ProtocolError:
            return  # a refused status: whose it is, the broker decides
        if shown is None or shown.driver is None:
            return
        runs = f"study {name!r} is run by the Optimizer on {shown.driver} (a Python process)"
        if isinstance(command, Submit):
            live = judge_driver(shown, now_s=server_clock_s(self.connection))
            if shown.state.ended or live is None or not live.alive:
                return
            raise StudyConflictError(
                f"{runs}, which is running: nothing was sent; submit it under another "
                "--study-name, or when that run has ended"
            )
        what = type(command).__name__.lower()
        raise StudyConflictError(
            f"{runs}, not by the broker: nothing was sent ({what} is a broker command); stop or "
            "change that run in its process (cancelling its `await` ends it cancelled)"
        )

    def submit(self, spec: StudySpec, *, enqueue: list[dict[str, Any]] | None = None) -> None:
        """Submit `spec`. A study with no status yet shows as queued until the broker takes it
        (`status`). Resubmitting a study's definition runs it on to the new budget;
        StudyConflictError, sending nothing, if a study of that name exists with another
        definition (the broker refuses it too). `enqueue`: parameter sets to run first
        (`Enqueue`), sent with the submission, so they are stored before the study's first
        ask."""
        known = self.stored_spec(spec.name)
        if known is not None:
            known.refuse_redefinition(spec)
        self.send(Submit(spec=spec), *self.enqueue_commands(spec.name, enqueue or []))

    def enqueue_commands(self, study: str, param_sets: list[dict[str, Any]]) -> list[Enqueue]:
        """`Enqueue` commands for `param_sets`, each within the message cap (`send` them)."""
        return enqueue_commands(study, param_sets, max_bytes=self.signer.max_message_bytes)

    def receipts(self, commands: list[Enqueue]) -> dict[str, BulkReceipt]:
        """What the broker did with the parameter sets of these sent `commands`, by command id,
        for those it is done with so far (`protocol.receipts`)."""
        return read_receipts(self.connection, self.keys, self.signer, [c.id for c in commands])

    def cancel(self, study: str) -> None:
        """Cancel a queued or running study; StudyEndedError if it has ended (nothing is sent:
        an ended study is never rewritten, `protocol.status.refuse_if_closed`)."""
        command = Cancel(study=study)
        self.refuse_driven(command)  # not the broker's to cancel, ended or not
        status = self.status(study)
        if status is not None:
            status.refuse("cancel")
        self.send(command)

    def change(self, study: str, **changes: Any) -> StudyStatus | None:
        """`n_trials`, `concurrency` and/or `priority` for a queued or running `study`;
        StudyEndedError if it has ended or a stop condition is winding it down (nothing is
        sent: resubmit it to run it on, `protocol.status.refuse_if_closed`). A budget below
        the trials the study has started winds it down: it starts no more, and its budget
        becomes what it started. Returns the status the change was checked against (None: the
        study has none)."""
        command = Change(study=study, **changes)
        self.refuse_driven(command)  # not the broker's to change, ended or not
        status = self.status(study)
        if status is not None:
            status.refuse("set")
        self.send(command)
        return status

    def delete_driven(self, status: StudyStatus) -> None:
        """Forget `status`, the status of a study a remote Optimizer ran (`Keys.driven`), and
        the trials it published: it leaves `status` and `trials`. StudyConflictError while that
        Optimizer's process still runs it (it would publish it again at its next turn: stop it
        there first). Its trials stay in that Optimizer's study."""
        live = judge_driver(status, now_s=server_clock_s(self.connection))
        if not status.state.ended and live is not None and live.alive:
            raise StudyConflictError(
                f"study {status.name!r} is {status.state.value} in the Optimizer on "
                f"{status.driver}: nothing was deleted; stop that run in its process first"
            )
        # A run of the study that starts meanwhile publishes it again at its next turn.
        pipe = self.connection.pipeline(transaction=False)
        pipe.hdel(self.keys.driven, status.name)
        pipe.delete(self.keys.driven_trials_of(status.name))
        pipe.execute()

    def stored_spec(self, study: str) -> StudySpec | None:
        """The definition the broker holds for `study` (None: it has none yet, or the one
        stored does not verify: the broker sealed it, with signing on, or it is not its own;
        the broker refuses it too, and a submission replaces it)."""
        try:
            return StudySpec.read_stored(self.connection, self.keys, self.signer, study)
        except ProtocolError as exc:
            log.warning("ignoring the stored spec of study %r: %s", study, exc)
            return None

    # -- what the broker publishes -----------------------------------------------------------

    def status(self, study: str) -> StudyStatus | None:
        """The study's status as the broker published it, ProtocolError if that does not open
        (with signing on: one the broker did not sign); `queued` if the broker has not taken it
        yet (its submission waits in the inbox) or not published it yet; else the status of
        the remote Optimizer that runs a study of that name (ProtocolError if it does not open:
        with signing on, one no front-door key signed); None if there is no such study."""
        published = self.published_status(study)
        if published is not None:
            return published
        pipe = self.connection.pipeline(transaction=True)  # one snapshot of the four
        pipe.hexists(self.keys.status, study)
        pipe.hget(self.keys.studies, study)
        pipe.lrange(self.keys.commands, 0, -1)
        pipe.hexists(self.keys.driven, study)
        now_published, stored, inbox, driven = pipe.execute()
        if now_published:  # published in between
            return self.published_status(study)
        queued = self._queued({study: stored} if stored is not None else {}, inbox).get(study)
        if queued is None and stored is None and driven:  # a name the broker does not hold
            return read_driven_status(self.connection, self.keys, self.signer, study)
        return queued

    def published_status(self, study: str) -> StudyStatus | None:
        """The study's status as the broker last published it (None: it has published none);
        ProtocolError if it does not open."""
        return read_status(self.connection, self.keys, self.signer, study)

    def require_status(self, study: str) -> StudyStatus:
        """The study's status; ConfigError naming the prefix if it has none (an unknown study),
        ProtocolError if it is refused (`status`)."""
        status = self.status(study)
        if status is None:
            shows = "; with signing on, a study shows once a broker took it"
            shows = shows if self.signer.enabled else ""
            raise ConfigError(
                f"unknown study {study!r} on prefix {self.prefix!r} (see `optuna-rq status`{shows})"
            )
        return status

    def trials(self, study: str, *, driven: bool = False) -> list[TrialSummary | RefusedTrial]:
        """The study's trials as the broker published them, by number: each sent to a worker
        or ended (not those enqueued and not yet asked). With signing on, an entry the broker
        did not sign is a `RefusedTrial`, saying why, never believed. Its storage is not
        opened: the broker publishes what `optuna-rq trials` shows (`protocol.trial_summary`).
        With `driven` (its status is a driven one), as the remote Optimizer that runs it
        published them."""
        return read_trial_summaries(self.connection, self.keys, self.signer, study, driven=driven)

    def has_status(self, study: str) -> bool:
        """Whether anything is stored as the study's status, the broker's or not (not counting
        a remote Optimizer's: `Keys.driven`)."""
        return bool(self.connection.hexists(self.keys.status, study))

    def is_current(self, status: StudyStatus) -> bool:
        """Whether `status` is of the submission the broker holds for its study (its stored
        spec's `submitted_at`), with signing on: a signed status of an earlier run of the study,
        kept and written back after it was submitted again, is not. Always True without
        signing, where anyone may write any status anyway."""
        if not self.signer.enabled:
            return True
        held = self.stored_spec(status.name)
        return held is not None and held.submitted_at == status.submitted_at

    def statuses(self) -> list[StudyStatus | RefusedStatus]:
        """Every study's status, by name: the published ones, where one that does not open
        (`status`) is a `RefusedStatus`, saying why (shown as refused, never believed), a
        `queued` one for each study submitted and not published yet, and the status of each
        study a remote Optimizer runs under a name the broker does not hold."""
        pipe = self.connection.pipeline(transaction=True)  # one snapshot of the two
        pipe.hgetall(self.keys.studies)
        pipe.lrange(self.keys.commands, 0, -1)
        stored, inbox = pipe.execute()
        # Read after the submissions: a study published in between is found published.
        found = {s.name: s for s in read_statuses(self.connection, self.keys, self.signer)}
        specs = {bytes(name).decode(errors="replace"): raw for name, raw in stored.items()}
        queued = self._queued(specs, inbox)
        brokers = set(found) | set(queued) | set(specs)
        driven = {
            s.name: s
            for s in read_driven_statuses(self.connection, self.keys, self.signer)
            if s.name not in brokers
        }
        merged = {**driven, **queued, **found}
        return [merged[name] for name in sorted(merged)]

    def _queued(self, stored: dict[str, bytes], inbox: list[bytes]) -> dict[str, StudyStatus]:
        """A `queued` status for each study submitted and not published yet: stored by the
        broker (`stored`: name -> spec), else waiting in the inbox (the last submission of it
        there). What cannot be read or verified is skipped."""
        specs: dict[str, StudySpec] = {}
        for raw in inbox:
            try:
                command = decode_command(
                    self.signer.open(Record.COMMAND, raw),
                    max_bytes=self.signer.max_message_bytes,
                )
            except ProtocolError:
                continue  # the broker refuses it too
            if isinstance(command, Submit):
                specs[command.spec.name] = command.spec
        for name, raw in stored.items():
            try:
                specs[name] = open_stored_spec(self.signer, name, raw)
            except ProtocolError:
                continue
        return {name: queued_status(spec) for name, spec in specs.items()}

    def served_modules(self, queue: str) -> list[str]:
        """The objective modules the live workers of resource class `queue` serve here (from
        their pools' heartbeats): what a study waiting for a worker could have meant."""
        served = set()
        for pool in live_pools(self.connection, self.keys, self.signer):
            for rq_queue in pool.queues:
                parts = self.keys.parse_trial_queue(rq_queue)
                if parts is not None and parts[0] == queue:
                    served.add(parts[1])
        return sorted(served)

    def liveness(self, *, grace_s: float = BROKER_GRACE_S) -> BrokerLiveness:
        """Whether a broker serves the prefix: its lock and its loop's last turn (see
        `protocol.liveness.BrokerState`)."""
        return read_liveness(self.connection, self.keys, grace_s=grace_s)

    def broker_holder(self) -> str | None:
        """Who holds the prefix's broker lock ("host:pid since ..."), None if no broker runs."""
        raw: Any = self.connection.get(self.keys.broker)
        return None if raw is None else bytes(raw).decode()


def queued_status(spec: StudySpec) -> StudyStatus:
    """How a study the broker has not published yet shows: queued, as submitted (`status`, and
    `submit --wait` until the broker's own status comes)."""
    return StudyStatus.of(
        spec,
        state=StudyState.QUEUED,
        storage=spec.storage_url(""),  # "": the broker's default
    )
