"""The `verdict` command: run the API, a worker, beat, or everything embedded; migrate; manage keys and tenant
settings; verify and export the audit trail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import click
from alembic import command
from alembic.config import Config as AlembicConfig
from gunicorn.app.base import BaseApplication

from app.config import Settings
from app.use_cases.authentication import DEFAULT_SCOPES, SCOPES

if TYPE_CHECKING:
    from app.audit_chain import Verification

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
        from app.extensions import PROVIDER

        app = create_app()
        # Each API process loads the moderation model as it starts, not on its first /v1/moderations request.
        app.extensions[PROVIDER].warm_up()
        return app


def _serve_api(bind: str, workers: int, threads: int) -> None:
    # gthread workers: long-polls (`?wait=`) park a thread, not a whole process.
    # No control socket (gunicorn 25+): its default path is one per user, so a second server on the machine (a test
    # run, `verdict dev` beside `verdict api`) would take it over; Verdict is managed by signals and its CLI.
    _Gunicorn({"bind": bind, "workers": workers, "worker_class": "gthread", "threads": threads,
               "accesslog": None, "timeout": 60, "graceful_timeout": 20, "control_socket_disable": True}).run()


def _die_with_parent() -> None:
    """In a child between fork and exec (Linux): SIGTERM this child when the process that started it dies, even by
    SIGKILL, so a killed `verdict dev` never leaves an orphaned worker."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes  # noqa: PLC0415 - only in the child, only on Linux

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the prctl took hold
        os.kill(os.getpid(), signal.SIGTERM)


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
    # Declared here, once, before the API and the worker both declare them at start (a race on SQLite).
    from app.queue import declare_queues  # noqa: PLC0415 - Celery is imported only by the commands that use it

    declare_queues(settings)
    schedule = settings.var_dir.resolve() / "celerybeat-schedule"
    worker = subprocess.Popen(_celery_argv(  # noqa: S603 - our own interpreter and arguments
        "worker", "--beat", "--schedule", str(schedule), "--loglevel", settings.log_level,
        "--concurrency", str(min(settings.worker_concurrency, 2)), "--without-gossip", "--without-mingle",
    ), preexec_fn=_die_with_parent)  # noqa: PLW1509 - prctl must run in the child; the parent has no threads yet
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


# Commands that wrap one of Celery's: every argument, `--help` included, goes to Celery's own command unparsed, so any
# option it takes works through `verdict` (`verdict beat --schedule PATH`, `verdict worker --help`).
_CELERY_COMMAND: dict[str, Any] = {"context_settings": {"ignore_unknown_options": True}, "add_help_option": False}


@main.command(**_CELERY_COMMAND)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker (extra arguments go to `celery worker`)."""
    os.execv(sys.executable, _celery_argv("worker", "--loglevel", Settings().log_level, *celery_args))  # noqa: S606


@main.command(**_CELERY_COMMAND)
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


def _iso_time(_ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter("an ISO 8601 time, such as 2026-01-31T00:00:00Z") from exc
    # An operator's time without a zone is UTC, like every time Verdict stores.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@main.group()
def keys() -> None:
    """Create and revoke API keys."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant name; created if new.")
@click.option("--scopes", default=",".join(DEFAULT_SCOPES), show_default=True,
              help=f"Comma-separated scopes, of {', '.join(SCOPES)}.")
@click.option("--name", default=None, help="A label for the key (required with `review`: the reviewer's name).")
@click.option("--expires-at", callback=_iso_time, default=None,
              help="After this time the key is refused (ISO 8601; UTC without a zone).")
@click.option("--rate-limit-rpm", type=click.IntRange(1, 2**31 - 1), default=None,
              help="The key's own requests per minute; default: its tenant's.")
@click.option("--rate-limit-tpm", type=click.IntRange(1, 2**31 - 1), default=None,
              help="The key's own tokens per minute; default: its tenant's.")
def keys_create(tenant: str, scopes: str, name: str | None, expires_at: datetime | None,
                rate_limit_rpm: int | None, rate_limit_tpm: int | None) -> None:
    """Create a key. The key is printed once, alone on the last line of stdout. Rotation: create, deploy, revoke."""
    from app.db import Database
    from app.use_cases.keys import KeyLimits, KeyRequestError, create_key

    database = Database(Settings().database_url)
    try:
        with database.transaction() as session:
            issued = create_key(session, tenant_name=tenant, scopes=[s.strip() for s in scopes.split(",") if s],
                                name=name, expires_at=expires_at,
                                limits=KeyLimits(rpm=rate_limit_rpm, tpm=rate_limit_tpm))
    except KeyRequestError as exc:
        raise click.ClickException(str(exc)) from exc
    # Printed once committed: a key that is shown exists.
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
    try:
        with database.transaction() as session:
            key = revoke_key(session, key_id)
    except KeyRequestError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"revoked {key.id}")


