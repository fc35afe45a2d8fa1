"""The `verdict` command: run the API, a worker, beat, or everything embedded; migrate; manage keys and tenant
settings; verify and export the audit trail; see the deployment at a glance (`verdict status`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import click
from gunicorn.app.base import BaseApplication

from app.config import Settings
from app.forking import settle_before_fork
from app.use_cases.authentication import DEFAULT_SCOPES, SCOPES

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

    from app.audit_chain import Verification

_ROOT = Path(__file__).resolve().parent.parent
# prometheus-client's own variable: where its multiprocess files are kept.
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _keep_metrics(settings: Settings, kind: str) -> Path:
    """Keep the metrics of this process and of the processes it starts in METRICS_DIR/`kind` (multiprocess files,
    so /metrics counts every gunicorn and pool process), emptied first: an earlier run's counters are not this
    run's. Runs before anything is counted."""
    directory = settings.metrics_directory / kind
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[_MULTIPROC_ENV] = str(directory)
    # prometheus-client chose its value class when `app` imported it, before this variable was set; no value exists
    # yet (every metric in app/metrics.py has labels), so choosing again now makes every value a multiprocess one.
    from prometheus_client import values  # noqa: PLC0415

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return directory


def _alembic_config(settings: Settings) -> AlembicConfig:
    # Imported here, not at the top: an API process never migrates, and Alembic is about 10 MB of it (issue 15).
    from alembic.config import Config as AlembicConfig  # noqa: PLC0415

    # The migrations live beside the package in a checkout; an installed copy finds them in the working directory.
    root = _ROOT if (_ROOT / "migrations").is_dir() else Path.cwd()
    config = AlembicConfig(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "migrations"))
    config.attributes["database_url"] = settings.database_url
    config.attributes["configure_logger"] = False
    return config


def migrate_database(settings: Settings) -> None:
    from app.secrets_at_rest import load_box

    settings.ensure_var_dir()
    from alembic import command  # noqa: PLC0415 - see _alembic_config

    config = _alembic_config(settings)
    # Revision 0006 encrypts webhook secrets stored before it, with this deployment's key.
    config.attributes["webhook_secret_box"] = load_box(settings)
    command.upgrade(config, "head")


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)
        self.cfg.set("post_fork", self._post_fork)

    def load(self) -> Any:
        from app import create_app
        from app.extensions import DATABASE, PROVIDER

        # The app bounds its open long-polls below the threads it is given (app/api/long_polls.py).
        app = create_app(server_threads=self.options["threads"])
        # Loaded once, in gunicorn's master before it forks (preload_app): every API process shares the model's and
        # the libraries' pages instead of holding copies, and none loads it on its first /v1/moderations request.
        app.extensions[PROVIDER].warm_up()
        self._database = app.extensions[DATABASE]
        settle_before_fork()
        return app

    def _post_fork(self, _server: Any, _worker: Any) -> None:
        # A forked API process opens its own database connections, never the master's (it should hold none).
        database = getattr(self, "_database", None)  # None without preload_app: the app is built after the fork
        if database is not None:
            database.engine.dispose(close=False)


def _check_long_poll_bound(settings: Settings, threads: int) -> None:
    """Refuse, before anything starts, a long-poll bound that would leave the server no free thread."""
    bound = settings.long_poll_max_per_process
    if bound is not None and bound >= threads:
        # Long-polls on every thread would leave none for /healthz or any other request.
        raise click.UsageError(f"LONG_POLL_MAX_PER_PROCESS ({bound}) must be below --threads ({threads}).")


