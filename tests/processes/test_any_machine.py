"""Every front door works from a machine that reaches Redis alone: `trials`, `best`, `status`,
`wait`, `cancel`, `set`, `enqueue` and `delete` act through Redis and the broker, never through a
storage path a status names, and create nothing on that machine.

"Machine A" is a broker and a worker pool with their own home, working directory and state
directory; "machine B" is the command line with another home and working directory, given the
Redis URL and nothing else. A's storage is where B cannot read it as A does: with signing off,
the broker's default journal under A's state directory; with role keys, a SQLite file named
relative to A's working directory (`sqlite:///studies.db`), which on B would name a file in B's.
Every command B runs must work, and B's directories must stay empty.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from optuna_rq.client import BrokerClient
from optuna_rq.protocol import ENV_KEY, Keys, Role, Signer, StudyState, generate_keyrings
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env, live_workers, stop_process

pytestmark = pytest.mark.timeout(300)

PAIR = ("tests.support.objectives:reports_pair", "--param", "x={type: float, low: 0, high: 1}")
_NOT_FROM_HERE = (  # what would point B's commands at A's state: B has none of it
    "OPTUNA_RQ_STATE_DIR",
    "XDG_STATE_HOME",
    "OPTUNA_RQ_REDIS_URL",
    ENV_KEY,
    "OPTUNA_RQ_SECRET",
)


def _strict_json(text: str) -> Any:
    """`text` parsed as strict JSON: the bare words NaN and Infinity are refused (as jq does)."""

    def refuse(word: str) -> Any:
        raise AssertionError(f"not JSON: {word}")

    return json.loads(text, parse_constant=refuse)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


class Machine:
    """A home, a working directory and an environment: what a machine's processes get."""

    def __init__(self, root: Path, redis_url: str, prefix: str, **env: str) -> None:
        self.home, self.cwd = root / "home", root / "cwd"
        self.home.mkdir(parents=True)
        self.cwd.mkdir()
        self.redis_url, self.prefix = redis_url, prefix
        self.env = cli_env(HOME=str(self.home), **env)
        for name in _NOT_FROM_HERE:
            if name not in env:
                self.env.pop(name, None)

    def argv(self, *args: str) -> list[str]:
        return cli("--redis-url", self.redis_url, "--prefix", self.prefix, *args)

    def start(self, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(*args), cwd=self.cwd, env={**self.env, **env})

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), cwd=self.cwd, env=self.env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip

    def ok(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout


@pytest.fixture(params=["unsigned", "role keys"])
def machines(
    request: pytest.FixtureRequest, redis_url: str, prefix: str, tmp_path: Path
) -> Iterator[tuple[Machine, Machine, Signer]]:
    """(A, B, a signer that reads as B does), A's broker and one worker running."""
    env: dict[Role, dict[str, str]] = {role: {} for role in Role}
    reader = Signer()
    broker_args: tuple[str, ...] = ()
    if request.param == "role keys":
        rings = generate_keyrings()
        env = {role: {ENV_KEY: rings[role].to_token()} for role in Role}
        reader = Signer(keyring=rings[Role.CLIENT])
        broker_args = ("--storage", "sqlite:///studies.db")  # relative: in A's working directory
    a_root, b_root = tmp_path / "a", tmp_path / "b"
    a = Machine(a_root, redis_url, prefix, OPTUNA_RQ_STATE_DIR=str(a_root / "state"))
    b = Machine(b_root, redis_url, prefix, **env[Role.CLIENT])
    conn = redis.Redis.from_url(redis_url)
    started: list[subprocess.Popen[bytes]] = []
    try:
        started.append(a.start("broker", *broker_args, env=env[Role.BROKER]))
        wait_until(lambda: conn.exists(f"{prefix}:broker"), timeout_s=30)
        args = ("workers", "--count", "1", "--import", "tests.support.objectives")
        started.append(a.start(*args, env=env[Role.WORKER]))
        wait_until(lambda: live_workers(conn, prefix, reader) >= 1, timeout_s=60)
        yield a, b, reader
    finally:
        codes = [stop_process(p) for p in started]
        conn.close()
        assert codes == [0] * len(codes), codes


def test_every_front_door_works_from_a_machine_that_reaches_only_redis(
    machines: tuple[Machine, Machine, Signer], conn: redis.Redis, prefix: str, tmp_path: Path
) -> None:
    a, b, reader = machines
    client = BrokerClient(conn, prefix, signer=reader)  # the test's own view, read as B reads

    # A study submitted from B, run on A: two objectives, each reported at three steps, a user
    # attribute, an infinite second value.
    pair = ("submit", *PAIR, "--direction", "minimize", "--direction", "minimize")
    b.ok(*pair, "--n-trials", "5", "--concurrency", "2", "--study-name", "pair", "--wait")
    b.ok("wait", "pair")

    rows = _strict_json(b.ok("trials", "pair", "--format", "json"))
    assert [r["number"] for r in rows] == [0, 1, 2, 3, 4], rows
    for row in rows:
        x = row["params"]["x"]
        assert row["state"] == "complete" and row["values"] == [x, "Infinity"], row
        assert row["user_attrs"] == {"note": f"x={x:.3f}"}, row
        assert row["intermediate_values"] == {str(s): [x * s, float(s)] for s in range(3)}, row
        assert row["duration_s"] >= 0 and row["datetime_start"] and row["fail_reason"] is None
    table = b.ok("trials", "pair").splitlines()
    assert table[0].split()[:4] == ["number", "state", "value_0", "value_1"], table
    assert "user_attrs.note" in table[0] and "last_report" in table[0], table
    assert len(table) == 6 and all("2: [" in line for line in table[1:]), table
    cells = list(csv.DictReader(io.StringIO(b.ok("trials", "pair", "--format", "csv"))))
    assert len(cells) == 5 and cells[0]["user_attrs.note"].startswith("x="), cells
    assert len(json.loads(cells[0]["intermediate_values"])) == 3, cells
    assert _strict_json(b.ok("trials", "pair", "--format", "json", "--state", "fail")) == []

    best = _strict_json(b.ok("best", "pair", "--json"))
    assert best["pareto_front"] and best["pareto_front"][0]["values"][1] == "Infinity", best
    detail = _strict_json(b.ok("status", "pair", "--json"))
    assert detail["state"] == "finished" and detail["complete"] == 5, detail
    assert all(values[1] == "Infinity" for values in detail["best_values"]), detail
    assert [s["name"] for s in _strict_json(b.ok("status", "--json"))] == ["pair"]

    # A study no worker serves (it waits, running): enqueue, set, cancel, delete from B.
    held = ("submit", *PAIR, "--queue", "nobody", "--n-trials", "3", "--concurrency", "1")
    b.ok(*held, "--direction", "minimize", "--direction", "minimize", "--study-name", "held")
    wait_until(lambda: client.require_status("held").state is StudyState.RUNNING, timeout_s=30)
    sets = tmp_path / "sets.yaml"  # the user's own file, outside B's directories
    sets.write_text("- {x: 0.25}\n")
    b.ok("enqueue", "held", str(sets))
    b.ok("set", "held", "--concurrency", "2")
    wait_until(lambda: client.require_status("held").concurrency == 2, timeout_s=30)
    wait_until(lambda: len(client.trials("held")) == 2, timeout_s=30)  # sent: running
    b.ok("cancel", "held")
    wait_until(lambda: client.require_status("held").state is StudyState.CANCELLED, timeout_s=30)
    cancelled = _strict_json(b.ok("trials", "held", "--format", "json"))
    assert {r["params"]["x"] for r in cancelled} >= {0.25}, cancelled  # the enqueued set ran
    assert [(r["state"], r["fail_reason"]) for r in cancelled] == [("fail", "cancelled")] * 2
    assert b.run("wait", "held").returncode == 1  # cancelled: not a success

    keys = Keys(prefix)
    b.ok("delete", "held")
    b.ok("delete", "pair", "--purge")
    assert not conn.exists(keys.trials_of("pair"), keys.trials_of("held"))
    assert b.run("trials", "pair").returncode == 2  # an unknown study now

    # Nothing of any of it is on B: no state directory, no journal, no database, no socket.
    assert _files(b.home) == [] and _files(b.cwd) == [], (_files(b.home), _files(b.cwd))
    assert _files(a.cwd) or _files(a.home.parent / "state")  # A's storage is where A keeps it
