"""A remote Optimizer as a user's script runs it, in a process of its own (killed, or given a
terminal, by the tests):
`python -m tests.support.driven_optimizer URL PREFIX STUDY N_TRIALS HOLD_S KEY [PROGRESS]`,
where PROGRESS is `on`, `off` or `auto` (the default: on a terminal).

It runs `tests.support.fault_objectives:steady` (each trial holds HOLD_S seconds, recording under
KEY) at concurrency 1, and prints `finished N` on stdout when the run returns."""

from __future__ import annotations

import sys

import optuna

from optuna_rq import Optimizer, suggest


def main(argv: list[str]) -> None:
    url, prefix, study_name, n_trials, hold_s, key = argv[:6]
    progress = {"on": True, "off": False, "auto": None}[argv[6] if len(argv) > 6 else "auto"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # stderr: the progress bar alone
    study = optuna.create_study(study_name=study_name, sampler=optuna.samplers.RandomSampler())
    optimizer = Optimizer(
        "tests.support.fault_objectives:steady",
        concurrency=1,
        n_trials=int(n_trials),
        study=study,
        redis_url=url,
        prefix=prefix,
        progress=progress,
    )
    optimizer.run(x=suggest.float(0, 1), redis_url=url, key=key, hold_s=float(hold_s))
    print(f"finished {len(study.trials)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
