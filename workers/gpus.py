"""One device set per worker process: `optuna-rq workers --gpus 0,1,2,3 [--gpus-per-trial N]`.

Child i of the pool gets device set i in `CUDA_VISIBLE_DEVICES`, set before it imports anything,
so CUDA (PyTorch, JAX, TensorFlow, CuPy) sees only those devices, numbered from 0 inside the
process. A restarted child keeps its index, and so its devices. Nothing here needs a GPU: the
pool only sets the variable.
"""

from __future__ import annotations

from optuna_rq.errors import ConfigError

__all__ = ["VISIBLE_DEVICES", "device_sets"]

VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
"""The variable each child gets its device set in."""


def device_sets(gpus: str, per_trial: int = 1) -> tuple[str, ...]:
    """The device sets of `--gpus` (a count N, meaning devices 0..N-1, or a comma-separated list
    of device ids or UUIDs), `per_trial` devices each, in order: "0,1,2,3" with 2 per trial is
    ("0,1", "2,3"). ConfigError naming the option for anything else."""
    text = gpus.strip()
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise ConfigError(f"--gpus {gpus!r}: give a count >= 1 or a list of ids like 0,1")
        ids = [str(i) for i in range(count)]
    else:
        ids = [part.strip() for part in text.split(",") if part.strip()]
        if not ids or any(not _device_id(i) for i in ids):
            raise ConfigError(
                f"--gpus {gpus!r}: give a count (4) or device ids separated by commas "
                "(0,1,2,3, or GPU UUIDs)"
            )
        if len(set(ids)) != len(ids):
            raise ConfigError(f"--gpus {gpus!r} names a device twice")
    if isinstance(per_trial, bool) or not isinstance(per_trial, int) or per_trial < 1:
        raise ConfigError(f"--gpus-per-trial must be an integer >= 1, got {per_trial!r}")
    if len(ids) % per_trial:
        raise ConfigError(
            f"--gpus {gpus!r} has {len(ids)} devices, not a multiple of --gpus-per-trial "
            f"{per_trial}: every worker process gets {per_trial}"
        )
    return tuple(",".join(ids[i : i + per_trial]) for i in range(0, len(ids), per_trial))


def _device_id(text: str) -> bool:
    return all(c.isalnum() or c in "-_:/" for c in text)
