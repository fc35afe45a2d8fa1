"""Pooled PostgreSQL connections are pinged before use only when they have been idle (app/db.py, issue 15): a busy
API sends no round trip per request for it, and a connection the server dropped while it sat idle is still never
handed to a request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

import app.db
from app.db import make_engine


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def pings(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    sent: list[object] = []
    ping = engine.dialect.do_ping

    def counting(dbapi_connection: Any) -> bool:
        sent.append(dbapi_connection)
        return ping(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", counting)
    return sent


def backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_connection_given_back_a_moment_ago_is_used_without_a_ping(engine: Engine, pings: list[object]) -> None:
    first = backend_pid(engine)  # a new connection: never pinged
    assert [backend_pid(engine) for _ in range(5)] == [first] * 5
    assert pings == []


def test_an_idle_connection_is_pinged_first(engine: Engine, pings: list[object],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    first = backend_pid(engine)
    monkeypatch.setattr(app.db, "PING_IDLE_SECONDS", 0.0)
    assert backend_pid(engine) == first
    assert len(pings) == 1


def test_a_connection_the_server_dropped_while_idle_is_replaced(engine: Engine, database_url: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    first = backend_pid(engine)
    with psycopg.connect(make_url(database_url).set(drivername="postgresql")
                         .render_as_string(hide_password=False), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (first,))
    monkeypatch.setattr(app.db, "PING_IDLE_SECONDS", 0.0)
    second = backend_pid(engine)  # the ping finds it gone: a new connection answers, no error reaches the caller
    assert second != first
