"""The study spec: a submitted study's definition, as the front doors send it and the broker keeps
it (`<prefix>:studies`).

A `StudySpec` is validated when it is built, so the CLI refuses a bad submission before sending
it, and when it is decoded, so the daemon refuses a forged one the same way. What it names is
checked as the wire can: whether the packages a sampler needs are installed is the broker's to
say, where the sampler is built (`optuna_rq.study.algorithms`), not the submitting machine's.

The spec the broker keeps is its own record (`Record.SPEC`): with signing on it is sealed by the
broker and bound to the study's name (`seal_stored_spec`), and whoever reads it back, the broker
at its next start or a front door, opens it with `open_stored_spec`, which refuses one that is
unsigned, signed by another role, or stored under another name than its own.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optuna_rq.errors import ConfigError, MessageLimitError, ProtocolError, StudyConflictError
from optuna_rq.protocol.choices import Direction, Pruner, Sampler, StrChoice
from optuna_rq.protocol.codec import check_params
from optuna_rq.protocol.field_error import FieldError
from optuna_rq.protocol.keys import (
    DEFAULT_QUEUE,
    INCARNATION_PATTERN,
    check_queue_name,
    new_incarnation,
)
from optuna_rq.protocol.objectives import parse_objective_path
from optuna_rq.protocol.schema import (
    Bool,
    Choice,
    Choices,
    Float,
    Int,
    Map,
    Matching,
    Message,
    Text,
    version_field,
    wire,
)
from optuna_rq.protocol.signing import Record, Signer
from optuna_rq.protocol.spec_bounds import (
    MAX_ASK_AHEAD,
    MAX_BATCH,
    MAX_SEED,
    MAX_TIMEOUT_S,
    MAX_TRIAL_TIMEOUT_S,
    check_max_retries,
    check_settings,
    choice_of,
    int_in,
    positive_number,
)
from optuna_rq.space.space_files import space_from_data

if TYPE_CHECKING:
    import redis

    from optuna_rq.protocol.keys import Keys

__all__ = [
    "DEFINITION",
    "KEEP_OUT",
    "StudySpec",
    "open_stored_spec",
    "seal_stored_spec",
]

KEEP_OUT = (
    "keep large data out of the space: give a path or URL to it as a fixed input, and read it in "
    "the objective"
)
"""The fix for a space over a limit of a message: every trial's request carries it."""


