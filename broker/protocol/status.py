"""A study's status: the snapshot the broker publishes for `status`, `wait` and scripts.

Stored as JSON in `<prefix>:status` (readable with `redis-cli` too), and printed as the same JSON
by `optuna-rq status --json` (which adds `broker`, the prefix's broker as read, or for a study a
remote Optimizer runs `driver_liveness`, its process as read: `liveness`; `from_json` ignores
them). Only the broker moves its studies from state to state and writes their status; the front
doors show a study it has not taken yet as `queued` (`BrokerClient.status`).

With signing on, the broker seals each status (`Record.STATUS`, bound to the study's name: one
study's signed status copied under another name does not open), and every reader opens it here,
through `read_status` or `read_statuses` and nowhere else: a status the broker did not sign is
refused, never believed (a forged `finished` would release `wait`).

A study a remote `Optimizer` runs is driven by that Python process, not by the broker: its status
(`driver` names the process, `turn_at_s` its last turn) is published by the process itself on a
hash of its own (`Keys.driven`), sealed as a `Record.DRIVEN_STATUS` with the front-door key it
holds, and read through `read_driven_status` and `read_driven_statuses`. Neither kind opens as
the other: a driven status is never taken for the broker's, nor a broker's for a driven one.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from optuna_rq.errors import ProtocolError, StudyEndedError
from optuna_rq.protocol.keys import Keys
from optuna_rq.protocol.schema import (
    Bool,
    Choice,
    Float,
    Int,
    Kind,
    Map,
    Message,
    Text,
    Texts,
    version_field,
    wire,
)
from optuna_rq.protocol.signing import Record, Signer

if TYPE_CHECKING:
    import redis

    from optuna_rq.protocol.spec import StudySpec

__all__ = [
    "RefusedStatus",
    "StudyState",
    "StudyStatus",
    "read_driven_status",
    "read_driven_statuses",
    "read_status",
    "read_statuses",
    "refuse_if_closed",
]


class StudyState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (StudyState.FINISHED, StudyState.CANCELLED, StudyState.FAILED)


_COUNT = Int(minimum=0)


@dataclass(frozen=True, kw_only=True)
class StudyStatus(Message):
    """One study as last published. `best_value` is a single-objective study's best;
    `best_values` a multi-objective study's Pareto front (and `best_params` a list of them)."""

    name: str = wire(Text())
    state: StudyState = wire(Choice(StudyState))
    objective: str = wire(Text())
    directions: list[str] = wire(Texts())
    n_trials: int = wire(_COUNT)
    concurrency: int = wire(_COUNT)
    priority: float = wire(Float(minimum=0))
    batch: int = wire(
        Int(minimum=1), default=1
    )  # trials a job carries, at most (`StudySpec.batch`)
    complete: int = wire(_COUNT, default=0)
    pruned: int = wire(_COUNT, default=0)
    failed: int = wire(_COUNT, default=0)
    running: int = wire(_COUNT, default=0)
    best_value: float | None = wire(Float(optional=True), default=None)
    best_values: list[list[float]] | None = wire(Kind(), default=None)
    best_params: dict[str, Any] | list[dict[str, Any]] | None = wire(Kind(), default=None)
    fail_reasons: dict[str, int] = wire(Map(), default_factory=dict)
    # The budget's count: trials whose last attempt ended (a lost trial and the retries of it
    # are one unit). None in a snapshot from a broker that does not publish it: `done` falls back.
    ended: int | None = wire(Int(minimum=0, optional=True), default=None)
    retries: int = wire(_COUNT, default=0)
    # The submission this snapshot reflects (its StudySpec's `submitted_at`): `submit --wait`
    # waits past the snapshots of an earlier one, and with signing on `wait` takes an ended one
    # as the end only if it is of the submission the broker holds (a signed status kept from an
    # earlier run of the study and written back is not the end of this one).
    submitted_at: float | None = wire(Float(optional=True), default=None)
    storage: str = wire(Text(nonempty=False))
    error: str | None = wire(Text(optional=True, nonempty=False), default=None)
    # Why the study stopped before its budget: a stop condition held (`stopped by --timeout
    # 60: ...`), or a callback called `study.stop()`. A success, not an error (`error` stays
    # None): set from the moment the condition held, while its last trials finish (`running`),
    # and kept once it is `finished`.
    stopped: str | None = wire(Text(optional=True, nonempty=False), default=None)
    # The last line of the latest failed trial's error ("ValueError: ..."): what a study whose
    # trials fail shows first, without a look at its trials.
    last_error: str | None = wire(Text(optional=True, nonempty=False), default=None)
    queue: str = wire(Text(), default="default")  # its resource class
    # No live worker listens to the study's queue: its trials wait for one (nothing fails).
    waiting_for_workers: bool = wire(Bool(), default=False)
    # A study a remote Optimizer runs: `host:pid` of that Python process (None: the broker's
    # study), and the Redis server's clock (seconds) at its last turn, which it publishes at
    # least every `protocol.liveness.TURN_BEAT_S` while it runs: how a reader on any machine
    # tells that the process died (`protocol.liveness.judge_driver`).
    driver: str | None = wire(Text(optional=True), default=None)
    turn_at_s: float | None = wire(Float(minimum=0, optional=True), default=None)
    updated_at: str = wire(Text(), default_factory=lambda: _now())
    v: int = version_field()

    @property
    def driven(self) -> bool:
        """Whether a remote Optimizer's process runs the study (not the broker)."""
        return self.driver is not None

    @property
    def multi_objective(self) -> bool:
        return len(self.directions) > 1

    @property
    def done(self) -> int:
        """How much of the budget (`n_trials`) is done: trials that ended, by any state, not
        counting the attempts that were retried."""
        if self.ended is not None:
            return self.ended
        return self.complete + self.pruned + self.failed

    def outcome(self) -> str | None:
        """Why an ended study is not a success (None if it finished with a COMPLETE trial, or
        has not ended): the line `wait` prints before exiting non-zero. A study a stop condition
        ended finished, and is a success like any other with a COMPLETE trial."""
        if not self.state.ended:
            return None
        if self.state is not StudyState.FINISHED:
            return str(self.state.value) + (f": {self.error}" if self.error else "")
        if self.complete:
            return None
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.fail_reasons.items()))
        return (
            f"finished without a complete trial: {self.pruned} pruned, {self.failed} failed"
            + (f" ({reasons})" if reasons else "")
            + (f"; {self.stopped}" if self.stopped else "")
            + (f"; last error: {self.last_error}" if self.last_error else "")
        )

    @classmethod
    def of(cls, spec: StudySpec, *, state: StudyState, storage: str, **rest: Any) -> StudyStatus:
        """The status of the submitted study `spec`: what the spec says of it (its name,
        objective, directions, budget, cap, priority, batch, queue, when it was submitted), with its
        `state`, its `storage` URL and the `rest` (its figures, an error)."""
        return cls(
            name=spec.name,
            state=state,
            objective=spec.objective,
            directions=spec.direction_names,
            n_trials=spec.n_trials,
            concurrency=spec.concurrency,
            priority=spec.priority,
            batch=spec.batch,
            submitted_at=spec.submitted_at,
            queue=spec.queue,
            storage=storage,
            **rest,
        )

    def refuse(self, command: str) -> None:
        """StudyEndedError if the study takes no `command` (`cancel` or `set`) as it is now
        (`refuse_if_closed`)."""
        refuse_if_closed(self.name, self.state, stopped=self.stopped, command=command)

    @property
    def best(self) -> float | list[list[float]] | None:
        return self.best_values if self.multi_objective else self.best_value

    def with_changes(self, **changes: Any) -> StudyStatus:
        return replace(self, updated_at=_now(), **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: one best key, `best_value` or `best_values`, as the study has."""
        data = self.to_wire()
        del data["best_value" if self.multi_objective else "best_values"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, raw: bytes | str) -> StudyStatus:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"StudyStatus is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ProtocolError(f"StudyStatus must be a JSON object, got {type(data).__name__}")
        data.setdefault("best_value", None)
        data.setdefault("best_values", None)
        data.setdefault("queue", "default")  # an older broker's status names no queue
        data.setdefault("waiting_for_workers", False)
        data.setdefault("stopped", None)  # an older broker's status has no stop field
        data.pop("broker", None)  # `status --json` adds the prefix's broker: not the study's
        data.pop("driver_liveness", None)  # and a driven study's process, as read
        return cls.from_wire(data)

    def sealed(self, signer: Signer) -> bytes:
        """What its publisher stores under the study's name: its JSON, sealed as a status of this
        study (the JSON itself with signing off): the broker's (`Record.STATUS`), or a driven
        study's (`Record.DRIVEN_STATUS`) if `driver` is set."""
        record = Record.DRIVEN_STATUS if self.driven else Record.STATUS
        return signer.seal(record, self.to_json().encode(), bound_to=self.name)

    @classmethod
    def opened(cls, raw: bytes, signer: Signer, *, name: str, driven: bool = False) -> StudyStatus:
        """The status stored under `name`, if the broker signed it for that study (with signing
        on); with `driven`, if it is a driven study's status, signed by a front-door key (a
        remote Optimizer's). ProtocolError saying why not, naming the study."""
        record = Record.DRIVEN_STATUS if driven else Record.STATUS
        signed_by = "a front-door key (a remote Optimizer's)" if driven else "the broker"
        try:
            body = signer.open(record, raw, bound_to=name)
        except ProtocolError as exc:
            raise ProtocolError(
                f"the status of study {name!r} is not signed by {signed_by}, refused: {exc}"
            ) from None
        try:
            status = cls.from_json(body)
        except ProtocolError as exc:
            raise ProtocolError(f"the status of study {name!r} is unreadable: {exc}") from None
        if status.name != name:  # only without signing: a sealed one is bound to its name
            raise ProtocolError(
                f"the status stored under study {name!r} is study {status.name!r}'s, refused"
            )
        if status.driven is not driven:  # only without signing: a sealed one names its kind
            says = "a remote Optimizer's" if status.driven else "the broker's"
            raise ProtocolError(f"the status of study {name!r} says it is {says}, refused")
        return status


def refuse_if_closed(
    name: str, state: StudyState | None, *, stopped: str | None, command: str
) -> None:
    """The one rule on what an ended study takes, applied by the front doors before they send a
    command and by the broker when it applies one (a command sent before the study ended).

    A study that ended (finished, by its budget or a stop condition; cancelled; failed) takes no
    `cancel` and no `set`: it is never rewritten. A running study a stop condition holds for
    (`stopped`: its last trials are finishing) takes no `set` either, which would start trials
    again. Either way StudyEndedError, naming the study: resubmitting it reopens it."""
    ended = state is not None and state.ended
    if not ended and (command != "set" or not stopped):
        return
    what = state.value if ended and state is not None else "stopping"
    why = f" ({stopped})" if stopped else ""
    raise StudyEndedError(
        f"study {name!r} is {what}{why}: `{command}` does not change a study that "
        f"{'ended' if ended else 'stopped'}; resubmitting it (the same definition, "
        f"--study-name {name}) reopens it"
    )


@dataclass(frozen=True)
class RefusedStatus:
    """A study's entry in `<prefix>:status` (or `<prefix>:driven`) that does not open
    (`StudyStatus.opened`): not signed by the broker (a front-door key), or not a status at
    all. Shown as refused, never believed."""

    name: str
    why: str


def read_status(
    connection: redis.Redis, keys: Keys, signer: Signer, name: str
) -> StudyStatus | None:
    """The study's status as the broker published it (None: it has none); ProtocolError if
    what is stored does not open (`StudyStatus.opened`)."""
    raw: Any = connection.hget(keys.status, name)
    return None if raw is None else StudyStatus.opened(bytes(raw), signer, name=name)


def read_statuses(
    connection: redis.Redis, keys: Keys, signer: Signer
) -> list[StudyStatus | RefusedStatus]:
    """Every study's status, by name; an entry that does not open is a `RefusedStatus`."""
    stored: dict[bytes, bytes] = connection.hgetall(keys.status)  # type: ignore[assignment]
    found: list[StudyStatus | RefusedStatus] = []
    for raw_name, raw in sorted(stored.items()):
        name = raw_name.decode(errors="replace")
        try:
            found.append(StudyStatus.opened(raw, signer, name=name))
        except ProtocolError as exc:
            found.append(RefusedStatus(name=name, why=str(exc)))
    return found


def read_driven_status(
    connection: redis.Redis, keys: Keys, signer: Signer, name: str
) -> StudyStatus | None:
    """The status of study `name` as the remote Optimizer running it published it (None: none
    did); ProtocolError if what is stored does not open (`StudyStatus.opened`)."""
    raw: Any = connection.hget(keys.driven, name)
    return None if raw is None else StudyStatus.opened(bytes(raw), signer, name=name, driven=True)


def read_driven_statuses(
    connection: redis.Redis, keys: Keys, signer: Signer
) -> list[StudyStatus | RefusedStatus]:
    """Every driven study's status, by name; an entry that does not open is a `RefusedStatus`."""
    stored: dict[bytes, bytes] = connection.hgetall(keys.driven)  # type: ignore[assignment]
    found: list[StudyStatus | RefusedStatus] = []
    for raw_name, raw in sorted(stored.items()):
        name = raw_name.decode(errors="replace")
        try:
            found.append(StudyStatus.opened(raw, signer, name=name, driven=True))
        except ProtocolError as exc:
            found.append(RefusedStatus(name=name, why=str(exc)))
    return found


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
