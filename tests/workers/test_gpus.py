"""`--gpus` shares out the GPUs the pool was given (CUDA_VISIBLE_DEVICES when set, else the
machine's), never one outside them: the parsing and the choice in-process, case by case; the
refusals through `optuna-rq workers`; and real worker processes that see the devices chosen."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from optuna_rq.errors import ConfigError
from optuna_rq.storage.storage_access import default_storage_url, open_storage
from optuna_rq.workers.gpus import (
    Allocation,
    allocation,
    device_sets,
    machine_gpus,
    parse_visible_devices,
)
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env

pytestmark = pytest.mark.timeout(240)

UUID_A = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
UUID_B = "GPU-1d2e3f40-aaaa-bbbb-cccc-0123456789ab"


def given(value: str) -> Allocation:
    """The allocation of a pool started with CUDA_VISIBLE_DEVICES=value."""
    return allocation({"CUDA_VISIBLE_DEVICES": value}, probe=_no_probe)


def _no_probe() -> Allocation | None:
    raise AssertionError("CUDA_VISIBLE_DEVICES is set: the machine is not asked")


@pytest.mark.parametrize(
    ("value", "devices"),
    [
        ("2,3", ("2", "3")),
        (" 2 , 3 ", ("2", "3")),
        ("3", ("3",)),
        ("02,3", ("2", "3")),  # CUDA reads an index as a number
        ("", ()),  # set and empty: no GPU
        ("-1", ()),
        ("0,-1,1", ("0",)),  # CUDA stops at the first entry that is not a device
        ("0,nope,1", ("0",)),
        ("0,1,0", ()),  # a device twice: CUDA refuses the list
        (f"{UUID_A},{UUID_B}", (UUID_A, UUID_B)),
        ("MIG-4b8c2f1e-1111-2222-3333-444455556666", ("MIG-4b8c2f1e-1111-2222-3333-444455556666",)),
    ],
)
def test_cuda_visible_devices_is_read_as_cuda_reads_it(value: str, devices: tuple[str]) -> None:
    assert parse_visible_devices(value) == devices
    assert given(value).devices == devices


def test_without_cuda_visible_devices_the_machine_is_asked() -> None:
    machine = Allocation(devices=("0", "1", "2"), source="nvidia-smi -L")
    assert allocation({}, probe=lambda: machine) is machine
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES is not set and there is no"):
        allocation({"PATH": "/bin"}, probe=lambda: None)


@pytest.mark.parametrize(
    ("gpus", "visible", "per_trial", "sets"),
    [
        # a count: the first N of the allocation, never devices 0..N-1 of the machine
        ("2", "2,3", 1, ("2", "3")),
        ("1", "2,3", 1, ("2",)),
        (" 2 ", "2,3", 1, ("2", "3")),
        ("4", "4,5,6,7", 2, ("4,5", "6,7")),
        ("2", "0,1,2,3", 1, ("0", "1")),
        # all of it
        ("all", "2,3", 1, ("2", "3")),
        ("all", "4,5,6,7", 2, ("4,5", "6,7")),
        # devices named, each inside the allocation
        ("device=3", "2,3", 1, ("3",)),
        ("device=3,2", "2,3", 1, ("3", "2")),
        ("device=2,3", "2,3", 2, ("2,3",)),
        ("device= 3 ", "2,3", 1, ("3",)),
        ("device=03", "2,3", 1, ("3",)),
        (f"device={UUID_B}", f"{UUID_A},{UUID_B}", 1, (UUID_B,)),
    ],
)
def test_gpus_picks_from_the_allocation(
    gpus: str, visible: str, per_trial: int, sets: tuple[str, ...]
) -> None:
    assert device_sets(gpus, given(visible), per_trial) == sets


def test_a_device_named_by_its_uuid_is_the_machine_gpu_nvidia_smi_lists() -> None:
    machine = Allocation(devices=("0", "1"), aliases={UUID_A: "0", UUID_B: "1"}, source="smi")
    assert device_sets(f"device={UUID_B},0", machine) == ("1", "0")
    with pytest.raises(ConfigError, match="names a device twice"):
        device_sets(f"device={UUID_A},0", machine)


@pytest.mark.parametrize(
    ("gpus", "visible", "per_trial", "message"),
    [
        # outside the allocation, or more than it holds: refused naming it
        ("3", "2,3", 1, "asks for 3 GPUs, but the pool's GPUs are 2,3 (CUDA_VISIBLE_DEVICES=2,3)"),
        ("3", "2,3", 1, "give at most 2"),
        ("1", "", 1, "the pool's GPUs are none (CUDA_VISIBLE_DEVICES=)"),
        ("1", "-1", 1, "the pool's GPUs are none (CUDA_VISIBLE_DEVICES=-1)"),
        ("all", "", 1, "--gpus all: the pool's GPUs are none"),
        ("device=1", "2,3", 1, "GPU 1 is outside the pool's GPUs, 2,3 (CUDA_VISIBLE_DEVICES=2,3)"),
        ("device=0", "2,3", 1, "GPU 0 is outside the pool's GPUs"),
        (f"device={UUID_A}", "0,1", 1, f"GPU {UUID_A} is outside the pool's GPUs"),
        # not one of the three spellings
        ("2,3", "2,3", 1, "give a count (--gpus 2), all (--gpus all), or devices by id"),
        ("3,", "2,3", 1, "device=2,3"),
        ("devices=2,3", "2,3", 1, "device=2,3"),
        ("two", "2,3", 1, "device=2,3"),
        ("-1", "2,3", 1, "device=2,3"),
        ("0", "2,3", 1, "give a count >= 1"),
        ("device=", "2,3", 1, "name devices by index or UUID"),
        ("device=2,,3", "2,3", 1, "name devices by index or UUID"),
        ("device=2 3", "2,3", 1, "name devices by index or UUID"),
        ("device=3,3", "2,3", 1, "names a device twice"),
        # the share per worker process
        ("3", "0,1,2", 2, "takes 3 GPUs, not a multiple of --gpus-per-trial 2"),
        ("2", "2,3", 0, "--gpus-per-trial must be an integer >= 1"),
    ],
)
def test_gpus_outside_the_allocation_or_misspelt_is_refused(
    gpus: str, visible: str, per_trial: int, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        device_sets(gpus, given(visible), per_trial)
    assert message in str(raised.value)


@pytest.mark.processes
def test_nvidia_smi_lists_the_machine_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_nvidia_smi(
        tmp_path,
        f"GPU 0: NVIDIA A100-SXM4-40GB (UUID: {UUID_A})\n"
        f"GPU 1: NVIDIA A100-SXM4-40GB (UUID: {UUID_B})\n",
    )
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    found = machine_gpus()
    assert found is not None and found.devices == ("0", "1")
    assert found.resolve(UUID_B) == "1" and found.source == "nvidia-smi -L"
    assert device_sets("all", found) == ("0", "1")


@pytest.mark.processes
def test_without_nvidia_smi_or_devices_nothing_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if any(re.fullmatch(r"nvidia\d+", name) for name in os.listdir("/dev")):
        pytest.skip("this machine has NVIDIA devices")
    _fake_nvidia_smi(tmp_path, "", code=9)  # installed, but no driver answers
    monkeypatch.setenv("PATH", str(tmp_path))
    assert machine_gpus() is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert machine_gpus() is None


def _fake_nvidia_smi(directory: Path, output: str, *, code: int = 0) -> None:
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


# Through the command line: refused before anything connects (the Redis URL leads nowhere).


def _workers(
    *args: str, url: str = "redis://127.0.0.1:1/0", **env: str
) -> subprocess.CompletedProcess[str]:
    environ = cli_env(OPTUNA_RQ_REDIS_URL=url, **env)
    return subprocess.run(
        cli("workers", "--import", "tests.support.objectives", *args),
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.processes
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--gpus", "device=1"),
            "GPU 1 is outside the pool's GPUs, 2,3 (CUDA_VISIBLE_DEVICES=2,3)",
        ),
        (("--gpus", "3"), "give at most 2"),
        (("--gpus", "2,3"), "devices by id (--gpus device=2,3)"),
        (("--gpus", "all", "--gpus-per-trial", "3"), "not a multiple of --gpus-per-trial 3"),
    ],
)
def test_workers_refuse_gpus_outside_their_allocation(args: tuple[str, ...], message: str) -> None:
    result = _workers(*args, CUDA_VISIBLE_DEVICES="2,3")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and message in line, line


@pytest.mark.processes
def test_more_worker_processes_than_device_sets_is_refused(redis_url: str) -> None:
    result = _workers("--gpus", "2", "--count", "3", CUDA_VISIBLE_DEVICES="2,3", url=redis_url)
    assert result.returncode == 2, result.stderr
    assert "3 worker processes but 2 GPU device sets (2 3)" in result.stderr, result.stderr


@pytest.mark.processes
def test_workers_help_shows_both_spellings() -> None:
    result = subprocess.run(
        cli("workers", "--help"), env=cli_env(), capture_output=True, text=True, timeout=60
    )
    text = " ".join(result.stdout.split())
    assert "(--gpus 2)" in text and "(--gpus device=2,3)" in text, text
    assert "CUDA_VISIBLE_DEVICES when it is set" in text, text


# Real worker processes: what each one sees.


def test_worker_processes_see_the_devices_chosen_inside_the_allocation(
    run_cli: Callable[..., subprocess.CompletedProcess[str]],
    broker_process: object,
    workers_factory: Callable[..., str],
    cli_state: Path,
) -> None:
    module = ("tests.support.routing_objectives",)
    inherited = {"CUDA_VISIBLE_DEVICES": "2,3"}  # a scheduler gave the pool devices 2 and 3
    workers_factory(count=2, modules=module, env=inherited, args=("--queue", "a", "--gpus", "2"))
    workers_factory(
        count=1, modules=module, env=inherited, args=("--queue", "b", "--gpus", "device=3")
    )
    for name, queue, n_trials in (("by-count", "a", "8"), ("by-id", "b", "3")):
        submitted = run_cli(
            "submit",
            "tests.support.routing_objectives:where",
            "--study-name",
            name,
            "--queue",
            queue,
            "--n-trials",
            n_trials,
            "--concurrency",
            "2",
            "--param",
            "hold_s=0.1",
        )
        assert submitted.returncode == 0, submitted.stderr

    def finished(name: str) -> bool:
        shown = run_cli("status", name, "--json")
        assert shown.returncode == 0, shown.stderr
        return bool(json.loads(shown.stdout)["state"] == "finished")

    wait_until(lambda: finished("by-count") and finished("by-id"), timeout_s=120)
    storage = open_storage(default_storage_url(cli_state))

    def seen(name: str) -> dict[int, set[str]]:
        by_pid: dict[int, set[str]] = {}
        for trial in optuna.load_study(study_name=name, storage=storage).trials:
            by_pid.setdefault(trial.user_attrs["pid"], set()).add(trial.user_attrs["gpus"])
        return by_pid

    by_count = seen("by-count")
    assert sorted(d for devices in by_count.values() for d in devices) == ["2", "3"], by_count
    assert all(len(devices) == 1 for devices in by_count.values())  # a process, a device
    assert set().union(*seen("by-id").values()) == {"3"}