@main.group()
def tenants() -> None:
    """Tenant settings: content retention, PII masking, rate limits, and what happens when no provider can answer."""


@tenants.command("configure")
@click.argument("name")
@click.option("--retention-days", default=None,
              help="Days to keep submitted content; 0 keeps it forever; 'default' follows CONTENT_RETENTION_DAYS.")
@click.option("--mask-by-default", type=click.Choice(["on", "off", "default"]), default=None,
              help="Mask submissions that do not say `mask`; 'default' follows MASK_BY_DEFAULT.")
@click.option("--rate-limit-rpm", default=None,
              help="Requests per minute for each of the tenant's keys; 'default' follows RATE_LIMIT_RPM.")
@click.option("--rate-limit-tpm", default=None,
              help="Tokens per minute for each of the tenant's keys; 'default' follows RATE_LIMIT_TPM.")
@click.option("--failure-mode", type=click.Choice(["fail", "review", "block", "allow", "default"]), default=None,
              help="When no provider can answer: fail, or a degraded review/block (fail closed) or allow (fail "
                   "open) verdict; 'default' follows MODERATION_FAILURE_MODE.")
def tenants_configure(name: str, retention_days: str | None, mask_by_default: str | None,
                      rate_limit_rpm: str | None, rate_limit_tpm: str | None, failure_mode: str | None) -> None:
    """Change a tenant's settings (only those given) and print them."""
    from app.db import Database
    from app.use_cases.tenants import KEEP, Keep, TenantRequestError, configure_tenant

    retention: int | None | Keep = KEEP
    if retention_days is not None:
        if retention_days == "default":
            retention = None
        elif retention_days.isdigit():
            retention = int(retention_days)
        else:
            raise click.BadParameter("a number of days (0: forever) or 'default'", param_hint="--retention-days")
    mask: bool | None | Keep = KEEP
    if mask_by_default is not None:
        mask = None if mask_by_default == "default" else mask_by_default == "on"
    rpm, tpm = _limit_option(rate_limit_rpm, "--rate-limit-rpm"), _limit_option(rate_limit_tpm, "--rate-limit-tpm")
    mode: str | None | Keep = KEEP if failure_mode is None else (None if failure_mode == "default" else failure_mode)
    database = Database(Settings().database_url)
    try:
        with database.transaction() as session:
            tenant = configure_tenant(session, name, retention_days=retention, mask_by_default=mask,
                                      rate_limit_rpm=rpm, rate_limit_tpm=tpm, failure_mode=mode)
    except TenantRequestError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"tenant: {tenant.name} ({tenant.id})")
    click.echo(f"retention_days: {'default' if tenant.retention_days is None else tenant.retention_days}")
    click.echo(f"mask_by_default: {'default' if tenant.mask_by_default is None else tenant.mask_by_default}")
    click.echo(f"rate_limit_rpm: {'default' if tenant.rate_limit_rpm is None else tenant.rate_limit_rpm}")
    click.echo(f"rate_limit_tpm: {'default' if tenant.rate_limit_tpm is None else tenant.rate_limit_tpm}")
    click.echo(f"failure_mode: {'default' if tenant.failure_mode is None else tenant.failure_mode}")


def _limit_option(value: str | None, hint: str) -> int | None | Any:
    from app.use_cases.tenants import KEEP

    if value is None:
        return KEEP
    if value == "default":
        return None
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise click.BadParameter("a positive number or 'default'", param_hint=hint)


class CannotVerify(click.ClickException):
    """Verification could not run (unknown tenant, unreadable file): exit 2, apart from a broken chain's 1."""

    exit_code = 2


def _chain_id(session: Any, tenant: str | None, system: bool) -> str:
    from sqlalchemy import select

    from app.audit_chain import SYSTEM_CHAIN
    from app.models import Tenant

    if system:
        return SYSTEM_CHAIN
    tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
    if tenant_id is None:
        raise CannotVerify(f"no tenant named {tenant!r}")
    return str(tenant_id)


@main.group()
def audit() -> None:
    """Verify and export the audit trail."""


@audit.command("verify")
@click.option("--tenant", default=None, help="Verify this tenant's chain in the database.")
@click.option("--system", "system_chain", is_flag=True, help="Verify the system chain (events of no tenant).")
@click.option("--file", "export_file", type=click.File("rb"), default=None,
              help="Verify an NDJSON export offline instead ('-' reads stdin); with --tenant, it must be theirs.")
