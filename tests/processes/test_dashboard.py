"""`optuna-rq dashboard`: optuna-dashboard on the broker's study storage, found from what the
broker publishes, read-only unless --allow-writes, on 127.0.0.1 unless --host says otherwise.

A real broker, real workers and a real study; the dashboard as a real process beside them; the
page loaded by a real headless Chromium (Debian's package), whose screenshot is kept under
tests/artifacts/ (gitignored).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from typing import Any

import optuna
import psutil
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage

from optuna_rq.cli.dashboard_app import INSTALL_LINE, READ_METHODS
from optuna_rq.client import BrokerClient
from optuna_rq.plumbing.connection import connect
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env, stop_process

pytest.importorskip("optuna_dashboard", reason=f"optuna-dashboard is not installed: {INSTALL_LINE}")

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_INSTALL = "apt-get install -y chromium"
STARTED = re.compile(r"optuna-dashboard on (http://\S+/) \((read-only|read-write)")


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        reason = f"headless Chromium is needed to load the dashboard's page: {CHROMIUM_INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (required in CI: .ci/run installs it)")
        pytest.skip(reason)
    return exe


def _journal(path: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(path)))


class Dashboard:
    """A running `optuna-rq dashboard` process and the address it printed."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(cli(*args), env=env, stderr=out)
        wait_until(
            lambda: self.process.poll() is not None or STARTED.search(self.output()),
            timeout_s=60,
            message="the dashboard did not start",
        )
        started = STARTED.search(self.output())
        assert started, f"exit {self.process.returncode}: {self.output()}"
        self.url = started.group(1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def request(self, method: str, path: str, body: object = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}  # as the page sends its writes
        request = urllib.request.Request(
            self.url + path.lstrip("/"), data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def studies(self) -> dict[str, int]:
        code, body = self.request("GET", "/api/studies")
        assert code == 200, body
        return {s["study_name"]: s["study_id"] for s in json.loads(body)["study_summaries"]}

    def listening(self) -> set[str]:
        """The addresses the process listens on."""
        process = psutil.Process(self.process.pid)
        connections = getattr(process, "net_connections", process.connections)(kind="inet")
        return {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}

    def stop(self) -> None:
        assert stop_process(self.process) == 0, self.output()


@pytest.fixture
def start_dashboard(tmp_path: Path) -> Iterator[Any]:
    started: list[Dashboard] = []

    def start(*args: str, **env: str) -> Dashboard:
        log = tmp_path / f"dashboard-{len(started)}.log"
        dashboard = Dashboard([*args], log, cli_env(**env))
        started.append(dashboard)
        return dashboard

    yield start
    for dashboard in started:
        if dashboard.process.poll() is None:
            dashboard.process.kill()
            dashboard.process.wait()


def _page_text(url: str, shot: Path | None = None) -> str:
    """The page at `url` as headless Chromium renders it (scripts run, the API read), as text;
    with `shot`, a screenshot of it there too."""
    exe = _chromium()
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"]
    base += ["--virtual-time-budget=15000"]
    done = subprocess.run(
        [*base, "--dump-dom", url], capture_output=True, text=True, timeout=90, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if shot is not None:
        shot.parent.mkdir(parents=True, exist_ok=True)
        taken = subprocess.run(
            [*base, f"--screenshot={shot}", url], capture_output=True, timeout=90, check=False
        )
        assert taken.returncode == 0 and shot.stat().st_size > 0, taken.stderr[-2000:]
    text = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", done.stdout, flags=re.S)
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", text)).split())


def _wait_for_page(
    dashboard: Dashboard, study_id: int, study: str, numbers: list[int], shot: Path
) -> None:
    """Load the study's trials page until it shows the study's name, at least as many trials
    as `numbers` in its list, and the first and the newest of them in detail (selected: the
    list is drawn only as far as the window reaches, and each detail drawn costs Chromium
    time); the screenshot kept at `shot`."""
    count = len(numbers)
    detailed = sorted({*numbers[:2], *numbers[-6:]})
    selected = ",".join(str(n) for n in detailed)
    page = f"{dashboard.url}dashboard/studies/{study_id}/trials?numbers={selected}"
    texts: list[str] = []

    def shown() -> bool:
        texts.append(_page_text(page, shot))
        listed = re.search(r"(\d+) Trials", texts[-1])
        details = {int(n) for n in re.findall(r"Trial (\d+) \(trial_id=\d+\)", texts[-1])}
        return (
            study in texts[-1]
            and listed is not None
            and int(listed.group(1)) >= count
            and details >= set(detailed)
        )

    try:
        wait_until(shown, timeout_s=120, interval_s=0.5)
    except AssertionError:
        raise AssertionError(
            f"not on the page: {study!r}, {count} trials, {detailed} in detail\n{texts[-1]}"
        ) from None
    print(f"screenshot of the dashboard ({count} trials, {detailed} in detail): {shot}")


# -- beside a running study ---------------------------------------------------------------------


def test_the_page_shows_the_running_study_and_its_trials(
    redis_url: str, prefix: str, tmp_path: Path, start_dashboard: Any
) -> None:
    """Given a broker, workers and a running study on its default storage (and a second study
    on a storage of its own), `optuna-rq dashboard` with no storage named opens the broker's
    journal, says where the other study is, listens on 127.0.0.1 only, and the page Chromium
    loads shows the study and every trial told so far; loaded again later, the trials told
    since, without a restart."""
    _chromium()
    state = tmp_path / "state"
    other = tmp_path / "own.journal"
    common = ["--redis-url", redis_url, "--prefix", prefix]
    env = cli_env(OPTUNA_RQ_STATE_DIR=str(state))
    broker = subprocess.Popen(
        cli(*common, "broker", "--allow-storage", str(tmp_path / "*.journal")), env=env
    )
    workers = subprocess.Popen(
        cli(*common, "workers", "--import", "tests.support.objectives", "--count", "2"), env=env
    )
    client = BrokerClient(connect(redis_url), prefix)
    try:
        running, own, pair = "running-study", "own-storage-study", "pair-study"
        x = ["--param", "x={type: float, low: 0, high: 1}"]
        studies = {
            running: ("sleeps", "400", *x, "--param", "hold_s=0.5"),
            own: ("sleeps", "2", *x, "--param", "hold_s=0.5", "--storage", f"journal:///{other}"),
            # two objectives, each reported at three steps: the reports show as text
            pair: ("reports_pair", "2", *x, "--direction", "minimize", "--direction", "minimize"),
        }
        submits = [  # all at once: each takes a few seconds to start on a loaded machine
            subprocess.Popen(
                cli(
                    *common, "submit", f"tests.support.objectives:{objective}", "--study-name", name
                )
                + ["--n-trials", n_trials, "--concurrency", "2", "--sampler", "random", *extra],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, (objective, n_trials, *extra) in studies.items()
        ]
        for submit in submits:
            _out, err = submit.communicate(timeout=60)
            assert submit.returncode == 0, err

        def complete(name: str) -> int:
            status = client.status(name)
            return 0 if status is None else status.complete

        wait_until(lambda: min(complete(running), complete(own), complete(pair)) >= 1, timeout_s=60)
        dashboard = start_dashboard(
            *common, "dashboard", "--port", "0", OPTUNA_RQ_STATE_DIR=str(state)
        )
        said = dashboard.output()
        assert f"storage journal:///{state / 'studies.journal'}" in said, said
        assert "(read-only)" in said, said
        assert f"studies are in storage journal:///{other} ({own})" in said, said
        assert f"optuna-rq dashboard --storage journal:///{other}" in said, said
        assert dashboard.listening() == {"127.0.0.1"}
        study_id = dashboard.studies()[running]
        assert own not in dashboard.studies()  # in its own storage, not the broker's

        journal = state / "studies.journal"
        seen = 0
        for look in range(2):  # twice: the second sees trials told after the first
            stored = optuna.load_study(study_name=running, storage=_journal(journal))
            numbers = [t.number for t in stored.get_trials(deepcopy=False)]
            assert len(numbers) > seen
            assert client.status(running).state.value == "running"  # type: ignore[union-attr]
            _wait_for_page(
                dashboard, study_id, running, numbers, ARTIFACTS / f"dashboard-{look}.png"
            )
            seen = len(numbers)
            wait_until(lambda n=seen: complete(running) >= n + 2, timeout_s=60)

        # A multi-objective study's reports (`report(values, step)`): a user attribute, shown
        # as text in the trial's detail (optuna-dashboard charts reports of one objective only).
        reported = optuna.load_study(study_name=pair, storage=_journal(journal)).trials[0]
        steps = reported.user_attrs["intermediate_values"]
        assert sorted(steps) == ["0", "1", "2"] and reported.intermediate_values == {}
        text = _page_text(
            f"{dashboard.url}dashboard/studies/{dashboard.studies()[pair]}/trials?numbers=0"
        )
        assert "intermediate_values" in text and '"2":[' in text.replace(" ", ""), text
        dashboard.stop()
    finally:
        for process in (workers, broker):
            stop_process(process)
        client.connection.close()


# -- read-only by default -------------------------------------------------------------------


def _write_routes() -> list[tuple[str, str]]:
    """Every route of optuna-dashboard's app that is not a read, with its parameters filled in
    (study 0, trial 0): the installed version's own list, whatever it adds."""
    from optuna_dashboard import wsgi

    app = wsgi(optuna.storages.InMemoryStorage())
    routes = []
    for route in app.routes:  # type: ignore[attr-defined]
        if route.method in READ_METHODS:
            continue
        path = re.sub(r"<[^>]*:int>", "0", route.rule)
        path = re.sub(r"<[^>]*>", "00000000-0000-0000-0000-000000000000", path)
        routes.append((route.method, path))
    assert len(routes) >= 10, routes  # studies, trials, notes, artifacts, preferences...
    return routes


def test_writes_are_refused_unless_allowed(tmp_path: Path, start_dashboard: Any) -> None:
    """Read-only, every write route optuna-dashboard has answers 403 and the storage is left
    byte for byte as it was, while reads still answer; with --allow-writes a study can be
    created from the page's API, and lands in the storage."""
    path = tmp_path / "studies.journal"
    study = optuna.create_study(study_name="kept", storage=_journal(path))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    before = path.read_bytes()
    url = f"journal:///{path}"
    env = {"OPTUNA_RQ_STATE_DIR": str(tmp_path / "unused")}

    dashboard = start_dashboard("dashboard", "--storage", url, "--port", "0", **env)
    assert dashboard.studies() == {"kept": 0}
    for method, route in _write_routes():
        code, body = dashboard.request(method, route, {"study_name": "x", "directions": []})
        assert code == 403, (method, route, body)
        assert "read-only" in json.loads(body)["reason"]
    assert dashboard.request("GET", "/api/studies/0")[0] == 200
    assert path.read_bytes() == before
    dashboard.stop()

    writer = start_dashboard("dashboard", "--storage", url, "--port", "0", "--allow-writes", **env)
    assert "(read-write" in writer.output()
    created = {"study_name": "made-on-the-page", "directions": ["minimize"]}
    code, body = writer.request("POST", "/api/studies", created)
    assert code == 201, body
    assert "made-on-the-page" in {
        s.study_name for s in optuna.get_all_study_summaries(_journal(path))
    }
    writer.stop()


def test_host_says_where_it_listens(tmp_path: Path, start_dashboard: Any) -> None:
    path = tmp_path / "studies.journal"
    optuna.create_study(study_name="s", storage=_journal(path))
    dashboard = start_dashboard(
        "dashboard", "--storage", f"journal:///{path}", "--port", "0", "--host", "0.0.0.0"
    )
    assert dashboard.listening() == {"0.0.0.0"}
    dashboard.stop()


# -- wrong input -------------------------------------------------------------------------------


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(*args), env=env or cli_env(), capture_output=True, text=True, timeout=60, check=False
    )


def test_help_answers() -> None:
    done = _run("dashboard", "--help")
    assert done.returncode == 0, done.stderr
    for said in ("--storage URL", "--host ADDRESS", "--port PORT", "--allow-writes", "127.0.0.1"):
        assert said in done.stdout


def test_wrong_input_is_an_error_naming_it_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port taken, an address not this machine's, a storage that is not there, a port out of
    range, a Redis named that does not answer, optuna-dashboard not installed: each one line
    naming the input and the fix, and nothing served (run in this process: each ends before
    the dashboard would serve)."""
    from optuna_rq.cli.app import main

    path = tmp_path / "studies.journal"
    optuna.create_study(study_name="s", storage=_journal(path))
    url = f"journal:///{path}"

    def fails(*argv: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exited:
            main(list(argv))
        err = capsys.readouterr().err
        assert err.startswith("Error: ") and err.count("\n") == 1, (argv, err)
        return int(exited.value.code or 0), err

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code, err = fails("dashboard", "--storage", url, "--port", port)
    assert code == 2 and f"--port {port}" in err and "taken" in err, err
    # 203.0.113.0/24 is for documentation: never this machine's
    code, err = fails("dashboard", "--storage", url, "--host", "203.0.113.7")
    assert code == 2 and "--host 203.0.113.7" in err, err
    code, err = fails("dashboard", "--storage", f"journal:///{tmp_path}/none.journal")
    assert code == 2 and "none.journal" in err and "no such file" in err, err
    code, err = fails("dashboard", "--port", "70000")
    assert code == 2 and "--port" in err and "65535" in err, err
    # The Redis the user named is down: said, not guessed around.
    code, err = fails("--redis-url", "redis://127.0.0.1:1/0", "dashboard")
    assert code == 1 and "127.0.0.1:1" in err, err
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # as if not installed
    code, err = fails("dashboard", "--storage", url)
    assert code == 1 and INSTALL_LINE in err and "not installed" in err, err


def test_no_storage_found_and_no_redis_started(tmp_path: Path) -> None:
    """With no Redis to reach and no journal in the state directory, an error naming where it
    looked and the fix, and no redis-server started (the state directory is not even made)."""
    state = tmp_path / "state"
    env = cli_env(OPTUNA_RQ_STATE_DIR=str(state))
    env.pop("OPTUNA_RQ_REDIS_URL", None)
    done = _run("dashboard", env=env)
    assert done.returncode == 2, done.stderr
    assert "no study storage to show" in done.stderr
    assert str(state / "studies.journal") in done.stderr and "--storage URL" in done.stderr
    assert not state.exists()


def test_storages_a_status_names_that_it_will_not_open(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """Statuses (anyone who can write to Redis writes them when signing is off) naming a
    JournalRedis storage, the broker's memory, and a journal on another machine: the dashboard
    opens none of them, connects to no JournalRedis, and says why for each, naming the fix."""
    from optuna_rq.protocol import Keys, Signer
    from optuna_rq.protocol.status import StudyState, StudyStatus

    with socket.socket() as pickling:  # where a JournalRedis would be: nothing may connect
        pickling.bind(("127.0.0.1", 0))
        pickling.listen()
        pickling.settimeout(0.1)
        named = {
            "pickled": f"redis://127.0.0.1:{pickling.getsockname()[1]}/0",
            "in-memory": "memory",
            "elsewhere": "journal:////nonexistent/elsewhere/studies.journal",
        }
        conn = connect(redis_url)
        for name, storage in named.items():
            status = StudyStatus(
                name=name,
                state=StudyState.RUNNING,
                objective="m:f",
                directions=["minimize"],
                n_trials=1,
                concurrency=1,
                priority=1.0,
                storage=storage,
            )
            conn.hset(Keys(prefix).status, name, status.sealed(Signer()))
        conn.close()
        state = tmp_path / "state"
        done = _run(
            "--redis-url", redis_url, "--prefix", prefix, "dashboard",
            env=cli_env(OPTUNA_RQ_STATE_DIR=str(state)),
        )  # fmt: skip
        with pytest.raises(TimeoutError):
            pickling.accept()
    assert done.returncode == 2, done.stderr
    said = done.stderr
    assert said.startswith("Error: no study storage to show") and said.count("\n") == 1, said
    assert "unpickles" in said and "--storage URL if you do" in said
    assert "storage memory (in-memory): the broker keeps these studies in its memory" in said
    assert "no file /nonexistent/elsewhere/studies.journal on this machine" in said
    assert f"no file {state / 'studies.journal'}" in said  # the state directory's default
