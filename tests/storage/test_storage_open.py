"""Opening a study storage (`optuna_rq.storage.storage_access.open_storage`) where another
process opens it at the same moment: an active and a standby broker start together on an empty
PostgreSQL database, and Optuna creates its tables (and enum types) on open in both."""

from __future__ import annotations

import threading

import pytest

from optuna_rq.errors import ConfigError
from optuna_rq.storage.storage_access import open_storage

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("round_", range(3))
def test_brokers_opening_an_empty_database_at_once_all_open_it(
    empty_database: str, round_: int
) -> None:
    opened: list[object] = []
    failed: list[BaseException] = []
    start = threading.Barrier(4)

    def broker() -> None:
        start.wait()
        try:
            opened.append(open_storage(empty_database))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=broker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failed, failed
    assert len(opened) == 4


def test_a_rejected_sql_url_is_named_without_its_password() -> None:
    with pytest.raises(ConfigError) as refused:
        open_storage("postgresql://user:hunter2@127.0.0.1:1/studies?connect_timeout=2")
    assert "was rejected by Optuna" in str(refused.value)
    assert "hunter2" not in str(refused.value), refused.value
