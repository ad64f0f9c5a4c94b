"""A full disk under a study's journal: the study fails with the figures its journal holds (not
0, not what the broker told it and could not write), and the other studies go on in the same
broker. The disk is a real one: a small tmpfs mounted for the test (root only)."""

from __future__ import annotations

import collections
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from tests.support.cluster import Cluster
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(180)

DISK_BYTES = 128 * 1024
"""About 200 trials' journal: full within seconds of fast trials."""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(
            f"NOT RUN: a full disk needs a small filesystem, and mounting a tmpfs is not "
            f"permitted here (run as root): {done.stderr.strip()}"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def _complete_in(journal: Path, name: str) -> int:
    """COMPLETE trials in `journal` as it stands on the disk."""
    storage = JournalStorage(JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    return collections.Counter(t.state for t in trials)[TrialState.COMPLETE]


def test_a_full_disk_fails_its_study_alone_with_its_figures_right(
    cluster: Cluster, small_disk: Path, tmp_path: Path
) -> None:
    # Given two studies running side by side, one journaled on a small disk
    cluster.start_workers(4)
    log = tmp_path / "broker.log"
    journal = small_disk / "doomed.journal"
    broker = cluster.start_broker(log=log, args=("--allow-storage", str(journal)))
    good = cluster.submit("steady", n_trials=80, concurrency=2, hold_s=0.3)
    doomed = cluster.submit(
        "steady",
        n_trials=100_000,
        concurrency=2,
        hold_s=0.01,
        extra=("--storage", f"journal://{journal}"),
    )

    # When that disk fills
    wait_until(
        lambda: cluster.status(doomed).get("state") == "failed",
        timeout_s=120,
        message=f"study {doomed} did not fail: {cluster.status(doomed)}",
    )

    assert cluster.status(good)["state"] == "running", "the disk filled too late to tell"

    # Then it fails for the full disk, with the figures its journal holds
    status = cluster.status(doomed)
    assert os.strerror(errno.ENOSPC) in str(status["error"]), status
    held = _complete_in(journal, doomed)
    assert held > 0, "the disk filled before any trial was told"
    assert status["complete"] == held, (status, held)
    # and the same broker finishes the other study exactly
    cluster.check(good, complete=80, cap=4, failed=0)
    assert broker.poll() is None
    assert str(broker.pid) in cluster.conn.get(f"{cluster.prefix}:broker").decode()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
