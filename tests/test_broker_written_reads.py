"""Every place that touches what front doors and workers act on that the broker wrote: a study's
status (`Keys.status`), a trial call's reply list (`Keys.reply_list`), an attempt's cancel mark
(`Keys.cancel`); and the status a remote Optimizer publishes of the study it runs
(`Keys.driven`). Listed here by the source itself, so a new reader cannot slip past the verifying
read: each one that reads a value hands it to the one place that judges it (a status to
`StudyStatus.opened`, a reply to `RemoteTrial._answer_to`, a mark to `CancelMarks.holds`), which
refuses, with signing on, what the broker (for a driven status, a front-door key) did not seal.
What each refusal does is tested with real processes in
tests/processes/faults/test_signed_state.py, and below for the pieces alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import redis

from optuna_rq.client import BrokerClient
from optuna_rq.protocol import Keys, Record, Signer, StudyState, StudyStatus
from optuna_rq.protocol.keyring import Role, generate_keyrings
from optuna_rq.protocol.status import RefusedStatus
from tests.support import source_trees

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("broker", "workers")

# (file, function) -> what it does with the name; "reads" ones say which verifying read they use.
STATUS_SITES = {
    ("broker/protocol/status.py", "read_status"): "reads: StudyStatus.opened",
    ("broker/protocol/status.py", "read_statuses"): "reads: StudyStatus.opened",
    ("broker/daemon/status_publisher.py", "StatusPublisher._write"): "writes: StudyStatus.sealed",
    ("broker/daemon/status_publisher.py", "StatusPublisher.annotate"): "writes: StudyStatus.sealed",
    ("broker/client.py", "BrokerClient.status"): "exists: published in between? then read",
    ("broker/client.py", "BrokerClient.has_status"): "exists: nothing of it is believed",
    ("broker/daemon/command_handlers.py", "Commands.on_delete"): "exists, deletes",
    (
        "broker/optimizer_run/run_status.py",
        "DrivenStatus.claim",
    ): "exists: is the name the broker's?",
}
DRIVEN_SITES = {
    ("broker/protocol/status.py", "read_driven_status"): "reads: StudyStatus.opened",
    ("broker/protocol/status.py", "read_driven_statuses"): "reads: StudyStatus.opened",
    ("broker/optimizer_run/run_status.py", "DrivenStatus._publish"): "writes: StudyStatus.sealed",
    ("broker/client.py", "BrokerClient.status"): "exists: then read",
    ("broker/client.py", "BrokerClient.delete_driven"): "deletes",
}
REPLY_SITES = {
    (
        "broker/dispatch/calls.py",
        "CallServer._reply_list",
    ): "names it for the sealed Record.REPLY sent",
    ("workers/remote_trial.py", "RemoteTrial.__init__"): "names it: _reply_key",
}
REPLY_KEY_SITES = {  # the list's name as the remote trial keeps it
    ("workers/remote_trial.py", "RemoteTrial._call"): "reads: BLPOP -> _answer_to",
}
CANCEL_SITES = {
    ("broker/dispatch/sending.py", "TrialSender.withdraw"): "writes: sealed Record.CANCEL",
    ("workers/running_attempt.py", "Attempt.cancel_mark"): "names it",
}
CANCEL_MARK_SITES = {
    ("workers/supervision.py", "Supervisor._renew"): "reads: GET -> CancelMarks.holds",
    ("workers/runner.py", "_take_lease"): "reads: GET -> CancelMarks.holds",
}
# Each reader's body calls its verifying read.
VERIFIED_BY = {
    ("broker/protocol/status.py", "read_status"): "StudyStatus.opened(",
    ("broker/protocol/status.py", "read_statuses"): "StudyStatus.opened(",
    ("broker/protocol/status.py", "read_driven_status"): "StudyStatus.opened(",
    ("broker/protocol/status.py", "read_driven_statuses"): "StudyStatus.opened(",
    ("workers/remote_trial.py", "RemoteTrial._call"): "self._answer_to(",
    ("workers/remote_trial.py", "RemoteTrial._answer_to"): "self._signer.open(Record.REPLY,",
    ("workers/supervision.py", "Supervisor._renew"): "self.cancel_marks.holds(",
    ("workers/runner.py", "_take_lease"): "CancelMarks(",
    ("workers/cancel_marks.py", "CancelMarks.holds"): "self.signer.open(Record.CANCEL,",
}


class _Sites(ast.NodeVisitor):
    """Where each of the watched names is used, as (file, enclosing function's dotted name)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.scope: list[str] = []
        self.found: dict[str, set[tuple[str, str]]] = {
            "status": set(),
            "driven": set(),
            "reply_list": set(),
            "_reply_key": set(),
            "cancel": set(),
            "cancel_mark": set(),
        }

    def _enter(self, node: ast.AST, name: str) -> None:
        self.scope.append(name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._enter(node, node.name)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._enter(node, node.name)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        where = (self.path, ".".join(self.scope))
        owner = ast.unparse(node.value)
        if node.attr in ("status", "driven") and (
            owner.endswith("keys") or owner.startswith("Keys(")
        ):
            self.found[node.attr].add(where)
        if node.attr in ("reply_list", "cancel") and owner == "Keys":
            self.found[node.attr].add(where)
        if node.attr in ("_reply_key", "cancel_mark") and not isinstance(node.ctx, ast.Store):
            self.found[node.attr].add(where)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        # A name spelt out by hand would escape the lists above.
        spelt = (":status", ":driven", ":cancel:", ":call:")
        if isinstance(node.value, str) and node.value.endswith(spelt):
            self.found["status"].add((self.path, "a literal " + node.value))


def _all_sites() -> dict[str, set[tuple[str, str]]]:
    found: dict[str, set[tuple[str, str]]] = {}
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = str(path.relative_to(ROOT))
            if relative == "broker/protocol/keys.py":  # where the names are made
                continue
            visitor = _Sites(relative)
            visitor.visit(source_trees.parse(path.read_text()))
            for kind, sites in visitor.found.items():
                found.setdefault(kind, set()).update(sites)
    return found


def _source_of(path: str, qualname: str) -> str:
    tree = source_trees.parse((ROOT / path).read_text())
    node: ast.AST = tree
    for part in qualname.split("."):
        node = next(
            child
            for child in ast.iter_child_nodes(node)
            if isinstance(child, (ast.ClassDef, ast.FunctionDef)) and child.name == part
        )
    return ast.unparse(node)


def test_every_use_of_a_status_reply_list_or_cancel_mark_is_listed() -> None:
    found = _all_sites()
    assert found["status"] == set(STATUS_SITES), "a new use of Keys.status: list it, verified"
    assert found["driven"] == set(DRIVEN_SITES), "a new use of Keys.driven: list it, verified"
    assert found["reply_list"] == set(REPLY_SITES)
    assert found["_reply_key"] == set(REPLY_KEY_SITES)
    assert found["cancel"] == set(CANCEL_SITES)
    assert found["cancel_mark"] == set(CANCEL_MARK_SITES)


def test_every_reader_calls_its_verifying_read() -> None:
    readers = [
        site
        for sites in (STATUS_SITES, REPLY_KEY_SITES, CANCEL_MARK_SITES)
        for site, what in sites.items()
        if what.startswith("reads")
    ]
    assert set(readers) <= set(VERIFIED_BY)
    for (path, qualname), call in VERIFIED_BY.items():
        assert call in _source_of(path, qualname), (path, qualname, call)


# -- the verifying reads, alone ----------------------------------------------------------------

SECRET = b"0123456789abcdef0123456789abcdef"


def _status(name: str, state: StudyState = StudyState.FINISHED) -> StudyStatus:
    return StudyStatus(
        name=name,
        state=state,
        objective="m:f",
        directions=["minimize"],
        n_trials=1,
        concurrency=1,
        priority=1.0,
        complete=1,
        best_value=0.5,
        storage="memory",
    )


def test_a_status_opens_only_as_the_brokers_for_its_own_study() -> None:
    rings = generate_keyrings()
    broker = Signer(keyring=rings[Role.BROKER])
    client = Signer(keyring=rings[Role.CLIENT])
    sealed = _status("a").sealed(broker)
    assert StudyStatus.opened(sealed, client, name="a") == _status("a")
    refusals = {
        "b": sealed,  # another study's
        "a ": _status("a").to_json().encode(),  # plain JSON
    }
    for name, raw in refusals.items():
        try:
            StudyStatus.opened(raw, client, name=name)
        except Exception as exc:
            assert "not signed by the broker" in str(exc)
        else:
            raise AssertionError(f"{name!r} opened")
    # With signing off, as it always was: plain JSON.
    plain = _status("a").sealed(Signer())
    assert StudyStatus.opened(plain, Signer(), name="a") == _status("a")


def test_status_lists_a_refused_status_as_refused(conn: redis.Redis, prefix: str) -> None:
    signer = Signer(SECRET)
    keys = Keys(prefix)
    conn.hset(keys.status, "real", _status("real").sealed(signer))
    conn.hset(keys.status, "ghost", _status("ghost").to_json())
    found = BrokerClient(conn, prefix, signer=signer).statuses()
    assert [type(s) for s in found] == [RefusedStatus, StudyStatus]
    assert found[0].name == "ghost" and "not signed by the broker" in found[0].why  # type: ignore[union-attr]


def test_a_front_door_writes_no_status_of_its_own(conn: redis.Redis, prefix: str) -> None:
    from optuna_rq.protocol import StudySpec

    spec = StudySpec(
        name="s",
        objective="tests.support.objectives:quadratic",
        space={},
        n_trials=1,
        concurrency=1,
    )
    BrokerClient(conn, prefix, signer=Signer(SECRET)).submit(spec)
    assert not conn.hexists(Keys(prefix).status, "s")  # it could not sign it as the broker
    unsigned = BrokerClient(conn, prefix, signer=Signer())
    unsigned.submit(spec.with_changes(name="t"))
    assert not conn.hexists(Keys(prefix).status, "t")  # unsigned too: the broker writes them all
    queued = unsigned.status("t")  # shown from its submission, waiting in the inbox
    assert queued is not None and queued.state is StudyState.QUEUED


def test_a_cancel_mark_holds_only_if_the_broker_sealed_it_for_the_attempt(
    conn: redis.Redis, prefix: str
) -> None:
    from optuna_rq.workers.cancel_marks import CancelMarks
    from optuna_rq.workers.running_attempt import Attempt

    rings = generate_keyrings()
    broker = Signer(keyring=rings[Role.BROKER])
    attempt = Attempt(
        job_id="rq-id",
        lease="l",
        holder="h",
        pid=1,
        started=0.0,
        timeout_s=None,
        study="s",
        incarnation="0123456789ab",
        trial_number=0,
        attempt=1,
        reply_to=f"{prefix}:results",
    )
    job_id = Keys.job_id(attempt.attempt_id)
    marks = CancelMarks(conn, Signer(keyring=rings[Role.WORKER]), Keys(prefix))
    assert marks.holds(attempt, broker.seal(Record.CANCEL, b"1", bound_to=job_id))
    assert not marks.holds(attempt, None)
    refused = [
        b"1",
        broker.seal(Record.CANCEL, b"1", bound_to=job_id + "0"),  # another attempt's
        broker.seal(Record.REPLY, b"1", bound_to=job_id),  # not a mark
    ]
    for raw in refused:
        assert not marks.holds(attempt, raw)
        assert not marks.holds(attempt, raw)  # read again at the next renewal: counted once
    assert int(conn.hget(Keys(prefix).refused, "cancel") or 0) == len(refused)
    # Without signing, any mark holds, as it always did.
    assert CancelMarks(conn, Signer(), Keys(prefix)).holds(attempt, b"1")
