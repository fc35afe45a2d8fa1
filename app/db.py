"""The database: engine, declarative base, and sessions that never begin a transaction by themselves
(`autobegin=False`): each entry point opens its own. See docs/architecture.md ("Transactions")."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import MetaData, create_engine, event, insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.orm import DeclarativeBase, Session, make_transient_to_detached, sessionmaker

from app.outbox import Outbox

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def make_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while the worker writes; foreign keys are off by default in SQLite.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    if url.startswith("postgresql"):
        # A database that is unreachable (not merely refusing) must not hang a request for the OS's TCP timeout.
        kwargs.setdefault("connect_args", {"connect_timeout": 5})
    engine = create_engine(url, pool_size=5, max_overflow=10, **kwargs)
    _ping_when_idle(engine)
    return engine


# A pooled connection that has been idle this long is pinged before it is used again (what `pool_pre_ping` does
# for every checkout: one round trip per request under load, issue 15). One given back a moment ago was working a
# moment ago; a database restart, a connection killed while idle or a network cut take longer than this.
PING_IDLE_SECONDS = 1.0


def _ping_when_idle(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _idle_since(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        # No mark: the connection was just opened (its record's `info` goes with the DBAPI connection).
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < PING_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            # As pool_pre_ping: every older pooled connection is dropped and the checkout retried on a new one.
            raise InvalidatePoolError() from exc


class Database:
    """One engine, session factory and outbox per process."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False, autobegin=False)
        # What committed transactions send to the queue; app/queue.py installs its publisher.
        self.outbox = Outbox(self.sessions)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session for a command that commits in several steps, each opened with `with session.begin():`."""
        with self.sessions() as session:
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed when the block ends, rolled back if it raises."""
        with self.sessions() as session, session.begin():
            yield session

    def dispose_after_fork(self) -> None:
        # A forked worker must not reuse the parent's connections.
        self.engine.dispose(close=False)


def insert_for(session: Session) -> Any:
    """The dialect's INSERT (PostgreSQL's or SQLite's), for `on_conflict_do_nothing`."""
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert



@functools.cache
def _plain_insert(model: type[Base]) -> tuple[Any, dict[str, str]]:
    """The INSERT of `model`'s table (built once: its cache key with it) and each column attribute's column name."""
    mapper = model.__mapper__
    return insert(model), {attribute.key: attribute.columns[0].key for attribute in mapper.column_attrs}


def insert_as_loaded(session: Session, instances: Sequence[Base]) -> None:
    """Write new objects (of one model) as rows, with one INSERT on the session's transaction, not through the unit
    of work (whose flush of each object costs far more than the statement), and make them objects of the session as
    if just loaded: read, and settled afterwards (an UPDATE's values set with `set_committed_value`), with no reload
    and no flush. No column defaults are applied: every value the row needs is set on the object, the primary key too;
    a column attribute not set is None, so nothing of the objects is left to load."""
    if not instances:
        return
    statement, columns = _plain_insert(type(instances[0]))
    rows = []
    for instance in instances:
        for key in columns:
            if key not in instance.__dict__:
                setattr(instance, key, None)
        rows.append({column: getattr(instance, key) for key, column in columns.items()})
    session.connection().execute(statement, rows)
    for instance in instances:
        make_transient_to_detached(instance)
        session.add(instance)
