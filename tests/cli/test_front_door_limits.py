"""Limits are front-door errors: every limit the broker's decoder enforces on a command (the byte
cap, entries per list or map, nesting depth) and every bound of a setting is checked by the
command line before anything is sent, failing with exit 2 naming the limit and the fix; files of
inputs are read bounded (size, YAML aliases); `enqueue` says how many sets were new.

The rule is one: `protocol.sendable` is what the broker's `decode_command` takes, tested on
messages at either side of each limit; the command line is tested through the installed CLI.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CONTAINER_LEN,
    MAX_DEPTH,
    Change,
    Command,
    Enqueue,
    Keys,
    Submit,
    decode_command,
    sendable,
)
from optuna_rq.protocol.spec import StudySpec
from optuna_rq.protocol.spec_bounds import MAX_CONCURRENCY, MAX_N_TRIALS, MAX_PRIORITY
from optuna_rq.space import space_files as spacefile

pytestmark = pytest.mark.timeout(180)

X = "x={type: float, low: -10, high: 10}"
# An objective the command line cannot import (tests/support/workers_only): its inputs are not
# checked here, so what a test gives it in its space is only the space's business.
SUBMIT = ("submit", "elsewhere:takes_x", "--param", X, "--n-trials", "5", "--concurrency", "1")
SUBMIT += ("--study-name", "s")


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def _submit(space: dict[str, Any]) -> Callable[[], Command]:
    return lambda: Submit(spec=StudySpec(name="s", objective="m:f", space=space, n_trials=1,
                                         concurrency=1))  # fmt: skip


def _enqueue(sets: list[dict[str, Any]]) -> Callable[[], Command]:
    return lambda: Enqueue(study="s", params=sets)


# Each limit, as a submission and as an enqueue: just within it, and just past it. (A submission
# is ~200 bytes besides its space; depth counts the command, its spec and its space.)
CAP = DEFAULT_MAX_MESSAGE_BYTES
AT_EACH_LIMIT: list[tuple[str, Callable[[], Command], bool]] = [
    ("submit, a list at the limit", _submit({"a": [0] * MAX_CONTAINER_LEN}), True),
    ("submit, a list past it", _submit({"a": [0] * (MAX_CONTAINER_LEN + 1)}), False),
    ("submit, a map past it", _submit({f"k{i}": 0 for i in range(MAX_CONTAINER_LEN + 1)}), False),
    ("submit, nested to the limit", _submit({"a": _nested(MAX_DEPTH - 4)}), True),
    ("submit, nested past it", _submit({"a": _nested(MAX_DEPTH - 3)}), False),
    ("submit, under the cap", _submit({"a": "x" * (CAP - 1000)}), True),
    ("submit, over the cap", _submit({"a": "x" * CAP}), False),
    ("enqueue, a list past the limit", _enqueue([{"x": 0}] * (MAX_CONTAINER_LEN + 1)), False),
    ("enqueue, a set nested past it", _enqueue([{"a": _nested(MAX_DEPTH - 3)}]), False),
    ("enqueue, over the cap", _enqueue([{"a": "x" * CAP}]), False),
    ("enqueue, within every limit", _enqueue([{"x": 0.5}] * 1000), True),
]


@pytest.mark.parametrize(
    ("case", "make", "fits"), AT_EACH_LIMIT, ids=[case for case, _, _ in AT_EACH_LIMIT]
)
def test_the_front_door_takes_exactly_what_the_brokers_decoder_takes(
    case: str, make: Callable[[], Command], fits: bool
) -> None:
    try:
        command = make()
    except ConfigError as exc:  # refused as it is made (a space's own check): not sendable
        assert not fits, exc
        return
    try:
        decode_command(command.encode())
        broker_takes = True
    except ProtocolError:
        broker_takes = False
    assert broker_takes is fits
    if fits:
        assert sendable(command) == command.encode()
    else:
        with pytest.raises(ConfigError, match="message|list or map|nests deeper") as refused:
            sendable(command)
        assert "make it smaller" in str(refused.value) or "space" in str(refused.value)


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"concurrency": MAX_CONCURRENCY + 1}, f"concurrency must be .* to {MAX_CONCURRENCY}"),
        ({"n_trials": MAX_N_TRIALS + 1}, "n_trials must be an integer"),
        ({"priority": MAX_PRIORITY * 2}, "priority must be a number > 0 and at most"),
    ],
)  # fmt: skip
def test_set_is_bound_as_submit_is_and_the_broker_refuses_past_the_bound(
    changes: dict[str, Any], said: str
) -> None:
    with pytest.raises(ConfigError, match=said):
        Change(study="s", **changes)
    # What a front door of another version could send: the broker refuses it as it decodes.
    raw = Change(study="s").encode()
    forged = decode_command(raw).to_wire() | changes
    from optuna_rq.protocol.codec import pack

    with pytest.raises(ProtocolError, match=said):
        decode_command(pack(forged))


# -- through the command line: exit 2, naming the limit and the fix, nothing sent ---------------


def _inbox(conn: redis.Redis, prefix: str) -> list[str]:
    """The ops of the commands waiting for a broker on `prefix`."""
    raws = conn.lrange(Keys(prefix).commands, 0, -1)
    return [decode_command(raw, max_bytes=4 * CAP).op for raw in raws]


def _space(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def test_a_submission_over_the_message_cap_is_refused_before_it_is_sent(
    run_cli, conn: redis.Redis, prefix: str, tmp_path: Path
) -> None:
    space = _space(tmp_path, f"x: {{type: float, low: 0, high: 1}}\nblob: {'a' * CAP}\n")
    result = run_cli(*SUBMIT, "--space", space)
    assert result.returncode == 2, result.stderr
    assert f"over the {CAP:,}-byte message cap" in result.stderr
    assert "keep large data out of the space" in result.stderr
    assert "--max-message-bytes" in result.stderr
    assert result.stdout == "" and _inbox(conn, prefix) == []
    assert run_cli("status", "s").returncode != 0  # not queued for good: unknown
    # The same submission with a cap that takes it (on every role alike) is sent.
    bigger = run_cli("--max-message-bytes", str(2 * CAP), *SUBMIT, "--space", space)
    assert bigger.returncode == 0, bigger.stderr
    assert _inbox(conn, prefix) == ["submit"]


@pytest.mark.parametrize(
    ("space", "said"),
    [
        ("x: {type: float, low: 0, high: 1}\nids: [" + "0, " * MAX_CONTAINER_LEN + "0]\n",
         f"input 'ids' is a list of {MAX_CONTAINER_LEN + 1:,} entries, over the "
         f"{MAX_CONTAINER_LEN:,}"),
        ("x: {type: float, low: 0, high: 1}\nd: " + "{a: " * 40 + "1" + "}" * 40 + "\n",
         f"nests deeper than {MAX_DEPTH} levels"),
    ],
    ids=["a list too long", "nested too deep"],
)  # fmt: skip
def test_a_space_past_a_limit_of_a_message_is_refused_naming_it(
    run_cli, conn: redis.Redis, prefix: str, tmp_path: Path, space: str, said: str
) -> None:
    result = run_cli(*SUBMIT, "--space", _space(tmp_path, space))
    assert result.returncode == 2, result.stderr
    assert said in result.stderr and "keep large data out of the space" in result.stderr
    assert _inbox(conn, prefix) == []


def test_set_past_a_bound_is_refused_before_it_is_sent(
    run_cli, conn: redis.Redis, prefix: str
) -> None:
    assert run_cli(*SUBMIT).returncode == 0  # queued: no broker runs
    for option, value in [("--concurrency", MAX_CONCURRENCY + 1), ("--priority", 1e9)]:
        result = run_cli("set", "s", option, str(value))
        assert result.returncode == 2, result.stderr
        assert f"{option} must be" in result.stderr, result.stderr
    assert _inbox(conn, prefix) == ["submit"]


@pytest.mark.parametrize(
    ("sets", "said"),
    [
        ("- {x: 1, ids: [" + "0, " * MAX_CONTAINER_LEN + "0]}\n",
         f"set 0: input 'ids' is a list of {MAX_CONTAINER_LEN + 1:,} entries"),
        (f"- {{x: 1}}\n- {{x: 2, blob: {'a' * CAP}}}\n",
         "parameter set 1 is 1,048,5"),  # and a few bytes: "... bytes encoded"
    ],
    ids=["a list too long", "a set over the cap"],
)  # fmt: skip
def test_enqueue_past_a_limit_is_refused_before_it_is_sent(
    run_cli, conn: redis.Redis, prefix: str, tmp_path: Path, sets: str, said: str
) -> None:
    assert run_cli(*SUBMIT).returncode == 0
    path = tmp_path / "sets.yaml"
    path.write_text(sets)
    result = run_cli("enqueue", "s", str(path))
    assert result.returncode == 2, result.stderr
    assert said in result.stderr, result.stderr
    assert _inbox(conn, prefix) == ["submit"]


# -- files of inputs, read bounded ---------------------------------------------------------------

ALIAS_BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
x: {type: float, low: 0, high: 1}
"""


