"""Verdict's settings, read from the environment (and an optional `.env`), each one described here and only here:
`.env.example` and docs/configuration.md are generated from these descriptions (`make settings-docs`)."""

from __future__ import annotations

import re
import textwrap
import types
import typing
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

# The sections of the reference, in order, each with what an operator should know before its settings.
STORAGE = "Storage, broker and Redis"
PROVIDER = "Moderation provider"
REQUEST_LIMITS = "Request limits"
KEY_LIMITS = "Per-key rate limits and idempotency"
PROCESSING = "Processing, retries and recovery"
WEBHOOKS = "Webhooks"
COMPLIANCE = "Compliance: retention and masking"
METRICS = "Metrics"
REVIEW = "Human review and the console"
RUNTIME = "Workers and logging"
SECTIONS: dict[str, str] = {
    STORAGE: (
        "With none of these set, Verdict runs on the embedded default: SQLite files under VAR_DIR, a Celery broker on "
        "SQLite, per-key rate limits in the API process's memory, and no upstream budget, circuit breaker or cache "
        "shared between processes. In production two settings are enough, DATABASE_URL and REDIS_URL: REDIS_URL alone "
        "gives the broker, the shared upstream budget, circuit breaker and cache, and the per-key rate-limit windows. "
        "BROKER_URL and RATE_LIMIT_STORAGE_URL override it for the broker or the rate limits only; a deployment that "
        "sets only BROKER_URL to a Redis URL keeps using that Redis for everything."
    ),
    PROVIDER: (
        "Which provider scores the texts and how Verdict calls it: batching, the upstream budget shared by all "
        "workers, the circuit breaker, the fallback, the failure mode and the cache (docs/moderation.md)."
    ),
    REQUEST_LIMITS: "A larger request is refused: 413 for the body, 400 naming the field for the rest (docs/api.md).",
    KEY_LIMITS: "How per-key rate limits and Idempotency-Key work: docs/api.md.",
    PROCESSING: (
        "How the pipeline recovers from lost messages and dead workers, and how often it retries "
        "(docs/moderation.md, \"The pipeline\")."
    ),
    WEBHOOKS: "Delivery, retries, signing and the SSRF guard: docs/webhooks.md.",
    COMPLIANCE: "Retention, erasure and masking: docs/compliance.md.",
    METRICS: (
        "`GET /metrics` in the Prometheus text format: every API process's and (on the same host) every worker's "
        "counters, and the deployment's gauges read at scrape time; the metrics, dashboard and alerts: "
        "docs/operations.md."
    ),
    REVIEW: "The review queue's claims and the console's sessions: docs/review.md.",
    RUNTIME: "",
}


def _in(section: str, *, accepts: str | None = None) -> JsonDict:
    """A field's place in the reference (and, where its type says too little, what it accepts)."""
    return {"section": section} if accepts is None else {"section": section, "accepts": accepts}


