"""PostgreSQL for the tests that need one: its URL where one answers, and a database of a
test's own."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest


def postgres_url() -> str | None:
    """The test PostgreSQL's URL (`OPTUNA_RQ_TEST_POSTGRES_URL`), or None, said loudly, where
    none answers."""
    url = os.environ.get("OPTUNA_RQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 2})
        try:
            with engine.connect():
                return url
        finally:
            engine.dispose()
    except Exception as exc:  # no server, no driver: say so loudly
        print(f"\nPostgreSQL not available at {url}: {exc}")
        return None


@pytest.fixture
def empty_database() -> Iterator[str]:
    """The URL of a PostgreSQL database of the test's own, with no tables yet."""
    url = postgres_url()
    if url is None:
        pytest.skip(
            "PostgreSQL is not answering at 127.0.0.1:5432 (or psycopg2 is missing): "
            "this PostgreSQL storage test did not run"
        )
    import sqlalchemy

    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    name = f"orq_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()
