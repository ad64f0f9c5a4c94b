"""`trials`, `best`, `delete`, `enqueue` and `status` lines against a real broker and workers."""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import optuna
import pytest
import redis

from optuna_rq.client import BrokerClient
from optuna_rq.protocol import StudySpec, StudyState, StudyStatus
from optuna_rq.storage.storage_access import default_storage_url, open_storage
from optuna_rq.terminal.status_view import status_detail, status_lines, waiting_note
from optuna_rq.terminal.study_bar import StudyBar, make_console
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(180)

X = "x={type: float, low: -10, high: 10}"


def test_enqueued_sets_run_first_once_and_trials_best_delete_work(
    run_cli,
    broker_process,
    workers_factory,
    tmp_path: Path,
    cli_state: Path,
    conn: redis.Redis,
    prefix: str,
) -> None:
    workers_factory(count=1)
    sets = tmp_path / "sets.yaml"
    sets.write_text("- {x: 1.5}\n- {x: -2.0}\n")
    args = ("submit", "tests.support.objectives:quadratic", "--param", X, "--param", "depth=0")
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
    assert len(stored_trials("s", cli_state)) == 4  # without --purge, its trials stay

    # A running study (no worker serves its queue, so it waits, running) is refused unless
    # --force, and --purge deletes its trials too. Its name alone nearly fills 80 columns: what
    # is printed to a pipe stays one line a study.
    busy = "a-study-whose-name-alone-takes-most-of-an-eighty-column-terminal-" + "x" * 20
    result = run_cli(*args, "--queue", "nobody", "--n-trials", "3", "--concurrency", "1",
                     "--study-name", busy)  # fmt: skip
    assert result.returncode == 0, result.stderr
    client = BrokerClient(conn, prefix)  # read in-process: each command run takes seconds
    wait_until(lambda: client.require_status(busy).waiting_for_workers, timeout_s=60)
    lines = run_cli("status").stdout.splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"{busy}  running  0/3"), lines
    waited = run_cli("wait", busy, "--timeout", "0").stderr.splitlines()
    assert f"timeout: study {busy!r} is still running" in waited, waited
    note = (
        "waiting for a worker: optuna-rq workers --import tests.support.objectives --queue nobody"
    )
    assert any(line.startswith(busy) and note in line for line in waited), waited  # the bar

    refused = run_cli("delete", busy)
    assert refused.returncode == 2 and f"`optuna-rq cancel {busy}` first" in refused.stderr
    assert client.require_status(busy).state is StudyState.RUNNING
    assert stored_trials(busy, cli_state)  # asked, waiting in their queue
    purged = run_cli("delete", busy, "--force", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.strip() == f"deleted study {busy!r}"
    assert client.status(busy) is None
    with pytest.raises(KeyError):
        stored_trials(busy, cli_state)


def test_a_bar_on_a_pipe_is_one_line_whatever_columns_says(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """COLUMNS=80 as pytest-xdist's workers have it (GNU readline, imported by pytest as it
    starts, exports it, and the workers inherit it): on a pipe the bar's last line still holds
    the command to copy whole, as in the test above, whichever process ran it."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "24")
    for forcing in ("FORCE_COLOR", "TTY_COMPATIBLE"):  # what would make a pipe a terminal
        monkeypatch.delenv(forcing, raising=False)
    busy = "a-study-whose-name-alone-takes-most-of-an-eighty-column-terminal-" + "x" * 20
    snapshot = StudyStatus(
        name=busy,
        state=StudyState.RUNNING,
        objective="tests.support.objectives:quadratic",
        directions=["minimize"],
        n_trials=3,
        concurrency=1,
        priority=1.0,
        storage="memory",
        queue="nobody",
        waiting_for_workers=True,
    )
    with StudyBar(make_console(stderr=True), busy) as bar:
        bar.show(snapshot, waiting_note(snapshot, None))
    lines = capsys.readouterr().err.splitlines()
    note = (
        "waiting for a worker: optuna-rq workers --import tests.support.objectives --queue nobody"
    )
    assert any(line.startswith(busy) and note in line for line in lines), lines


def stored_trials(name: str, state: Path) -> list[optuna.trial.FrozenTrial]:
    """The study's trials in the broker's default storage; KeyError if it has none there."""
    return optuna.load_study(
        study_name=name, storage=open_storage(default_storage_url(state))
    ).trials


def test_a_status_lines_age_is_since_the_submission_not_the_last_update() -> None:
    now_s = time.time()
    snapshot = StudyStatus(
        name="long-running",
        state=StudyState.RUNNING,
        objective="tests.support.objectives:quadratic",
        directions=["minimize"],
        n_trials=100,
        concurrency=2,
        priority=1.0,
        storage="memory",
        submitted_at=now_s - 2 * 3600 - 5,
        updated_at=datetime.fromtimestamp(now_s, timezone.utc).isoformat(),  # just now
    )
    header, line = status_lines([snapshot], now_s=now_s)
    assert header.split()[-1] == "AGE" and line.split()[-1] == "2h", (header, line)
    assert any(d.startswith("submitted") and "(2h ago)" in d for d in status_detail(snapshot))


def test_status_says_a_studys_batches_as_submitted() -> None:
    def concurrency_line(batch: int) -> str:
        spec = StudySpec(
            name="short", objective="tests.support.objectives:quadratic", space={},
            n_trials=8, concurrency=8, batch=batch,
        )  # fmt: skip
        status = StudyStatus.of(spec, state=StudyState.RUNNING, storage="memory")
        assert StudyStatus.from_json(status.to_json()).batch == batch  # what `status` reads
        [line] = [d for d in status_detail(status) if d.startswith("concurrency")]
        return line

    assert concurrency_line(4) == "concurrency  8, priority 1, batches of 4"
    assert concurrency_line(1) == "concurrency  8, priority 1"