class Settings(BaseSettings):
    # An empty variable (`UPSTREAM_RPM=`, as `.env.example` shows an unset one) means "not set": the default.
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore",
                                      env_ignore_empty=True)

    # ---- storage, broker and Redis
    database_url: str = Field(
        default="", json_schema_extra=_in(STORAGE, accepts="a SQLAlchemy URL"),
        description=(
            "The database. Empty: SQLite at $VAR_DIR/verdict.db. Production: "
            "`postgresql+psycopg://user:pass@host:5432/verdict`."
        ),
    )
    redis_url: str = Field(
        default="", json_schema_extra=_in(STORAGE, accepts="a `redis://` or `rediss://` URL"),
        description=(
            "The Redis that processes share: the Celery broker (unless BROKER_URL is set), the upstream budget, "
            "circuit breaker and verdict cache, and the per-key rate-limit windows (unless RATE_LIMIT_STORAGE_URL is "
            "set). Production: `redis://host:6379/0`. Empty: BROKER_URL when that is Redis. With no Redis at all "
            "there is no upstream budget (only the provider's 429s hold calls back), each worker process has its own "
            "circuit breaker, and nothing is cached."
        ),
    )
    broker_url: str = Field(
        default="", json_schema_extra=_in(STORAGE, accepts="a Celery broker URL"),
        description=(
            "The Celery broker, when it is not REDIS_URL (another Redis, or any kombu transport). Empty: REDIS_URL if "
            "set, else kombu's SQLAlchemy transport on SQLite at $VAR_DIR/broker.db (no server)."
        ),
    )
    broker_polling_interval: float = Field(
        default=0.1, gt=0, le=10, json_schema_extra=_in(STORAGE),
        description=(
            "Seconds between a worker's looks at a broker that cannot push messages: kombu's SQLAlchemy transport "
            "(`sqla+` URLs, the embedded default), whose own default is 1 s. An idle worker sees a new submission "
            "within this long, at one small query per interval per worker process. Redis pushes: unused there."
        ),
    )
    broker_key_prefix: str = Field(
        default="", json_schema_extra=_in(STORAGE),
        description=(
            "Prefix for every key Verdict writes in Redis (broker messages, the doorbell, the upstream budget, "
            "circuit breaker, cache and per-key rate limits), so several deployments (or test runs) can share one "
            "Redis. Empty: none."
        ),
    )
    var_dir: Path = Field(
        default=Path("var"), json_schema_extra=_in(STORAGE),
        description=(
            "Where the embedded default keeps its SQLite files, and `verdict dev` its beat schedule (created on first "
            "use; relative to the working directory)."
        ),
    )

    # ---- moderation provider
    moderation_provider: Literal["local", "openai", "cascade"] = Field(
        default="local", json_schema_extra=_in(PROVIDER),
        description=(
            "`local`: the engine shipped inside Verdict, no network (the categories it judges and does not judge: "
            "docs/engine.md). `openai`: any OpenAI-compatible moderation endpoint, configured by the UPSTREAM_* "
            "settings. `cascade`: the local engine answers the texts it is sure of and only the uncertain ones go "
            "upstream (CASCADE_BAND_LOW/HIGH)."
        ),
    )
    cascade_band_low: float = Field(
        default=0.1, ge=0.0, le=1.0, json_schema_extra=_in(PROVIDER),
        description=(
            "With MODERATION_PROVIDER=cascade: a text whose highest local score is at least this and below "
            "CASCADE_BAND_HIGH is sent upstream; below it the local engine's answer stands (`make eval` reports the "
            "share sent upstream and the harmful texts let through for a band)."
        ),
    )
    cascade_band_high: float = Field(
        default=0.9, ge=0.0, le=1.0, json_schema_extra=_in(PROVIDER),
        description="With MODERATION_PROVIDER=cascade: at or above this highest local score the local engine's answer "
                    "stands (it flags the text); between the two bands the upstream decides.",
    )
    upstream_base_url: str = Field(
        default="https://api.openai.com/v1", json_schema_extra=_in(PROVIDER, accepts="a URL"),
        description="Base URL of the OpenAI-compatible API; calls go to UPSTREAM_BASE_URL + UPSTREAM_PATH.",
    )
    upstream_api_key: SecretStr | None = Field(
        default=None, json_schema_extra=_in(PROVIDER),
        description=(
            "The upstream API key, sent as a Bearer token. Secret: never logged, never shown. Empty: no Authorization "
            "header is sent."
        ),
    )
    upstream_model: str = Field(
        default="omni-moderation-latest", json_schema_extra=_in(PROVIDER),
        description="Model name sent upstream for submissions that name no `model`.",
    )
    upstream_path: Literal["/moderations", "/moderate"] = Field(
        default="/moderations", json_schema_extra=_in(PROVIDER),
        description="`/moderations` (OpenAI's) or `/moderate`.",
    )
    upstream_timeout_seconds: float = Field(
        default=10.0, gt=0, json_schema_extra=_in(PROVIDER),
        description=(
            "Timeout of one upstream call, in seconds, for connecting and again for reading; a call that times out is "
            "retried."
        ),
    )
    upstream_max_batch: int | None = Field(
        default=None, gt=0, json_schema_extra=_in(PROVIDER),
        description=(
            "Most texts in one upstream call: workers gather queued texts into batches up to this size. Empty: 32 for "
            "`/moderations`, 100 for `/moderate`."
        ),
    )
    upstream_rpm: int | None = Field(
        default=None, gt=0, json_schema_extra=_in(PROVIDER),
        description=(
            "The provider's requests per minute for this key. Every worker on every host shares one budget (in Redis) "
            "and waits for capacity instead of being refused. Empty: no limit but what the provider's "
            "`X-RateLimit-*` headers say; those headers also tighten a configured limit."
        ),
    )
    upstream_tpm: int | None = Field(
        default=None, gt=0, json_schema_extra=_in(PROVIDER),
        description=(
            "The provider's tokens per minute for this key, shared like UPSTREAM_RPM. A call's tokens are estimated "
            "(one per 4 characters) and corrected from the answer's `usage`. Empty: as for UPSTREAM_RPM."
        ),
    )
    upstream_rate_window_seconds: float = Field(
        default=60.0, gt=0, json_schema_extra=_in(PROVIDER),
        description=(
            "The period the provider counts those limits over, in seconds: a minute for every provider we know. "
            "Verdict counts over this plus a 1 s margin."
        ),
    )
    batch_max_wait_ms: int = Field(
        default=5, ge=0, le=1000, json_schema_extra=_in(PROVIDER),
        description=(
            "Under load, milliseconds a worker waits once for more queued texts to fill a batch. An idle worker never "
            "waits."
        ),
    )
    cache_ttl_seconds: int = Field(
        default=86_400, ge=0, json_schema_extra=_in(PROVIDER),
        description=(
            "Seconds a provider's scores for a text are reused when the same tenant sends the same text again (same "
            "provider, model and policy version); such verdicts say `\"cached\": true`. Only scores are stored, "
            "under a SHA-256. Needs Redis. 0: off."
        ),
    )
    backtest_sync_max_verdicts: int = Field(
        default=2000, ge=0, le=1_000_000, json_schema_extra=_in(PROVIDER),
        description=(
            "A policy backtest over at most this many stored verdicts is answered at once (200); a larger one runs "
            "on a worker (202 with a job to poll at /v1/backtests/{id}). 0: always on a worker."
        ),
    )
    circuit_failure_threshold: int = Field(
        default=5, gt=0, json_schema_extra=_in(PROVIDER),
        description=(
            "Upstream outages in a row (5xx, timeouts, unreachable, garbled answers; not 429, not other 4xx) that "
            "open the circuit breaker shared by all workers: no call is made for CIRCUIT_RESET_SECONDS, then one call "
            "tries again."
        ),
    )
    circuit_reset_seconds: float = Field(
        default=30.0, gt=0, json_schema_extra=_in(PROVIDER),
        description="Seconds the circuit stays open before one call tries the provider again.",
    )
    moderation_fallback_provider: Literal["none", "local"] = Field(
        default="none", json_schema_extra=_in(PROVIDER),
        description=(
            "Who answers while the circuit is open or an upstream error outlasted its retries: `local` (the local "
            "engine; verdicts say provider `local` and `\"degraded\": true`) or `none`."
        ),
    )
    moderation_failure_mode: Literal["fail", "review", "block", "allow"] = Field(
        default="fail", json_schema_extra=_in(PROVIDER),
        description=(
            "When no provider can answer at all: `fail` the submission (with the upstream's error code), or record a "
            "degraded verdict from provider `failsafe`: `review` or `block` (fail closed), `allow` (fail open). "
            "Tenants may have their own (`verdict tenants configure NAME --failure-mode`). The synchronous "
            "`/v1/moderations` answers 503 instead."
        ),
    )

    # ---- request limits
    max_request_bytes: int = Field(
        default=1024 * 1024, gt=0, json_schema_extra=_in(REQUEST_LIMITS),
        description="Largest HTTP request body, in bytes (1 MiB); a larger one is answered 413.",
    )
    max_text_chars: int = Field(
        default=32_768, gt=0, json_schema_extra=_in(REQUEST_LIMITS),
        description="Longest single text, in characters.",
    )
    max_items_per_request: int = Field(
        default=100, gt=0, json_schema_extra=_in(REQUEST_LIMITS),
        description="Most submissions in one `POST /v1/submissions` (`items`).",
    )
    max_texts_per_submission: int = Field(
        default=32, gt=0, json_schema_extra=_in(REQUEST_LIMITS),
        description="Most texts in one submission's `input` list, and in one `/v1/moderations` request.",
    )
    max_metadata_bytes: int = Field(
        default=4096, gt=0, json_schema_extra=_in(REQUEST_LIMITS),
        description=(
            "Largest `metadata` object, in bytes of compact JSON (it may also be nested at most 5 levels deep)."
        ),
    )
    # issue 17 (sec): a long-poll holds a request thread, so open ones are bounded; past a bound the current state is
    # answered at once, with `Verdict-Wait: refused` (docs/api.md, "Long-polling").
    long_poll_max_per_process: int | None = Field(
        default=None, ge=0, json_schema_extra=_in(REQUEST_LIMITS),
        description=(
            "Most `GET /v1/submissions/{id}?wait=` requests one API process holds open at once. Empty: half its "
            "threads (`verdict api --threads`, 8 by default: 4), so the other half always serves everything else, "
            "`/healthz` included; 4 under a server that does not say its threads. `verdict api` refuses a value that "
            "is not below `--threads`. 0: no request waits."
        ),
    )
    long_poll_max_per_key: int = Field(
        default=2, ge=0, json_schema_extra=_in(REQUEST_LIMITS),
        description=(
            "Most long-polls one API key holds open at once, across every API process when Redis is configured "
            "(REDIS_URL or RATE_LIMIT_STORAGE_URL), else in each process."
        ),
    )
    long_poll_max_per_tenant: int = Field(
        default=4, ge=0, json_schema_extra=_in(REQUEST_LIMITS),
        description="Most long-polls all of one tenant's keys hold open at once, counted as LONG_POLL_MAX_PER_KEY is.",
    )

    # ---- per-key rate limits and idempotency
    rate_limit_rpm: int = Field(
        default=600, gt=0, json_schema_extra=_in(KEY_LIMITS),
        description=(
            "Requests per minute for each API key, in a sliding one-minute window; a request over it gets 429 with "
            "Retry-After. A tenant may have its own (`verdict tenants configure NAME --rate-limit-rpm N`), and a key "
            "its own, no higher than its tenant's (`rate_limit_rpm` in `POST /v1/keys`)."
        ),
    )
    rate_limit_tpm: int = Field(
        default=1_000_000, gt=0, json_schema_extra=_in(KEY_LIMITS),
        description=(
            "Tokens per minute for each API key, counted over the texts of `POST /v1/submissions`, `/v1/moderations` "
            "and `/v1/moderate` (one token per 4 characters, at least one per text). Tenants and keys may have their "
            "own, as for RATE_LIMIT_RPM (`--rate-limit-tpm`, `rate_limit_tpm`)."
        ),
    )
    rate_limit_storage_url: str = Field(
        default="", json_schema_extra=_in(KEY_LIMITS, accepts="a Redis URL, or `memory://`"),
        description=(
            "Where the per-key windows are kept, when not in REDIS_URL: another Redis (every API process shares it), "
            "or `memory://` (each process counts alone). Empty: REDIS_URL, else a Redis BROKER_URL, else the API "
            "process's memory, which is right only for one process, such as the embedded default's."
        ),
    )
    idempotency_ttl_seconds: int = Field(
        default=86_400, gt=0, json_schema_extra=_in(KEY_LIMITS),
        description=(
            "Seconds a response to a POST sent with an `Idempotency-Key` is kept and replayed to retries (24 h)."
        ),
    )
    # issue 11 (rel): a claim that no live request holds stops blocking retries after this long.
    idempotency_claim_lease_seconds: int = Field(
        default=60, gt=0, json_schema_extra=_in(KEY_LIMITS),
        description=(
            "Seconds a request holds its `Idempotency-Key` while it runs: if the API process dies mid-request, a "
            "retry with the key gets 409 for at most this long, then runs. Keep it above the slowest keyed POST."
        ),
    )

    # issue 11 item 5 / issue 17 item 2 (rel): failed authentication is throttled and summarised.
    auth_failures_per_minute: int = Field(
        default=30, gt=0, json_schema_extra=_in(KEY_LIMITS),
        description=(
            "Failed authentications allowed per minute from one client address, and for one key id, in a sliding "
            "window; past it a failing request gets 429 with Retry-After instead of 401. A valid key is never "
            "refused for others' failures. The client address is the connection's, or behind reverse proxies the "
            "one TRUSTED_PROXY_COUNT says."
        ),
    )
    trusted_proxy_count: int = Field(
        default=0, ge=0, le=5, json_schema_extra=_in(KEY_LIMITS),
        description=(
            "How many reverse proxies in front of the API append to X-Forwarded-For (and set X-Forwarded-Proto). "
            "With 0, the default, those headers are ignored and the client address is the connection's, so a "
            "client cannot choose its own; behind one proxy (a load balancer, nginx) set 1, or every client shares "
            "the proxy's address in the failed-auth throttle and the audit trail. Never set it higher than the "
            "proxies there really are: the extra hop would let clients forge their address."
        ),
    )
    api_key_cache_seconds: float = Field(
        default=5, ge=0, le=60, json_schema_extra=_in(KEY_LIMITS),
        description=(
            "How long an API process trusts a key it has checked against the database: within this many seconds a "
            "key revoked (or deleted) elsewhere is refused by every API process, and a change to its or its tenant's "
            "limits or defaults reaches them (the process that revokes a key refuses it at once; expiry is always "
            "exact). Meanwhile a request with that key reads nothing from the database to authenticate. 0: every "
            "request reads its key."
        ),
    )
    auth_failure_window_seconds: int = Field(
        default=60, ge=10, json_schema_extra=_in(KEY_LIMITS),
        description=(
            "Repeated failed authentications are audited as one `auth.failed` event per window of this many seconds "
            "and key id (or client address, when the key id names no key): the window's first failure at once, and "
            "when more followed, one summary with their count and first and last time after the window closes."
        ),
    )

    # ---- processing, retries and recovery
    processing_lease_seconds: int = Field(
        default=120, gt=0, json_schema_extra=_in(PROCESSING),
        description=(
            "How long a worker's claim on a submission lasts before another worker may take it over (at least 10). A "
            "task is killed 5 s before its lease ends, so two workers never moderate one submission at once."
        ),
    )
    requeue_after_seconds: int = Field(
        default=60, gt=0, json_schema_extra=_in(PROCESSING),
        description=(
            "A queued submission that no worker has picked up by then is sent again if its message never reached "
            "the broker (a publish that failed); see REDISPATCH_AFTER_SECONDS for one the broker took."
        ),
    )
    # issue 11 item 2 (rel): a healthy backlog is not re-sent.
    redispatch_after_seconds: int = Field(
        default=600, gt=0, json_schema_extra=_in(PROCESSING),
        description=(
            "A queued submission whose message the broker accepted is sent again only after this long (at least "
            "REQUEUE_AFTER_SECONDS): it covers a broker that lost its messages (a Redis restarted without "
            "persistence), while a backlog merely waiting in a healthy queue is left alone. One whose message was "
            "never accepted (the broker was down) is sent again after REQUEUE_AFTER_SECONDS."
        ),
    )
    doorbell_ttl_ms: int = Field(
        default=2000, ge=0, le=60_000, json_schema_extra=_in(PROCESSING),
        description=(
            "With a Redis broker, new submissions ring a doorbell (one message that says \"claim what is queued\", "
            "sent only when none is pending) instead of sending a message each. A doorbell counts as pending for at "
            "most this long: a doorbell message that was lost holds up new submissions no longer than this (the next "
            "submission rings again; with none, the sweep sends them after REDISPATCH_AFTER_SECONDS). 0: no doorbell, "
            "one message per submission as with any other broker."
        ),
    )
    sweep_interval_seconds: float = Field(
        default=30.0, gt=0, json_schema_extra=_in(PROCESSING),
        description="Seconds between beat's sweeps for such submissions and for claims whose lease ran out.",
    )
    broker_visibility_timeout: int = Field(
        default=900, gt=0, json_schema_extra=_in(PROCESSING),
        description=(
            "Seconds after which a Redis broker redelivers a message that was not acknowledged. No retry delay may "
            "reach it."
        ),
    )
    moderation_max_retries: int = Field(
        default=5, ge=0, json_schema_extra=_in(PROCESSING),
        description=(
            "Retries after a transient upstream error (429, 5xx, timeout, unreachable, garbled answer) before the "
            "fallback or the failure mode decides. Waiting for the upstream budget does not count as a try."
        ),
    )
    moderation_retry_backoff_max: int = Field(
        default=300, gt=0, json_schema_extra=_in(PROCESSING),
        description="Cap on one retry's delay, in seconds; must be below BROKER_VISIBILITY_TIMEOUT.",
    )

    # ---- webhooks
    webhook_allowed_networks: str = Field(
        default="", json_schema_extra=_in(WEBHOOKS, accepts="comma-separated CIDRs"),
        description=(
            "Networks webhooks may reach although they are not public (loopback, private, link-local, ...), e.g. "
            "`10.20.0.0/16` for receivers on your own network. Empty: public addresses only; any other URL is refused "
            "at registration and again before each attempt."
        ),
    )
    # issue 17 (sec): public hosts on the web's ports only, so a tenant cannot probe third parties' ports through us.
    webhook_allowed_ports: str = Field(
        default="80,443", json_schema_extra=_in(WEBHOOKS, accepts="comma-separated ports, or `*`"),
        description=(
            "Ports webhook and callback URLs may use on a public host; any other is refused at registration and again "
            "before each attempt (`unsafe_port`). Addresses in WEBHOOK_ALLOWED_NETWORKS may use any port. `*`: any "
            "port anywhere (a tenant could then probe which ports of a public host answer)."
        ),
    )
    callback_resolve_timeout_seconds: float = Field(
        default=5.0, gt=0, le=60, json_schema_extra=_in(WEBHOOKS),
        description=(
            "Most time one `POST /v1/submissions` spends looking up the hosts of its `callback_url`s, in all: each "
            "distinct host once, several at a time. A host not resolved by then refuses the request "
            "(400 `unresolvable_host`)."
        ),
    )
    webhook_retry_schedule: str = Field(
        default="5,300,1800,7200,18000,36000", json_schema_extra=_in(WEBHOOKS, accepts="comma-separated seconds"),
        description=(
            "Seconds before each retry of a failed delivery (at most 20 retries, each below 10 days; the default's "
            "seven attempts span about 18 hours); after the last, the delivery is dead."
        ),
    )
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, json_schema_extra=_in(WEBHOOKS),
        description="Timeout of one delivery attempt, in seconds, for connecting and again for reading.",
    )
    # issue 15 item 2: a verdict's webhooks are sent by the moderation task itself, saving a queue message per text.
    webhook_inline_seconds: float = Field(
        default=1.0, ge=0, json_schema_extra=_in(WEBHOOKS),
        description=(
            "The moderation worker sends a verdict's webhooks itself (8 at a time) right after the verdict "
            "commits, waiting at most this long (and at most WEBHOOK_TIMEOUT_SECONDS) for each step of an attempt; a "
            "receiver that has not answered by then gets the delivery from the `webhooks` queue instead, with the "
            "full timeout, and the worker sends it nothing inline for a minute. 0: every delivery goes through the "
            "`webhooks` queue (moderation workers never wait on a receiver)."
        ),
    )
    webhook_lease_seconds: int = Field(
        default=60, gt=0, json_schema_extra=_in(WEBHOOKS),
        description=(
            "A worker's claim on a delivery, in seconds (at least 2 x WEBHOOK_TIMEOUT_SECONDS + 10). The delivery "
            "task is killed 5 s before it ends, and only then may another worker retry it, so no delivery is sent "
            "twice at once."
        ),
    )
    # issue 11 item 6 (rel): signing secrets are stored encrypted (app/secrets_at_rest.py).
    webhook_secret_keys: SecretStr | None = Field(
        default=None, json_schema_extra=_in(WEBHOOKS, accepts="comma-separated Fernet keys"),
        description=(
            "Keys that encrypt webhook signing secrets at rest (`verdict webhooks new-encryption-key` makes one): the "
            "first encrypts, every one decrypts, so a new key goes first and the old one stays until "
            "`verdict webhooks rotate-encryption` has re-encrypted every secret. Every API and worker process needs "
            "the same list. Empty: a key made once in $VAR_DIR/webhook-secret.key (right for the embedded default "
            "and a single host)."
        ),
    )
    webhook_sweep_interval_seconds: float = Field(
        default=5.0, gt=0, json_schema_extra=_in(WEBHOOKS),
        description="Seconds between beat's sweeps: due retries, and deliveries whose task was lost, are sent again.",
    )
    webhook_secret_grace_seconds: int = Field(
        default=86_400, ge=0, json_schema_extra=_in(WEBHOOKS),
        description=(
            "After a secret is rotated, the old one keeps signing beside the new one for this many seconds. 0: it "
            "stops at once."
        ),
    )

    # ---- compliance: retention and masking
    content_retention_days: int = Field(
        default=30, ge=0, json_schema_extra=_in(COMPLIANCE),
        description=(
            "Days submitted content is kept; then the retention job erases it (texts, metadata, per-text results) and "
            "keeps a tombstone and every audit event. 0 keeps content forever. A tenant may have its own: `verdict "
            "tenants configure NAME --retention-days N` (0: forever, `default`: follow this setting)."
        ),
    )
    retention_sweep_interval_seconds: float = Field(
        default=3600.0, gt=0, json_schema_extra=_in(COMPLIANCE),
        description="Seconds between beat's retention sweeps (the same interval purges expired idempotency keys).",
    )
    mask_by_default: bool = Field(
        default=False, json_schema_extra=_in(COMPLIANCE),
        description=(
            "Mask personal data (e-mail, phone, card, IP, IBAN, SSN) in submissions that neither set `mask` nor "
            "belong to a tenant with its own default (`verdict tenants configure NAME --mask-by-default "
            "on|off|default`)."
        ),
    )
    mask_phone_regions: str = Field(
        default="US", json_schema_extra=_in(COMPLIANCE, accepts="comma-separated ISO 3166 region codes"),
        description=(
            "Regions whose national phone numbers masking recognises; numbers written with a +country code are "
            "recognised whatever this says."
        ),
    )

    # ---- metrics
    metrics_token: SecretStr | None = Field(
        default=None, json_schema_extra=_in(METRICS),
        description=(
            "When set, `GET /metrics` answers only a request with `Authorization: Bearer <this token>` (401 "
            "otherwise); Prometheus sends it with `authorization: {credentials: ...}`. Empty: /metrics is open, like "
            "/healthz: keep it off the public network then."
        ),
    )
    metrics_dir: Path | None = Field(
        default=None, json_schema_extra=_in(METRICS),
        description=(
            "Where the processes of `verdict api`, `verdict worker` and `verdict dev` keep their counters "
            "(prometheus-client's multiprocess files, in `api/` and `worker/` beneath it; each is emptied when its "
            "process kind starts). /metrics adds up every process kind found here, so a worker on the same host is "
            "counted by the API's scrape. Empty: $VAR_DIR/metrics. Two `verdict worker` on one host need a directory "
            "each."
        ),
    )
    metrics_tenant_labels: bool = Field(
        default=False, json_schema_extra=_in(METRICS),
        description=(
            "Label submissions, verdicts and audit events with the tenant's id (and show each chain's last audit "
            "sequence). Off: the `tenant` label is empty, so a deployment with many tenants keeps few series."
        ),
    )
    worker_metrics_port: int | None = Field(
        default=None, ge=1, le=65535, json_schema_extra=_in(METRICS),
        description=(
            "Port on which `verdict worker` serves its own processes' counters (`/metrics`, no token) for Prometheus "
            "to scrape a worker on another host or container (`verdict worker --metrics-port N` sets it). Empty: "
            "none; a worker on the API's host is counted by the API's /metrics through METRICS_DIR."
        ),
    )

    # ---- human review and the console
    review_claim_seconds: int = Field(
        default=600, ge=10, le=86_400, json_schema_extra=_in(REVIEW),
        description=(
            "Seconds a reviewer's claim on a review item lasts (claim, claim-next, extend); then the item is back in "
            "the queue for anyone, and the reviewer's decision is refused until they claim it again."
        ),
    )
    console_session_seconds: int = Field(
        default=28_800, ge=60, le=30 * 86_400, json_schema_extra=_in(REVIEW),
        description="Seconds a console sign-in lasts; then the reviewer signs in again with their key.",
    )
    console_cookie_secure: bool = Field(
        default=False, json_schema_extra=_in(REVIEW),
        description=(
            "Mark the console's session cookie `Secure` (sent over HTTPS only) even when the request reached Verdict "
            "over plain HTTP, as it does behind a TLS-terminating proxy. Set it true in production; requests that "
            "arrive over HTTPS get a Secure cookie anyway."
        ),
    )

    # ---- workers and logging
    worker_concurrency: int = Field(
        default=2, gt=0, json_schema_extra=_in(RUNTIME),
        description="Tasks one `verdict worker` runs at once (its pool processes; `verdict dev` runs at most 2).",
    )
    log_level: str = Field(
        default="INFO", json_schema_extra=_in(RUNTIME, accepts="`DEBUG`, `INFO`, `WARNING` or `ERROR`"),
        description="The least severe log lines written.",
    )
    log_format: Literal["json", "console"] = Field(
        default="json", json_schema_extra=_in(RUNTIME),
        description="`json`: one JSON object per line, for log shippers; `console`: readable lines, for a terminal.",
    )

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        # The embedded default keeps everything in files under VAR_DIR, so a laptop needs no server.
        var = self.var_dir.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{var / 'verdict.db'}"
        if not self.broker_url:
            # One Redis is enough: REDIS_URL is the broker too, unless BROKER_URL says otherwise.
            self.broker_url = self.redis_url or f"sqla+sqlite:///{var / 'broker.db'}"
        # A task still running when its lease ends could be taken over by a second worker; the hard time limit
        # (lease minus a margin) makes sure the first one is gone by then.
        if self.processing_lease_seconds < 10:
            raise ValueError("PROCESSING_LEASE_SECONDS must be at least 10")
        if self.redispatch_after_seconds < self.requeue_after_seconds:
            raise ValueError("REDISPATCH_AFTER_SECONDS must be at least REQUEUE_AFTER_SECONDS")
        if self.moderation_retry_backoff_max >= self.broker_visibility_timeout:
            raise ValueError("MODERATION_RETRY_BACKOFF_MAX must be below BROKER_VISIBILITY_TIMEOUT")
        return self

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _check_networks(cls, value: str) -> str:
        _parse_networks(value)
        return value

    @field_validator("webhook_allowed_ports")
    @classmethod
    def _check_ports(cls, value: str) -> str:
        _parse_ports(value)
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

    @field_validator("webhook_secret_keys")
    @classmethod
    def _check_secret_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _parse_fernet_keys(value.get_secret_value())
        return value

    @property
    def webhook_secret_key_list(self) -> list[bytes]:
        """WEBHOOK_SECRET_KEYS as Fernet keys, first the one that encrypts; empty when unset."""
        if self.webhook_secret_keys is None:
            return []
        return _parse_fernet_keys(self.webhook_secret_keys.get_secret_value())

    @property
    def webhook_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return _parse_networks(self.webhook_allowed_networks)

    @property
    def webhook_ports(self) -> frozenset[int] | None:
        """The ports a public host may be reached on; None: any."""
        return _parse_ports(self.webhook_allowed_ports)

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
        """Where the per-key rate-limit windows live: RATE_LIMIT_STORAGE_URL, else the shared Redis, else memory."""
        return self.rate_limit_storage_url or self.shared_redis_url or "memory://"

    @property
    def metrics_directory(self) -> Path:
        return (self.metrics_dir or self.var_dir / "metrics").resolve()

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
        """The Redis workers share (upstream budget, circuit breaker, cache): REDIS_URL, else a Redis broker."""
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