def _serve_api(bind: str, workers: int, threads: int) -> None:
    # gthread workers: long-polls (`?wait=`) park a thread, not a whole process, and at most half the threads wait.
    # No control socket (gunicorn 25+): its default path is one per user, so a second server on the machine (a test
    # run, `verdict dev` beside `verdict api`) would take it over; Verdict is managed by signals and its CLI.
    # The worker is gunicorn's gthread one, answering its own errors in the JSON envelope (app/http_server.py). The
    # longest request line it reads is gunicorn's maximum, so any path a client may send reaches the API's routing.
    _Gunicorn({"bind": bind, "workers": workers, "worker_class": "app.http_server.JsonErrorsWorker",
               "threads": threads, "limit_request_line": 8190, "accesslog": None, "timeout": 60,
               "graceful_timeout": 20, "control_socket_disable": True, "preload_app": True}).run()


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
    _check_long_poll_bound(settings, threads=8)
    worker_env = {**os.environ, _MULTIPROC_ENV: str(_keep_metrics(settings, "worker"))}
    _keep_metrics(settings, "api")
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
    ), env=worker_env, preexec_fn=_die_with_parent)  # noqa: PLW1509 - prctl must run in the child; the parent has no threads yet
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
    settings = Settings()
    _check_long_poll_bound(settings, threads)
    _keep_metrics(settings, "api")
    _serve_api(bind, workers=workers, threads=threads)


# Commands that wrap one of Celery's: every argument, `--help` included, goes to Celery's own command unparsed, so any
# option it takes works through `verdict` (`verdict beat --schedule PATH`, `verdict worker --help`).
_CELERY_COMMAND: dict[str, Any] = {"context_settings": {"ignore_unknown_options": True}, "add_help_option": False}