@pytest.mark.parametrize("role", ["--space", "--enqueue", "enqueue"])
@pytest.mark.parametrize(
    ("text", "said"),
    [
        (ALIAS_BOMB, f"aliases expand to more than {spacefile.MAX_FILE_VALUES:,} values"),
        ("a: &a [1, *a]\n", "an alias refers to a mapping or list that contains it"),
    ],
    ids=["an alias bomb", "an alias loop"],
)
def test_a_yaml_alias_bomb_is_refused_at_once_naming_the_file(
    run_cli, conn: redis.Redis, prefix: str, tmp_path: Path, role: str, text: str, said: str
) -> None:
    path = tmp_path / "inputs.yaml"
    path.write_text(text if role == "--space" else f"- {text.replace(chr(10), chr(10) + '  ')}")
    if role == "enqueue":
        assert run_cli(*SUBMIT).returncode == 0
        result = run_cli("enqueue", "s", str(path))
    else:
        result = run_cli(*SUBMIT, role, str(path))
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr and said in result.stderr, result.stderr
    assert _inbox(conn, prefix) == ([] if role != "enqueue" else ["submit"])


def test_a_file_of_inputs_is_read_up_to_its_cap(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(spacefile, "MAX_FILE_BYTES", 1000)
    path = tmp_path / "space.yaml"
    path.write_text("x: {type: float, low: 0, high: 1}\n" + "#" * 1000 + "\n")
    with pytest.raises(ConfigError, match=f"space file {str(path)!r} is over"):
        spacefile.load_space_file(path)
    path.write_text("x: {type: float, low: 0, high: 1}\n")
    assert set(spacefile.load_space_file(path)) == {"x"}


def test_a_param_value_is_read_bounded_too() -> None:
    with pytest.raises(ConfigError, match="--param 'x=&a \\[1, \\*a\\]': the value: an alias"):
        spacefile.parse_param("x=&a [1, *a]")
    assert spacefile.parse_param("x=&a [1, 2]") == (["x"], [1, 2])


# -- enqueue says how many sets were new ---------------------------------------------------------


def test_enqueue_says_how_many_sets_were_new_and_how_many_already_there(
    run_cli, broker_process, tmp_path: Path
) -> None:
    # No worker serves its queue: the study runs, its sets wait as WAITING trials.
    submitted = run_cli(*SUBMIT, "--queue", "nobody")
    assert submitted.returncode == 0, submitted.stderr
    first, again = tmp_path / "first.yaml", tmp_path / "again.yaml"
    first.write_text("- {x: 1.5}\n- {x: 2.5}\n")
    again.write_text("- {x: 1.5}\n- {x: 2.5}\n- {x: 3.5}\n- {x: 2.5000001}\n")
    stored = run_cli("enqueue", "s", str(first))
    assert stored.returncode == 0, stored.stderr
    assert stored.stdout.strip() == "study 's': 2 parameter sets: 2 new, 0 already enqueued or run"
    repeated = run_cli("enqueue", "s", str(again))
    assert repeated.returncode == 0, repeated.stderr
    assert repeated.stdout.strip() == (
        "study 's': 4 parameter sets: 1 new, 3 already enqueued or run"
    )
    status = json.loads(run_cli("status", "s", "--json").stdout)
    assert status["state"] == "running"


def test_enqueue_without_a_broker_says_what_it_sent_and_no_more(run_cli, tmp_path: Path) -> None:
    assert run_cli(*SUBMIT).returncode == 0
    sets = tmp_path / "sets.yaml"
    sets.write_text("- {x: 1.5}\n")
    result = run_cli("enqueue", "s", str(sets))
    assert result.returncode == 0, result.stderr
    assert "1 parameter sets sent; a broker stores them when one runs" in result.stdout
    assert "new" not in result.stdout
