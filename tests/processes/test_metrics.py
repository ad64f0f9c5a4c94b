"""Prometheus metrics of a real broker and real workers, read during and after a real study."""

from __future__ import annotations

import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env, stop_process

pytestmark = pytest.mark.timeout(120)


def free_port(count: int = 1) -> int:
    """A port with `count` free ports from it (workers take PORT, PORT + 1, ...)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        try:
            for offset in range(count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples served on `port`, or none while nothing listens there yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except urllib.error.URLError:
        return {}
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: dict, name: str, **labels: str) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


def test_broker_and_worker_metrics_during_a_real_study(
    redis_url: str, prefix: str, cli_state: Path, run_cli
) -> None:
    broker_port, worker_port = free_port(), free_port(2)
    env = cli_env(OPTUNA_RQ_STATE_DIR=str(cli_state))
    base = ("--redis-url", redis_url, "--prefix", prefix)
    broker = subprocess.Popen(cli(*base, "broker", "--metrics-port", str(broker_port)), env=env)
    workers = subprocess.Popen(
        cli(
            *base,
            "workers",
            "--import",
            "tests.support.objectives",
            "--count",
            "2",
            "--metrics-port",
            str(worker_port),
        ),
        env=env,
    )
    try:
        wait_until(
            lambda: value(scrape(broker_port), "optuna_rq_live_workers", queue="default") == 2,
            timeout_s=60,
            message="the broker did not see 2 live workers",
        )
        submitted = run_cli(
            "submit",
            "tests.support.objectives:capped",
            "--param",
            "x={type: float, low: 0, high: 1}",
            "--param",
            f"redis_url={redis_url}",
            "--param",
            f"key={prefix}",
            "--param",
            "hold_s=0.3",
            "--n-trials",
            "8",
            "--concurrency",
            "2",
            "--study-name",
            "m",
        )
        assert submitted.returncode == 0, submitted.stderr

        def running() -> bool:
            m = scrape(broker_port)
            return value(m, "optuna_rq_outstanding_trials", study="m") == 2

        wait_until(running, timeout_s=30, message="never saw 2 outstanding trials")
        during = scrape(broker_port)
        assert value(during, "optuna_rq_concurrency_cap", study="m") == 2
        assert (
            value(during, "optuna_rq_desired_workers", queue="default") == 2
        )  # min(cap 2, trials left)
        assert value(during, "optuna_rq_queue_depth") is not None

        assert run_cli("wait", "m", "--timeout", "60").returncode == 0

        def settled() -> bool:  # the gauges are refreshed by the broker's loop
            m = scrape(broker_port)
            told = value(m, "optuna_rq_trials_total", study="m", state="COMPLETE", reason="")
            return told == 8 and value(m, "optuna_rq_desired_workers", queue="default") == 0

        wait_until(settled, timeout_s=10)
        after = scrape(broker_port)
        assert value(after, "optuna_rq_ask_seconds_count") == 8
        assert value(after, "optuna_rq_tell_seconds_count") == 8
        assert value(after, "optuna_rq_result_to_tell_seconds_count") == 8
        assert value(after, "optuna_rq_desired_workers", queue="default") == 0
        assert value(after, "optuna_rq_outstanding_trials", study="m") is None  # ended
        ran = sum(
            value(
                scrape(worker_port + i),
                "optuna_rq_worker_trials_total",
                outcome="COMPLETE",
                reason="",
            )
            or 0
            for i in range(2)
        )
        assert ran == 8
    finally:
        assert stop_process(workers) == 0
        assert stop_process(broker) == 0


@pytest.mark.timeout(180)
def test_every_way_a_trial_ends_is_counted_as_its_storage_says(
    redis_url: str, prefix: str, cli_state: Path, run_cli, workers_factory
) -> None:
    """`optuna_rq_trials_total` counts each trial once, by the state and reason it ended with,
    whatever ended it: a worker's result (each outcome and fail reason), a lost worker, a
    cancel, a stop condition's wind-down, a study that cannot run. Every fail reason a trial
    can reach through the daemon is enumerated; `not_allowed` cannot (a trial only reaches
    workers that serve its module: tests/processes/test_routing.py)."""
    import collections

    import optuna

    from optuna_rq.client import BrokerClient
    from optuna_rq.protocol import FailReason
    from optuna_rq.storage.storage_access import default_storage_url, open_storage

    port = free_port()
    env = cli_env(OPTUNA_RQ_STATE_DIR=str(cli_state))
    broker = subprocess.Popen(
        cli("--redis-url", redis_url, "--prefix", prefix, "broker", "--metrics-port", str(port)),
        env=env,
    )
    conn = None
    try:
        wait_until(lambda: scrape(port), timeout_s=60, message="no metrics served")
        # `elsewhere` only the workers import: `submit` cannot check it, the workers do.
        modules = (
            "tests.support.objectives",
            "tests.support.fault_objectives",
            "tests.support.held_objectives",
        )
        workers_only = str(Path(__file__).parents[1] / "support" / "workers_only")
        workers_factory(count=3, modules=(*modules, "elsewhere"), args=("--path", workers_only))
        from optuna_rq.plumbing.connection import connect

        conn = connect(redis_url)
        x = ("--param", "x={type: float, low: 0, high: 1}", "--sampler", "random")
        url = ("--param", f"redis_url={redis_url}")
        recorded = (*url, "--param", f"key={prefix}")
        studies: dict[str, tuple[str, ...]] = {
            "complete": ("tests.support.objectives:quadratic", "--n-trials", "2"),
            "pruned": ("tests.support.objectives:prunes", "--n-trials", "1"),
            "exception": ("tests.support.objectives:raises", "--n-trials", "1"),
            "bad_return": ("tests.support.objectives:returns_str", "--n-trials", "1"),
            "timeout": (
                "tests.support.objectives:sleeps", "--param", "hold_s=60", "--trial-timeout", "1",
            ),
            "import_error": ("elsewhere:nope", "--n-trials", "5"),
            "bad_signature": ("elsewhere:takes_x", "--param", "booster=dart", "--n-trials", "5"),
            "worker_lost": (
                "tests.support.fault_objectives:exits", *recorded, "--max-retries", "0",
            ),
            "cancelled": (
                "tests.support.held_objectives:held", *url, "--param", f"key={prefix}:c",
            ),
            # Its first trial held past --timeout: the two asked ahead end FAIL cancelled. The
            # timeout counts from the submission: it is submitted first, alone, so that it
            # starts well within it (the others' starts take the broker seconds on a slow
            # machine).
            "stopped": (
                "tests.support.held_objectives:held", *url, "--param", f"key={prefix}:s",
                "--n-trials", "50", "--ask-ahead", "2", "--timeout", "3",
            ),
        }  # fmt: skip

        client = BrokerClient(conn, prefix)

        def status(name: str) -> dict:
            found = client.status(name)
            assert found is not None, name
            return found.to_dict()

        def submit(name: str) -> subprocess.Popen[bytes]:
            args = studies[name]
            return subprocess.Popen(
                cli("--redis-url", redis_url, "--prefix", prefix, "submit", *args, *x)
                + (["--n-trials", "1"] if "--n-trials" not in args else [])
                + ["--concurrency", "1", "--study-name", name],
                env=env,
                stdout=subprocess.DEVNULL,
            )

        assert submit("stopped").wait(timeout=60) == 0
        wait_until(lambda: status("stopped")["running"] == 1, timeout_s=60)
        submits = [submit(name) for name in studies if name != "stopped"]  # side by side
        assert [p.wait(timeout=60) for p in submits] == [0] * len(submits)
        wait_until(lambda: status("cancelled")["running"] == 1, timeout_s=60)
        assert run_cli("cancel", "cancelled").returncode == 0
        wait_until(lambda: status("stopped")["failed"] == 2, timeout_s=60)  # wound down
        conn.rpush(f"{prefix}:s:go", "go")  # the held trial of `stopped` returns
        for name in studies:
            wait_until(lambda name=name: status(name)["state"] in ("finished", "cancelled",
                       "failed"), timeout_s=90, message=f"study {name} did not end")  # fmt: skip

        storage = open_storage(default_storage_url(cli_state))
        metrics = scrape(port)
        seen: set[tuple[str, str]] = set()
        for name in studies:
            trials = optuna.load_study(study_name=name, storage=storage).trials
            ended = collections.Counter(
                (t.state.name, str(t.user_attrs.get("fail_reason", ""))) for t in trials
            )
            counted = {
                (labels["state"], labels["reason"]): count
                for (metric, label_items), count in metrics.items()
                if metric == "optuna_rq_trials_total"
                for labels in [dict(label_items)]
                if labels["study"] == name and count
            }
            assert counted == dict(ended), (name, counted, dict(ended))
            seen |= set(ended)
        reasons = {reason for state, reason in seen if state == "FAIL"}
        assert reasons == {r.value for r in FailReason} - {FailReason.NOT_ALLOWED.value}, seen
        assert {state for state, _reason in seen} == {"COMPLETE", "PRUNED", "FAIL"}
    finally:
        if conn is not None:
            for held in ("c", "s"):  # nothing held keeps the workers
                conn.rpush(f"{prefix}:{held}:go", *["go"] * 10)
        assert stop_process(broker) == 0
