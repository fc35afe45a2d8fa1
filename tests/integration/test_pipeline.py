"""The asynchronous pipeline end to end: in-process API → PostgreSQL → Redis → real worker process → provider."""

from __future__ import annotations

from collections.abc import Callable

from flask.testing import FlaskClient

from tests.conftest import TenantKey
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import WorkerProcess, openai_worker_env, submit, wait_final


def test_submission_completes_through_openai_compatible_provider(
    client: FlaskClient, tenant: TenantKey, fake_upstream: FakeUpstream, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(**openai_worker_env(fake_upstream))
    accepted = submit(client, tenant, {"input": ["I will kill you", "have a nice day"], "role": "output",
                                       "conversation_id": "conv-1", "turn_id": "t-2", "metadata": {"k": "v"}})
    body = wait_final(client, tenant, accepted["id"])

    assert body["status"] == "completed"
    verdict = body["verdict"]
    assert verdict["decision"] == "block"
    assert verdict["categories"]["violence"] is True
    assert verdict["category_scores"]["violence"] == 0.97
    assert verdict["provider"] == "openai"
    assert verdict["model"] == "omni-moderation-latest"
    assert verdict["not_judged"] == []
    assert [r["decision"] for r in verdict["results"]] == ["block", "allow"]
    assert body["metadata"] == {"k": "v"} and body["role"] == "output" and body["conversation_id"] == "conv-1"
    assert fake_upstream.texts_seen() == ["I will kill you", "have a nice day"]
    assert fake_upstream.requests[0].headers["authorization"] == "Bearer sk-upstream-test"


def test_submission_completes_through_local_engine(
    client: FlaskClient, tenant: TenantKey, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(MODERATION_PROVIDER="local")
    accepted = submit(client, tenant, {"input": "you are a fucking idiot"})
    body = wait_final(client, tenant, accepted["id"])

    verdict = body["verdict"]
    assert body["status"] == "completed"
    assert verdict["provider"] == "local"
    assert verdict["decision"] == "block"
    assert verdict["category_scores"]["harassment"] > 0.8
    # The local engine judges harassment only; the rest is reported as not judged, never as zero.
    assert "violence" in verdict["not_judged"] and verdict["category_scores"]["violence"] is None
    assert verdict["categories"]["violence"] is None
