"""One device set per worker process, taken from the GPUs the pool itself was given.

`optuna-rq workers --gpus N` shares out the first N GPUs of the pool's allocation, `--gpus all`
all of them, and `--gpus device=2,3` the ones named (Docker's spellings); `--gpus-per-trial K`
gives each worker process K of them. The allocation is what the pool was started with:
`CUDA_VISIBLE_DEVICES` when it is set (by SLURM, a scheduler, a shared node's convention), read as
CUDA reads it; otherwise every GPU of the machine, as `nvidia-smi -L` lists them (or, without
nvidia-smi, the `/dev/nvidiaN` devices). A device outside the allocation, or more than it has,
is refused naming the allocation: a pool never reaches a GPU that another job was given.

Child i of the pool gets device set i in `CUDA_VISIBLE_DEVICES`, set before it imports anything,
so CUDA (PyTorch, JAX, TensorFlow, CuPy) sees only those devices, numbered from 0 inside the
process. CUDA reads the variable against the machine's own numbering, so a child's set names
devices as the allocation does (`2,3` shared out as `2` and `3`). A restarted child keeps its
index, and so its devices. Nothing here needs a GPU: the pool only sets the variable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from optuna_rq.errors import ConfigError

__all__ = [
    "VISIBLE_DEVICES",
    "Allocation",
    "allocation",
    "device_sets",
    "machine_gpus",
    "parse_visible_devices",
]

VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
"""The variable the pool's allocation is read from, and each child gets its device set in."""

DEVICE_LIST = "device="
"""How `--gpus` names devices (`--gpus device=2,3`), as Docker's `--gpus` does."""

SPELLINGS = "a count (--gpus 2), all (--gpus all), or devices by id (--gpus device=2,3)"

# A device as CUDA_VISIBLE_DEVICES names one: an index, or a GPU or MIG instance UUID.
_INDEX = re.compile(r"\d+")
_UUID = re.compile(r"(GPU|MIG)-[0-9A-Za-z/_-]+")
# `nvidia-smi -L`: "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-8932f937-d72c-4106-c12f-...)".
_SMI_LINE = re.compile(r"^GPU (\d+): .*\(UUID: ((?:GPU|MIG)-[^)\s]+)\)", re.MULTILINE)
_DEVICE_NODE = re.compile(r"nvidia\d+")
_PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True, kw_only=True)
class Allocation:
    """The GPUs a pool was given: `devices` in order, as `CUDA_VISIBLE_DEVICES` names them;
    `aliases` maps other names of the same devices (a UUID for an index) to those; `source`
    says where they were read, for errors."""

    devices: tuple[str, ...]
    source: str
    aliases: Mapping[str, str] | None = None

    def describe(self) -> str:
        """`2,3 (CUDA_VISIBLE_DEVICES=2,3)`, `none (CUDA_VISIBLE_DEVICES=-1)`."""
        return f"{','.join(self.devices) or 'none'} ({self.source})"

    def resolve(self, name: str) -> str | None:
        """The device of the allocation `name` names (itself or an alias), else None."""
        key = _normal(name)
        if key in self.devices:
            return key
        return (self.aliases or {}).get(key)


def parse_visible_devices(value: str) -> tuple[str, ...]:
    """The devices `CUDA_VISIBLE_DEVICES=value` leaves visible, as CUDA reads it: the entries
    up to the first one that is not a device (so `-1`, and an empty value, leave none); a
    device named twice leaves none either (CUDA refuses the list)."""
    devices: list[str] = []
    for entry in value.split(","):
        name = entry.strip()
        if not (_INDEX.fullmatch(name) or _UUID.fullmatch(name)):
            break
        devices.append(_normal(name))
    return () if len(set(devices)) != len(devices) else tuple(devices)