def _parse_ports(value: str) -> frozenset[int] | None:
    if value.strip() == "*":
        return None
    ports = set()
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        if not part.isdigit() or not 0 < int(part) < 65536:
            raise ValueError(f"WEBHOOK_ALLOWED_PORTS must list ports from 1 to 65535, or be `*`; not {part!r}")
        ports.add(int(part))
    return frozenset(ports)


def _parse_fernet_keys(value: str) -> list[bytes]:
    import base64
    import binascii

    keys = [part.strip().encode() for part in value.split(",") if part.strip()]
    if not keys:
        raise ValueError("WEBHOOK_SECRET_KEYS must list at least one key")
    for number, key in enumerate(keys, start=1):
        try:
            valid = len(base64.urlsafe_b64decode(key)) == 32
        except (binascii.Error, ValueError):
            valid = False
        if not valid:
            # Never the key itself in the message: it is a secret.
            raise ValueError(f"WEBHOOK_SECRET_KEYS: key {number} is not a Fernet key (32 url-safe base64 bytes)")
    return keys


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


# ---- the reference: `.env.example` and docs/configuration.md, generated from the fields above ---------------------

REGENERATE = "make settings-docs"
_WIDTH = 118

_ENV_HEADER = f"""\
# Verdict's settings. Copy to .env (never commit .env) and uncomment what you change; each line shows the default.
# Generated from app/config.py by `{REGENERATE}`: change a description there, then regenerate; never edit here.
# With nothing set, Verdict runs on the embedded default: SQLite files under VAR_DIR, a broker on SQLite, the local
# moderation engine, no server to install. Environment variables win over .env; an empty value means the default.
# In docker-compose.yml, DATABASE_URL and REDIS_URL are set by compose. The reference: docs/configuration.md.
"""