@dataclass(frozen=True, kw_only=True)
class StudySpec(Message):
    """Everything the broker needs to run one submitted study.

    The wire kinds check what travels; `__post_init__` checks the rules, naming the field (a
    `FieldError` when built, which a front door shows with its own names for the fields; a
    `ProtocolError` when decoded).
    """

    name: str = wire(Text())
    objective: str = wire(Text())
    space: dict[str, Any] = wire(Map())
    n_trials: int = wire(Int(minimum=1))
    concurrency: int = wire(Int(minimum=1))
    # Choices travel as their strings; a front door may build the spec with the strings too.
    directions: list[Direction] = wire(
        Choices(Direction), default_factory=lambda: [Direction.MINIMIZE]
    )
    sampler: Sampler = wire(Choice(Sampler), default=Sampler.TPE)
    seed: int | None = wire(Int(minimum=0, optional=True), default=None)
    pruner: Pruner = wire(Choice(Pruner), default=Pruner.NONE)
    # TPE's constant liar (running trials count as bad ones, so parallel asks spread out);
    # None: on when the cap is above 1. At cap 1 nothing runs while it asks: it changes nothing.
    constant_liar: bool | None = wire(Bool(optional=True), default=None)
    # Trials asked (sampled, RUNNING in the storage) before a slot frees, to send at once when
    # one does. 0 by default: the sampler then sees exactly what `study.optimize` would.
    ask_ahead: int = wire(Int(minimum=0), default=0)
    # Trials sent to a worker in one RQ job, run there one after another, each leased and
    # reported as it ends: for objectives so short that RQ's cost per job is most of a trial's.
    # 1 by default: a job per trial, as RQ users expect to see in `rq info`.
    batch: int = wire(Int(minimum=1), default=1)
    storage: str | None = wire(Text(optional=True), default=None)
    trial_timeout_s: float | None = wire(Float(minimum=0, optional=True), default=None)
    max_retries: int = wire(Int(minimum=0), default=2)
    priority: float = wire(Float(minimum=0), default=1.0)
    # The resource class its trials go to (`--queue gpu`): workers started with that --queue.
    queue: str = wire(Text(), default=DEFAULT_QUEUE)
    submitted_at: float = wire(Float(), default_factory=time.time)
    # Stop conditions: the study ends FINISHED, naming the one that held, before its budget.
    timeout_s: float | None = wire(Float(minimum=0, optional=True), default=None)  # wall clock
    target: float | None = wire(Float(optional=True), default=None)  # best value reaches it
    patience: int | None = wire(Int(minimum=1, optional=True), default=None)  # no improvement
    # Which incarnation of the study this is: set by the broker when it stores the spec
    # (`incarnated`: new unless the study is known and has not ended), never by a front door;
    # not part of the definition. Every per-attempt name carries it (`Keys`).
    incarnation: str | None = wire(
        Matching(INCARNATION_PATTERN, "an incarnation id (12 lowercase hex digits)", optional=True),
        default=None,
    )
    v: int = version_field()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise FieldError(
                "name", "{name} must be a non-empty name, got {value!r}", value=self.name
            )
        parse_objective_path(self.objective)
        space_from_data(self.space)  # every suggestion validated
        try:
            check_params(self.space)
        except MessageLimitError as exc:
            raise ConfigError(f"{exc}: {KEEP_OUT}") from exc
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from exc
        check_settings(n_trials=self.n_trials, concurrency=self.concurrency)
        self._take_choices()
        if self.seed is not None and not int_in(self.seed, 0, MAX_SEED):
            raise FieldError(
                "seed",
                "{seed} must be an integer from 0 to {high} (what Optuna's samplers take), "
                "got {value!r}",
                high=MAX_SEED,
                value=self.seed,
            )
        if self.trial_timeout_s is not None and not positive_number(
            self.trial_timeout_s, MAX_TRIAL_TIMEOUT_S
        ):
            raise FieldError(
                "trial_timeout_s",
                "{trial_timeout_s} must be > 0 and at most {high} seconds (30 days), got {value!r}",
                high=MAX_TRIAL_TIMEOUT_S,
                value=self.trial_timeout_s,
            )
        if not int_in(self.ask_ahead, 0, MAX_ASK_AHEAD):
            raise FieldError(
                "ask_ahead",
                "{ask_ahead} must be an integer from 0 to {high}, got {value!r}",
                high=MAX_ASK_AHEAD,
                value=self.ask_ahead,
            )
        self._check_batch()
        if self.constant_liar is not None and self.sampler is not Sampler.TPE:
            raise FieldError(
                "constant_liar",
                "{constant_liar} is a TPE option, not one of {sampler} {value}: "
                "drop it or use {sampler} tpe",
                value=self.sampler,
            )
        check_max_retries(self.max_retries)
        check_settings(priority=self.priority)
        self._check_stop_conditions()
        check_queue_name(self.queue)
        if self.storage is not None and not isinstance(self.storage, str):
            raise FieldError(
                "storage", "{storage} must be a URL, got {value!r}", value=self.storage
            )

    def _check_batch(self) -> None:
        if not int_in(self.batch, 1, MAX_BATCH):
            raise FieldError(
                "batch",
                "{batch} must be an integer from 1 to {high}, got {value!r}",
                high=MAX_BATCH,
                value=self.batch,
            )
        # RQ's timeout alarm is armed once a job: a batch's trials cannot each have their own.
        if self.batch > 1 and self.trial_timeout_s is not None:
            raise FieldError(
                "batch",
                "{batch} {value} cannot go with {trial_timeout_s}: RQ times a job, not each "
                "trial of a batch; drop one of them",
                value=self.batch,
            )

    def _take_choices(self) -> None:
        """The sampler, pruner and directions as their enums (given as strings, or decoded);
        FieldError naming the field and its choices for one that is none of them."""
        if not isinstance(self.directions, list) or not self.directions:
            raise FieldError(
                "directions",
                "{directions}: give a list of {choices}, one for each objective, got {value!r}",
                choices=" or ".join(Direction.values()),
                value=self.directions,
            )
        directions = [choice_of(Direction, "directions", d) for d in self.directions]
        object.__setattr__(self, "directions", directions)
        object.__setattr__(self, "sampler", choice_of(Sampler, "sampler", self.sampler))
        object.__setattr__(self, "pruner", choice_of(Pruner, "pruner", self.pruner))

    def _check_stop_conditions(self) -> None:
        if self.timeout_s is not None and not positive_number(self.timeout_s, MAX_TIMEOUT_S):
            raise FieldError(
                "timeout_s",
                "{timeout_s} must be > 0 and at most {high:g} seconds (a year), got {value!r}",
                high=MAX_TIMEOUT_S,
                value=self.timeout_s,
            )
        single = len(self.directions) == 1
        if self.target is not None:
            if isinstance(self.target, bool) or not isinstance(self.target, (int, float)):
                raise FieldError(
                    "target", "{target} must be a number, got {value!r}", value=self.target
                )
            if not math.isfinite(self.target):
                raise FieldError(
                    "target", "{target} must be a finite number, got {value!r}", value=self.target
                )
            if not single:
                raise FieldError(
                    "target",
                    "{target} needs a single-objective study: a multi-objective study has no "
                    "single best value to compare (use {timeout_s} or {n_trials})",
                )
        if self.patience is not None:
            if (
                isinstance(self.patience, bool)
                or not isinstance(self.patience, int)
                or not 1 <= self.patience <= self.n_trials
            ):
                raise FieldError(
                    "patience",
                    "{patience} must be an integer from 1 to {n_trials} ({high}), got {value!r}",
                    high=self.n_trials,
                    value=self.patience,
                )
            if not single:
                raise FieldError(
                    "patience",
                    "{patience} needs a single-objective study: improvement of a Pareto front "
                    "is not one number (use {timeout_s} or {n_trials})",
                )

    @property
    def uses_constant_liar(self) -> bool:
        """Whether its TPE sampler runs with the constant liar: as set, else above cap 1."""
        return self.concurrency > 1 if self.constant_liar is None else self.constant_liar

    @property
    def direction_names(self) -> list[str]:
        """The directions as Optuna and a status name them: `["minimize"]`."""
        return [str(d) for d in self.directions]

    @property
    def inputs(self) -> dict[str, Any]:
        """The space as `Optimizer` inputs: suggestions and fixed values."""
        return space_from_data(self.space)

    def with_changes(self, **changes: Any) -> StudySpec:
        return dataclasses.replace(self, **changes)

    def incarnated(self, known: StudySpec | None) -> StudySpec:
        """This submission as the broker stores it: with the incarnation of `known`, the spec
        stored under its name of a study that has not ended (the same study submitted again),
        or else a new one: a study submitted for the first time, or again after a delete, or
        after it ended. An ended study has no attempt left running, and may number its trials
        again (a storage that failed can come back without its last ones): nothing left of
        its earlier attempts (their cancel marks) may be taken for the new ones."""
        incarnation = new_incarnation() if known is None else known.incarnation
        return self.with_changes(incarnation=incarnation or new_incarnation())

    def differences(self, other: StudySpec) -> list[str]:
        """What makes `other` another study than this one, one phrase per field (empty: the
        same definition). Only `DEFINITION` counts: budget, cap, priority, timeout and retries
        may change from one submission to the next."""
        found = []
        for name in DEFINITION:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine == theirs:
                continue
            if name == "space":
                keys = sorted(
                    k for k in {*mine, *theirs} if mine.get(k, _MISSING) != theirs.get(k, _MISSING)
                )
                found.append(f"space ({', '.join(keys)} differ)")
            else:
                found.append(f"{name} {_plain(mine)!r}, not {_plain(theirs)!r}")
        return found

    # -- rules on a submitted study that the front doors and the broker both apply -------------

    def storage_url(self, default: str) -> str:
        """The storage its trials are in: its own, or `default` (the broker's)."""
        return self.storage or default

    def refuse_redefinition(self, submitted: StudySpec) -> None:
        """StudyConflictError if `submitted`, under this study's name, is another definition
        (`differences`): its trials would mix with this study's. The front doors refuse it
        before sending it, and the broker when it applies it."""
        differences = self.differences(submitted)
        if differences:
            raise StudyConflictError(
                f"study {self.name!r} exists with another definition: {'; '.join(differences)}. "
                "Nothing was changed; submit it under another study name"
            )

    @classmethod
    def read_stored(
        cls, connection: redis.Redis, keys: Keys, signer: Signer, name: str
    ) -> StudySpec | None:
        """The spec the broker stored for study `name` (None: none is stored); ProtocolError if
        it does not open (`open_stored_spec`)."""
        raw: Any = connection.hget(keys.studies, name)
        return None if raw is None else open_stored_spec(signer, name, raw)


def seal_stored_spec(signer: Signer, spec: StudySpec) -> bytes:
    """`spec` as the broker keeps it under its name in `<prefix>:studies`: sealed, bound to it."""
    return signer.seal(Record.SPEC, spec.encode(), bound_to=spec.name)


def open_stored_spec(signer: Signer, name: str, raw: bytes) -> StudySpec:
    """The spec stored under `name`; ProtocolError if it does not verify (with signing on: the
    broker did not seal it, or sealed it for another name), does not decode, or is another
    study's (a spec copied under another name)."""
    body = signer.open(Record.SPEC, raw, bound_to=name)
    spec = StudySpec.decode(body, max_bytes=signer.max_message_bytes)
    if spec.name != name:
        raise ProtocolError(f"the spec stored as study {name!r} is study {spec.name!r}'s")
    return spec


DEFINITION = (
    "objective",
    "space",
    "directions",
    "sampler",
    "seed",
    "constant_liar",
    "pruner",
    "storage",
)
"""The StudySpec fields that define a study: a submission that differs in one is another study,
and is refused under the same name."""
_MISSING = object()


def _plain(value: Any) -> Any:
    """`value` with its choices as the strings they are typed as (for messages)."""
    if isinstance(value, StrChoice):
        return str(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value
