"""The broker's fence inside an SQL study storage: a transaction of a broker that lost its lock
never commits a write.

The broker checks its Redis fence (`daemon.fence`) before each write to a study storage, but a
broker frozen between that check and its commit (a paused VM, a long GC, SIGSTOP) would commit
after another broker took the prefix over: a trial asked twice, a result recorded by a broker
that no longer serves the study. No check the frozen broker makes can close that gap, so the
database keeps the fence too. Table `optuna_rq_fence` holds, per prefix and Redis (its epoch,
so that deployments on other Redis servers with the same prefix are never touched), the
generation of the broker that may write: the Redis lock's acquisition count, which only grows
(`daemon.fence`).

- A broker claims the row when it opens the storage: it raises the row to its generation. A
  broker with a lower generation cannot take it back: it was taken over.
- Every transaction of the broker that wrote reads the row just before it commits, under a
  share lock held until the commit, and rolls back with `FenceLostError` if the row holds
  another generation.
- A claim therefore waits for any transaction that read the row and has not committed. On
  PostgreSQL it ends the sessions of the brokers it takes over from (each names its epoch,
  generation and prefix in `application_name`) instead of waiting for a frozen process;
  elsewhere it waits until that broker wakes, when its check fails and its transaction rolls
  back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from optuna_rq.errors import FenceLostError
from optuna_rq.storage.storage_access import created_despite_races

__all__ = ["TABLE", "SqlFence"]

log = logging.getLogger("optuna_rq.broker")

TABLE = "optuna_rq_fence"
_WROTE = "optuna_rq_wrote"  # in a connection's `info`: this transaction wrote
_WRITES = ("INSERT", "UPDATE", "DELETE")
_APPLICATION = "optuna-rq:"
_NAME_LENGTH = 63  # PostgreSQL's limit on application_name (NAMEDATALEN - 1)
CLAIM_LOCK_WAIT_S = 2
"""How long a claim waits for the row on PostgreSQL before it ends the stale brokers' sessions
that hold it, and tries again."""
CLAIM_ATTEMPTS = 10

_metadata = sqlalchemy.MetaData()
_table = sqlalchemy.Table(
    TABLE,
    _metadata,
    sqlalchemy.Column("prefix", sqlalchemy.String(255), primary_key=True),
    sqlalchemy.Column("epoch", sqlalchemy.String(64), primary_key=True),
    sqlalchemy.Column("generation", sqlalchemy.BigInteger, nullable=False),
)


@dataclass(frozen=True)
class SqlFence:
    """The fence of the broker of `prefix` on the Redis whose epoch is `epoch`, that took its
    lock as acquisition `generation`."""

    prefix: str
    epoch: str
    generation: int

    @property
    def application_name(self) -> str:
        """How this broker's sessions name themselves on PostgreSQL (see the module)."""
        return f"{_APPLICATION}{self.epoch}:{self.generation}:{self.prefix}"[:_NAME_LENGTH]

    def engine_kwargs(self, url: str) -> dict[str, Any]:
        """What Optuna's engine is made with for `url`: on PostgreSQL, the sessions' name."""
        if sqlalchemy.engine.make_url(url).get_backend_name() != "postgresql":
            return {}
        return {"connect_args": {"application_name": self.application_name}}

    def install(self, engine: Engine, sessions: Any) -> None:
        """Claim the row on `engine`'s database, then check it before every commit of a
        transaction that wrote, in `sessions` (Optuna's `scoped_session`). Raises
        FenceLostError if a broker of a later generation holds it."""
        created_despite_races(lambda: _metadata.create_all(engine), TABLE)
        self._claim(engine)
        event.listen(engine, "before_cursor_execute", _note_writes)
        event.listen(engine, "commit", _forget_writes)
        event.listen(engine, "rollback", _forget_writes)
        event.listen(sessions, "before_commit", self._check)

    def _check(self, session: Session) -> None:
        session.flush()  # what is pending is written now, so that it counts as written
        connection = session.connection()
        if not connection.info.get(_WROTE):
            return
        held = self._read(connection, lock=True)
        if held != self.generation:
            raise FenceLostError(
                f"lost the broker lock: the study storage's fence ({TABLE}) holds generation "
                f"{held}, not this broker's {self.generation}. This broker was frozen or cut "
                "off longer than the lock's TTL and stops without writing anything more; the "
                "broker holding the lock serves its studies"
            )

    def _claim(self, engine: Engine) -> None:
        postgresql = engine.dialect.name == "postgresql"
        for attempt in range(1, CLAIM_ATTEMPTS + 1):
            try:
                with engine.begin() as connection:
                    if postgresql:
                        connection.exec_driver_sql(
                            f"SET LOCAL lock_timeout = '{CLAIM_LOCK_WAIT_S}s'"
                        )
                    self._raise_row(connection)
                return
            except sqlalchemy.exc.IntegrityError:  # another broker inserted the row first
                continue
            except sqlalchemy.exc.OperationalError as exc:
                if not postgresql or attempt == CLAIM_ATTEMPTS:
                    raise
                log.warning(
                    "%s: a broker this one took over holds a transaction open (frozen?): "
                    "ending its sessions (%s)",
                    TABLE,
                    exc.orig,
                )
                self._end_stale_sessions(engine)  # the claim's next wait sees them go
        raise FenceLostError(f"{TABLE}: could not claim the row of prefix {self.prefix!r}")

    def _row(self) -> Any:
        return sqlalchemy.and_(_table.c.prefix == self.prefix, _table.c.epoch == self.epoch)

    def _read(self, connection: Connection, *, lock: bool) -> int | None:
        query = sqlalchemy.select(_table.c.generation).where(self._row())
        if lock and connection.dialect.name != "sqlite":  # SQLite's writer holds the database
            query = query.with_for_update(read=True)
        held = connection.execute(query).scalar()
        return None if held is None else int(held)

    def _raise_row(self, connection: Connection) -> None:
        raised = connection.execute(
            _table.update()
            .where(self._row(), _table.c.generation < self.generation)
            .values(generation=self.generation)
        )
        if raised.rowcount:
            return
        held = self._read(connection, lock=False)
        if held is None:
            row = {"prefix": self.prefix, "epoch": self.epoch, "generation": self.generation}
            connection.execute(_table.insert().values(**row))
        elif held > self.generation:
            raise FenceLostError(
                f"lost the broker lock: the study storage's fence ({TABLE}) holds generation "
                f"{held}, later than this broker's {self.generation}: another broker took the "
                "prefix over; this one stops without writing anything more"
            )

    def _end_stale_sessions(self, engine: Engine) -> None:
        """End the PostgreSQL sessions of this prefix's brokers of earlier generations, on the
        same Redis."""
        with engine.begin() as connection:
            rows = connection.exec_driver_sql(
                "SELECT pid, application_name FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                f"AND application_name LIKE '{_APPLICATION}%%'"
            ).all()
            for pid, name in rows:
                epoch, _, rest = name.removeprefix(_APPLICATION).partition(":")
                generation, _, prefix = rest.partition(":")
                cut = len(name) >= _NAME_LENGTH  # a long prefix is cut short in the name
                ours = self.prefix.startswith(prefix) if cut else prefix == self.prefix
                ours = ours and epoch == self.epoch
                if ours and generation.isdigit() and int(generation) < self.generation:
                    connection.execute(
                        sqlalchemy.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}
                    )


def _note_writes(
    connection: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> None:
    if statement.lstrip()[:6].upper() in _WRITES:
        connection.info[_WROTE] = True


def _forget_writes(connection: Connection) -> None:
    connection.info.pop(_WROTE, None)