_ENV_FOOTER = f"""\
{"# --- Tests only ".ljust(_WIDTH, "-")}
# TEST_DATABASE_URL, TEST_REDIS_URL and FUZZ_MAX_EXAMPLES are read from the shell (or CI), not from .env:
# docs/testing.md.
"""

_MARKDOWN_HEADER = f"""\
# Configuration

<!-- Generated from app/config.py by `{REGENERATE}` (`verdict settings --format markdown`). Do not edit this
file: change a setting's description in app/config.py and regenerate; a test fails until you do. -->

Every setting is an environment variable, or a line in a `.env` file in the working directory
([`.env.example`](../.env.example) lists them all, commented out, with their defaults). Environment variables win
over `.env`; names are not case-sensitive; an empty value means the default. A value that is out of range, or a
combination that would let work be lost or run twice (a retry delay reaching the broker's visibility timeout, a lease
too short for its task's timeouts), stops Verdict at start with an error that names the setting.
`verdict settings` prints this reference (`--format env` as `.env.example`, `--format markdown` as this page), so an
installed copy or a container carries it too.

Tenants override some of these for themselves with `verdict tenants configure` (retention, masking, rate limits,
failure mode: [operations.md](operations.md#the-cli)); keys may have their own rate limits (`POST /v1/keys`,
[api.md](api.md#rate-limits)). The variables that only the test suite reads are in [testing.md](testing.md).
"""


