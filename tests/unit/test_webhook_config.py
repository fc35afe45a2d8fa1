"""Webhook settings and Celery wiring: the retry schedule and allowed networks parse and refuse nonsense, the lease
outlives an attempt, deliveries route to their own `webhooks` queue, and a worker started without -Q consumes it."""

from __future__ import annotations

from ipaddress import ip_network
from typing import Any

import pytest
from celery import Celery
from pydantic import ValidationError

from app.config import Settings
from app.outbox import DELIVER_WEBHOOK, DISPATCH_WEBHOOKS, MODERATE_SUBMISSION
from app.queue import celery_config


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_defaults_retry_for_about_a_day_and_allow_public_addresses_only() -> None:
    defaults = settings()
    assert defaults.webhook_retry_delays == (5, 300, 1800, 7200, 18000, 36000)
    assert 15 * 3600 < sum(defaults.webhook_retry_delays) < 26 * 3600
    assert defaults.webhook_networks == ()


def test_settings_parse_comma_separated_values() -> None:
    parsed = settings(webhook_allowed_networks=" 127.0.0.0/8, ::1 ,10.1.2.3", webhook_retry_schedule="0.5, 2")
    assert parsed.webhook_networks == (ip_network("127.0.0.0/8"), ip_network("::1/128"),
                                       ip_network("10.1.2.3/32"))
    assert parsed.webhook_retry_delays == (0.5, 2.0)
    assert settings(webhook_retry_schedule="").webhook_retry_delays == ()  # no retries: dead after one failure
    assert settings().webhook_ports == frozenset({80, 443})
    assert settings(webhook_allowed_ports=" 443, 8443 ").webhook_ports == frozenset({443, 8443})
    assert settings(webhook_allowed_ports="*").webhook_ports is None


@pytest.mark.parametrize("values", [
    {"webhook_allowed_networks": "localhost"},
    {"webhook_allowed_networks": "10.0.0.0/33"},
    {"webhook_retry_schedule": "5,soon"},
    {"webhook_retry_schedule": "5,-1"},
    {"webhook_retry_schedule": "0"},
    {"webhook_retry_schedule": ",".join(["1"] * 21)},
    {"webhook_timeout_seconds": 30, "webhook_lease_seconds": 60},
    {"webhook_timeout_seconds": 0},
    {"webhook_allowed_ports": "http"},
    {"webhook_allowed_ports": "0"},
    {"webhook_allowed_ports": "65536"},
    {"webhook_allowed_ports": "443,-1"},
    {"callback_resolve_timeout_seconds": 0},
])
def test_nonsense_is_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        settings(**values)


def test_deliveries_have_their_own_queue_and_a_plain_worker_consumes_both() -> None:
    configured = settings(broker_url="memory://", webhook_lease_seconds=60, webhook_sweep_interval_seconds=2)
    config = celery_config(configured)
    app = Celery("verdict-test")
    app.config_from_object(config)
    assert app.amqp.router.route({}, DELIVER_WEBHOOK)["queue"].name == "webhooks"
    assert app.amqp.router.route({}, DISPATCH_WEBHOOKS)["queue"].name == "webhooks"
    assert app.amqp.router.route({}, MODERATE_SUBMISSION)["queue"].name == "moderation"
    # What `celery worker` without -Q consumes.
    assert set(app.amqp.queues) == {"moderation", "webhooks"}
    assert config["beat_schedule"]["dispatch-webhook-deliveries"] == {"task": DISPATCH_WEBHOOKS, "schedule": 2}
    # The task is gone before its claim's lease runs out, so no two workers send one delivery at once.
    limits = config["task_annotations"][DELIVER_WEBHOOK]
    assert limits["soft_time_limit"] < limits["time_limit"] < configured.webhook_lease_seconds
