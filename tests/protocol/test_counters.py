"""Refused and dropped messages are counted through one helper (`optuna_rq.protocol.counters`),
under the prefix's own `Keys`: no module writes `<prefix>:refused` or `<prefix>:dropped` by
itself, and every site that counts is listed here, so that a new one is seen (and a counter
under a key of a site's own making, `<prefix>:<class>:<module>:refused`, cannot come back).

The walk reads the source; the worker's refusal of a request that does not open is then counted
for real, in-process, under its trial queue's prefix."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import redis

from optuna_rq.protocol import Keys
from optuna_rq.workers.runner import refuse_trial
from tests.support import source_trees

ROOT = Path(__file__).resolve().parents[2]
HELPERS = {"count_refused", "count_dropped", "count_refusal"}
"""The protocol's two counters, and the broker's refusal log that counts through them."""

SITES = {
    # the broker's refusal log and dropped count: through the protocol's counters
    ("broker/dispatch/observer.py", "count_refusal", "count_refused", "*"),
    ("broker/dispatch/observer.py", "count_dropped", "count_dropped", "*"),
    # the broker
    ("broker/daemon/backlog.py", "Backlog._load", "count_refusal", "backlog"),
    ("broker/daemon/inbox.py", "CommandInbox.apply", "count_refusal", "command"),
    ("broker/daemon/inbox.py", "CommandInbox.apply", "count_refusal", "*"),
    ("broker/daemon/registry.py", "Registry._refuse_stored", "count_refusal", "spec"),
    ("broker/daemon/registry.py", "Registry.refuse_storage", "count_refusal", "storage"),
    ("broker/daemon/registry.py", "Registry._published", "count_refusal", "status"),
    ("broker/daemon/status_publisher.py", "StatusPublisher.annotate", "count_refusal", "status"),
    ("broker/dispatch/results.py", "ResultStream._refuse", "count_refusal", "*"),
    ("broker/dispatch/results.py", "ResultStream.drop", "count_dropped", "result"),
    ("broker/dispatch/calls.py", "CallServer._refuse_unanswered", "count_refusal", "*"),
    # the workers
    ("workers/runner.py", "run_trial", "count_refused", "request"),
    ("workers/runner.py", "refuse_trial", "count_refused", "request"),
    ("workers/remote_trial.py", "RemoteTrial._drop", "count_refused", "reply"),
    ("workers/remote_trial.py", "RemoteTrial._drop", "count_dropped", "reply"),
    ("workers/cancel_marks.py", "CancelMarks.holds", "count_refused", "cancel"),
}
"""(file, function, helper, kind: the literal, or * when a variable names it) of every count."""


class _Sites(ast.NodeVisitor):
    def __init__(self, path: str) -> None:
        self.path = path
        self.scope: list[str] = []
        self.found: set[tuple[str, str, str, str]] = set()
        self.hincrby: list[str] = []

    def _enter(self, node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _enter  # noqa: N815

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        where = ".".join(self.scope)
        if name == "hincrby":
            self.hincrby.append(f"{self.path}:{where}")
        if name in HELPERS:
            kind = node.args[2] if len(node.args) > 2 else None  # (connection, prefix, kind...)
            literal = kind.value if isinstance(kind, ast.Constant) else "*"
            self.found.add((self.path, where, name, str(literal)))
        self.generic_visit(node)


def _walk() -> _Sites:
    every = _Sites("")
    for folder in ("broker", "workers"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = str(path.relative_to(ROOT))
            sites = _Sites(relative)
            sites.visit(source_trees.parse(path.read_text(), relative))
            every.found |= sites.found
            every.hincrby += sites.hincrby
    return every


def test_every_count_of_a_refused_or_dropped_message_goes_through_the_protocols_counters() -> None:
    walked = _walk()
    assert walked.hincrby == [
        "broker/protocol/counters.py:count_refused",
        "broker/protocol/counters.py:count_dropped",
    ]
    assert walked.found == SITES


def test_a_request_a_worker_refuses_is_counted_under_its_prefix(
    conn: redis.Redis, prefix: str
) -> None:
    job = SimpleNamespace(connection=conn, origin=f"{prefix}:gpu:tests.objectives", args=(b"?",))
    refuse_trial(job, "its timeout is beyond what RQ takes")
    assert conn.hgetall(Keys(prefix).refused) == {b"request": b"1"}
    assert conn.keys(f"{prefix}:gpu*") == []
