"""The packages as users get them. The wheel: one top-level package, `optuna_rq`, holding every
module and nothing else, its license and metadata (PEP 639), and `optuna-rq demo` from it in a
fresh virtualenv outside the clone, on every Python its classifiers name. The sdist: every file of
the clone but CI's. Both built by `uv build` (the wheel from the sdist) at both ends of the
setuptools range pyproject.toml allows. And the README's fallback installs of uv, run as written.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import trove_classifiers
from packaging.metadata import Metadata
from packaging.requirements import Requirement

from tests.support.helpers import wait_until
from tests.support.readme import Block, blocks, commands

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"broker": "optuna_rq", "workers": "optuna_rq/workers"}


def _uv() -> str:
    uv = shutil.which("uv")
    if uv is None:
        if os.environ.get("CI"):
            pytest.fail("uv is required in CI to build the wheel")
        pytest.skip("uv is not on PATH: cannot build the wheel")
    return uv


LEFT_OUT_OF_THE_SDIST = (".ci/", ".gitignore")
"""What a clone has and the sdist does not (prefixes): CI's scripts, git's own file. Every other
file is in the sdist (MANIFEST.in), so a new folder is either added there or listed here."""
APACHE_2_0 = Path("/usr/share/common-licenses/Apache-2.0")
"""The ASF's text of the license, as Debian's base-files ships it."""


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())  # type: ignore[no-any-return]


def _claimed_pythons() -> list[str]:
    """The `Programming Language :: Python :: 3.X` classifiers' versions, read at collection."""
    text = (ROOT / "pyproject.toml").read_text()
    return re.findall(r'"Programming Language :: Python :: (3\.\d+)"', text)


def _clone_files() -> list[str]:
    """The clone's files as git sees them: tracked, or new and not ignored."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git clone (no .git or no git): the sdist is compared with one")
    listed = subprocess.run(
        [git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return sorted(name for name in set(listed.split("\0")) if name and (ROOT / name).is_file())


@dataclass(frozen=True)
class Built:
    sdist: Path
    wheel: Path


def _build(tmp_path_factory: pytest.TempPathFactory, *constraints: str) -> Built:
    """`uv build` as a release does it: the sdist from a copy of the clone (setuptools writes
    build/ and egg-info beside the sources), then the wheel from the sdist."""
    uv = _uv()
    source = tmp_path_factory.mktemp("source")
    for name in _clone_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    command = [uv, "build", "--out-dir", str(out), str(source)]
    if constraints:
        pins = out.parent / f"{out.name}-constraints.txt"
        pins.write_text("\n".join(constraints) + "\n")
        command += ["--build-constraints", str(pins)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [sdist] = out.glob("optuna_rq-*.tar.gz")
    [wheel] = out.glob("optuna_rq-*.whl")
    return Built(sdist=sdist, wheel=wheel)


@pytest.fixture(scope="module")
def newest_build(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build(tmp_path_factory)


@pytest.fixture(scope="module")
def lowest_build(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Built by the oldest setuptools pyproject's build-system allows."""
    [setuptools] = [
        Requirement(r) for r in _pyproject()["build-system"]["requires"] if "setuptools" in r
    ]
    [floor] = [spec.version for spec in setuptools.specifier if spec.operator == ">="]
    return _build(tmp_path_factory, f"setuptools=={floor}")


@pytest.fixture(scope="module", params=["newest_build", "lowest_build"])
def build(request: pytest.FixtureRequest) -> Built:
    built: Built = request.getfixturevalue(request.param)
    return built


@pytest.fixture(scope="module")
def wheel_path(newest_build: Built) -> Path:
    return newest_build.wheel


@pytest.fixture(scope="module")
def wheel(wheel_path: Path) -> zipfile.ZipFile:
    return zipfile.ZipFile(wheel_path)


def _make_venv(wheel: Path, python: str, where: Path) -> Path:
    """A fresh virtualenv at `where` (outside the clone) with the wheel and its dependencies."""
    uv = _uv()
    venv = where / "venv"
    assert ROOT not in venv.parents
    for command in (
        [uv, "venv", "--quiet", "--python", python, str(venv)],
        [uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), str(wheel)],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command} exited {done.returncode}: {done.stderr}"
    return venv


