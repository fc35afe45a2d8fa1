"""Settings: with nothing set, the embedded default (SQLite and a SQLite broker under VAR_DIR, the local engine);
environment variables override; combinations that would let work be lost or run twice are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from pydantic import ValidationError

from app.config import Settings
from app.queue import celery_config


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the machine running the tests."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def test_defaults_are_the_embedded_setup_under_var_dir(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'verdict.db'}"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path.resolve() / 'broker.db'}"
    assert settings.moderation_provider == "local"
    assert settings.is_embedded is True


def test_relative_var_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    # Absolute, so the API and the worker (possibly started elsewhere) agree on the files.
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'var' / 'verdict.db'}"


def test_ensure_var_dir_creates_it_for_the_embedded_setup(tmp_path: Path) -> None:
    var = tmp_path / "nested" / "var"
    Settings(_env_file=None, var_dir=var).ensure_var_dir()  # type: ignore[call-arg]
    assert var.is_dir()


def test_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://u@db:5432/verdict")
    monkeypatch.setenv("BROKER_URL", "redis://cache:6379/0")
    monkeypatch.setenv("MODERATION_PROVIDER", "openai")
    monkeypatch.setenv("UPSTREAM_API_KEY", "sk-secret")
    monkeypatch.setenv("UPSTREAM_PATH", "/moderate")
    monkeypatch.setenv("MAX_TEXT_CHARS", "1000")
    monkeypatch.setenv("PROCESSING_LEASE_SECONDS", "30")
    settings = Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]

    assert settings.database_url == "postgresql+psycopg://u@db:5432/verdict"
    assert settings.broker_url == "redis://cache:6379/0"
    assert settings.is_embedded is False
    assert settings.moderation_provider == "openai"
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.get_secret_value() == "sk-secret"
    assert "sk-secret" not in repr(settings)
    assert settings.upstream_path == "/moderate"
    assert settings.max_text_chars == 1000
    assert settings.processing_lease_seconds == 30


def test_env_file_is_read(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("BROKER_URL=redis://from-file:6379/1\n")
    settings = Settings(_env_file=env_file, var_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.broker_url == "redis://from-file:6379/1"
    assert settings.database_url.startswith("sqlite:///")


@pytest.mark.parametrize(("name", "value"), [
    ("MODERATION_PROVIDER", "bogus"),
    ("UPSTREAM_PATH", "/v2/whatever"),
    ("UPSTREAM_TIMEOUT_SECONDS", "0"),
    ("MAX_TEXT_CHARS", "-1"),
])
def test_invalid_values_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]


@pytest.mark.parametrize("lease", ["1", "9"])
def test_short_processing_lease_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lease: str) -> None:
    monkeypatch.setenv("PROCESSING_LEASE_SECONDS", lease)
    with pytest.raises(ValidationError, match="PROCESSING_LEASE_SECONDS"):
        Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]


def test_lease_of_ten_seconds_is_accepted(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, var_dir=tmp_path, processing_lease_seconds=10)  # type: ignore[call-arg]
    assert settings.processing_lease_seconds == 10


@pytest.mark.parametrize(("backoff", "visibility"), [(900, 900), (1000, 900)])
def test_retry_backoff_at_or_over_visibility_timeout_is_refused(tmp_path: Path, backoff: int, visibility: int) -> None:
    with pytest.raises(ValidationError, match="MODERATION_RETRY_BACKOFF_MAX"):
        Settings(_env_file=None, var_dir=tmp_path, moderation_retry_backoff_max=backoff,  # type: ignore[call-arg]
                 broker_visibility_timeout=visibility)


def test_retry_backoff_below_visibility_timeout_is_accepted(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, var_dir=tmp_path, moderation_retry_backoff_max=899,  # type: ignore[call-arg]
                        broker_visibility_timeout=900)
    assert settings.moderation_retry_backoff_max == 899


@pytest.mark.parametrize("lease", [10, 11, 60, 120, 3600])
def test_task_time_limit_ends_before_the_lease(tmp_path: Path, lease: int) -> None:
    settings = Settings(_env_file=None, var_dir=tmp_path, processing_lease_seconds=lease)  # type: ignore[call-arg]
    assert 0 < settings.task_time_limit < settings.processing_lease_seconds


def test_batch_size_follows_the_upstream_path_unless_set() -> None:
    assert Settings(_env_file=None).upstream_batch_size == 32  # type: ignore[call-arg]
    assert Settings(_env_file=None, upstream_path="/moderate").upstream_batch_size == 100  # type: ignore[call-arg]
    assert Settings(_env_file=None, upstream_max_batch=8).upstream_batch_size == 8  # type: ignore[call-arg]


def test_shared_redis_is_the_redis_broker_unless_set() -> None:
    assert Settings(_env_file=None).shared_redis_url is None  # type: ignore[call-arg]
    assert Settings(_env_file=None, broker_url="redis://r:6379/0").shared_redis_url == "redis://r:6379/0"  # type: ignore[call-arg]
    assert Settings(_env_file=None, redis_url="redis://other/1").shared_redis_url == "redis://other/1"  # type: ignore[call-arg]


def test_capacity_wait_leaves_the_call_its_timeout_within_the_soft_limit() -> None:
    short = Settings(_env_file=None, processing_lease_seconds=10, upstream_timeout_seconds=2)  # type: ignore[call-arg]
    assert short.upstream_capacity_wait == 1  # nothing left after the timeout: the floor, so a call still waits a bit
    default = Settings(_env_file=None)  # type: ignore[call-arg]
    assert default.upstream_capacity_wait == 30
    assert default.upstream_capacity_wait + 2 * default.upstream_timeout_seconds < default.task_soft_time_limit


@pytest.mark.parametrize("mode", ["sometimes", ""])
def test_failure_mode_is_checked(mode: str) -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, moderation_failure_mode=mode)  # type: ignore[call-arg]


# ---- one Redis for everything: REDIS_URL, with BROKER_URL and RATE_LIMIT_STORAGE_URL as overrides --------------


def redis_roles(settings: Settings) -> tuple[str, str | None, str]:
    """Where the broker, the workers' shared state (upstream budget, circuit, cache) and the per-key limits live."""
    return settings.broker_url, settings.shared_redis_url, settings.rate_limit_storage


