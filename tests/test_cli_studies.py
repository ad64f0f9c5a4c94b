"""`trials`, `best`, `delete`, `enqueue` and `status` lines against a real broker and workers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

X = "x={type: float, low: -10, high: 10}"


def test_enqueued_sets_run_first_once_and_trials_best_delete_work(
    run_cli, broker_process, workers_factory, tmp_path: Path
) -> None:
    workers_factory(count=1)
    sets = tmp_path / "sets.yaml"
    sets.write_text("- {x: 1.5}\n- {x: -2.0}\n")
    args = ("submit", "tests.objectives:quadratic", "--param", X, "--param", "depth=0")
    result = run_cli(
        *args, "--enqueue", str(sets), "--n-trials", "4", "--concurrency", "1",
        "--study-name", "s", "--seed", "0", "--wait",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    rows = json.loads(run_cli("trials", "s", "--format", "json").stdout)
    assert [r["params"]["x"] for r in rows[:2]] == [1.5, -2.0]
    assert len(rows) == 4 and all(r["state"] == "complete" for r in rows)
    table = list(csv.DictReader(io.StringIO(run_cli("trials", "s", "--format", "csv").stdout)))
    assert [float(r["x"]) for r in table[:2]] == [1.5, -2.0]
    assert len(run_cli("trials", "s").stdout.splitlines()) == 5  # a header and 4 trials

    best = json.loads(run_cli("best", "s", "--json").stdout)
    assert best["value"] == min(r["values"][0] for r in rows)
    lines = run_cli("status").stdout.splitlines()
    assert lines[0].split()[:3] == ["STUDY", "STATE", "DONE"]
    assert lines[1].split()[:3] == ["s", "finished", "4/4"]

    deleted = run_cli("delete", "s")
    assert deleted.returncode == 0, deleted.stderr
    assert "kept in" in deleted.stdout
    assert run_cli("status", "s").returncode == 2  # unknown study now