@pytest.fixture(scope="module")
def venv(wheel_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_venv(wheel_path, sys.executable, tmp_path_factory.mktemp("venv"))


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
                and "optuna_rq.cli.app" in line
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


def test_the_wheel_holds_every_module_and_nothing_else(build: Built) -> None:
    """Nothing of the sdist's other folders (deploy/, examples/, tests/, benchmarks/) reaches
    the wheel: its files are the modules of broker/ and workers/, py.typed and its metadata."""
    names = {n for n in zipfile.ZipFile(build.wheel).namelist() if ".dist-info/" not in n}
    expected = {"optuna_rq/py.typed"}
    for folder, package in FOLDERS.items():
        for source in (ROOT / folder).rglob("*.py"):
            relative = source.relative_to(ROOT / folder)
            expected.add(f"{package}/{relative.as_posix()}")
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel (list the subpackage in pyproject.toml): {missing}"
    assert sorted(names - expected) == [], "in the wheel, not a module of broker/ or workers/"


def _metadata(wheel: Path) -> tuple[str, Message]:
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(name).decode()
    return text, email.parser.HeaderParser().parsestr(text)


def test_the_wheel_carries_the_license_as_pep_639_says(build: Built) -> None:
    project = _pyproject()["project"]
    text, metadata = _metadata(build.wheel)
    Metadata.from_email(text, validate=True)  # every field well-formed, the expression too

    assert metadata["License-Expression"] == project["license"]
    assert metadata.get_all("License-File") == project["license-files"] == ["LICENSE"]
    with zipfile.ZipFile(build.wheel) as archive:
        [carried] = [n for n in archive.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        assert archive.read(carried) == (ROOT / "LICENSE").read_bytes()
    # The expression replaces the license classifiers (PEP 639): never both.
    assert not [c for c in metadata.get_all("Classifier", []) if c.startswith("License ::")]


def test_the_license_is_the_apache_2_0_text() -> None:
    assert _pyproject()["project"]["license"] == "Apache-2.0"
    if not APACHE_2_0.is_file():
        pytest.skip(f"no {APACHE_2_0} (Debian's base-files) to compare LICENSE with")
    assert (ROOT / "LICENSE").read_bytes() == APACHE_2_0.read_bytes()


def test_every_classifier_is_one_pypi_accepts(wheel_path: Path) -> None:
    _, metadata = _metadata(wheel_path)
    classifiers = metadata.get_all("Classifier", [])
    assert classifiers == _pyproject()["project"]["classifiers"]
    unknown = [c for c in classifiers if c not in trove_classifiers.classifiers]
    assert not unknown, f"not trove classifiers (PyPI refuses the upload): {unknown}"
    deprecated = [c for c in classifiers if c in trove_classifiers.deprecated_classifiers]
    assert not deprecated, deprecated
    assert "Typing :: Typed" in classifiers  # py.typed ships: the wheel test above


def test_the_python_classifiers_start_at_requires_python_without_a_gap() -> None:
    project = _pyproject()["project"]
    floor = re.fullmatch(r">=3\.(\d+)", project["requires-python"])
    assert floor is not None, project["requires-python"]
    minors = [int(v.split(".")[1]) for v in _claimed_pythons()]
    assert minors == list(range(int(floor.group(1)), max(minors) + 1)), minors


def _python(version: str) -> str | None:
    """An interpreter of `version` on this machine: on PATH, or one pyenv installed."""
    candidates = [shutil.which(f"python{version}") or ""]
    root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(str(p) for p in Path(root).glob(f"versions/{version}.*/bin/python3"))
    for candidate in candidates:
        try:
            done = subprocess.run(
                [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except OSError:
            continue
        if done.returncode == 0 and done.stdout.strip() == version:
            return candidate
    return None


@pytest.mark.parametrize("version", _claimed_pythons())
def test_the_wheel_runs_the_demo_on_every_python_its_classifiers_name(
    version: str, wheel_path: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if version == f"{sys.version_info.major}.{sys.version_info.minor}":  # the suite's own venv
        venv: Path = request.getfixturevalue("venv")
    elif (python := _python(version)) is not None:
        venv = _make_venv(wheel_path, python, tmp_path)
    else:
        pytest.skip(
            f"no Python {version} here (PATH or pyenv): its classifier is unchecked on this machine"
        )
    modules = sorted(
        n.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for n in zipfile.ZipFile(wheel_path).namelist()
        if n.endswith(".py")
    )
    imported = subprocess.run(
        [str(venv / "bin" / "python"), "-c", f"import {', '.join(modules)}"],
        cwd=tmp_path,
        env=_user_env(venv, tmp_path / "state"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert imported.returncode == 0, imported.stderr

    result = _run_demo(venv, tmp_path, "--n-trials", "10")

    assert result.returncode == 0, result.stderr
    assert "best value" in result.stderr
    assert _demo_processes(venv) == []


def test_the_project_urls_are_pyprojects_and_share_one_home(wheel_path: Path) -> None:
    _, metadata = _metadata(wheel_path)
    urls = dict(entry.split(", ", 1) for entry in metadata.get_all("Project-URL", []))
    assert urls == _pyproject()["project"]["urls"]
    home = urls["Homepage"]
    assert home.startswith("https://") and all(url.startswith(home) for url in urls.values())
    assert urls["Source"] == home and urls["Issues"] == f"{home}/issues"
    assert urls["Documentation"] == f"{home}#readme"  # the README is the documentation


def test_the_sdist_holds_every_file_of_the_clone_but_cis(build: Built) -> None:
    with tarfile.open(build.sdist) as archive:
        held = {m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile()}
    expected = {n for n in _clone_files() if not n.startswith(LEFT_OUT_OF_THE_SDIST)}
    missing = sorted(expected - held)
    assert not missing, f"not in the sdist (MANIFEST.in, or LEFT_OUT_OF_THE_SDIST): {missing}"
    assert not [n for n in held if n.startswith(LEFT_OUT_OF_THE_SDIST)]
    for wanted in ("LICENSE", "README.md", "deploy/Dockerfile", "examples/space.yaml"):
        assert wanted in held, wanted


def test_the_console_script_points_into_the_package(wheel: zipfile.ZipFile) -> None:
    [entry_points] = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "optuna-rq = optuna_rq.cli.app:main" in wheel.read(entry_points).decode()


RELEASES_THE_README_NAMES = {("debian", "12"), ("ubuntu", "24.04")}
STOCK_PATH = "/usr/local/bin:/usr/bin:/bin"
"""A new user's PATH before any login script: the system's python3 and pip, nothing of ours."""


def _uv_fallbacks() -> list[Block]:
    """The Quickstart's installs of uv without its installer: its bash blocks that use apt."""
    return [b for b in blocks("Quickstart", "bash") if "sudo apt install " in b.text]


def _release() -> tuple[str, str]:
    fields = dict(
        line.split("=", 1)
        for line in Path("/etc/os-release").read_text().splitlines()
        if "=" in line
    )
    return fields.get("ID", "").strip('"'), fields.get("VERSION_ID", "").strip('"')


def _deb_installed(package: str) -> bool:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return done.returncode == 0 and done.stdout == "install ok installed"


def test_the_readme_has_both_fallback_installs_of_uv() -> None:
    apt = sorted(
        re.findall(r"^sudo apt install (.+)$", "".join(b.text for b in _uv_fallbacks()), re.M)
    )
    assert apt == ["pipx", "python3-pip"], apt


@pytest.mark.parametrize(
    "block", _uv_fallbacks(), ids=lambda b: b.text.split("sudo apt install ", 1)[1].split()[0]
)
def test_the_readmes_fallback_install_of_uv_runs_as_written(block: Block, tmp_path: Path) -> None:
    """As a new user of Debian 12 or Ubuntu 24.04 types it, in a home made from /etc/skel: the
    apt packages must be there already (the suite installs no system package); `pip install
    --user` without --break-system-packages is refused (PEP 668) and with it lands in ~/.local;
    and the new login shell the block ends with finds uv."""
    if not Path("/etc/os-release").is_file() or _release() not in RELEASES_THE_README_NAMES:
        pytest.skip(f"the README's steps are for {sorted(RELEASES_THE_README_NAMES)}")
    *steps, last = commands(block)
    assert last == "exec bash -l", block.text
    script = []
    for line in steps:
        if line.startswith("sudo apt install "):
            for package in line.split()[3:]:
                if not _deb_installed(package):
                    pytest.skip(f"{package} is not installed: `sudo apt install {package}` first")
        else:
            script.append(line)
    home = tmp_path / "home"
    shutil.copytree("/etc/skel", home)  # what useradd -m gives a new user
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "PIPX_", "PYTHON", "PYENV", "VIRTUAL_ENV", "UV_", "XDG_"))
        or k == "PIP_CERT"
    }
    env.update(HOME=str(home), PATH=STOCK_PATH, PIP_CACHE_DIR=str(Path.home() / ".cache/pip"))

    def run(script: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-e", "-c", script],
            input=stdin,
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    for line in script:
        if " --break-system-packages" in line:
            refused = run(line.replace(" --break-system-packages", ""))
            assert refused.returncode != 0, refused.stdout
            assert "externally-managed-environment" in refused.stderr, refused.stderr
            assert not (home / ".local/bin/uv").exists()

    done = run("\n".join([*script, last]), stdin="command -v uv\nuv --version\n")

    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    found, version = done.stdout.splitlines()[-2:]
    assert found == f"{home}/.local/bin/uv", done.stdout
    assert version.startswith("uv "), done.stdout


def test_the_readmes_pip_fallback_is_the_one_ci_runs() -> None:
    """The README says its pip line is what .ci/run does where uv is missing."""
    [readme_line] = [
        line
        for block in _uv_fallbacks()
        for line in commands(block)
        if "--break-system-packages" in line
    ]
    ci_lines = [
        [word for word in line.split() if word not in ("||", "--quiet")]
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
    ]
    assert readme_line.split() in ci_lines, readme_line


def test_the_image_copies_every_file_the_build_reads() -> None:
    """deploy/Dockerfile builds the wheel from the files it copies: pyproject.toml, the readme
    and license files it names (setuptools fails, or drops the license, without them), and the
    folders of its packages."""
    project = _pyproject()
    needed = {"pyproject.toml", project["project"]["readme"], *project["project"]["license-files"]}
    needed |= set(project["tool"]["setuptools"]["package-dir"].values())
    copied = set()
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            copied |= {w.rstrip("/") for w in words[1:-1] if not w.startswith("--")}
    assert needed <= copied, f"deploy/Dockerfile copies none of {sorted(needed - copied)}"
