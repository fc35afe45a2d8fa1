"""Fixtures shared by every test: real PostgreSQL (a scratch database per run), real Redis, app and client.

Services are never skipped: if PostgreSQL or Redis does not answer, the run fails and says how to provide them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.engine import make_url

from app import create_app
from app.cli import migrate_database
from app.config import Settings
from app.db import Database
from app.use_cases.keys import create_key

# The integration marker, set by the fixtures a test uses, and the guard that keeps each test in its lane.
pytest_plugins = ["tests.lanes"]

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# Each test process (a run, or one pytest-xdist worker of it: gw0, gw1, ...) has its own scratch database and its own
# Redis key prefix, so concurrent runs and workers never take each other's messages, rows, limits or cache entries.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
BROKER_KEY_PREFIX = f"verdict-test-{XDIST_WORKER}-{uuid.uuid4().hex[:8]}:"
SERVICES_HINT = (
    "Run `make services` (or `docker compose up -d postgres redis`), or set TEST_DATABASE_URL/TEST_REDIS_URL."
)


def _admin_conninfo(url: str) -> str:
    parsed = make_url(url)
    return parsed.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this run, migrated to head with Alembic, dropped at the end."""
    name = f"verdict_test_{XDIST_WORKER}_{uuid.uuid4().hex[:10]}"
    admin = _admin_conninfo(TEST_DATABASE_URL)
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {TEST_DATABASE_URL}: {exc}. {SERVICES_HINT}", pytrace=False)
    url = make_url(TEST_DATABASE_URL).set(database=name).render_as_string(hide_password=False)
    migrate_database(Settings(_env_file=None, database_url=url))  # type: ignore[call-arg]
    yield url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {TEST_REDIS_URL}: {exc}. {SERVICES_HINT}", pytrace=False)
    finally:
        client.close()
    yield TEST_REDIS_URL
    flush_redis(TEST_REDIS_URL)


def flush_redis(url: str) -> None:
    """Drop every broker key of this run (what a Redis restart does to a Redis that keeps nothing on disk)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{BROKER_KEY_PREFIX}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def make_settings(database_url: str, broker_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"database_url": database_url, "broker_url": broker_url, "log_format": "json",
                              "broker_key_prefix": BROKER_KEY_PREFIX}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str) -> Settings:
    return make_settings(database_url, redis_url)


@pytest.fixture(scope="session")
def app(settings: Settings) -> Flask:
    flask_app = create_app(settings)
    flask_app.config["TESTING"] = True
    return flask_app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    test_client = app.test_client()
    # Each test is its own client address (documentation prefix, RFC 3849): failed authentications are throttled
    # per address (AUTH_FAILURES_PER_MINUTE), and one test's bad keys must not throttle the next test's.
    test_client.environ_base["REMOTE_ADDR"] = f"2001:db8:ffff::{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}"
    return test_client


@pytest.fixture(scope="session")
def database(app: Flask) -> Database:
    db: Database = app.extensions["verdict.db"]
    return db


@dataclass(frozen=True)
class TenantKey:
    """A tenant (unique per test) and one of its keys."""

    tenant_name: str
    tenant_id: str
    key_id: str
    plaintext: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.plaintext}"}


def issue_key(database: Database, *, tenant_name: str | None = None, scopes: tuple[str, ...] = (
        "submit", "read", "audit", "admin"), key_name: str | None = None) -> TenantKey:
    name = tenant_name or f"tenant-{uuid.uuid4().hex[:12]}"
    if key_name is None and "review" in scopes:
        key_name = f"reviewer-{uuid.uuid4().hex[:6]}"  # a review key names its reviewer
    with database.transaction() as session:
        issued = create_key(session, tenant_name=name, scopes=scopes, name=key_name)
        return TenantKey(tenant_name=name, tenant_id=issued.key.tenant_id, key_id=issued.key.id,
                         plaintext=issued.plaintext)


@pytest.fixture
def tenant(database: Database) -> TenantKey:
    return issue_key(database)


@pytest.fixture
def other_tenant(database: Database) -> TenantKey:
    return issue_key(database)


@pytest.fixture(autouse=True)
def _metrics_stay_in_process() -> Iterator[None]:
    """A CLI command run in-process (`verdict api` refusing its options, say) must not leave this test process
    keeping its metrics in another command's multiprocess files: later tests scrape the in-process app."""
    yield
    if os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None) is not None:
        from prometheus_client import values

        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
