"""The scratch database (and Redis keys) of one in-process cost script (verdict_cost.py, intake_cost.py,
sync_cost.py): made on the PostgreSQL that BENCH_PG_ADMIN_URL names, dropped at the end with every Redis key under
its name."""

from __future__ import annotations

import os
import uuid

import psycopg
import redis
from sqlalchemy.engine import make_url

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def create_scratch(prefix: str) -> tuple[str, str]:
    """A new empty database `<prefix>_<random>`: its name (also the prefix of the run's Redis keys, `<name>:`) and
    its SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    url = make_url(PG_ADMIN).set(drivername="postgresql+psycopg", database=name).render_as_string(
        hide_password=False)
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, url


def drop_scratch(name: str) -> None:
    """Drop the database `create_scratch` made and the Redis keys under `<name>:`."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{name}:*"):
        client.delete(key)
