"""The README's command-line section runs as written, from examples/, and every objective the
README shows for `mypkg` is the one examples/mypkg holds and takes the inputs the README gives.

The commands are read from the README's own text: an edit there is what runs here.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from optuna_rq.protocol import inputs_mismatch
from tests.support import source_trees
from tests.support.readme import blocks, commands, section

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
COMMAND_LINE = "The command line"
REFUSED_ONCE_ENDED = {"enqueue", "set", "cancel"}
"""What the README's lifecycle table says is refused, nothing changed, for a finished study: the
block runs them after `submit --wait`, when its study has finished."""


def _train_module() -> dict[str, ast.FunctionDef]:
    tree = source_trees.parse((EXAMPLES / "mypkg" / "train.py").read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def _readme_train_blocks() -> list[str]:
    text = section("The Python API") + section(COMMAND_LINE)
    found = re.findall(r"^```python\n(# mypkg/train\.py.*?)^```", text, re.M | re.S)
    assert found, "the README shows no mypkg/train.py"
    return found


def test_every_mypkg_objective_the_readme_shows_is_the_one_examples_holds() -> None:
    examples = _train_module()
    source = (EXAMPLES / "mypkg" / "train.py").read_text()
    for block in _readme_train_blocks():
        for node in source_trees.parse(block).body:
            if isinstance(node, ast.FunctionDef):
                assert node.name in examples, f"examples/mypkg/train.py has no {node.name}"
                shown = ast.get_source_segment(block, node)
                assert shown is not None and shown in source, (
                    f"README's {node.name} differs from examples/mypkg/train.py's"
                )


def test_the_readme_space_is_examples_space_and_every_submit_of_mypkg_binds() -> None:
    """The space file the README shows is examples/space.yaml; every `submit mypkg.train:F`
    line of the README names a function of examples/mypkg that takes its inputs (the space
    file's, or none: define-by-run)."""
    [space_block] = blocks(COMMAND_LINE, "yaml")
    space = yaml.safe_load(space_block.text)
    assert space == yaml.safe_load((EXAMPLES / "space.yaml").read_text())
    sys.path.insert(0, str(EXAMPLES))
    try:
        from mypkg import train  # examples/mypkg, as workers started in examples/ import it
    finally:
        sys.path.remove(str(EXAMPLES))
    submits = re.findall(
        r"optuna-rq submit (mypkg\.train:\w+)([^\n`]*)", Path(ROOT / "README.md").read_text()
    )
    assert len(submits) >= 3, submits
    for objective, options in submits:
        function = getattr(train, objective.partition(":")[2])
        inputs = space if "--space space.yaml" in options else {}
        assert inputs_mismatch(function, inputs) is None, (objective, options)


def _subcommand(command: str) -> str:
    words = command.split()
    assert words[0] == "optuna-rq", command
    return next(w for w in words[1:] if not w.startswith("-"))


def _env(redis_url: str, prefix: str, state: Path) -> dict[str, str]:
    """A user's shell on this machine, pointed at the test's Redis, prefix and state directory:
    the installed `optuna-rq` first on PATH, nothing of the user's optuna-rq settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTUNA_RQ_")}
    env.pop("PYTHONPATH", None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        OPTUNA_RQ_REDIS_URL=redis_url, OPTUNA_RQ_PREFIX=prefix, OPTUNA_RQ_STATE_DIR=str(state)
    )
    return env


def test_the_command_line_section_runs_as_written(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """The section's first block, line by line, in a copy of examples/: the broker and the
    workers in the background as the lines start them, `submit --wait` to the end (exit 0),
    then every other line on the study it printed (NAME), each doing what the README says."""
    lines = commands(blocks(COMMAND_LINE, "bash")[0])
    assert any(" submit " in line and "--wait" in line for line in lines), lines
    workdir = tmp_path / "examples"
    shutil.copytree(EXAMPLES, workdir, ignore=shutil.ignore_patterns("__pycache__"))
    env = _env(redis_url, prefix, tmp_path / "state")
    background: list[subprocess.Popen[bytes]] = []
    name: str | None = None
    ran: list[str] = []
    try:
        for line in lines:
            if line.endswith("&"):  # its own process: `exec` so that it is the one we stop
                command = f"exec {line[:-1].strip()}"
                background.append(subprocess.Popen(["bash", "-c", command], cwd=workdir, env=env))
                continue
            if "NAME" in line:
                assert name is not None, f"{line!r} comes before any submit"
                line = line.replace("NAME", name)
            done = subprocess.run(
                ["bash", "-c", line],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
            )
            said = f"{line!r} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            subcommand = _subcommand(line)
            if subcommand in REFUSED_ONCE_ENDED:
                assert done.returncode != 0 and "finished" in done.stderr, said
            else:
                assert done.returncode == 0, said
            if subcommand == "submit":
                name = done.stdout.splitlines()[0]
                assert "200/200" in done.stderr and "failed" not in done.stderr, said
            ran.append(subcommand)
    finally:
        codes = []
        for process in reversed(background):  # the workers, then the broker
            process.send_signal(signal.SIGTERM)
            try:
                codes.append(process.wait(timeout=60))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                codes.append(None)
    assert codes == [0] * len(background), codes
    assert {"submit", "status", "wait", "trials", "best", "delete"} <= set(ran), ran
    assert (workdir / "broker.log").stat().st_size > 0
    assert "mypkg.train" in (workdir / "workers.log").read_text()
