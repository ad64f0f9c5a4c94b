"""A journal writer frozen holding the file's lock, whose lock another broker takes, appends
nothing a reader sees once woken (`optuna_rq.storage.journal_file`: the file is revoked).

The frozen writer is a real process, paused inside its flush at each point where it could be
frozen with the lock held: before its append (past every check it makes: the broker's fence is
checked before a flush begins), and halfway through it (a torn line in the file). Another
`BatchedJournal` takes the lock as a broker that took over from it does (`superseded`), and writes;
the frozen one is woken and completes its flush. Optuna's own reader then reads every line the
frozen writer flushed before it froze, the new writer's lines, and nothing it wrote afterwards.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from optuna_rq.errors import JournalConflictError
from optuna_rq.storage.journal_file import BatchedJournal

pytestmark = pytest.mark.timeout(60)

FROZEN_WRITER = """
import os, sys
import optuna
from optuna.storages import JournalStorage
from optuna_rq.storage import journal_file

path, pause = sys.argv[1], sys.argv[2]
journal = journal_file.BatchedJournal(path)
study = optuna.create_study(study_name="frozen", storage=JournalStorage(journal))
study.tell(study.ask(), 1.0)
journal.flush()  # durable before the freeze: kept
study.tell(study.ask(), 2.0)  # buffered: the journal's lock is held from here to the flush
write_all = journal_file._write_all


def paused(fd, data, size):
    # Frozen here until the test writes a line: as a SIGSTOP between the fence and the append.
    if pause == "mid_write":
        os.write(fd, data[: len(data) // 2])
        data = data[len(data) // 2 :]
    print("frozen", flush=True)
    sys.stdin.readline()
    while data:
        data = data[os.write(fd, data) :]


journal_file._write_all = paused
journal.flush()
print("flushed", flush=True)
"""


def writers(path: Path) -> list[str]:
    """Each whole line's writer (the JournalStorage that appended it), in file order."""
    lines = path.read_bytes().split(b"\n")[:-1]
    return [json.loads(line)["worker_id"][:36] for line in lines]


@pytest.mark.parametrize("pause", ["before_write", "mid_write"])
@pytest.mark.parametrize("round_", range(3))
def test_a_frozen_holders_late_append_reaches_no_reader(
    tmp_path: Path, pause: str, round_: int
) -> None:
    path = tmp_path / "studies.journal"
    frozen = subprocess.Popen(
        [sys.executable, "-c", FROZEN_WRITER, str(path), pause],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert frozen.stdout is not None and frozen.stdin is not None
    try:
        assert frozen.stdout.readline() == "frozen\n"
        before = writers(path)  # what it flushed before the freeze (a torn half is no line)
        theirs = set(before)
        # A broker that took over from it: the lock is taken at once, and the file revoked.
        journal = BatchedJournal(path, superseded={f"{socket.gethostname()}:{frozen.pid}"})
        ours = optuna.create_study(study_name="ours", storage=JournalStorage(journal))
        ours.tell(ours.ask(), 3.0)
        journal.flush()
        frozen.stdin.write("wake\n")
        frozen.stdin.flush()
        assert frozen.stdout.readline() == "flushed\n"  # its append "succeeded", elsewhere
        assert frozen.wait(timeout=30) == 0
        ours.tell(ours.ask(), 4.0)
        journal.flush()
    finally:
        frozen.kill()
        frozen.wait()
    after = writers(path)
    assert after[: len(before)] == before, "a line flushed before the freeze was lost"
    assert not set(after[len(before) :]) & theirs, "the frozen writer's append reached the file"
    # Optuna's own reader: the frozen study as it was flushed before the freeze, ours whole.
    reader = JournalStorage(JournalFileBackend(str(path)))
    frozen_study = optuna.load_study(study_name="frozen", storage=reader)
    assert [t.value for t in frozen_study.trials if t.value is not None] == [1.0]
    assert [t.value for t in optuna.load_study(study_name="ours", storage=reader).trials] == [
        3.0,
        4.0,
    ]
    journal.close()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["studies.journal"], left  # no lock, holder or copy left behind


def test_a_reader_holding_the_old_file_follows_the_journal_to_its_new_file(
    tmp_path: Path,
) -> None:
    """A journal that only reads (another broker's, a second prefix's) keeps its descriptor
    open: after a revocation it reads the file now at the path, not the one it opened."""
    path = tmp_path / "studies.journal"
    writer = BatchedJournal(path)
    optuna.create_study(study_name="s", storage=JournalStorage(writer))
    writer.flush()
    writer.close()
    reader = BatchedJournal(path)
    seen = JournalStorage(reader)
    assert [s.study_name for s in seen.get_all_studies()] == ["s"]
    # Revoked under it: taken from a holder silent past the grace period, as Optuna's writers do.
    frozen = subprocess.Popen(
        [sys.executable, "-c", FROZEN_WRITER, str(path), "before_write"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert frozen.stdout is not None
    try:
        assert frozen.stdout.readline() == "frozen\n"
        taker = BatchedJournal(path, superseded={f"{socket.gethostname()}:{frozen.pid}"})
        optuna.create_study(study_name="after", storage=JournalStorage(taker))
        taker.flush()
        taker.close()
    finally:
        frozen.kill()
        frozen.wait()
    names = sorted(s.study_name for s in JournalStorage(reader).get_all_studies())
    assert names == ["after", "frozen", "s"]
    reader.close()


def test_a_reader_that_read_past_what_the_new_file_holds_fails_loudly(tmp_path: Path) -> None:
    """A line read from the old file after it was copied (its holder woke in between) is not in
    the new one: the reader that read it stops with JournalConflictError rather than read the
    new file from the wrong place."""
    path = tmp_path / "studies.journal"
    reader = BatchedJournal(path)
    optuna.create_study(study_name="s", storage=JournalStorage(reader))
    reader.flush()
    copy = tmp_path / "copy.journal"
    copy.write_bytes(path.read_bytes())  # the revoking broker's copy
    with open(path, "ab") as old:  # the old holder's late line, read by the reader...
        old.write(path.read_bytes().splitlines(keepends=True)[-1])
    assert len(JournalStorage(reader).get_all_studies()) == 1
    copy.replace(path)  # ...and then the copy takes the file's place, without it,
    taker = BatchedJournal(path)  # and the broker that revoked it writes on
    optuna.create_study(study_name="after", storage=JournalStorage(taker))
    optuna.create_study(study_name="later", storage=JournalStorage(taker))
    taker.flush()
    taker.close()
    with pytest.raises(JournalConflictError, match="does not hold what this broker read"):
        JournalStorage(reader).get_all_studies()
    reader.close()