def test_nothing_set_is_the_embedded_default(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]
    assert redis_roles(settings) == (f"sqla+sqlite:///{tmp_path.resolve() / 'broker.db'}", None, "memory://")
    # The SQLAlchemy transport polls: BROKER_POLLING_INTERVAL, not kombu's one second, says how often (issue 15).
    # On the transport's class: kombu's SQLAlchemy transport would hand a transport option to create_engine(), which
    # refuses it (tests/unit/test_queue_declare.py opens a real connection with these settings).
    assert celery_config(settings)["broker_transport_options"] == {}
    assert kombu_sqlalchemy.Transport.polling_interval == 0.1
    tuned = Settings(_env_file=None, var_dir=tmp_path, broker_polling_interval=0.5)  # type: ignore[call-arg]
    celery_config(tuned)
    assert kombu_sqlalchemy.Transport.polling_interval == 0.5
    celery_config(settings)


def test_redis_url_alone_is_the_broker_the_shared_state_and_the_rate_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert redis_roles(settings) == ("redis://cache:6379/0",) * 3
    # The broker gets the Redis transport options (the visibility timeout every retry delay is kept below).
    config = celery_config(settings)
    assert config["broker_url"] == "redis://cache:6379/0"
    assert config["broker_transport_options"]["visibility_timeout"] == settings.broker_visibility_timeout


def test_a_redis_broker_url_alone_still_serves_for_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    # Deployments configured before REDIS_URL was enough keep working unchanged.
    monkeypatch.setenv("BROKER_URL", "rediss://queue:6380/2")
    assert redis_roles(Settings(_env_file=None)) == ("rediss://queue:6380/2",) * 3  # type: ignore[call-arg]


def test_broker_url_overrides_redis_url_for_the_broker_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("BROKER_URL", "redis://queue:6379/1")
    assert redis_roles(Settings(_env_file=None)) == (  # type: ignore[call-arg]
        "redis://queue:6379/1", "redis://cache:6379/0", "redis://cache:6379/0")


def test_a_broker_that_is_not_redis_leaves_redis_url_to_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("BROKER_URL", "sqla+postgresql://u@db/broker")
    assert redis_roles(Settings(_env_file=None)) == (  # type: ignore[call-arg]
        "sqla+postgresql://u@db/broker", "redis://cache:6379/0", "redis://cache:6379/0")


def test_a_non_redis_broker_without_redis_url_keeps_limits_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_URL", "sqla+postgresql://u@db/broker")
    assert redis_roles(Settings(_env_file=None)) == (  # type: ignore[call-arg]
        "sqla+postgresql://u@db/broker", None, "memory://")


@pytest.mark.parametrize("storage", ["redis://limits:6379/3", "memory://"])
def test_rate_limit_storage_url_overrides_redis_url_for_the_rate_limits_only(
    monkeypatch: pytest.MonkeyPatch, storage: str,
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("RATE_LIMIT_STORAGE_URL", storage)
    assert redis_roles(Settings(_env_file=None)) == (  # type: ignore[call-arg]
        "redis://cache:6379/0", "redis://cache:6379/0", storage)


def test_an_empty_variable_means_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # `.env.example` shows an unset setting as `NAME=`; uncommented as it is, it must not break the start.
    for name in ("REDIS_URL", "BROKER_URL", "UPSTREAM_RPM", "UPSTREAM_API_KEY", "LOG_LEVEL", "MASK_BY_DEFAULT"):
        monkeypatch.setenv(name, "")
    settings = Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.broker_url.startswith("sqla+sqlite:///")
    assert settings.upstream_rpm is None and settings.upstream_api_key is None
    assert settings.log_level == "INFO" and settings.mask_by_default is False
