"""Alembic environment: migrates the database Verdict is configured for (DATABASE_URL or the embedded default)."""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from alembic import context
from alembic.autogenerate.api import AutogenContext

from app import models  # registers every table on Base.metadata
from app.config import Settings
from app.db import Base, make_engine
from app.secrets_at_rest import EncryptedSecret

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("database_url")
    if isinstance(url, str):
        return url
    settings = Settings()
    settings.ensure_var_dir()
    return settings.database_url


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    # Revisions must not import application code, which changes after they are written.
    if type_ == "type" and isinstance(obj, models.UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if type_ == "type" and isinstance(obj, EncryptedSecret):
        return "sa.String(length=255)"
    return False


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, compare_type=True,
                      render_item=_render_item, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url())
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # Batch mode rebuilds a table by copying it and dropping the original; with foreign keys enforced (as
            # app/db.py sets them), dropping a parent such as `tenants` would cascade its children away. SQLite
            # ignores this pragma inside a transaction, so it is set first, and only for the migration's connection.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            compare_type=True,
            render_item=_render_item,
            # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
