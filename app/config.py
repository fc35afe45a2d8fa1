"""Verdict's settings, read from the environment (and an optional `.env`).

With nothing set, the embedded default applies: SQLite under VAR_DIR, a broker on SQLite that needs no server,
and the local moderation engine. Every setting is documented in `.env.example`.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    var_dir: Path = Path("var")
    database_url: str = ""
    broker_url: str = ""
    # Prefix for every key Verdict's broker writes in Redis, so several deployments (or test runs) share one Redis.
    broker_key_prefix: str = ""

    # "local" (the embedded engine), "openai" (an OpenAI-compatible upstream), or "cascade": the local engine
    # answers the texts it is sure of and only the uncertain ones go upstream (app/moderation/cascade.py).
    moderation_provider: Literal["local", "openai", "cascade"] = "local"
    # The cascade's uncertainty band: a text whose highest local score is >= CASCADE_BAND_LOW and < CASCADE_BAND_HIGH
    # is sent upstream; below, the engine allows it; at or above, the engine flags it. `make eval` reports the share
    # sent upstream and the harmful texts let through for a band (ops/engine/RESULTS.md).
    cascade_band_low: float = Field(default=0.1, ge=0.0, le=1.0)
    cascade_band_high: float = Field(default=0.9, ge=0.0, le=1.0)
    upstream_base_url: str = "https://api.openai.com/v1"
    upstream_api_key: SecretStr | None = None
    upstream_model: str = "omni-moderation-latest"
    upstream_path: Literal["/moderations", "/moderate"] = "/moderations"
    upstream_timeout_seconds: float = Field(default=10.0, gt=0)
    # Most texts in one upstream call; empty: 32 for /moderations, 100 for /moderate.
    upstream_max_batch: int | None = Field(default=None, gt=0)
    # The provider's limits for this key, shared by every worker through Redis. Empty: only what the provider's
    # X-RateLimit-* headers say (they also tighten a configured limit).
    upstream_rpm: int | None = Field(default=None, gt=0)
    upstream_tpm: int | None = Field(default=None, gt=0)
    # The period the provider counts those limits over: a minute for every provider we know.
    upstream_rate_window_seconds: float = Field(default=60.0, gt=0)
    # Redis for what workers share besides the queue (the upstream rate limit). Empty: BROKER_URL when it is Redis.
    redis_url: str = ""
    # The circuit breaker (shared by all workers): this many upstream outages in a row open it for
    # CIRCUIT_RESET_SECONDS, during which the fallback answers (or calls fail and are retried after the cool-down).
    circuit_failure_threshold: int = Field(default=5, gt=0)
    circuit_reset_seconds: float = Field(default=30.0, gt=0)
    # Who answers while the upstream's circuit is open or its retries are used up: "local" (the local engine,
    # verdicts marked degraded) or "none".
    moderation_fallback_provider: Literal["none", "local"] = "none"
    # When no provider can answer at all (tenants may override): "fail" the submission, or record a degraded
    # verdict: "review" or "block" (fail closed), "allow" (fail open).
    moderation_failure_mode: Literal["fail", "review", "block", "allow"] = "fail"
    # How long a provider's scores for a text are reused for the same text (same tenant, model and policy). 0: off.
    cache_ttl_seconds: int = Field(default=86_400, ge=0)
    # Under load, how long a worker waits for more queued texts to fill a batch; an idle worker never waits.
    batch_max_wait_ms: int = Field(default=5, ge=0, le=1000)

    max_request_bytes: int = Field(default=1024 * 1024, gt=0)
    max_text_chars: int = Field(default=32_768, gt=0)
    max_items_per_request: int = Field(default=100, gt=0)
    max_texts_per_submission: int = Field(default=32, gt=0)
    max_metadata_bytes: int = Field(default=4096, gt=0)

    # Per-key rate limits, in moving one-minute windows (tenants and keys may have their own, app/rate_limits.py).
    # Tokens are estimated as one per four characters of moderated text, at least one per text.
    rate_limit_rpm: int = Field(default=600, gt=0)
    rate_limit_tpm: int = Field(default=1_000_000, gt=0)
    # Where the windows are kept: a Redis URL, so every API process shares them. Empty: BROKER_URL if it is Redis,
    # else in memory (one process only, as on the embedded default).
    rate_limit_storage_url: str = ""
    # How long a response to a POST with an Idempotency-Key is kept and replayed to retries.
    idempotency_ttl_seconds: int = Field(default=86_400, gt=0)

    processing_lease_seconds: int = Field(default=120, gt=0)
    requeue_after_seconds: int = Field(default=60, gt=0)
    sweep_interval_seconds: float = Field(default=30.0, gt=0)
    broker_visibility_timeout: int = Field(default=900, gt=0)
    moderation_max_retries: int = Field(default=5, ge=0)
    moderation_retry_backoff_max: int = Field(default=300, gt=0)

    # Webhooks. Networks a webhook URL may resolve into although they are not public (loopback, private,
    # link-local, ...): comma-separated CIDRs. Empty: public addresses only (the SSRF guard, app/webhooks/url_guard.py).
    webhook_allowed_networks: str = ""
    # Seconds before each retry of a failed delivery, comma-separated; after the last one the delivery is dead.
    webhook_retry_schedule: str = "5,300,1800,7200,18000,36000"
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    # A worker's claim on a delivery; its task is killed before the claim runs out, so no two send at once.
    webhook_lease_seconds: int = Field(default=60, gt=0)
    webhook_sweep_interval_seconds: float = Field(default=5.0, gt=0)
    # After a rotation the previous secret keeps signing (as a second signature) for this long.
    webhook_secret_grace_seconds: int = Field(default=86_400, ge=0)

    # Days to keep submitted content (tenants may override); then it is erased and audit events stay. 0: forever.
    content_retention_days: int = Field(default=30, ge=0)
    retention_sweep_interval_seconds: float = Field(default=3600.0, gt=0)
    # Mask personal data in submissions that neither say `mask` nor belong to a tenant with its own default.
    mask_by_default: bool = False
    # Where phone numbers written without a +country code are recognised: ISO 3166 region codes, comma-separated.
    mask_phone_regions: str = "US"

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

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _check_networks(cls, value: str) -> str:
        _parse_networks(value)
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        _parse_delays(value)
        return value

    @model_validator(mode="after")
    def _check_cascade_band(self) -> Settings:
        if self.cascade_band_low > self.cascade_band_high:
            raise ValueError("CASCADE_BAND_LOW must not be above CASCADE_BAND_HIGH")
        return self

    @model_validator(mode="after")
    def _check_webhook_lease(self) -> Settings:
        # One attempt may spend the timeout connecting and again reading; the task's hard time limit (the lease
        # minus 5 s) must still leave it that time.
        if self.webhook_lease_seconds < 2 * self.webhook_timeout_seconds + 10:
            raise ValueError("WEBHOOK_LEASE_SECONDS must be at least 2 * WEBHOOK_TIMEOUT_SECONDS + 10")
        return self

    @property
    def webhook_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return _parse_networks(self.webhook_allowed_networks)

    @property
    def webhook_retry_delays(self) -> tuple[float, ...]:
        return _parse_delays(self.webhook_retry_schedule)

    @field_validator("mask_phone_regions")
    @classmethod
    def _known_regions(cls, value: str) -> str:
        import phonenumbers

        regions = [r.strip().upper() for r in value.split(",") if r.strip()]
        unknown = [r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS]
        if not regions or unknown:
            raise ValueError(f"MASK_PHONE_REGIONS must list region codes such as US,GB,DE; unknown: {unknown}")
        return ",".join(regions)

    @property
    def phone_regions(self) -> tuple[str, ...]:
        return tuple(self.mask_phone_regions.split(","))

    @property
    def rate_limit_storage(self) -> str:
        if self.rate_limit_storage_url:
            return self.rate_limit_storage_url
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return "memory://"

    @property
    def is_embedded(self) -> bool:
        return self.database_url.startswith("sqlite") or self.broker_url.startswith("sqla+")

    @property
    def task_time_limit(self) -> int:
        return max(5, self.processing_lease_seconds - 5)

    @property
    def task_soft_time_limit(self) -> int:
        # Most of the task's time (never less than 80%), so a short lease does not cut an upstream call off before
        # its own timeout; the hard limit still ends the task before the lease runs out.
        return max(1, self.task_time_limit - min(5, self.task_time_limit // 5))

    @property
    def upstream_batch_size(self) -> int:
        if self.upstream_max_batch is not None:
            return self.upstream_max_batch
        return 100 if self.upstream_path == "/moderate" else 32

    @property
    def shared_redis_url(self) -> str | None:
        if self.redis_url:
            return self.redis_url
        return self.broker_url if self.broker_url.startswith(("redis://", "rediss://")) else None

    @property
    def upstream_capacity_wait(self) -> float:
        """How long a call may wait for rate-limit capacity: what the task's soft limit leaves after the call's
        own timeout (connect and read), at most 30 s; after that its texts go back to the queue."""
        return max(1.0, min(30.0, self.task_soft_time_limit - 2 * self.upstream_timeout_seconds))

    def ensure_var_dir(self) -> None:
        if self.database_url.startswith("sqlite") or self.broker_url.startswith("sqla+sqlite"):
            self.var_dir.mkdir(parents=True, exist_ok=True)


def _parse_networks(value: str) -> tuple[IPv4Network | IPv6Network, ...]:
    networks = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        try:
            networks.append(ip_network(part, strict=False))
        except ValueError as exc:
            raise ValueError(f"WEBHOOK_ALLOWED_NETWORKS: {part!r} is not a CIDR network") from exc
    return tuple(networks)


def _parse_delays(value: str) -> tuple[float, ...]:
    delays = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        try:
            delay = float(part)
        except ValueError as exc:
            raise ValueError(f"WEBHOOK_RETRY_SCHEDULE: {part!r} is not a number of seconds") from exc
        if not 0 < delay < 10 * 86_400:
            raise ValueError("WEBHOOK_RETRY_SCHEDULE: each delay must be above 0 and below 10 days")
        delays.append(delay)
    if len(delays) > 20:
        raise ValueError("WEBHOOK_RETRY_SCHEDULE: at most 20 retries")
    return tuple(delays)