@dataclass(frozen=True)
class SettingDoc:
    """One setting as the reference shows it."""

    name: str  # the environment variable
    section: str
    default: str  # as an environment value; "" when the default is empty
    accepts: str
    description: str


def settings_reference() -> list[SettingDoc]:
    """Every setting, section by section in SECTIONS order, and within a section in the order of the fields."""
    documented: list[SettingDoc] = []
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        section, accepts = extra.get("section"), extra.get("accepts")
        if not isinstance(section, str) or section not in SECTIONS or not field.description:
            raise ValueError(f"Settings.{name} needs a description and a section, one of: {', '.join(SECTIONS)}")
        documented.append(SettingDoc(name=name.upper(), section=section, default=_env_value(field.default),
                                     accepts=accepts if isinstance(accepts, str) else _accepts(field),
                                     description=" ".join(field.description.split())))
    order = list(SECTIONS)
    return sorted(documented, key=lambda doc: order.index(doc.section))


def env_reference() -> str:
    """`.env.example`: every setting with its description, commented out at its default."""
    lines = [_ENV_HEADER]
    for section, settings in _by_section():
        lines.append(f"# --- {section} ".ljust(_WIDTH, "-"))
        lines.extend(_comment(SECTIONS[section]))
        for doc in settings:
            lines.append("")
            lines.extend(_comment(f"{doc.description} Accepts: {doc.accepts}."))
            lines.append(f"# {doc.name}={doc.default}")
        lines.append("")
    lines.append(_ENV_FOOTER)
    return "\n".join(lines)


