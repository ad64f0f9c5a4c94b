"""The sampler process's main: sample what the broker asks for, hand the params back, wake it.

One study object per study, on a `ScratchStorage` over the broker's journal file (read only), with
the sampler the study's spec names: the only one of that study that samples, so a seeded sampler
draws the sequence it would in `study.optimize`. Each answer is followed by an entry on the
broker's wake stream (`Keys.wake`), so that its loop, waiting on it, takes the trial at once.
"""

from __future__ import annotations

import copy
import logging
import pickle
import signal
import sys
import time
from multiprocessing.connection import Connection

import optuna
import redis
from optuna.storages import JournalStorage

from optuna_rq.plumbing.connection import connect
from optuna_rq.plumbing.outages import UNREACHABLE, outage_of
from optuna_rq.protocol import WAKE_FIELD, WAKE_MAXLEN
from optuna_rq.sampling.journal_replica import JournalReader, ScratchStorage
from optuna_rq.sampling.sampler_messages import READY, Sampled, SampleFailed, SampleRequest
from optuna_rq.space.declarations import process
from optuna_rq.study.optuna_trials import given_relative

__all__ = ["serve"]

log = logging.getLogger("optuna_rq.sampling")

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"


def serve(pipe: Connection, redis_url: str, password: str | None, wake_stream: str) -> None:
    """Answer requests from `pipe` until it closes (the broker stopped, or died). Ctrl-C and
    SIGTERM are the broker's to act on (they reach this process too, in its process group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Spawned, it logs nothing of the broker's set-up: its warnings (an outage) marked as its own.
    logging.basicConfig(level=logging.WARNING, format=_LOG_FORMAT, stream=sys.stderr)
    try:
        _answer(pipe, connect(redis_url, password=password), wake_stream)
    except (EOFError, OSError):  # the pipe: the broker is gone, maybe before this process was up
        return


def _answer(pipe: Connection, wake: redis.Redis, wake_stream: str) -> None:
    studies: dict[tuple[str, str], tuple[optuna.Study, ScratchStorage]] = {}
    readers: dict[str, JournalStorage] = {}
    pipe.send(READY)
    while True:
        request = pipe.recv()
        if request is None:
            return
        try:
            study, storage = _study(studies, readers, request)
        except Exception as exc:  # the broker samples the study itself
            for _ in range(request.n):
                pipe.send(SampleFailed(request.request_id, f"{type(exc).__name__}: {exc}"))
            continue
        try:
            for _ in range(request.n):
                pipe.send(_sample(study, storage, request))
                try:
                    wake.xadd(wake_stream, {WAKE_FIELD: b""}, maxlen=WAKE_MAXLEN, approximate=False)
                except UNREACHABLE as exc:  # the loop reads the pipe at its next turn anyway
                    outage_of(wake).failed(exc)
                except redis.RedisError:  # a full Redis, say: as above, the next turn reads it
                    pass
                else:
                    outage_of(wake).recovered()
        finally:
            storage.drop_scratch()  # the broker creates them before it asks this study again


def _study(
    studies: dict[tuple[str, str], tuple[optuna.Study, ScratchStorage]],
    readers: dict[str, JournalStorage],
    request: SampleRequest,
) -> tuple[optuna.Study, ScratchStorage]:
    """The study `request` samples, on its journal; made anew when the request brings the
    study's sampler (its first, or a new run of it)."""
    key = (request.journal, request.study)
    if request.sampler is not None:
        if request.journal not in readers:
            readers[request.journal] = JournalStorage(JournalReader(request.journal))
        storage = ScratchStorage(readers[request.journal])
        sampler = pickle.loads(request.sampler)
        if request.reseed:
            sampler.reseed_rng()
        study = optuna.load_study(study_name=request.study, storage=storage, sampler=sampler)
        studies[key] = (study, storage)
    return studies[key]


def _sample(
    study: optuna.Study, storage: ScratchStorage, request: SampleRequest
) -> Sampled | SampleFailed:
    started = time.perf_counter()
    try:
        trial = study.ask()
        process(trial, copy.deepcopy(request.inputs))
        frozen = storage.scratch_trial(storage.last_created)
        relative = given_relative(trial)
    except Exception as exc:  # the broker asks it itself, and meets it again if it is the space's
        return SampleFailed(request.request_id, f"{type(exc).__name__}: {exc}")
    return Sampled(
        request.request_id,
        params=frozen.params,
        distributions=frozen.distributions,
        user_attrs=frozen.user_attrs,
        system_attrs=frozen.system_attrs,
        sample_s=time.perf_counter() - started,
        relative=relative,
    )
