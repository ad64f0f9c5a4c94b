"""The wheel as users install it: one top-level package, `optuna_rq`, holding every module,
and `optuna-rq demo` from it in a fresh virtualenv outside the clone."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"broker": "optuna_rq", "workers": "optuna_rq/workers"}


def _uv() -> str:
    uv = shutil.which("uv")
    if uv is None:
        if os.environ.get("CI"):
            pytest.fail("uv is required in CI to build the wheel")
        pytest.skip("uv is not on PATH: cannot build the wheel")
    return uv


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    uv = _uv()
    # Built from a copy, as from an sdist: setuptools writes build/ and egg-info beside the sources.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in FOLDERS:
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [uv, "build", "--wheel", "--out-dir", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [built] = out.glob("optuna_rq-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel(wheel_path: Path) -> zipfile.ZipFile:
    return zipfile.ZipFile(wheel_path)


@pytest.fixture(scope="module")
def venv(wheel_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv outside the clone with the wheel (and its dependencies) installed."""
    uv = _uv()
    venv = tmp_path_factory.mktemp("venv") / "venv"
    assert ROOT not in venv.parents
    subprocess.run(
        [uv, "venv", "--quiet", "--python", sys.executable, str(venv)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            str(venv / "bin" / "python"),
            str(wheel_path),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return venv


def _user_env(venv: Path, state: Path) -> dict[str, str]:
    """A shell with the virtualenv activated: no project on PYTHONPATH, not under `uv run`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPTUNA_RQ_", "UV", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(venv)
    env["OPTUNA_RQ_STATE_DIR"] = str(state)
    return env


def _demo_processes(venv: Path) -> list[str]:
    """Command lines of processes the demo in `venv` started (its Redis, broker, workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(venv) in cmdline or "orq-demo-" in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def _run_demo(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["optuna-rq", "demo", *args],
        cwd=cwd,
        env=_user_env(venv, cwd / "state"),
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_the_demo_runs_from_the_wheel_outside_the_clone(venv: Path, tmp_path: Path) -> None:
    result = _run_demo(venv, tmp_path, "--n-trials", "20")

    assert result.returncode == 0, result.stderr
    assert "best value" in result.stderr and "model.lr" in result.stderr
    # The Next commands, as this user types them.
    assert "\n  optuna-rq broker > broker.log 2>&1 &" in result.stderr
    assert _demo_processes(venv) == []


def test_a_demo_whose_objective_cannot_be_imported_stops_at_once(
    venv: Path, tmp_path: Path
) -> None:
    [objective] = venv.glob("lib/python*/site-packages/optuna_rq/examples/rosenbrock.py")
    hidden = objective.with_suffix(".hidden")
    objective.rename(hidden)
    try:
        result = _run_demo(venv, tmp_path)
    finally:
        hidden.rename(objective)

    assert result.returncode == 2, result.stderr
    assert "'optuna_rq.examples.rosenbrock' cannot be imported" in result.stderr
    assert "0/60" not in result.stderr  # it never started the study
    assert _demo_processes(venv) == []


def test_a_demo_whose_workers_die_stops_at_once(venv: Path, tmp_path: Path) -> None:
    demo = subprocess.Popen(
        ["optuna-rq", "demo", "--n-trials", "100000"],
        cwd=tmp_path,
        env=_user_env(venv, tmp_path / "state"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pools: list[int] = []

        def workers_running() -> bool:
            pools[:] = [
                int(line.split(":", 1)[0])
                for line in _demo_processes(venv)
                if " workers --import optuna_rq.examples.rosenbrock" in line
                and "optuna_rq.cli" in line
            ]
            return bool(pools)

        wait_until(workers_running, timeout_s=60, message="the demo started no workers")
        os.kill(min(pools), signal.SIGKILL)  # the pool's parent: the first started
        _, stderr = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()

    assert demo.returncode == 1, stderr
    assert "the demo's workers exited with code -9" in stderr
    wait_until(lambda: _demo_processes(venv) == [], timeout_s=30, message="demo leftovers")


def test_the_wheel_installs_exactly_one_top_level_package(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/", 1)[0] for name in wheel.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"optuna_rq"}


def test_the_wheel_holds_every_module_of_broker_and_workers(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    expected = set()
    for folder, package in FOLDERS.items():
        for source in (ROOT / folder).rglob("*.py"):
            relative = source.relative_to(ROOT / folder)
            expected.add(f"{package}/{relative.as_posix()}")
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel (list the subpackage in pyproject.toml): {missing}"
    assert "optuna_rq/py.typed" in names


def test_the_console_script_points_into_the_package(wheel: zipfile.ZipFile) -> None:
    [entry_points] = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "optuna-rq = optuna_rq.cli:main" in wheel.read(entry_points).decode()