def machine_gpus() -> Allocation | None:
    """Every GPU of the machine (as CUDA numbers them with no CUDA_VISIBLE_DEVICES): what
    `nvidia-smi -L` lists, indices with their UUIDs as aliases; without nvidia-smi, one per
    `/dev/nvidiaN` device (a container holds only its own). None if neither is there to ask."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            listed = subprocess.run(
                [smi, "-L"], capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired):
            listed = None
        if listed is not None and listed.returncode == 0:
            found = _SMI_LINE.findall(listed.stdout)
            return Allocation(
                devices=tuple(index for index, _uuid in found),
                aliases={uuid: index for index, uuid in found},
                source="nvidia-smi -L",
            )
    try:
        nodes = [n for n in os.listdir("/dev") if _DEVICE_NODE.fullmatch(n)]
    except OSError:
        return None
    if not nodes:
        return None
    return Allocation(
        devices=tuple(str(i) for i in range(len(nodes))),
        source="the /dev/nvidiaN devices; no nvidia-smi",
    )


def allocation(
    environ: Mapping[str, str], *, probe: Callable[[], Allocation | None] = machine_gpus
) -> Allocation:
    """The GPUs a pool started with `environ` may share out: `CUDA_VISIBLE_DEVICES` if it is
    set, else what `probe` finds on the machine. ConfigError if neither says."""
    if VISIBLE_DEVICES in environ:
        value = environ[VISIBLE_DEVICES]
        return Allocation(devices=parse_visible_devices(value), source=f"{VISIBLE_DEVICES}={value}")
    found = probe()
    if found is None:
        raise ConfigError(
            f"--gpus: cannot tell which GPUs this pool may use: {VISIBLE_DEVICES} is not set and "
            f"there is no nvidia-smi or /dev/nvidiaN here; set {VISIBLE_DEVICES} to the "
            "devices to share out (for example CUDA_VISIBLE_DEVICES=0,1)"
        )
    return found


def device_sets(gpus: str, given: Allocation, per_trial: int = 1) -> tuple[str, ...]:
    """The device sets `--gpus gpus` takes from the allocation `given`, `per_trial` devices each,
    in order: with CUDA_VISIBLE_DEVICES=2,3,4,5, `--gpus 4 --gpus-per-trial 2` is ("2,3", "4,5").
    ConfigError naming the option, and the allocation where it matters, for anything else."""
    if isinstance(per_trial, bool) or not isinstance(per_trial, int) or per_trial < 1:
        raise ConfigError(f"--gpus-per-trial must be an integer >= 1, got {per_trial!r}")
    text = gpus.strip()
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise ConfigError(f"--gpus {gpus!r}: give a count >= 1, or {SPELLINGS}")
        if count > len(given.devices):
            raise ConfigError(
                f"--gpus {gpus!r} asks for {count} GPUs, but the pool's GPUs are "
                f"{given.describe()}: give at most {len(given.devices)}"
            )
        devices = list(given.devices[:count])
    elif text == "all":
        if not given.devices:
            raise ConfigError(f"--gpus all: the pool's GPUs are {given.describe()}")
        devices = list(given.devices)
    elif text.startswith(DEVICE_LIST):
        devices = _named(gpus, text[len(DEVICE_LIST) :], given)
    else:
        raise ConfigError(f"--gpus {gpus!r}: give {SPELLINGS}")
    if len(devices) % per_trial:
        raise ConfigError(
            f"--gpus {gpus!r} takes {len(devices)} GPUs, not a multiple of --gpus-per-trial "
            f"{per_trial}: every worker process gets {per_trial}"
        )
    return tuple(",".join(devices[i : i + per_trial]) for i in range(0, len(devices), per_trial))


def _named(gpus: str, listed: str, given: Allocation) -> list[str]:
    """The devices of `--gpus device=A,B`, each checked against the allocation."""
    names = [part.strip() for part in listed.split(",")]
    if not listed.strip() or any(not (_INDEX.fullmatch(n) or _UUID.fullmatch(n)) for n in names):
        raise ConfigError(
            f"--gpus {gpus!r}: name devices by index or UUID, separated by commas "
            "(device=2,3 or device=GPU-8932f937,GPU-1d2e...)"
        )
    devices = []
    for name in names:
        device = given.resolve(name)
        if device is None:
            raise ConfigError(
                f"--gpus {gpus!r}: GPU {name} is outside the pool's GPUs, {given.describe()}"
            )
        devices.append(device)
    if len(set(devices)) != len(devices):
        raise ConfigError(f"--gpus {gpus!r} names a device twice")
    return devices


def _normal(name: str) -> str:
    """A device name as compared: an index without leading zeros (CUDA reads `02` as 2)."""
    name = name.strip()
    return str(int(name)) if _INDEX.fullmatch(name) else name
