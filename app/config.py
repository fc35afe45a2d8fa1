"""Verdict's settings, read from the environment (and an optional `.env`).

With nothing set, the embedded default applies: SQLite under VAR_DIR, a broker on SQLite that needs no server,
and the local moderation engine. Every setting is documented in `.env.example`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    var_dir: Path = Path("var")
    database_url: str = ""
    broker_url: str = ""
    # Prefix for every key Verdict's broker writes in Redis, so several deployments (or test runs) share one Redis.
    broker_key_prefix: str = ""

    moderation_provider: Literal["local", "openai"] = "local"
    upstream_base_url: str = "https://api.openai.com/v1"
    upstream_api_key: SecretStr | None = None
    upstream_model: str = "omni-moderation-latest"
    upstream_path: Literal["/moderations", "/moderate"] = "/moderations"
    upstream_timeout_seconds: float = Field(default=10.0, gt=0)

    max_request_bytes: int = Field(default=1024 * 1024, gt=0)
    max_text_chars: int = Field(default=32_768, gt=0)
    max_items_per_request: int = Field(default=100, gt=0)
    max_texts_per_submission: int = Field(default=32, gt=0)
    max_metadata_bytes: int = Field(default=4096, gt=0)

    processing_lease_seconds: int = Field(default=120, gt=0)
    requeue_after_seconds: int = Field(default=60, gt=0)
    sweep_interval_seconds: float = Field(default=30.0, gt=0)
    broker_visibility_timeout: int = Field(default=900, gt=0)
    moderation_max_retries: int = Field(default=5, ge=0)
    moderation_retry_backoff_max: int = Field(default=300, gt=0)

    worker_concurrency: int = Field(default=2, gt=0)
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        # The embedded default keeps everything in files under VAR_DIR, so a laptop needs no server.
        var = self.var_dir.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{var / 'verdict.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{var / 'broker.db'}"
        # A task still running when its lease ends could be taken over by a second worker; the hard time limit
        # (lease minus a margin) makes sure the first one is gone by then.
        if self.processing_lease_seconds < 10:
            raise ValueError("PROCESSING_LEASE_SECONDS must be at least 10")
        if self.moderation_retry_backoff_max >= self.broker_visibility_timeout:
            raise ValueError("MODERATION_RETRY_BACKOFF_MAX must be below BROKER_VISIBILITY_TIMEOUT")
        return self

    @property
    def is_embedded(self) -> bool:
        return self.database_url.startswith("sqlite") or self.broker_url.startswith("sqla+")

    @property
    def task_time_limit(self) -> int:
        return max(5, self.processing_lease_seconds - 5)

    def ensure_var_dir(self) -> None:
        if self.database_url.startswith("sqlite") or self.broker_url.startswith("sqla+sqlite"):
            self.var_dir.mkdir(parents=True, exist_ok=True)
