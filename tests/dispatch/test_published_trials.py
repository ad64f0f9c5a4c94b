"""The trials the broker publishes for `optuna-rq trials` (`dispatch.publication`,
`protocol.trial_summary`): what an entry holds and how big it may be, that it opens only as the
broker's, that the dispatcher writes it in the writes it makes anyway (no round trip of its own,
at most one command a trial), and that the daemon catches up what it did not publish (a restart,
an older study, an ended one) and drops it with the study. Real Redis, in-process dispatcher and
daemon; the same end to end with real processes: tests/processes/test_any_machine.py.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import redis
from optuna.trial import TrialState

from optuna_rq import suggest
from optuna_rq.cli.output import json_text, render_trials, trial_row
from optuna_rq.client import BrokerClient
from optuna_rq.daemon import BrokerSettings, Daemon
from optuna_rq.dispatch import Budget, Dispatcher, RunSpec, StudyRun
from optuna_rq.dispatch.publication import TrialPublication, summary_of
from optuna_rq.dispatch.views import INTERMEDIATE_VALUES_ATTR
from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.protocol import (
    RESULT_FIELD,
    Delete,
    Keys,
    Outcome,
    Record,
    RefusedTrial,
    Role,
    Signer,
    StudySpec,
    StudyState,
    StudyStatus,
    TrialRequest,
    TrialStateName,
    TrialSummary,
    generate_keyrings,
    read_trial_summaries,
    seal_stored_spec,
)
from optuna_rq.protocol.trial_summary import SUMMARY_MAX_BYTES
from optuna_rq.storage.storage_access import open_storage, open_storage_to_read
from optuna_rq.workers.execute import trial_result
from tests.support import source_trees
from tests.support.worker_processes import cli, cli_env

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
RINGS = generate_keyrings()
BROKER, WORKER, CLIENT = (Signer(keyring=RINGS[r]) for r in (Role.BROKER, Role.WORKER, Role.CLIENT))


def _summary(**fields: Any) -> TrialSummary:
    return TrialSummary(**{"number": 3, "state": TrialStateName.COMPLETE, **fields})


# -- one entry ---------------------------------------------------------------------------------


def test_an_entry_opens_only_as_the_brokers_for_its_study_and_its_trial() -> None:
    summary = _summary(values=[0.5, math.inf], params={"x": 0.5})
    sealed = summary.sealed(BROKER, study="s")
    assert TrialSummary.opened(sealed, CLIENT, study="s", field="3") == summary
    refusals = {
        ("t", "3", sealed): "not signed by the broker",  # another study's
        ("s", "4", sealed): "is trial 3's",  # copied under another number
        ("s", "3", summary.encode()): "not signed by the broker",  # plain
        ("s", "3", CLIENT.seal(Record.COMMAND, summary.encode())): "not signed by the broker",
    }
    for (study, field, raw), why in refusals.items():
        with pytest.raises(ProtocolError, match=why):
            TrialSummary.opened(raw, CLIENT, study=study, field=field)
    with pytest.raises(ConfigError, match="cannot sign"):  # nobody but the broker seals one
        summary.sealed(CLIENT, study="s")
    # Signing off: as it is, and still the trial its field names.
    assert TrialSummary.opened(summary.sealed(Signer(), study="s"), Signer(), study="s", field="3")
    with pytest.raises(ProtocolError, match="is trial 3's"):
        TrialSummary.opened(summary.encode(), Signer(), study="s", field="5")


def test_an_entry_is_bounded_dropping_the_earliest_reports_first_then_attributes() -> None:
    steps = [[step, float(step)] for step in range(5000)]
    big = _summary(intermediate_values=steps, user_attrs={"note": "n"}, params={"x": 1.0})
    bounded = big.bounded()
    assert len(bounded.encode()) <= SUMMARY_MAX_BYTES < len(big.encode())
    assert bounded.truncated == ["intermediate_values"] and bounded.user_attrs == {"note": "n"}
    assert bounded.intermediate_values == steps[-len(bounded.intermediate_values) :]  # the last
    huge = _summary(user_attrs={"blob": "b" * 2 * SUMMARY_MAX_BYTES}, params={"x": 1.0})
    assert huge.bounded().truncated == ["user_attrs"] and huge.bounded().params == {"x": 1.0}
    assert len(huge.bounded(2048).encode()) <= 2048
    # What msgpack cannot carry is shown as its text, not refused.
    odd = _summary(user_attrs={"when": {1, 2}}).bounded()
    assert odd.user_attrs == {"when": "{1, 2}"}


def test_a_trial_summary_splits_optuna_rqs_own_attributes_from_the_users() -> None:
    study = optuna.create_study(directions=["minimize", "maximize"])
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr(INTERMEDIATE_VALUES_ATTR, {"0": [1.0, 2.0], "1": [0.5, 2.5]})
    trial.set_user_attr("note", "mine")
    trial.set_user_attr("fail_reason", "exception")
    trial.set_user_attr("fail_error", "Traceback...\nValueError: boom")
    trial.set_user_attr("attempt", 2)
    trial.set_user_attr("retry_of", 0)
    study.tell(trial, state=TrialState.FAIL)
    summary = summary_of(study.trials[0], multi=True)
    assert summary.state is TrialStateName.FAIL and summary.values is None
    assert summary.user_attrs == {"note": "mine"}
    assert summary.intermediate_values == [[0, [1.0, 2.0]], [1, [0.5, 2.5]]]
    assert (summary.fail_reason, summary.error) == ("exception", "ValueError: boom")
    assert (summary.attempt, summary.retry_of) == (2, 0)
    assert summary.duration_s is not None and summary.duration_s >= 0


# -- what front doors print --------------------------------------------------------------------


def test_json_output_writes_nan_and_infinities_as_text_any_parser_reads() -> None:
    text = json_text({"best": math.inf, "values": [-math.inf, math.nan, 1.5]})
    assert json.loads(text, parse_constant=_refuse) == {
        "best": "Infinity",
        "values": ["-Infinity", "NaN", 1.5],
    }
    assert [float(v) for v in ("Infinity", "-Infinity")] == [math.inf, -math.inf]


def _refuse(word: str) -> Any:
    raise AssertionError(f"not JSON: {word}")


def test_trials_shows_multi_objective_reports_and_user_attributes_in_every_format() -> None:
    entries: list[TrialSummary | RefusedTrial] = [
        _summary(
            number=0,
            values=[1.0, math.inf],
            params={"x": 0.25},
            user_attrs={"note": "a", "tags": ["p", "q"]},
            intermediate_values=[[0, [3.0, 1.0]], [1, [2.0, 1.5]]],
        ),
        RefusedTrial(field="1", why="the published trial 1 of study 's' is not signed"),
    ]
    rows = [trial_row(entry) for entry in entries]
    parsed = json.loads(render_trials(rows, "json"), parse_constant=_refuse)
    assert parsed[0]["intermediate_values"] == {"0": [3.0, 1.0], "1": [2.0, 1.5]}
    assert parsed[0]["user_attrs"] == {"note": "a", "tags": ["p", "q"]}
    assert parsed[0]["values"] == [1.0, "Infinity"]
    assert parsed[1] == {"number": 1, "state": "refused", "error": entries[1].why}  # type: ignore[union-attr]
    table = render_trials(rows, "table").splitlines()
    assert table[0].split() == [
        "number", "state", "value_0", "value_1", "x", "user_attrs.note", "user_attrs.tags",
        "last_report", "duration_s", "fail_reason",
    ]  # fmt: skip
    assert table[1].split()[:8] == ["0", "complete", "1", "inf", "0.25", "a", '["p",', '"q"]']
    assert "1: [2, 1.5]" in table[1] and table[2].split()[:2] == ["1", "refused"]
    csv_lines = render_trials(rows, "csv").splitlines()
    assert '"{""0"": [3.0, 1.0], ""1"": [2.0, 1.5]}"' in csv_lines[1], csv_lines


def _cli(redis_url: str, prefix: str, *args: str, **env: str) -> Any:
    return subprocess.run(
        cli("--redis-url", redis_url, "--prefix", prefix, *args),
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _finished(name: str, **fields: Any) -> StudyStatus:
    return StudyStatus(
        name=name,
        state=StudyState.FINISHED,
        objective="tests.support.objectives:quadratic",
        directions=fields.pop("directions", ["minimize"]),
        n_trials=1,
        concurrency=1,
        priority=1.0,
        complete=1,
        storage="journal:////nowhere/studies.journal",
        **fields,
    )


@pytest.mark.processes
def test_status_best_and_trials_print_json_that_strict_parsers_read(
    conn: redis.Redis, prefix: str, redis_url: str
) -> None:
    """An infinite best value (Optuna takes one) and an infinite trial value are the string
    "Infinity" in every JSON output, not the bare word jq refuses."""
    keys = Keys(prefix)
    conn.hset(
        keys.status, "inf", _finished("inf", best_value=-math.inf, best_params={"x": 1}).to_json()
    )
    front = [[1.0, math.inf]]
    pair = _finished(
        "pair", directions=["minimize", "minimize"], best_values=front, best_params=[{"x": 1}]
    )
    conn.hset(keys.status, "pair", pair.to_json())
    conn.hset(keys.trials_of("inf"), "0", _summary(number=0, values=[-math.inf]).encode())
    outputs = {
        ("status", "--json"): lambda d: [s["best_value"] for s in d if "best_value" in s],
        ("status", "inf", "--json"): lambda d: d["best_value"],
        ("status", "pair", "--json"): lambda d: d["best_values"],
        ("best", "inf", "--json"): lambda d: d["value"],
        ("best", "pair", "--json"): lambda d: d["pareto_front"][0]["values"],
        ("trials", "inf", "--format", "json"): lambda d: d[0]["values"],
    }
    expected = {
        ("status", "--json"): ["-Infinity"],
        ("status", "inf", "--json"): "-Infinity",
        ("status", "pair", "--json"): [[1.0, "Infinity"]],
        ("best", "inf", "--json"): "-Infinity",
        ("best", "pair", "--json"): [1.0, "Infinity"],
        ("trials", "inf", "--format", "json"): ["-Infinity"],
    }
    for args, pick in outputs.items():
        done = _cli(redis_url, prefix, *args)
        assert done.returncode == 0, (args, done.stderr)
        assert pick(json.loads(done.stdout, parse_constant=_refuse)) == expected[args], args


@pytest.mark.processes
def test_trials_shows_an_entry_the_broker_did_not_sign_as_refused_and_says_why(
    conn: redis.Redis, prefix: str, redis_url: str
) -> None:
    secret = "0123456789abcdef0123456789abcdef"
    broker = Signer(secret.encode())
    keys = Keys(prefix)
    conn.hset(keys.status, "s", _finished("s").sealed(broker))
    conn.hset(keys.trials_of("s"), "0", _summary(number=0, values=[0.5]).sealed(broker, study="s"))
    conn.hset(keys.trials_of("s"), "1", _summary(number=1, values=[-99.0]).encode())  # forged
    conn.hset(keys.trials_of("s"), "2", _summary(number=0, values=[0.5]).sealed(broker, study="s"))
    done = _cli(redis_url, prefix, "trials", "s", "--format", "json", OPTUNA_RQ_SECRET=secret)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["number"], r["state"]) for r in rows] == [
        (0, "complete"),
        (1, "refused"),  # not signed
        (2, "refused"),  # trial 0's, copied under 2
    ]
    assert "trial 1 of study 's' is not signed by the broker" in done.stderr, done.stderr
    assert "is trial 0's, refused" in done.stderr, done.stderr
    table = _cli(redis_url, prefix, "trials", "s", "--state", "complete", OPTUNA_RQ_SECRET=secret)
    assert len(table.stdout.splitlines()) == 2 and table.stderr == "", table


# -- the dispatcher: published in the writes it makes anyway ----------------------------------


class _Watched(TrialPublication):
    """Records, for each write it joins, how many commands the write held before it and how
    many it added."""

    def __init__(self, keys: Keys, signer: Signer) -> None:
        super().__init__(keys, signer)
        self.joined: list[tuple[int, int]] = []

    def into(self, pipe: Any, studies: Any = None) -> Any:
        before = len(pipe)
        queued = super().into(pipe, studies)
        self.joined.append((before, len(pipe) - before))
        return queued


def test_the_dispatcher_publishes_each_trial_sent_and_told_in_the_writes_it_makes_anyway(
    conn: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    publication = _Watched(keys, BROKER)
    dispatcher = Dispatcher(
        conn, prefix=prefix, reply_to=keys.results, signer=BROKER, publication=publication
    )
    run = StudyRun(
        study=optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)),
        spec=RunSpec(
            objective="tests.support.objectives:quadratic",
            inputs={"x": suggest.float(0, 1)},
            concurrency=2,
        ),
        budget=Budget(6),
    )
    dispatcher.add(run)
    queue = dispatcher.sender.queue(run)
    answered: set[str] = set()
    while not run.done:
        dispatcher.refill()
        sent = read_trial_summaries(conn, keys, CLIENT, run.name)
        running = [e.number for e in sent if e.state is TrialStateName.RUNNING]  # type: ignore[union-attr]
        assert sorted(running) == sorted(run.outstanding), "sent, and not published so"
        for job_id in set(queue.get_job_ids()) - answered:
            answered.add(job_id)
            job = queue.fetch_job(job_id)
            assert job is not None
            request = TrialRequest.decode(WORKER.open(Record.REQUEST, job.args[0]))
            result = trial_result(
                request, Outcome.COMPLETE, worker="w", started=time.monotonic(), values=[0.5]
            )
            conn.xadd(keys.results, {RESULT_FIELD: WORKER.seal(Record.RESULT, result.encode())})
        dispatcher.poll(None)
    dispatcher.flush()

    entries = read_trial_summaries(conn, keys, CLIENT, run.name)
    assert [(e.number, e.state, e.values) for e in entries] == [  # type: ignore[union-attr]
        (n, TrialStateName.COMPLETE, [0.5]) for n in range(6)
    ]
    assert entries[0].params == run.study.trials[0].params  # type: ignore[union-attr]
    assert not publication.pending
    joined = [(before, added) for before, added in publication.joined if added]
    assert joined and all(before > 0 for before, _added in joined), (
        "a publication took a write of its own",
        publication.joined,
    )
    assert sum(added for _before, added in joined) <= 6, "more than one command a trial"


# -- the daemon: caught up, and dropped with the study ----------------------------------------


def _spec(name: str, **fields: Any) -> StudySpec:
    fields.setdefault("queue", "nobody")  # no worker: what is sent waits, and it keeps running
    return StudySpec(
        name=name,
        objective="tests.support.objectives:noop",
        space={"x": {"type": "float", "low": 0, "high": 1}},
        sampler="random",
        seed=0,
        **{"n_trials": 4, "concurrency": 1, **fields},
    )


@pytest.fixture
def journal(tmp_path: Path) -> str:
    return f"journal:///{tmp_path}/studies.journal"


@pytest.fixture
def daemons(conn: redis.Redis, prefix: str, journal: str) -> Iterator[list[Daemon]]:
    """Make daemons with `start(daemons)`; each is stopped at the end (or by the next)."""
    made: list[Daemon] = []
    yield made
    for daemon in made:
        _stop(daemon)


def _start(made: list[Daemon], conn: redis.Redis, prefix: str, journal: str) -> Daemon:
    if made:
        _stop(made[-1])
    daemon = Daemon(conn, BrokerSettings(prefix=prefix, storage=journal), BROKER)
    made.append(daemon)
    daemon.acquire()
    daemon.registry.reattach()
    daemon.catch_up.add(daemon.registry.ended_at_start)
    return daemon


def _stop(daemon: Daemon) -> None:
    daemon.dispatcher.stop_sampling()
    daemon.storages.close()
    if daemon.lock.fence.epoch is not None:
        daemon.release()


def _old_trials(journal: str, name: str, n: int) -> None:
    """`n` COMPLETE trials of study `name`, run before any broker published trials."""
    study = optuna.create_study(study_name=name, storage=open_storage(journal))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n)


def test_the_broker_publishes_the_trials_of_a_study_it_takes_over_that_are_not_published(
    conn: redis.Redis, prefix: str, journal: str, daemons: list[Daemon]
) -> None:
    keys = Keys(prefix)
    client = BrokerClient(conn, prefix, signer=CLIENT)
    _old_trials(journal, "old", 2)  # an older study, resubmitted: run on in its storage
    daemon = _start(daemons, conn, prefix, journal)
    client.submit(_spec("old", n_trials=3))
    for _ in range(5):
        daemon.step()
    published = client.trials("old")
    assert [(e.number, e.state) for e in published] == [  # type: ignore[union-attr]
        (0, TrialStateName.COMPLETE),
        (1, TrialStateName.COMPLETE),
        (2, TrialStateName.RUNNING),  # sent, waiting for a worker
    ]
    # What a restarted broker finds missing or forged is published again, as the storage has it.
    conn.hdel(keys.trials_of("old"), "0")
    conn.hset(keys.trials_of("old"), "1", _summary(number=1, values=[-1.0]).encode())
    assert isinstance(client.trials("old")[-1], RefusedTrial)
    _start(daemons, conn, prefix, journal)
    again = client.trials("old")
    assert [e.number for e in again] == [0, 1, 2] and again == published


def test_the_broker_catches_up_an_ended_study_whose_trials_it_never_published(
    conn: redis.Redis, prefix: str, journal: str, daemons: list[Daemon]
) -> None:
    keys = Keys(prefix)
    client = BrokerClient(conn, prefix, signer=CLIENT)
    _old_trials(journal, "ended", 3)
    spec = _spec("ended", n_trials=3)
    conn.hset(keys.studies, "ended", seal_stored_spec(BROKER, spec))
    finished = StudyStatus(
        name="ended",
        state=StudyState.FINISHED,
        objective=spec.objective,
        directions=["minimize"],
        n_trials=3,
        concurrency=1,
        priority=1.0,
        complete=3,
        storage=journal,
    )
    conn.hset(keys.status, "ended", finished.sealed(BROKER))
    daemon = _start(daemons, conn, prefix, journal)
    assert client.trials("ended") == []
    daemon.step()  # one ended study a turn
    assert [e.number for e in client.trials("ended")] == [0, 1, 2]
    assert [s.name for s in daemon.registry.ended_at_start] == ["ended"]
    assert not daemon.catch_up.waiting


def test_deleting_a_study_drops_its_published_trials_and_a_resubmission_publishes_them_again(
    conn: redis.Redis, prefix: str, journal: str, daemons: list[Daemon]
) -> None:
    keys = Keys(prefix)
    client = BrokerClient(conn, prefix, signer=CLIENT)
    daemon = _start(daemons, conn, prefix, journal)
    client.submit(_spec("s"))
    for _ in range(3):
        daemon.step()
    assert len(client.trials("s")) == 1  # the one sent
    client.send(Delete(study="s", force=True))
    for _ in range(3):
        daemon.step()
    assert client.status("s") is None and not conn.exists(keys.trials_of("s"))
    client.submit(_spec("s"))  # its storage kept its trial: published again
    for _ in range(3):
        daemon.step()
    states = [e.state for e in client.trials("s")]  # type: ignore[union-attr]
    assert states[0] is TrialStateName.FAIL  # cancelled by the delete --force


# -- every use of the key ----------------------------------------------------------------------

# The broker's (`trials_of`) and those a remote Optimizer publishes (`driven_trials_of`).
TRIALS_SITES = {
    ("broker/protocol/trial_summary.py", "read_trial_summaries"): "reads: TrialSummary.opened",
    # `into` writes through it (sealed, noted); `reconcile` reads through it (`_published`)
    ("broker/dispatch/publication.py", "TrialPublication._key"): "names it",
    ("broker/daemon/command_handlers.py", "Commands.on_delete"): "deletes",
    ("broker/daemon/catch_up.py", "CatchUp._catch_up"): "counts (HLEN): believes nothing",
    ("broker/client.py", "BrokerClient.delete_driven"): "deletes (an Optimizer's)",
}
VERIFIED_BY = {
    ("broker/protocol/trial_summary.py", "read_trial_summaries"): "TrialSummary.opened(",
    ("broker/dispatch/publication.py", "TrialPublication._published"): "self.signer.open(record,",
    ("broker/dispatch/publication.py", "TrialPublication.reconcile"): "self._published(",
    ("broker/dispatch/publication.py", "TrialPublication.into"): "self._key(",
    ("broker/protocol/trial_summary.py", "TrialSummary.opened"): "signer.open(_record(driven),",
    (
        "broker/protocol/trial_summary.py",
        "_record",
    ): "Record.DRIVEN_TRIAL if driven else Record.TRIAL",
}


def _uses_of_trials_of() -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for folder in ("broker", "workers"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = str(path.relative_to(ROOT))
            if relative == "broker/protocol/keys.py":  # where the name is made
                continue

            def visit(node: ast.AST, scope: list[str], relative: str = relative) -> None:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                        visit(child, [*scope, child.name])
                        continue
                    named = ("trials_of", "driven_trials_of")
                    if isinstance(child, ast.Attribute) and child.attr in named:
                        found.add((relative, ".".join(scope)))
                    if isinstance(child, ast.Constant) and str(child.value).endswith(":trials:"):
                        found.add((relative, "a literal " + str(child.value)))
                    visit(child, scope)

            visit(source_trees.parse(path.read_text()), [])
    return found


def _source_of(path: str, qualname: str) -> str:
    node: ast.AST = source_trees.parse((ROOT / path).read_text())
    for part in qualname.split("."):
        node = next(
            child
            for child in ast.iter_child_nodes(node)
            if isinstance(child, (ast.ClassDef, ast.FunctionDef)) and child.name == part
        )
    return ast.unparse(node)


def test_every_use_of_the_published_trials_is_listed_and_every_reader_verifies() -> None:
    assert _uses_of_trials_of() == set(TRIALS_SITES), "a new use of Keys.trials_of: list it"
    readers = {site for site, what in TRIALS_SITES.items() if what.startswith("reads")}
    assert readers <= set(VERIFIED_BY)
    for (path, qualname), call in VERIFIED_BY.items():
        assert call in _source_of(path, qualname), (path, qualname, call)


def test_a_reader_opens_only_a_storage_that_exists_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="in-memory storage is the broker's own"):
        open_storage_to_read("memory")
    for url in (f"journal:///{tmp_path}/a/x.journal", f"sqlite:///{tmp_path}/b.db"):
        with pytest.raises(ConfigError, match="no such file"):
            open_storage_to_read(url)
    assert list(tmp_path.iterdir()) == []
