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
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeAlias

import optuna
import redis
from optuna.trial import FrozenTrial, TrialState

from optuna_rq.connection import DEFAULT_PREFIX
from optuna_rq.errors import ConfigError
from optuna_rq.objective_checks import (
    check_objective,
    is_async_task,
    remote_objective_path,
)
from optuna_rq.protocol import (
    DEFAULT_QUEUE,
    FailReason,
    Keys,
    check_queue_name,
    describe_exception,
    inputs_mismatch,
)
from optuna_rq.space import Category, Float, Integer, Number, Suggestion, process, suggest
from optuna_rq.trials import frozen_trial, optimize_loop, stop_requested
from optuna_rq.verdict import (
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
"""What `study.optimize(callbacks=...)` takes: called with the study and each trial it told."""


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
        n_trials: how many trials to run in total (an int > 0).
        study: the Optuna study to optimise; `optuna.create_study()` if None. It holds the
            results afterwards (`optimizer.study.best_params`).
        delay: seconds to wait before starting each trial (an int >= 0).
        callbacks: (keyword-only) each is called as `callback(study, frozen_trial)` after every
            trial is told, as `study.optimize(callbacks=...)` calls them (so
            `optuna.study.MaxTrialsCallback` works). `study.stop()` from one ends the run: no
            new trial starts, trials already running finish and are told. A callback that
            raises ends the run the same way, with the trials in flight FAIL `cancelled`, and
            the error is raised by the run.

    Keyword-only, to run trials on workers (optuna-rq's own; flytekitplugins.optuna has none):
        redis_url or connection: the Redis the workers listen on. With `redis_url`, a
            password apart from the URL is read from $OPTUNA_RQ_REDIS_PASSWORD (or the file
            $OPTUNA_RQ_REDIS_PASSWORD_FILE names), as the command line does.
        queue: the resource class trials run in, as `submit --queue`: workers started with
            `--queue NAME` take them. Default: `default`.
        prefix: the key prefix the workers were started with (`--prefix`). Default: optuna-rq.

    Raises:
        ValueError (`broker.errors.ConfigError`): for any invalid argument, naming it.

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

        if self.is_remote:
            if self.redis_url is not None and self.connection is not None:
                raise ConfigError("give redis_url or connection, not both")
            check_queue_name(self.queue or DEFAULT_QUEUE, option="queue")
            Keys(self.prefix or DEFAULT_PREFIX)  # checks it
            self._objective_path = remote_objective_path(self.objective, len(self.study.directions))
        else:
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
        """Run all trials; return when every one of them has been told to the study.

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
        """Run one trial; a SystemExit or KeyboardInterrupt from its objective (told FAIL by
        `spawn`) stops the run as it stops `study.optimize(n_jobs=...)`: no new trial starts,
        those running finish and are told, then the run raises it."""
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
        """Call the callbacks with the trial just told."""
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
        """Dispatch the trials to workers from a thread; cancelling the await stops the run and
        ends the outstanding trials FAIL (`cancelled`), so none is left RUNNING."""
        from optuna_rq.connection import connect, resolve_redis_password
        from optuna_rq.dispatch import Dispatcher, StudyRun
        from optuna_rq.protocol import Role, Signer

        connection = self.connection or connect(
            self.redis_url or "", password=resolve_redis_password()
        )
        prefix = self.prefix or DEFAULT_PREFIX
        run = StudyRun(
            study=self._study,
            objective=self._objective_path,
            inputs=inputs,
            concurrency=self.concurrency,
            n_trials=self.n_trials,
            queue=self.queue or DEFAULT_QUEUE,
        )
        dispatcher = Dispatcher(
            connection,
            prefix=prefix,
            reply_to=Keys(prefix).private_results(uuid.uuid4().hex),
            signer=Signer.from_env(Role.CLIENT),
        )
        dispatcher.add(run)
        stop = threading.Event()
        failures: list[BaseException] = []

        def after_tell(run: StudyRun, number: int) -> None:
            if failures:
                return
            try:
                self._after_tell(run.study, number)
            except Exception as exc:  # end the run cleanly, then raise it from the run
                failures.append(exc)
                stop.set()
                return
            if stop_requested(run.study):
                dispatcher.wind_down(run, "study.stop() was called before this trial was sent")

        def work_until_done() -> None:
            with optimize_loop(self._study):  # in the dispatcher's thread: callbacks run there
                dispatcher.run_until_done(stop)

        dispatcher.on_told = after_tell
        watch = threading.Thread(
            target=_warn_while_unserved,
            args=(dispatcher, run, stop),
            name="optuna-rq-worker-watch",
            daemon=True,
        )
        watch.start()
        work = asyncio.get_running_loop().run_in_executor(None, work_until_done)
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()
            await work  # the loop ends the outstanding trials, then returns
            raise
        finally:
            stop.set()
            dispatcher.close()
        if failures:
            raise failures[0]

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


_log = logging.getLogger("optuna_rq.optimizer")

UNSERVED_WARNING_S = 3.0
"""How soon a remote Optimizer whose queue has no live worker says so (and then how often)."""


def _warn_while_unserved(dispatcher: Any, run: Any, stop: threading.Event) -> None:
    """Log, every `UNSERVED_WARNING_S` while the run goes on, that no live worker serves its
    queue and what it waits for: otherwise a run without workers waits silently forever.
    Live workers are the pools' own heartbeats, as the broker counts them."""
    from optuna_rq.protocol import live_pools, workers_on

    module = run.objective.partition(":")[0]
    rq_queue = dispatcher.keys.trial_queue(module, run.queue)
    while not stop.wait(UNSERVED_WARNING_S):
        if run.done:
            return
        try:
            live = workers_on(
                live_pools(dispatcher.connection, dispatcher.keys, dispatcher.signer), rq_queue
            )
        except Exception:  # Redis away: the dispatcher rides it out and says so itself
            continue
        if live == 0:
            _log.warning(
                "study %r: waiting for a worker on queue %r (%d trials outstanding, %d of %d "
                "asked); start one with `optuna-rq workers --import %s --queue %s`",
                run.name,
                rq_queue,
                run.n_outstanding,
                run.asked,
                run.n_trials,
                module,
                run.queue,
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
