"""The outbox (app/outbox.py) on a real database (a SQLite file): messages leave once their transaction commits,
never for a rollback, and a publisher that fails is logged without undoing the commit."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from app.db import Database
from app.outbox import DELIVER_WEBHOOK, MODERATE_SUBMISSION, Message, send_after_commit


@pytest.fixture
def database(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'outbox.db'}")
    with database.transaction() as session:
        session.execute(text("CREATE TABLE rows (id TEXT PRIMARY KEY)"))
    return database


@pytest.fixture
def published(database: Database) -> list[list[Message]]:
    batches: list[list[Message]] = []
    database.outbox.publisher = lambda messages: batches.append(list(messages))
    return batches


def test_messages_leave_once_the_transaction_commits(database: Database, published: list[list[Message]]) -> None:
    first = Message(MODERATE_SUBMISSION, ("sub_1",))
    later = Message(MODERATE_SUBMISSION, ("sub_2",), countdown=30.0)
    with database.transaction() as session:
        session.execute(text("INSERT INTO rows VALUES ('sub_1')"))
        send_after_commit(session, first)
        send_after_commit(session, later, Message(DELIVER_WEBHOOK, ("msg_1",)))
        assert published == []  # nothing before the commit
    assert published == [[first, later, Message(DELIVER_WEBHOOK, ("msg_1",))]]


def test_a_rollback_sends_nothing_and_the_next_commit_only_its_own(database: Database,
                                                                   published: list[list[Message]]) -> None:
    with database.session() as session:
        with pytest.raises(RuntimeError), session.begin():
            send_after_commit(session, Message(MODERATE_SUBMISSION, ("sub_gone",)))
            raise RuntimeError("the transaction fails")
        with session.begin():
            send_after_commit(session, Message(MODERATE_SUBMISSION, ("sub_kept",)))
    assert published == [[Message(MODERATE_SUBMISSION, ("sub_kept",))]]


def test_a_failing_publisher_is_logged_and_the_commit_stands(database: Database) -> None:
    def broken(_messages: Sequence[Message]) -> None:
        raise ConnectionError("broker down")

    database.outbox.publisher = broken
    with capture_logs() as logs, database.transaction() as session:
        session.execute(text("INSERT INTO rows VALUES ('sub_1')"))
        send_after_commit(session, Message(MODERATE_SUBMISSION, ("sub_1",)))
    with database.transaction() as session:
        assert session.execute(text("SELECT id FROM rows")).scalars().all() == ["sub_1"]
    assert [(e["event"], e["error_type"], e["count"]) for e in logs] == [
        ("outbox_publish_failed", "ConnectionError", 1)]


def test_without_a_publisher_nothing_is_sent_and_nothing_fails(database: Database) -> None:
    with database.transaction() as session:
        send_after_commit(session, Message(MODERATE_SUBMISSION, ("sub_1",)))


def test_a_message_needs_a_transaction_under_way(database: Database) -> None:
    with database.session() as session, pytest.raises(RuntimeError, match="transaction"):
        send_after_commit(session, Message(MODERATE_SUBMISSION, ("sub_1",)))


def test_a_session_used_outside_a_transaction_fails_loudly(database: Database) -> None:
    from sqlalchemy.exc import InvalidRequestError

    with database.session() as session, pytest.raises(InvalidRequestError, match="Autobegin is disabled"):
        session.execute(text("SELECT 1"))
