"""Every Redis name optuna-rq uses: keys under a prefix, stream fields, job ids, the lease TTL.

One broker serves one prefix; several brokers can share a Redis with different prefixes. Under
`<prefix>`:

    <prefix>:<queue>:<module>
                        the RQ queue trials of `module`'s objectives travel on, in resource
                        class `queue` (`default`, or `--queue gpu`): only workers serving the
                        module listen to it, so no worker ever takes a trial it cannot run
    broker              the lock naming the running broker (one per prefix)
    broker:turn         hash: the broker of the loop's last turn, and when (Redis's clock)
    epoch               a random token set once: if it vanishes, Redis lost its data, and the
                        broker stops rather than write into an empty Redis as if nothing happened
    commands            a list of signed commands from the front doors: submit, cancel, set,
                        enqueue, delete
    studies             hash: study name -> its StudySpec (with its incarnation, below)
    status              hash: study name -> its StudyStatus (JSON, for `status` and `wait`;
                        with signing on, sealed by the broker and bound to the study's name)
    driven              hash: study name -> the StudyStatus of a study a remote `Optimizer` runs
                        (`driver` names its process), published by that process while it runs
                        and when it ends, sealed as a `driven study status`: the broker neither
                        reads nor writes it, and the front doors show a name the broker holds
                        as the broker's (`BrokerClient.status`)
    trials:<study>      hash: trial number -> the trial as the broker published it (`TrialSummary`,
                        for `trials`; sealed like a status), written as trials are sent and end
    driven:trials:<study>
                        the same, of a study a remote `Optimizer` runs, published by it
    results             the stream workers append results and trial calls to (group `broker`)
    results:<token>     a private result stream (one remote `Optimizer` run; the token is 32
                        lowercase hex digits, so an ACL pattern of 32 `?` names these streams
                        and nothing under them: deploy/redis/redis-acl.conf)
    wake                the stream a front door appends an empty entry to with its commands (and
                        the broker's sampler process with a sampled trial): the broker's loop
                        waits reading it with the result stream, so it takes them at once; the
                        broker acknowledges and deletes what it reads there (group `broker`)
    dropped, refused    hashes counting stale results and refused messages, by kind
    pools               the set of worker pools that sent a heartbeat
    pool:<id>           one pool's signed heartbeat (`PoolHeartbeat`), expiring unless renewed:
                        who is alive, on which queues, with how many workers
    demand              hash: RQ queue -> workers its studies could keep busy (the broker's)
    backlog             hash: study -> items of its first pending bulk command applied
    backlog:<study>     the study's pending bulk commands (an enqueue), applied a slice a turn
    receipt:<command id>
                        what the broker did with a bulk command's items (`BulkReceipt`), for
                        the front door that sent it to read; it expires after an hour

and, per attempt, under the result stream it reports to (`reply_to`), each named by its job id:

    <reply_to>:lease:<job id>   held by the worker running the attempt (`--lease-ttl`)
    <reply_to>:cancel:<job id>  set by the broker when it cancels a running attempt: the worker's
                                supervisor sees it and stops the objective (with signing on,
                                only if the value is sealed by the broker for that job id)
    <reply_to>:call:<job id>    the list a remote trial waits on for the broker's replies

A job id (`orq-<hash(reply_to, study)>-<incarnation>-<trial>-<attempt>`) names one attempt of
one trial of one incarnation of one study (`AttemptId`). The incarnation is a random id the
broker gives a study when it stores its spec, kept while the study runs (resubmissions,
restarts), and replaced when it is submitted again after it ended or after a delete. So nothing
left of another study, or of an earlier study of the same name (a reply on its way to a killed
worker, an hour-long cancel mark), is ever taken for this one. Every per-attempt name is made
here, from an `AttemptId` alone.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from optuna_rq.errors import ConfigError
from optuna_rq.protocol.field_error import FieldError

__all__ = [
    "INCARNATION_PATTERN",
    "AttemptId",
    "CALL_FIELD",
    "CANCEL_TTL_S",
    "DEFAULT_LEASE_TTL_S",
    "DEFAULT_QUEUE",
    "GROUP",
    "REPLY_TTL_S",
    "RESULT_FIELD",
    "WAKE_FIELD",
    "WAKE_MAXLEN",
    "PRIVATE_TOKEN_PATTERN",
    "Keys",
    "check_incarnation",
    "check_queue_name",
    "new_incarnation",
]

RESULT_FIELD = b"m"
"""The result-stream entry field that holds an encoded `TrialResult`."""
CALL_FIELD = b"c"
"""The result-stream entry field that holds an encoded `TrialCall`."""
WAKE_FIELD = b"w"
"""The field of an entry on the wake stream (`Keys.wake`), empty: it carries nothing. Sent with a
command, it wakes the broker's loop, which waits reading that stream with the result stream, so
the command is taken at once. On its own stream, so that whoever sends commands need not be
allowed to write the result stream."""
WAKE_MAXLEN = 16
"""The most entries the wake stream keeps (a front door trims it as it appends): entries carry
nothing, and a few unread ones wake the broker as well as many would, so it never grows while no
broker reads it."""
GROUP = "broker"
"""The consumer group the broker reads a result stream with."""
DEFAULT_LEASE_TTL_S = 10.0
"""How long a lease outlives its last renewal (`--lease-ttl`); renewed every quarter of it."""
REPLY_TTL_S = 300
"""How long a reply list outlives its last reply (a trial that never reads it)."""
CANCEL_TTL_S = 3600
"""How long a cancel mark waits for the worker running its attempt (one frozen, or cut off from
Redis, sees it when it comes back; after that its lease has long lapsed anyway)."""

DEFAULT_QUEUE = "default"
"""The resource class of a study that names none, and of workers started without `--queue`."""

INCARNATION_PATTERN = re.compile(r"[0-9a-f]{12}")
"""An incarnation id: 12 lowercase hex digits (48 random bits)."""

PRIVATE_TOKEN_PATTERN = re.compile(r"[0-9a-f]{32}")
"""The token of a private result stream (`Keys.private_results`): 32 lowercase hex digits, as
`uuid.uuid4().hex` makes. Its fixed length is what lets an ACL pattern (32 `?`) match the streams
and not the per-attempt keys under them."""

_QUEUE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def check_queue_name(name: object, *, option: str = "queue") -> str:
    """`name` if it is a resource class name (letters, digits, `_`, `.`, `-`; at most 64), else
    FieldError naming `option` (the field, or the caller's name for it)."""
    if not isinstance(name, str) or not _QUEUE_NAME.fullmatch(name):
        raise FieldError(
            option,
            f"{{{option}}} {{value!r}}: a queue is a name of letters, digits, '_', '.' and '-' "
            "(at most 64), such as gpu or default",
            value=name,
        )
    return name


def new_incarnation() -> str:
    """A fresh incarnation id: what the broker gives a study it stores for the first time."""
    return secrets.token_hex(6)


def check_incarnation(value: object) -> str:
    """`value` if it is an incarnation id, else ConfigError: it becomes part of Redis names."""
    if not isinstance(value, str) or not INCARNATION_PATTERN.fullmatch(value):
        raise ConfigError(f"incarnation {value!r} must be 12 lowercase hex digits")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptId:
    """One attempt of one trial of one incarnation of one study, reporting to the result stream
    `reply_to`: what every per-attempt name (`Keys.job_id`, `lease`, `cancel`, `reply_list`) is
    made of, on either side (a `TrialRequest` carries all of it)."""

    reply_to: str
    study: str
    incarnation: str
    trial_number: int
    attempt: int

    def __post_init__(self) -> None:
        check_incarnation(self.incarnation)


class Keys:
    """The keys of one prefix. The prefix is checked once, here."""

    def __init__(self, prefix: str) -> None:
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ConfigError(f"key prefix {prefix!r} must be non-empty and contain no whitespace")
        self.prefix = prefix
        self.broker = f"{prefix}:broker"
        self.broker_turn = f"{prefix}:broker:turn"  # protocol/liveness.py
        self.epoch = f"{prefix}:epoch"
        self.commands = f"{prefix}:commands"
        self.studies = f"{prefix}:studies"
        self.status = f"{prefix}:status"
        self.driven = f"{prefix}:driven"
        self.results = f"{prefix}:results"
        self.dropped = f"{prefix}:dropped"
        self.refused = f"{prefix}:refused"
        self.pools = f"{prefix}:pools"
        self.demand = f"{prefix}:demand"
        self.backlog = f"{prefix}:backlog"
        self.wake = f"{prefix}:wake"

    def trial_queue(self, module: str, queue: str = DEFAULT_QUEUE) -> str:
        """The RQ queue of objectives defined in `module`, in resource class `queue`."""
        return f"{self.prefix}:{queue}:{module}"

    @staticmethod
    def prefix_of(rq_queue: str) -> str:
        """The prefix of a trial queue (`<prefix>:<queue>:<module>`; a prefix may hold ':',
        a queue and a module cannot)."""
        parts = rq_queue.rsplit(":", 2)
        return parts[0] if len(parts) == 3 else rq_queue

    def queue_class(self, rq_queue: str) -> str | None:
        """The resource class of one of this prefix's trial queues (None: not one of them)."""
        parts = self.parse_trial_queue(rq_queue)
        return None if parts is None else parts[0]

    def parse_trial_queue(self, rq_queue: str) -> tuple[str, str] | None:
        """(resource class, module) of one of this prefix's trial queues (None: not one)."""
        head = f"{self.prefix}:"
        if not rq_queue.startswith(head):
            return None
        cls, sep, module = rq_queue[len(head) :].partition(":")
        return (cls, module) if sep and module else None

    def pool(self, pool_id: str) -> str:
        """The heartbeat key of worker pool `pool_id`."""
        return f"{self.prefix}:pool:{pool_id}"

    def trials_of(self, study: str) -> str:
        """The hash of `study`'s published trials, by number (`protocol.trial_summary`)."""
        return f"{self.prefix}:trials:{study}"

    def driven_trials_of(self, study: str) -> str:
        """The hash of the trials a remote Optimizer publishes of the study it runs (`driven`):
        apart from the broker's (`trials_of`), so that a name the broker takes later never
        shows an Optimizer's trials as its own."""
        return f"{self.driven}:trials:{study}"

    def backlog_of(self, study: str) -> str:
        """The list of `study`'s pending bulk commands (`daemon.backlog`)."""
        return f"{self.backlog}:{study}"

    def receipt(self, command_id: str) -> str:
        """The receipt of bulk command `command_id` (`protocol.receipts`)."""
        return f"{self.prefix}:receipt:{command_id}"

    def private_results(self, token: str) -> str:
        """A result stream of one's own under the prefix (a remote `Optimizer` run); `token` is
        32 lowercase hex digits (`PRIVATE_TOKEN_PATTERN`), else ConfigError."""
        if not isinstance(token, str) or not PRIVATE_TOKEN_PATTERN.fullmatch(token):
            raise ConfigError(f"result stream token {token!r} must be 32 lowercase hex digits")
        return f"{self.results}:{token}"

    # -- per attempt: every name below is made from one AttemptId, so it carries the study and
    # its incarnation (tests/protocol/test_keys.py enumerates these methods and checks it)

    @staticmethod
    def job_id(of: AttemptId) -> str:
        """The RQ job id of one attempt: the same attempt gives the same id, so re-enqueueing is
        a no-op. RQ allows only letters, digits, '-' and '_', so stream and study are hashed
        (the stream names the prefix: RQ's job keys are shared by every prefix)."""
        digest = _study_digest(of.reply_to, of.study)
        return f"orq-{digest}-{of.incarnation}-{of.trial_number}-{of.attempt}"

    @staticmethod
    def batch_job_id(attempts: Sequence[AttemptId]) -> str:
        """The RQ job id of a job carrying `attempts` (of one incarnation of one study), run in
        that order: the first one's `job_id`, then `_<trial>-<attempt>` for each other. One
        attempt's is its own `job_id`. The id alone says which attempts a job carries
        (`carried`), so a broker that restarts finds each attempt's job without a record of
        its own."""
        first, *others = attempts
        if any(
            (a.reply_to, a.study, a.incarnation) != (first.reply_to, first.study, first.incarnation)
            for a in others
        ):
            raise ValueError("a batch carries attempts of one incarnation of one study")
        return Keys.job_id(first) + "".join(f"_{a.trial_number}-{a.attempt}" for a in others)

    @staticmethod
    def carried(job: str) -> list[str]:
        """The `job_id` of each attempt the RQ job `job` carries, in order (`batch_job_id`)."""
        first, *others = job.split("_")
        study = first.rsplit("-", 2)[0]  # orq-<digest>-<incarnation>
        return [first, *(f"{study}-{other}" for other in others)]

    @staticmethod
    def lease(of: AttemptId) -> str:
        """The key a worker holds while it runs the attempt: it expires unless renewed, and a
        broker that finds it gone fails the attempt."""
        return f"{of.reply_to}:lease:{Keys.job_id(of)}"

    @staticmethod
    def cancel(of: AttemptId) -> str:
        """The mark the broker sets when it cancels the attempt: the worker holding its lease
        stops the objective and reports it FAIL `cancelled`."""
        return f"{of.reply_to}:cancel:{Keys.job_id(of)}"

    @staticmethod
    def reply_list(of: AttemptId) -> str:
        """The list the attempt's remote trial waits on for the broker's replies."""
        return f"{of.reply_to}:call:{Keys.job_id(of)}"


@functools.lru_cache(maxsize=1024)
def _study_digest(reply_to: str, study: str) -> str:
    return hashlib.blake2b(f"{reply_to}\0{study}".encode(), digest_size=8).hexdigest()
