"""`Optimizer` and `optimize`: the flytekitplugins.optuna 1.16 API, run in-process or on workers.

In-process, this behaves as the original does (same names, signatures, defaults, validation
errors), with three things made right: a trial whose objective raises ends FAIL with its reason
and the run goes on (the original leaves it RUNNING and aborts); a NaN or malformed result ends
FAIL instead of raising inside `tell`; an `optuna.TrialPruned` ends the trial PRUNED.

flytekit is optional: it is only looked at when the caller already imported it, so
`import optuna_rq` stays light.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeAlias

import optuna
import redis
from optuna.trial import FrozenTrial, TrialState

from optuna_rq.errors import ConfigError
from optuna_rq.optimizer_run.objective_checks import (
    check_objective,
    is_async_task,
    remote_objective_path,
)
from optuna_rq.plumbing.locations import DEFAULT_PREFIX
from optuna_rq.protocol import (
    DEFAULT_QUEUE,
    FailReason,
    Keys,
    check_max_retries,
    check_queue_name,
    check_trial_timeout,
    describe_exception,
    inputs_mismatch,
)
from optuna_rq.space.declarations import (
    Category,
    Float,
    Integer,
    Number,
    Suggestion,
    process,
    suggest,
)
from optuna_rq.study.optuna_trials import frozen_trial, optimize_loop, stop_requested
from optuna_rq.study.verdict import (
    FAIL_ERROR_ATTR,
    FAIL_REASON_ATTR,
    Verdict,
    judge_result,
    tell,
)

__all__ = [
    "FAIL_ERROR_ATTR",
    "FAIL_REASON_ATTR",
    "Category",
    "Float",
    "Integer",
    "Number",
    "Optimizer",
    "P",
    "Result",
    "Suggestion",
    "optimize",
    "process",
    "suggest",
]

P = ParamSpec("P")

Result: TypeAlias = float | tuple[float, ...]

CallbackType: TypeAlias = Callable[Concatenate[optuna.Trial, P], Awaitable[Result] | Result]

StudyCallback: TypeAlias = Callable[[optuna.Study, FrozenTrial], None]
"""What `study.optimize(callbacks=...)` takes: called with the study and each trial whose result
it recorded."""


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be an integer greater than 0, got {value!r}")


@dataclass
class Optimizer:
    """Run `n_trials` trials of an Optuna study, at most `concurrency` at a time.

    Args:
        objective: either a callback taking a `trial` parameter (sync or async, called as
            `objective(trial=trial, **inputs)` with the inputs as given), or a flytekit
            `AsyncPythonFunctionTask` (called inside `@flytekit.eager` with the inputs after
            `process()` replaced every suggestion by a sampled value).
        concurrency: how many trials may run at once (an int > 0).
        n_trials: how many trials each run asks (an int > 0): every `await optimizer(...)` (or
            `run(...)`) asks `n_trials` new trials of the study, whatever it holds already, so
            a second call runs `n_trials` more. This is how flytekitplugins.optuna 1.16 counts
            them (its `__call__` spawns `n_trials` trials each time; its docstring's "in
            total" is per call). A study stopped early (`study.stop()`) asks fewer. On workers,
            the retries of trials whose worker was lost do not count (`max_retries`).
        study: the Optuna study to optimise; `optuna.create_study()` if None. It holds the
            results afterwards (`optimizer.study.best_params`).
        delay: seconds to wait before starting each trial (an int >= 0).
        callbacks: (keyword-only) each is called as `callback(study, frozen_trial)` after every
            trial's result is recorded, as `study.optimize(callbacks=...)` calls them (so
            `optuna.study.MaxTrialsCallback` works). `study.stop()` from one ends the run: no
            new trial starts, trials already running finish and are recorded. A callback that
            raises ends the run the same way, with the trials in flight FAIL `cancelled`, and
            the error is raised by the run.

    Keyword-only, to run trials on workers (optuna-rq's own; flytekitplugins.optuna has none):
        redis_url or connection: the Redis the workers listen on. With `redis_url`, a
            password apart from the URL is read from $OPTUNA_RQ_REDIS_PASSWORD (or the file
            $OPTUNA_RQ_REDIS_PASSWORD_FILE names), as the command line does.
        queue: the resource class trials run in, as `submit --queue`: workers started with
            `--queue NAME` take them. Default: `default`.
        prefix: the key prefix the workers were started with (`--prefix`). Default: optuna-rq.
        trial_timeout: whole seconds a trial may run before its worker stops it: it ends FAIL
            `timeout`, as with `submit --trial-timeout` (an int >= 1, at most 30 days; None,
            the default: no limit).
        max_retries: how many times a trial whose worker was lost (killed, its machine gone)
            runs again as a new trial, as with `submit --max-retries` (an int from 0 to 100;
            default 2): the last lost attempt ends FAIL `worker_lost`.
        progress: show a progress bar (trials done of the study's budget, best value,
            failures by reason) on stderr. None, the default: when stderr is a terminal.

    While it runs on workers, the study is published on the prefix under its name, as a
    broker's studies are, marked as run by this Python process (`host:pid`): `optuna-rq
    status` lists it (`running (optimizer host:pid)`), and `optuna-rq wait NAME` follows it
    and exits as for a broker's study (0 finished with a complete trial, 1 failed, cancelled
    or without one, 3 if this process dies). A study name the broker holds is refused
    (StudyConflictError, nothing sent), and so is a broker command for this study
    (`optuna-rq cancel`: cancel the `await` instead, which ends it cancelled).

    Raises:
        ValueError (`optuna_rq.errors.ConfigError`): for any invalid argument, naming it.

    A trial ends COMPLETE with its value(s) (whatever `study.tell` takes: numpy scalars and
    0-d arrays too), PRUNED when the objective raises `optuna.TrialPruned`, or FAIL with a
    `fail_reason` user attribute (`exception`, `bad_return`) and the error text in
    `fail_error`; the run goes on, except after a `SystemExit` or `KeyboardInterrupt` from the
    objective: then, as `study.optimize` does, no new trial starts, the trials running finish,
    and the run raises it.
    """

    objective: CallbackType[...] | Any
    concurrency: int
    n_trials: int
    study: optuna.Study | None = None
    delay: int = 0
    redis_url: str | None = field(default=None, kw_only=True)
    connection: redis.Redis | None = field(default=None, kw_only=True, repr=False)
    queue: str | None = field(default=None, kw_only=True)
    callbacks: Sequence[StudyCallback] | None = field(default=None, kw_only=True)
    prefix: str | None = field(default=None, kw_only=True)
    trial_timeout: int | None = field(default=None, kw_only=True)
    max_retries: int = field(default=2, kw_only=True)
    progress: bool | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.study is None:
            self.study = optuna.create_study()

        _positive_int("concurrency", self.concurrency)
        _positive_int("n_trials", self.n_trials)

        if not isinstance(self.study, optuna.Study):
            raise ConfigError(
                f"study must be an optuna.Study, got {type(self.study).__name__}: {self.study!r}"
            )

        if isinstance(self.delay, bool) or not isinstance(self.delay, int) or self.delay < 0:
            raise ConfigError(
                f"delay must be an integer greater than or equal to 0, got {self.delay!r}"
            )
        if self.callbacks is not None:
            self.callbacks = list(self.callbacks)
            for callback in self.callbacks:
                if not callable(callback):
                    raise ConfigError(
                        "callbacks must be callables taking (study, frozen_trial), got "
                        f"{type(callback).__name__}: {callback!r}"
                    )

        if self.progress is not None and not isinstance(self.progress, bool):
            raise ConfigError(
                f"progress must be True, False or None (on a terminal), got {self.progress!r}"
            )
        if self.is_remote:
            if self.redis_url is not None and self.connection is not None:
                raise ConfigError("give redis_url or connection, not both")
            check_queue_name(self.queue or DEFAULT_QUEUE, option="queue")
            Keys(self.prefix or DEFAULT_PREFIX)  # checks it
            self.trial_timeout = check_trial_timeout(self.trial_timeout, option="trial_timeout")
            check_max_retries(self.max_retries, option="max_retries")
            self._objective_path = remote_objective_path(self.objective, len(self.study.directions))
        else:
            for name, value, default in (
                ("trial_timeout", self.trial_timeout, None),
                ("max_retries", self.max_retries, 2),
                ("progress", self.progress, None),
            ):
                if value != default:
                    raise ConfigError(
                        f"{name} is for trials run on workers (redis_url=... or connection=...); "
                        "an in-process run has no worker to stop or lose, and no progress bar "
                        "(as flytekitplugins.optuna's)"
                    )
            check_objective(self.objective, len(self.study.directions))

    @property
    def is_remote(self) -> bool:
        """True when trials run on workers over Redis (`redis_url` or `connection` given)."""
        return self.redis_url is not None or self.connection is not None

    @property
    def is_imperative(self) -> bool:
        """True when the objective is a flytekit async task fed with processed inputs."""
        return is_async_task(self.objective)

    @property
    def _study(self) -> optuna.Study:
        assert self.study is not None  # set in __post_init__
        return self.study

    async def __call__(self, **inputs: Any) -> None:
        """Run all trials; return when the study has recorded every one of them.

        ConfigError, before any trial, if the objective does not take `inputs` (a function;
        the workers check a `module:function` path, which is not imported here)."""
        self._check_inputs(inputs)
        if self.is_remote:
            await self._run_remote(inputs)
            return
        semaphore = asyncio.Semaphore(self.concurrency)
        raised: list[BaseException] = []
        with optimize_loop(self._study):  # study.stop() from a callback ends the run
            trials = [
                self._stops_the_run(self.spawn(semaphore, deepcopy(inputs)), raised)
                for _ in range(self.n_trials)
            ]
            await asyncio.gather(*trials)
        if raised:
            raise raised[0]

    async def _stops_the_run(self, trial: Awaitable[None], raised: list[BaseException]) -> None:
        """Run one trial; a SystemExit or KeyboardInterrupt from its objective (recorded FAIL by
        `spawn`) stops the run as it stops `study.optimize(n_jobs=...)`: no new trial starts,
        those running finish and are recorded, then the run raises it."""
        try:
            await trial
        except (KeyboardInterrupt, SystemExit) as exc:
            raised.append(exc)
            self._study.stop()

    def _check_inputs(self, inputs: dict[str, Any]) -> None:
        """The objective takes `inputs` (and `trial`, if it has that parameter)."""
        if isinstance(self.objective, str):
            return
        mismatch = inputs_mismatch(self.objective, inputs)
        if mismatch is not None:
            raise ConfigError(mismatch)

    def _after_tell(self, study: optuna.Study, number: int) -> None:
        """Call the callbacks with the trial just recorded."""
        if self.callbacks:
            frozen = frozen_trial(study, number)
            for callback in self.callbacks:
                callback(study, frozen)

    def run(self, **inputs: Any) -> optuna.Study:
        """Synchronous `await optimizer(**inputs)` for scripts; returns the study."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self(**inputs))
            return self._study
        raise RuntimeError(
            "Optimizer.run() cannot be called from a running event loop: "
            "use `await optimizer(**inputs)` there"
        )

    async def _run_remote(self, inputs: dict[str, Any]) -> None:
        """Dispatch the trials to workers (`optuna_rq.optimizer_run.remote_run`)."""
        from optuna_rq.optimizer_run.remote_run import RemoteRun, run_on_workers

        run = RemoteRun(
            study=self._study,
            objective_path=self._objective_path,
            concurrency=self.concurrency,
            n_trials=self.n_trials,
            connection=self.connection,
            redis_url=self.redis_url,
            prefix=self.prefix,
            queue=self.queue,
            trial_timeout=self.trial_timeout,
            max_retries=self.max_retries,
            progress=self.progress,
            after_tell=self._after_tell,
        )
        await run_on_workers(run, inputs)

    async def spawn(self, semaphore: asyncio.Semaphore, inputs: dict[str, Any]) -> None:
        """Run one trial in-process under `semaphore`: wait `delay`, ask, run the objective, tell.

        A remote Optimizer dispatches its trials as a whole (`await optimizer(**inputs)`), so
        that the cap is kept by the dispatcher across processes; `spawn` is in-process only.
        """
        if self.is_remote:
            raise ConfigError(
                "spawn() runs one trial in-process; this Optimizer runs trials on workers: "
                "use `await optimizer(**inputs)` or `optimizer.run(**inputs)`"
            )
        async with semaphore:
            await asyncio.sleep(self.delay)
            study = self._study
            if stop_requested(study):  # a callback called study.stop(): no new trial
                return
            trial = study.ask()
            objective: Any = self.objective  # a callback or a flytekit task: checked on init
            try:
                if self.is_imperative:
                    result = await objective(**process(trial, inputs))
                else:
                    out = objective(trial=trial, **inputs)
                    result = await out if inspect.isawaitable(out) else out
            except optuna.TrialPruned:
                tell(study, trial, Verdict(state=TrialState.PRUNED))
            except Exception as exc:
                tell(study, trial, _raised(exc))
            except (KeyboardInterrupt, SystemExit) as exc:
                # The objective's error, as study.optimize records it; and it stops the run as
                # it stops study.optimize: in-process, a Ctrl-C looks just the same.
                tell(study, trial, _raised(exc))
                raise
            except BaseException as exc:  # cancelled: never leave it RUNNING
                tell(
                    study,
                    trial,
                    Verdict(
                        state=TrialState.FAIL,
                        fail_reason=FailReason.CANCELLED,
                        error=f"{type(exc).__name__}: the run was stopped",
                    ),
                )
                raise
            else:
                tell(study, trial, judge_result(result, len(study.directions)))
            self._after_tell(study, trial.number)


def _raised(exc: BaseException) -> Verdict:
    """The verdict on an in-process trial whose objective raised `exc`."""
    return Verdict(
        state=TrialState.FAIL, fail_reason=FailReason.EXCEPTION, error=describe_exception(exc)
    )


def optimize(
    objective: CallbackType[...] | Any | None = None,
    concurrency: int = 1,
    n_trials: int = 1,
    study: optuna.Study | None = None,
) -> Any:
    """Decorate an objective into an `Optimizer`: `@optimize` or `@optimize(n_trials=..., ...)`."""
    if objective is not None:
        if callable(objective) or is_async_task(objective):
            return Optimizer(
                objective=objective, concurrency=concurrency, n_trials=n_trials, study=study
            )
        raise ConfigError(
            "This decorator must be called with a callable or a flyte Task, "
            f"got {type(objective).__name__}: {objective!r}"
        )

    def decorator(objective: CallbackType[...] | Any) -> Optimizer:
        return Optimizer(
            objective=objective, concurrency=concurrency, n_trials=n_trials, study=study
        )

    return decorator
