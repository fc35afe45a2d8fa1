"""`declare_queues`: what `verdict dev` runs once before its API and worker start, so that they never race to create
the same kombu_queue row on SQLite (issue 11, item 8)."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from app.config import Settings
from app.queue import MODERATION_QUEUE, WEBHOOKS_QUEUE, declare_queues


def test_declares_every_queue_once_and_again_without_error(tmp_path: Path) -> None:
    broker = tmp_path / "broker.db"
    settings = Settings(_env_file=None, broker_url=f"sqla+sqlite:///{broker}",  # type: ignore[call-arg]
                        database_url=f"sqlite:///{tmp_path / 'verdict.db'}", var_dir=tmp_path)
    declare_queues(settings)
    declare_queues(settings)  # a second start on the same files: the queues exist, nothing fails or doubles
    with closing(sqlite3.connect(broker)) as connection:
        names = sorted(row[0] for row in connection.execute("SELECT name FROM kombu_queue"))
    assert names == sorted([MODERATION_QUEUE, WEBHOOKS_QUEUE])
