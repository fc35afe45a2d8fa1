"""The `verdict` command: run the API, a worker, beat, or everything embedded; migrate; manage keys."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
from alembic import command
from alembic.config import Config as AlembicConfig
from gunicorn.app.base import BaseApplication

from app.auth import SCOPES
from app.config import Settings

_ROOT = Path(__file__).resolve().parent.parent


def _alembic_config(settings: Settings) -> AlembicConfig:
    # The migrations live beside the package in a checkout; an installed copy finds them in the working directory.
    root = _ROOT if (_ROOT / "migrations").is_dir() else Path.cwd()
    config = AlembicConfig(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "migrations"))
    config.attributes["database_url"] = settings.database_url
    config.attributes["configure_logger"] = False
    return config


def migrate_database(settings: Settings) -> None:
    settings.ensure_var_dir()
    command.upgrade(_alembic_config(settings), "head")


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from app import create_app

        return create_app()


def _serve_api(bind: str, workers: int, threads: int) -> None:
    # gthread workers: long-polls (`?wait=`) park a thread, not a whole process.
    _Gunicorn({"bind": bind, "workers": workers, "worker_class": "gthread", "threads": threads,
               "accesslog": None, "timeout": 60, "graceful_timeout": 20}).run()


def _celery_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "workers.entry", *args]


@click.group()
def main() -> None:
    """Verdict: self-hosted content-safety moderation."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def dev(host: str, port: int) -> None:
    """Run the API and a worker (with its scheduler) together on this machine, creating the schema first."""
    settings = Settings()
    migrate_database(settings)
    click.echo(f"verdict: database {settings.database_url}", err=True)
    click.echo(f"verdict: broker   {settings.broker_url}", err=True)
    click.echo(f"verdict: provider {settings.moderation_provider}", err=True)
    schedule = settings.var_dir.resolve() / "celerybeat-schedule"
    worker = subprocess.Popen(_celery_argv(  # noqa: S603 - our own interpreter and arguments
        "worker", "--beat", "--schedule", str(schedule), "--loglevel", settings.log_level,
        "--concurrency", str(min(settings.worker_concurrency, 2)), "--without-gossip", "--without-mingle",
    ))
    click.echo(f"verdict: API on http://{host}:{port} (Ctrl-C stops both)", err=True)
    try:
        _serve_api(f"{host}:{port}", workers=1, threads=8)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()


@main.command()
@click.option("--bind", default=lambda: f"0.0.0.0:{os.environ.get('PORT', '8000')}", show_default="0.0.0.0:8000")
@click.option("--workers", default=2, show_default=True, type=int)
@click.option("--threads", default=8, show_default=True, type=int)
def api(bind: str, workers: int, threads: int) -> None:
    """Serve the HTTP API with gunicorn."""
    _serve_api(bind, workers=workers, threads=threads)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker (extra arguments go to `celery worker`)."""
    os.execv(sys.executable, _celery_argv("worker", "--loglevel", Settings().log_level, *celery_args))  # noqa: S606


@main.command()
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def beat(celery_args: tuple[str, ...]) -> None:
    """Run the scheduler (exactly one per deployment): it re-sends work the queue lost."""
    os.execv(sys.executable, _celery_argv("beat", "--loglevel", Settings().log_level, *celery_args))  # noqa: S606


@main.command()
def migrate() -> None:
    """Bring the database schema up to date."""
    settings = Settings()
    migrate_database(settings)
    click.echo("verdict: schema is up to date", err=True)


@main.group()
def keys() -> None:
    """Create and revoke API keys."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant name; created if new.")
@click.option("--scopes", default=",".join(SCOPES), show_default=True, help="Comma-separated scopes.")
@click.option("--name", default=None, help="A label for the key.")
def keys_create(tenant: str, scopes: str, name: str | None) -> None:
    """Create a key. The key is printed once, alone on the last line of stdout."""
    from app.db import Database
    from app.use_cases.keys import KeyRequestError, create_key

    settings = Settings()
    database = Database(settings.database_url)
    with database.session_scope() as session:
        try:
            issued = create_key(session, tenant_name=tenant, scopes=[s.strip() for s in scopes.split(",") if s],
                                name=name)
        except KeyRequestError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"key id: {issued.key.id}")
        click.echo(f"tenant: {tenant}{' (new)' if issued.tenant_created else ''}")
        click.echo(f"scopes: {','.join(issued.key.scopes)}")
        click.echo("Store this key now; it is not shown again:")
        click.echo(issued.plaintext)


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id (key_...)."""
    from app.db import Database
    from app.use_cases.keys import KeyRequestError, revoke_key

    database = Database(Settings().database_url)
    with database.session_scope() as session:
        try:
            key = revoke_key(session, key_id)
        except KeyRequestError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"revoked {key.id}")


if __name__ == "__main__":
    main()