def markdown_reference() -> str:
    """docs/configuration.md: a table per section."""
    parts = [_MARKDOWN_HEADER]
    for section, settings in _by_section():
        parts.append(f"## {section}\n")
        if SECTIONS[section]:
            # The intro names a doc as a path (right in .env.example); here it is a link beside it.
            parts.append(re.sub(r"docs/([a-z]+\.md)", r"[\1](\1)", SECTIONS[section]) + "\n")
        rows = ["| setting | default | accepts | what it does |", "|---|---|---|---|"]
        rows += [f"| `{doc.name}` | {f'`{doc.default}`' if doc.default else 'empty'} | {_cell(doc.accepts)} | "
                 f"{_cell(doc.description)} |" for doc in settings]
        parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


def _by_section() -> list[tuple[str, list[SettingDoc]]]:
    documented = settings_reference()
    return [(section, [d for d in documented if d.section == section]) for section in SECTIONS
            if any(d.section == section for d in documented)]


def _comment(text: str) -> list[str]:
    return [f"# {line}" for line in textwrap.wrap(text, _WIDTH - 2, break_on_hyphens=False)] if text else []


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _env_value(default: Any) -> str:
    if default is None:
        return ""
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def _accepts(field: FieldInfo) -> str:
    """What a field's type and constraints allow, in words."""
    annotation, optional = field.annotation, False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional, annotation = len(members) < len(typing.get_args(annotation)), members[0]
    if typing.get_origin(annotation) is Literal:
        choices = [f"`{choice}`" for choice in typing.get_args(annotation)]
        text = f"{', '.join(choices[:-1])} or {choices[-1]}"
    elif annotation is bool:
        text = "`true` or `false`"
    elif annotation in (int, float):
        text = f"{'an integer' if annotation is int else 'a number'}{_bounds(field)}"
    elif annotation is SecretStr:
        text = "text (a secret)"
    elif annotation is Path:
        text = "a path"
    else:
        text = "text"
    return f"{text}, or empty" if optional else text


def _bounds(field: FieldInfo) -> str:
    """A number's constraints in words (wrapping never splits them from their number)."""
    # pydantic keeps Field(gt=..., ge=..., le=...) as annotated-types constraints, one attribute each.
    found = {name: getattr(rule, name) for rule in field.metadata for name in ("gt", "ge", "le") if hasattr(rule, name)}
    if "ge" in found and "le" in found:
        return f" from {_env_value(found['ge'])} to {_env_value(found['le'])}"
    if "gt" in found:
        return f" above {_env_value(found['gt'])}"
    if "ge" in found:
        return f", {_env_value(found['ge'])} or more"
    return ""