@main.command(**_CELERY_COMMAND)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve this worker's metrics on this port (WORKER_METRICS_PORT).")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(metrics_port: int | None, celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker: `verdict worker [--metrics-port PORT] [CELERY ARGS...]` (the rest goes to `celery
    worker`)."""
    if "--help" in celery_args or "-h" in celery_args:
        click.echo("Usage: verdict worker [--metrics-port PORT] [CELERY WORKER OPTIONS...]\n\n"
                   "  --metrics-port PORT  serve this worker's metrics on PORT (WORKER_METRICS_PORT)\n\n"
                   "Every other option is `celery worker`'s:\n")
        sys.stdout.flush()  # before exec replaces this process and its buffers
    if metrics_port is not None:
        os.environ["WORKER_METRICS_PORT"] = str(metrics_port)
    settings = Settings()
    _keep_metrics(settings, "worker")
    os.execv(sys.executable, _celery_argv("worker", "--loglevel", settings.log_level, *celery_args))  # noqa: S606


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
@click.option("--default-policy", default=None,
              help="The policy of submissions that name none; 'default' is the built-in policy.")
def tenants_configure(name: str, retention_days: str | None, mask_by_default: str | None,
                      rate_limit_rpm: str | None, rate_limit_tpm: str | None, failure_mode: str | None,
                      default_policy: str | None) -> None:
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
    from app.use_cases.audit import SYSTEM_ACTOR
    from app.use_cases.errors import DomainError
    from app.use_cases.policies import set_default_policy

    try:
        with database.transaction() as session:
            tenant = configure_tenant(session, name, retention_days=retention, mask_by_default=mask,
                                      rate_limit_rpm=rpm, rate_limit_tpm=tpm, failure_mode=mode)
            if default_policy is not None:
                set_default_policy(session, tenant.id, default_policy, actor=SYSTEM_ACTOR, request_id=None)
    except TenantRequestError as exc:
        raise click.ClickException(str(exc)) from exc
    except DomainError as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(f"tenant: {tenant.name} ({tenant.id})")
    click.echo(f"retention_days: {'default' if tenant.retention_days is None else tenant.retention_days}")
    click.echo(f"mask_by_default: {'default' if tenant.mask_by_default is None else tenant.mask_by_default}")
    click.echo(f"rate_limit_rpm: {'default' if tenant.rate_limit_rpm is None else tenant.rate_limit_rpm}")
    click.echo(f"rate_limit_tpm: {'default' if tenant.rate_limit_tpm is None else tenant.rate_limit_tpm}")
    click.echo(f"failure_mode: {'default' if tenant.failure_mode is None else tenant.failure_mode}")
    click.echo(f"default_policy: {tenant.default_policy or 'default'}")


def _limit_option(value: str | None, hint: str) -> int | None | Any:
    from app.use_cases.tenants import KEEP

    if value is None:
        return KEEP
    if value == "default":
        return None
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise click.BadParameter("a positive number or 'default'", param_hint=hint)


@main.group()
def policies() -> None:
    """Policy as code: apply and export a tenant's policies and term lists; shadow reports and backtests."""


def _domain_errors() -> Any:
    from contextlib import contextmanager

    from pydantic import ValidationError

    from app.use_cases.errors import DomainError

    @contextmanager
    def guard() -> Any:
        try:
            yield
        except DomainError as exc:
            raise click.ClickException(exc.message) from exc
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(part) for part in first["loc"])
            raise click.ClickException(f"{where}: {first['msg']}" if where else first["msg"]) from exc

    return guard()


@policies.command("apply")
@click.option("--tenant", required=True, help="The tenant's name.")
@click.argument("file", type=click.File("rb"))
def policies_apply(tenant: str, file: BinaryIO) -> None:
    """Apply FILE (YAML or JSON; '-' reads stdin): one policy document, or `{policies: [...], blocklists: {name:
    {terms, patterns}}, allowlists: {...}}` as `export` writes it. Idempotent: what is already so makes no new
    version."""
    import yaml

    from app.db import Database
    from app.schemas.policies import PolicyDocument, TermListIn
    from app.use_cases import policies as use
    from app.use_cases.audit import SYSTEM_ACTOR

    try:
        loaded = yaml.safe_load(file.read())
    except yaml.YAMLError as exc:
        raise click.ClickException(f"not YAML or JSON: {exc}") from exc
    if not isinstance(loaded, dict):
        raise click.ClickException("the file must hold a policy document or a bundle (a mapping)")
    # A mapping with a `name` is one policy document; any other is a bundle.
    bundle: dict[str, Any] = {"policies": [loaded]} if "name" in loaded else loaded
    database = Database(Settings().database_url)
    with _domain_errors(), database.transaction() as session:
        tenant_id = use.tenant_id_named(session, tenant)
        for kind in use.KINDS:
            for name, body in (bundle.get(f"{kind}s") or {}).items():
                row, changed = use.put_term_list(session, tenant_id, kind, str(name), TermListIn.model_validate(body),
                                                 actor=SYSTEM_ACTOR, request_id=None)
                click.echo(f"{kind} {row.name}: version {row.version} ({'changed' if changed else 'unchanged'})")
        documents = [PolicyDocument.model_validate(d) for d in bundle.get("policies") or []]
        # A shadow is applied before the policy naming it.
        names = {d.name for d in documents}
        for document in sorted(documents, key=lambda d: d.shadow in names):
            view, outcome = use.apply_policy(session, tenant_id, document, actor=SYSTEM_ACTOR)
            click.echo(f"policy {view.name}: version {view.version} ({outcome})")


@policies.command("export")
@click.option("--tenant", required=True, help="The tenant's name.")
@click.option("--format", "output_format", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
def policies_export(tenant: str, output_format: str) -> None:
    """Print the tenant's live policies (current versions) and term lists, in the form `apply` reads."""
    import yaml

    from app.db import Database
    from app.use_cases import policies as use

    database = Database(Settings().database_url)
    with _domain_errors(), database.transaction() as session:
        tenant_id = use.tenant_id_named(session, tenant)
        bundle: dict[str, Any] = {
            "policies": [v.document for v in use.list_policies(session, tenant_id)
                         if not v.builtin and v.retired_at is None]}
        for kind in use.KINDS:
            bundle[f"{kind}s"] = {row.name: {"terms": row.terms, "patterns": row.patterns,
                                             **({"description": row.description} if row.description else {})}
                                  for row in use.list_term_lists(session, tenant_id, kind)}
    if output_format == "json":
        click.echo(json.dumps(bundle, indent=2, sort_keys=True))
    else:
        click.echo(yaml.safe_dump(bundle, sort_keys=True, allow_unicode=True), nl=False)


@policies.command("shadow-report")
@click.option("--tenant", required=True, help="The tenant's name.")
@click.argument("policy")
@click.option("--start", callback=_iso_time, default=None, help="From this time (ISO 8601; UTC without a zone).")
@click.option("--end", callback=_iso_time, default=None, help="Until this time, exclusive.")
def policies_shadow_report(tenant: str, policy: str, start: datetime | None, end: datetime | None) -> None:
    """How the policy's verdicts agreed with its shadow's decisions (JSON, as the API answers)."""
    from app.db import Database
    from app.schemas.policies import ShadowReportOut
    from app.use_cases import policies as use

    database = Database(Settings().database_url)
    with _domain_errors(), database.transaction() as session:
        report = use.shadow_report(session, use.tenant_id_named(session, tenant), policy, start=start, end=end)
    click.echo(json.dumps(ShadowReportOut(**report).model_dump(mode="json"), indent=2))


@policies.command("backtest")
@click.option("--tenant", required=True, help="The tenant's name.")
@click.argument("policy")
@click.option("--file", "candidate_file", type=click.File("rb"), default=None,
              help="A candidate policy document (YAML or JSON).")
@click.option("--version", "version", type=click.IntRange(1, 2**31 - 1), default=None,
              help="Or a stored version of POLICY.")
@click.option("--start", callback=_iso_time, required=True, help="From this time (ISO 8601; UTC without a zone).")
@click.option("--end", callback=_iso_time, required=True, help="Until this time, exclusive.")
@click.option("--verdicts", type=click.Choice(["policy", "tenant"]), default="policy", show_default=True,
              help="policy: the verdicts POLICY decided; tenant: all of the tenant's.")
def policies_backtest(tenant: str, policy: str, candidate_file: BinaryIO | None, version: int | None,
                      start: datetime, end: datetime, verdicts: str) -> None:
    """Re-decide stored verdicts under a candidate from their stored scores, here and now (JSON)."""
    import yaml

    from app.db import Database
    from app.schemas.policies import BacktestIn, BacktestResult
    from app.use_cases import policies as use

    document = None if candidate_file is None else yaml.safe_load(candidate_file.read())
    database = Database(Settings().database_url)
    with _domain_errors(), database.transaction() as session:
        request = BacktestIn.model_validate({"document": document, "version": version, "start": start.isoformat(),
                                             "end": end.isoformat(), "verdicts": verdicts}, strict=False)
        tenant_id = use.tenant_id_named(session, tenant)
        use.get_policy(session, tenant_id, policy)
        result = use.run_backtest_now(session, tenant_id, policy, request)
    click.echo(json.dumps(BacktestResult(**result).model_dump(mode="json"), indent=2))


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
def webhooks() -> None:
    """Webhook signing secrets: their encryption at rest (docs/operations.md, "Webhook secret encryption")."""


@webhooks.command("new-encryption-key")
def webhooks_new_encryption_key() -> None:
    """Print a new Fernet key, to put first in WEBHOOK_SECRET_KEYS."""
    from cryptography.fernet import Fernet

    click.echo(Fernet.generate_key().decode())


@webhooks.command("rotate-encryption")
def webhooks_rotate_encryption() -> None:
    """Re-encrypt every stored webhook secret with the first key of WEBHOOK_SECRET_KEYS (run it after putting a new
    key first; then the old keys may be dropped)."""
    from app.db import Database
    from app.secrets_at_rest import SecretKeyMismatch, load_box
    from app.use_cases.webhook_endpoints import reencrypt_secrets

    settings = Settings()
    database = Database(settings.database_url)
    try:
        with database.transaction() as session:
            count = reencrypt_secrets(session, load_box(settings))
    except SecretKeyMismatch as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"re-encrypted the secrets of {count} webhook endpoint(s) with the first key")


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


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object, for scripts.")
@click.option("--timeout", type=click.FloatRange(0.1, 30), default=2.0, show_default=True,
              help="Seconds to wait for the workers to answer Celery's ping.")
def status(as_json: bool, timeout: float) -> None:
    """The deployment at a glance: queue, workers, upstream, webhooks, reviews and audit chains."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from app.db import Database
    from app.moderation.registry import build_provider
    from app.queue import alive_workers
    from app.use_cases.status import deployment_status

    settings = Settings()
    database = Database(settings.database_url)
    try:
        with database.transaction() as session:
            snapshot = deployment_status(session, build_provider(settings),
                                         shared=settings.shared_redis_url is not None)
    except SQLAlchemyError as exc:
        raise click.ClickException(f"the database did not answer ({type(exc).__name__}): is DATABASE_URL right, and "
                                   "the schema up to date (`verdict migrate`)?") from exc
    workers = alive_workers(settings, timeout=timeout)
    where = {"database": make_url(settings.database_url).render_as_string(hide_password=True),
             "broker": make_url(settings.broker_url).render_as_string(hide_password=True)}
    report = _status_report(snapshot, workers, where)
    if as_json:
        click.echo(json.dumps(report))
        return
    for line in _status_lines(report):
        click.echo(line)


def _status_report(snapshot: Any, workers: list[str] | None, where: dict[str, str]) -> dict[str, Any]:
    queue, hooks, upstream = snapshot.queue, snapshot.webhooks, snapshot.upstream
    budget = upstream.budget
    return {
        **where,
        "queue": {"queued": queue.queued, "processing": queue.processing,
                  "oldest_queued_age_seconds": queue.oldest_queued_age_seconds},
        # None: the broker offers no remote control (the embedded default's SQLite broker), so nobody can tell.
        "workers": None if workers is None else {"alive": len(workers), "names": workers},
        "upstream": {"provider": upstream.provider, "circuit": upstream.circuit, "note": upstream.note,
                     "budget": None if budget is None else {
                         "requests_limit": budget.requests_limit, "requests_left": budget.requests_left,
                         "tokens_limit": budget.tokens_limit, "tokens_left": budget.tokens_left}},
        "webhooks": {"pending": hooks.pending, "delivering": hooks.delivering, "dead": hooks.dead},
        "reviews": None if snapshot.reviews is None else {
            **snapshot.reviews.counts, "oldest_pending_age_seconds": snapshot.reviews.oldest_pending_age_seconds},
        "audit": [{"tenant": head.tenant_name, "chain": head.chain_id, "last_seq": head.seq}
                  for head in snapshot.audit_heads],
    }


def _status_lines(report: dict[str, Any]) -> list[str]:
    queue, upstream, hooks = report["queue"], report["upstream"], report["webhooks"]
    age = queue["oldest_queued_age_seconds"]
    lines = [f"database: {report['database']}", f"broker:   {report['broker']}",
             f"queue:    {queue['queued']} queued, {queue['processing']} processing, oldest queued "
             + ("none" if age is None else f"{age:.1f} s ago")]
    workers = report["workers"]
    if workers is None:
        lines.append("workers:  unknown (the broker offers no remote control, or did not answer)")
    else:
        names = f" ({', '.join(workers['names'])})" if workers["names"] else ""
        lines.append(f"workers:  {workers['alive']} alive{names}")
    text = f"upstream: {upstream['provider']}"
    if upstream["circuit"] is not None:
        text += f", circuit {upstream['circuit']}"
    budget = upstream["budget"]
    if budget is not None:
        parts = [f"{budget[kind + '_left']}/{budget[kind + '_limit']} {kind}" for kind in ("requests", "tokens")
                 if budget[kind + "_limit"] is not None]
        text += f", budget left this minute: {', '.join(parts) if parts else 'no limit'}"
    if upstream["note"]:
        text += f" ({upstream['note']})"
    lines.append(text)
    lines.append(f"webhooks: {hooks['pending']} pending, {hooks['delivering']} delivering, {hooks['dead']} dead")
    reviews = report["reviews"]
    if reviews is not None:
        oldest = reviews["oldest_pending_age_seconds"]
        lines.append(f"reviews:  {reviews['pending']} pending, {reviews['claimed']} claimed, {reviews['decided']} "
                     "decided, oldest pending " + ("none" if oldest is None else f"{oldest:.1f} s ago"))
    chains = [f"{entry['tenant'] or '(system)'} {entry['last_seq']}" for entry in report["audit"]]
    lines.append(f"audit:    last seq per chain: {', '.join(chains) if chains else 'no events'}")
    return lines


@main.command("settings")
@click.option("--format", "output_format", type=click.Choice(["env", "markdown"]), default="env", show_default=True,
              help="env: as .env.example; markdown: as docs/configuration.md.")
def settings_reference(output_format: str) -> None:
    """Print every setting with its default and what it does (the reference `make settings-docs` writes)."""
    from app.config import env_reference, markdown_reference

    click.echo(env_reference() if output_format == "env" else markdown_reference(), nl=False)


if __name__ == "__main__":
    main()