@click.option("--start-seq", type=click.IntRange(min=1), default=None, help="First seq to check (database).")
@click.option("--end-seq", type=click.IntRange(min=1), default=None, help="Last seq to check (database).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def audit_verify(tenant: str | None, system_chain: bool, export_file: BinaryIO | None, start_seq: int | None,
                 end_seq: int | None, as_json: bool) -> None:
    """Recompute a hash chain: print `ok` with the count and head hash, or the first broken event and why.

    Exit status: 0 the chain holds, 1 it is broken, 2 it could not be verified.
    """
    from app.audit_chain import verify_export
    from app.db import Database
    from app.use_cases.audit import verify_chain

    if tenant is not None and system_chain:
        raise click.UsageError("give --tenant or --system, not both")
    if tenant is None and not system_chain and export_file is None:
        raise click.UsageError("give --tenant NAME or --system (the database), or --file EXPORT.ndjson")
    expected_chain = None
    if tenant is not None or system_chain:
        database = Database(Settings().database_url)
        with database.transaction() as session:
            expected_chain = _chain_id(session, tenant, system_chain)
            if export_file is None:
                result = verify_chain(session, expected_chain, start_seq=start_seq, end_seq=end_seq)
    if export_file is not None:
        result = verify_export(export_file)
        if result.ok and expected_chain is not None and result.chain not in (None, expected_chain):
            raise CannotVerify(f"the file holds chain {result.chain}, not {expected_chain}")
    _report(result, as_json=as_json)
    if not result.ok:
        sys.exit(1)


def _report(result: Verification, *, as_json: bool) -> None:
    broken = result.broken
    if as_json:
        click.echo(json.dumps({
            "ok": result.ok, "chain": result.chain, "count": result.count, "first_seq": result.first_seq,
            "last_seq": result.last_seq, "head_hash": result.head_hash, "notes": result.notes,
            "broken": None if broken is None else {"seq": broken.seq, "line": broken.line, "code": broken.code,
                                                   "reason": broken.reason},
        }))
        return
    span = f"seq {result.first_seq}..{result.last_seq}" if result.count else "no events"
    if broken is None:
        click.echo(f"ok: chain {result.chain}, {result.count} events ({span}), head hash {result.head_hash}")
    else:
        where = f"seq {broken.seq}" if broken.seq is not None else "an unreadable event"
        line = f" (line {broken.line})" if broken.line is not None else ""
        click.echo(f"BROKEN: chain {result.chain} at {where}{line}: {broken.code}: {broken.reason}")
        click.echo(f"checked: {result.count} events held before it ({span})")
    for note in result.notes:
        click.echo(f"note: {note}")


@audit.command("export")
@click.option("--tenant", default=None, help="The tenant whose chain to export.")
@click.option("--system", "system_chain", is_flag=True, help="Export the system chain (events of no tenant).")
@click.option("--format", "export_format", type=click.Choice(["ndjson", "csv"]), default="ndjson",
              show_default=True, help="NDJSON carries what offline verification needs; CSV is for reading.")
@click.option("--start", callback=_iso_time, default=None, help="From this time (ISO 8601; UTC without a zone).")
@click.option("--end", callback=_iso_time, default=None, help="Until this time, exclusive.")
def audit_export(tenant: str | None, system_chain: bool, export_format: str, start: datetime | None,
                 end: datetime | None) -> None:
    """Stream a chain's events, oldest first, to stdout."""
    from app.audit_chain import csv_lines, export_line
    from app.db import Database
    from app.use_cases.audit import stream_events

    if (tenant is None) == (not system_chain):
        raise click.UsageError("give --tenant NAME or --system (one of them)")
    if start is not None and end is not None and end <= start:
        raise click.BadParameter("must be after --start", param_hint="--end")
    database = Database(Settings().database_url)
    out = sys.stdout.buffer
    with database.transaction() as session:
        events = stream_events(session, _chain_id(session, tenant, system_chain), start=start, end=end)
        if export_format == "csv":
            for text in csv_lines(events):
                out.write(text.encode())
        else:
            for event in events:
                out.write(export_line(event))
    out.flush()


@main.command("settings")
@click.option("--format", "output_format", type=click.Choice(["env", "markdown"]), default="env", show_default=True,
              help="env: as .env.example; markdown: as docs/configuration.md.")
def settings_reference(output_format: str) -> None:
    """Print every setting with its default and what it does (the reference `make settings-docs` writes)."""
    from app.config import env_reference, markdown_reference

    click.echo(env_reference() if output_format == "env" else markdown_reference(), nl=False)


if __name__ == "__main__":
    main()
