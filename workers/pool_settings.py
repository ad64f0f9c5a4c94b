"""What a pool of worker processes serves, where it listens, and how it runs: `WorkerSettings`,
built once by `optuna-rq workers` (every option checked here), handed to each child as it is
spawned."""

from __future__ import annotations

from dataclasses import dataclass, field

from optuna_rq.errors import ConfigError
from optuna_rq.plumbing.locations import DEFAULT_PREFIX
from optuna_rq.protocol import (
    DEFAULT_LEASE_TTL_S,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_QUEUE,
    Keys,
    Role,
    Signer,
    check_queue_name,
)
from optuna_rq.workers.rq_worker import ISOLATION

__all__ = ["STUCK_AFTER_S", "WorkerSettings"]

STUCK_AFTER_S = 10.0
"""How long a child told to stop may go on running no trial before it counts as stuck."""


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """What a pool of workers serves and where it listens."""

    redis_url: str
    modules: tuple[str, ...]
    redis_password: str | None = field(default=None, repr=False)  # apart from the URL
    prefix: str = DEFAULT_PREFIX
    queues: tuple[str, ...] = (DEFAULT_QUEUE,)  # resource classes, in priority order
    count: int = 1  # with `autoscale`, the pool starts at its MIN instead
    paths: tuple[str, ...] = ()  # put first on sys.path (parent and children) before imports
    gpus: tuple[str, ...] | None = None  # child i's CUDA_VISIBLE_DEVICES: gpus[i]
    autoscale: tuple[int, int] | None = None  # (MIN, MAX) worker processes
    scale_down_after_s: float = 30.0  # an autoscaled pool retires workers idle this long
    log_level: str = "INFO"
    restart_backoff_s: float = 1.0
    secret: bytes | None = field(default=None, repr=False)  # a shared secret signs, when set
    key: str | None = field(default=None, repr=False)  # or the worker role key (KeyRing token)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    metrics_port: int | None = None  # worker i serves Prometheus metrics on metrics_port + i
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S
    max_restart_backoff_s: float = 10.0
    isolation: str = "process"  # or "fork": see ISOLATION
    stuck_after_s: float = STUCK_AFTER_S  # a child told to stop, running no trial: then killed
    max_trials_per_child: int | None = None  # a child is replaced after this many trials

    def signer(self) -> Signer:
        """The signer of this pool and its children, as a worker."""
        return Signer.load(
            Role.WORKER,
            secret=self.secret,
            key=self.key,
            max_message_bytes=self.max_message_bytes,
        )

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION:
            raise ConfigError(f"--isolation {self.isolation!r}: choose {' or '.join(ISOLATION)}")
        if not self.queues:
            raise ConfigError("give at least one --queue")
        for queue in self.queues:
            check_queue_name(queue)
        if len(set(self.queues)) != len(self.queues):
            raise ConfigError(f"--queue names a queue twice: {list(self.queues)}")
        if self.max_trials_per_child is not None and (
            isinstance(self.max_trials_per_child, bool)
            or not isinstance(self.max_trials_per_child, int)
            or self.max_trials_per_child < 1
        ):
            raise ConfigError(
                f"--max-trials-per-child must be an integer >= 1, got {self.max_trials_per_child!r}"
            )
        if self.gpus is not None and self.max_workers > len(self.gpus):
            raise ConfigError(
                f"{self.max_workers} worker processes but {len(self.gpus)} GPU device sets "
                f"({' '.join(self.gpus)}): each worker process gets its own; "
                "give fewer --count (or a lower --autoscale MAX), or more GPUs to --gpus"
            )

    @property
    def max_workers(self) -> int:
        return self.count if self.autoscale is None else self.autoscale[1]

    @property
    def rq_queues(self) -> list[str]:
        """The RQ queues the workers listen to, first served first: every served module in the
        first resource class, then in the next."""
        keys = Keys(self.prefix)
        return [keys.trial_queue(m, q) for q in self.queues for m in self.modules]
