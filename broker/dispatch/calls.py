"""Remote-trial calls: a define-by-run objective's `trial.suggest_*`, `report`, ... made on a
worker's proxy (`optuna_rq.workers.remote_trial`), run here on the real trial, and answered.

Only the trial's current attempt is served: a call for a trial that ended, or whose attempt was
retried, or that another broker owns, gets an error reply (the objective raises it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import optuna
import redis

from optuna_rq.dispatch.observer import DispatchObserver, count_refusal
from optuna_rq.dispatch.runs import StudyRun
from optuna_rq.errors import ProtocolError
from optuna_rq.protocol import REPLY_TTL_S, Keys, Signer, TrialCall, TrialCallReply
from optuna_rq.trials import set_trial_system_attr

__all__ = ["CallServer"]

log = logging.getLogger("optuna_rq.dispatch")


class CallServer:
    """Serves the calls that arrive on one dispatcher's result stream."""

    def __init__(
        self,
        connection: redis.Redis,
        *,
        prefix: str,
        reply_to: str,
        signer: Signer,
        observer: DispatchObserver,
    ) -> None:
        self.connection = connection
        self.prefix = prefix
        self.reply_to = reply_to
        self.signer = signer
        self.observer = observer

    def serve(self, raw: bytes, runs: Mapping[str, StudyRun]) -> None:
        """Run a remote trial's call on the real trial; answer it if the worker waits."""
        try:
            body = self.signer.open(raw, what="TrialCall")
            call = TrialCall.decode(body, max_bytes=self.signer.max_message_bytes)
        except ProtocolError as exc:
            log.error("refused a trial call: %s", exc)
            self.observer.refused("call")
            count_refusal(self.connection, self.prefix, "call")
            return
        run = runs.get(call.study)
        record = None if run is None else run.owned(call.trial_number, call.attempt)
        try:
            if run is None or record is None:
                raise LookupError(
                    f"trial {call.trial_number} (attempt {call.attempt}) of study {call.study!r} "
                    "is not running on this broker: it ended, or another broker owns it"
                )
            value = _perform(run.study, record.trial, call)
            encoded = TrialCallReply(seq=call.seq, ok=True, value=value, error=None).encode()
        except Exception as exc:  # the objective gets the error; the broker serves on
            answer = TrialCallReply(seq=call.seq, ok=False, value=None, error=f"{exc}")
            encoded = answer.encode()
            if not call.reply:
                log.warning("trial call %s failed: %s", call.method, exc)
        if call.reply:
            # The reply list expires by itself: nothing to clean up when the trial ends.
            key = Keys.reply_list(self.reply_to, call.trial_number, call.attempt)
            pipe = self.connection.pipeline(transaction=False)
            pipe.rpush(key, self.signer.seal(encoded))
            pipe.expire(key, REPLY_TTL_S)
            pipe.execute()


def _perform(study: optuna.Study, trial: optuna.Trial, call: TrialCall) -> Any:
    """One remote trial call on the real trial: only these methods, nothing by name lookup."""
    args: Any = call.args  # checked by Optuna's own signatures: a mismatch is a TypeError reply
    kwargs: Any = call.kwargs
    match call.method:
        case "suggest_float":
            return trial.suggest_float(*args, **kwargs)
        case "suggest_int":
            return trial.suggest_int(*args, **kwargs)
        case "suggest_categorical":
            return trial.suggest_categorical(*args, **kwargs)
        case "report":
            trial.report(*args, **kwargs)
            return None
        case "should_prune":
            return bool(trial.should_prune())  # pruners may answer with a numpy bool
        case "set_user_attr":
            trial.set_user_attr(*args, **kwargs)
            return None
        case "set_system_attr":
            key, value = args
            if not isinstance(key, str):
                raise TypeError(f"attribute key must be a str, got {key!r}")
            set_trial_system_attr(study, trial, key, value)
            return None
        case "datetime_start":
            start = trial.datetime_start
            return None if start is None else start.isoformat()
    raise ValueError(f"unknown trial method {call.method!r}")
