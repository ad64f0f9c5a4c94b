"""The suite's two tiers. The fast tier runs the package's logic in the test's own process; the
`processes` tier is what only real processes show: signals, crashes, restarts, a real interpreter's
exit codes, packaging, and studies end to end through the CLI, a broker and worker processes.

A test is in the `processes` tier when it lives under tests/processes/, when it uses a fixture
that starts processes, or when it is marked `@pytest.mark.processes` (a test that starts one in
its own body). A test of the fast tier that starts a process anyway fails, naming what it started,
so the fast tier stays in-process as tests are added."""

from __future__ import annotations

import multiprocessing.process
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

MARK = "processes"
"""The marker of the real-process tier: `pytest -m processes`, or `-m "not processes"`."""

FOLDER = Path(__file__).resolve().parents[1] / "processes"
"""Every test under this folder is in the real-process tier."""

FIXTURES = frozenset(
    {"workers_factory", "broker_process", "run_cli", "cluster", "aof_redis", "dual_redis"}
)
"""Fixtures that start real processes: a test using one, even through another fixture, is in the
real-process tier."""


MACHINE_WIDE = frozenset(
    {"test_deploy_policy.py", "test_full_disk.py", "test_packaging.py", "test_dashboard.py"}
)
"""Files whose tests use what the whole machine shares (the image's init script's fixed names
under /tmp, a tmpfs mounted for a full disk, uv's builds of the wheel, a browser): under
pytest-xdist (`-n 2 --dist loadgroup`) they run on one worker, one after another."""

MACHINE_GROUP = "machine"


def machine_wide_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under `--dist loadgroup`, xdist's scheduler that runs the `MACHINE_WIDE` files on one
    worker, read from each test's file name; None (xdist's own) for any other --dist.

    pytest-xdist 3.8 groups a test by appending `@group` to its nodeid in the worker, which
    pytest 9.2's structured node ids no longer take (pytest-xdist#1386): the `xdist_group` mark
    is then silently ignored and the group's tests run on both workers at once."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class MachineWideScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if Path(nodeid.partition("::")[0]).name in MACHINE_WIDE:
                return MACHINE_GROUP
            return super()._split_scope(nodeid)

    return MachineWideScheduling(config, log)


def in_process_tier(item: pytest.Item) -> bool:
    """Whether `item` is a test of the real-process tier."""
    return (
        FOLDER in Path(item.path).parents
        or not FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))
        or item.get_closest_marker(MARK) is not None
    )


def mark(items: list[pytest.Item]) -> None:
    """Mark every test of the real-process tier `processes`, so `-m` selects either tier, and
    group the tests that use what the machine shares."""
    for item in items:
        if in_process_tier(item) and item.get_closest_marker(MARK) is None:
            item.add_marker(MARK)
        if Path(item.path).name in MACHINE_WIDE and item.config.pluginmanager.hasplugin("xdist"):
            item.add_marker(pytest.mark.xdist_group(MACHINE_GROUP))


@contextmanager
def no_processes(item: pytest.Item) -> Iterator[None]:
    """Around a fast-tier test's call: starting a subprocess or a multiprocessing process fails
    it, naming the process (it belongs in the real-process tier)."""
    started: list[str] = []
    popen_init = subprocess.Popen.__init__
    process_start = multiprocessing.process.BaseProcess.start

    def record_popen(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        started.append(f"subprocess {args!r}")
        popen_init(self, args, *rest, **kwargs)

    def record_start(self: multiprocessing.process.BaseProcess) -> None:
        started.append(f"multiprocessing {self.name}")
        process_start(self)

    subprocess.Popen.__init__ = record_popen  # type: ignore[method-assign]
    multiprocessing.process.BaseProcess.start = record_start  # type: ignore[method-assign]
    try:
        yield
    finally:
        subprocess.Popen.__init__ = popen_init  # type: ignore[method-assign]
        multiprocessing.process.BaseProcess.start = process_start  # type: ignore[method-assign]
    if started:
        pytest.fail(
            f"{item.nodeid} is in the fast tier but started a process ({started[0]}): move it "
            f"under tests/processes/ or mark it @pytest.mark.{MARK}",
            pytrace=False,
        )
