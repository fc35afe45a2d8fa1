"""Issue 15: concurrent `POST /v1/submissions` of one process are committed together (app/group_commit.py): one
transaction, one INSERT, one chain-head lock per tenant and as few moderation messages as a provider call's worth
allows for every write handed in at the same moment. Each request still gets its own submissions, only once they
are committed; a write that fails fails only its own request; idempotency replays still work."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.api.transactions import submissions_committer
from app.db import Database
from app.group_commit import GroupCommitter
from app.models import AuditEvent, Submission
from app.outbox import MODERATE_SUBMISSION, Message
from app.use_cases import submissions
from app.use_cases.audit import verify_chain
from app.use_cases.submissions import PreparedSubmissions
from tests.conftest import TenantKey

THREADS = 12


class HeldGroups:
    """The committer's store, recording each group's submission ids. Once armed, the next group waits (at most
    30 s) until every other poster's write waits behind it, so that those form the following group together."""

    def __init__(self, committer: GroupCommitter[PreparedSubmissions], posters: int) -> None:
        self.committer, self.posters = committer, posters
        self.store = committer.store
        self.groups: list[list[str]] = []
        self.armed = False
        self.first_entered = threading.Event()

    def arm(self) -> None:
        self.groups.clear()
        self.first_entered.clear()
        self.armed = True

    def __call__(self, session: Session, writes: Sequence[PreparedSubmissions]) -> None:
        if self.armed:
            self.armed = False
            self.first_entered.set()
            deadline = time.monotonic() + 30
            while len(writes) + self.committer.waiting < self.posters and time.monotonic() < deadline:
                time.sleep(0.005)
        self.groups.append([i for write in writes for i in write.ids])
        self.store(session, writes)


@pytest.fixture
def held(app: Flask, monkeypatch: pytest.MonkeyPatch) -> HeldGroups:
    with app.app_context():
        committer = submissions_committer()
    holder = HeldGroups(committer, THREADS)
    monkeypatch.setattr(committer, "store", holder)
    return holder


def post_together(app: Flask, held: HeldGroups, requests: list[Callable[[FlaskClient], Any]],
                  names: list[str] | None = None) -> list[Any]:
    """The first request alone, held in its group's store; then all the others at once (one thread each)."""
    answers: list[Any] = [None] * len(requests)
    held.arm()

    def run(index: int) -> None:
        answers[index] = requests[index](app.test_client())

    threads = [threading.Thread(target=run, args=(i,), name=(names or [])[i] if names else f"poster-{i}")
               for i in range(len(requests))]
    threads[0].start()
    assert held.first_entered.wait(30)
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    return answers


def poster(tenant: TenantKey, text: str, **headers: str) -> Callable[[FlaskClient], Any]:
    return lambda http: http.post("/v1/submissions", json={"input": text, "metadata": {"text": text}},
                                  headers={**tenant.headers, **headers})


def assert_chain_whole(database: Database, tenant: TenantKey) -> None:
    with database.transaction() as session:
        seqs = list(session.scalars(select(AuditEvent.seq).where(AuditEvent.chain_id == tenant.tenant_id)
                                    .order_by(AuditEvent.seq)))
        assert seqs == list(range(1, len(seqs) + 1))
        result = verify_chain(session, tenant.tenant_id)
        assert result.ok, result.broken


def texts_stored(database: Database, tenant: TenantKey) -> dict[str, list[str]]:
    with database.transaction() as session:
        rows = session.execute(select(Submission.id, Submission.content)
                               .where(Submission.tenant_id == tenant.tenant_id))
        found: dict[str, list[str]] = {}
        for submission_id, content in rows:
            found.setdefault(content[0], []).append(submission_id)
        return found


def moderated_ids(sent: list[Message]) -> list[str]:
    return [i for message in sent if message.task == MODERATE_SUBMISSION for i in message.args]


def test_concurrent_posts_commit_together_each_getting_its_own_submission(
    app: Flask, database: Database, tenant: TenantKey, other_tenant: TenantKey, held: HeldGroups,
    sent: list[Message],
) -> None:
    # Two tenants in one group: each chain's head is locked once, each chain stays whole.
    owners = [tenant if i % 3 else other_tenant for i in range(THREADS)]
    texts = [f"group commit text {i}" for i in range(THREADS)]
    answers = post_together(app, held, [poster(owner, text) for owner, text in zip(owners, texts, strict=True)])

    assert [answer.status_code for answer in answers] == [202] * THREADS
    ids = [answer.get_json()["id"] for answer in answers]
    assert len(set(ids)) == THREADS
    # The first alone, then every other one in one group.
    assert [len(group) for group in held.groups] == [1, THREADS - 1]
    # Each answer names its own request's submission, stored once.
    stored = {**texts_stored(database, tenant), **texts_stored(database, other_tenant)}
    assert {text: stored[text] for text in texts} == {text: [i] for text, i in zip(texts, ids, strict=True)}
    for owner, answer, text in zip(owners, answers, texts, strict=True):
        read = app.test_client().get(answer.headers["Location"], headers=owner.headers)
        assert read.status_code == 200 and read.get_json()["metadata"] == {"text": text}
    # Every id in a message once; the group's ids in one message (a provider call's worth).
    assert sorted(moderated_ids(sent)) == sorted(ids)
    assert len([m for m in sent if m.task == MODERATE_SUBMISSION]) == 2
    for owner in (tenant, other_tenant):
        assert_chain_whole(database, owner)
    with database.transaction() as session:
        received = session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "submission.received", AuditEvent.subject_id.in_(ids)))
    assert received == THREADS


def test_a_write_that_fails_in_a_group_fails_only_its_own_request(
    app: Flask, client: FlaskClient, database: Database, tenant: TenantKey, held: HeldGroups, sent: list[Message],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken = client.post("/v1/submissions", json={"input": "already here"}, headers=tenant.headers).get_json()["id"]
    sent.clear()
    new_id = submissions.new_id
    # The poster on the thread named "bad" makes a submission whose id is taken: its INSERT fails, and so would the
    # group's whole transaction.
    monkeypatch.setattr(submissions, "new_id", lambda prefix: taken if threading.current_thread().name == "bad"
                        else new_id(prefix))
    names = [f"poster-{i}" for i in range(THREADS)]
    names[THREADS // 2] = "bad"
    texts = [f"failing group text {i}" for i in range(THREADS)]
    answers = post_together(app, held, [poster(tenant, text) for text in texts], names)

    statuses = [answer.status_code for answer in answers]
    assert statuses[THREADS // 2] == 500
    assert statuses[:THREADS // 2] + statuses[THREADS // 2 + 1:] == [202] * (THREADS - 1)
    # The group of the other eleven failed, then each of its writes was committed alone.
    assert [len(group) for group in held.groups] == [1, THREADS - 1] + [1] * (THREADS - 1)
    good = [answer.get_json()["id"] for answer in answers if answer.status_code == 202]
    stored = texts_stored(database, tenant)
    assert texts[THREADS // 2] not in stored
    assert sorted(i for text in texts if text in stored for i in stored[text]) == sorted(good)
    assert sorted(moderated_ids(sent)) == sorted(good)
    assert_chain_whole(database, tenant)


def test_idempotent_posts_in_a_group_keep_their_answers_and_replay_them(
    app: Flask, client: FlaskClient, database: Database, tenant: TenantKey, held: HeldGroups,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    new_id = submissions.new_id
    taken = client.post("/v1/submissions", json={"input": "taken for the idempotent group"},
                        headers=tenant.headers).get_json()["id"]
    monkeypatch.setattr(submissions, "new_id", lambda prefix: taken if threading.current_thread().name == "bad"
                        else new_id(prefix))
    keys = [f"group-key-{tenant.tenant_id}-{i}" for i in range(THREADS)]
    texts = [f"idempotent group text {i}" for i in range(THREADS)]
    names = [f"poster-{i}" for i in range(THREADS)]
    names[-1] = "bad"
    answers = post_together(app, held, [poster(tenant, text, **{"Idempotency-Key": key})
                                        for text, key in zip(texts, keys, strict=True)], names)
    assert [answer.status_code for answer in answers] == [202] * (THREADS - 1) + [500]
    assert len(held.groups) > 2  # the second group failed on the bad write, the others were kept alone

    for text, key, answer in zip(texts[:-1], keys[:-1], answers[:-1], strict=True):
        replay = poster(tenant, text, **{"Idempotency-Key": key})(client)
        assert replay.status_code == 202 and replay.headers["Idempotent-Replayed"] == "true"
        assert replay.get_json() == answer.get_json()
    # The failed request kept no answer and released its key: its retry runs, once.
    retry = poster(tenant, texts[-1], **{"Idempotency-Key": keys[-1]})(client)
    assert retry.status_code == 202 and "Idempotent-Replayed" not in retry.headers
    stored = texts_stored(database, tenant)
    assert {text: len(stored[text]) for text in texts} == dict.fromkeys(texts, 1)
    assert stored[texts[-1]] == [retry.get_json()["id"]]
    assert_chain_whole(database, tenant)


def test_a_post_alone_is_committed_at_once_in_a_group_of_one(
    client: FlaskClient, tenant: TenantKey, held: HeldGroups
) -> None:
    held.posters = 1
    answer = client.post("/v1/submissions", json={"input": "alone"}, headers=tenant.headers)
    assert answer.status_code == 202
    assert held.groups == [[answer.get_json()["id"]]]


def test_a_group_failing_as_the_database_does_when_away_answers_503_without_trying_each(
    app: Flask, tenant: TenantKey, held: HeldGroups, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def away(session: Session, writes: Sequence[PreparedSubmissions]) -> None:
        calls.append(len(writes))
        raise OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))

    held.store = away
    answers = post_together(app, held, [poster(tenant, f"away text {i}") for i in range(THREADS)])
    assert [answer.status_code for answer in answers] == [503] * THREADS
    # The first alone; the group of the others; one of them alone, which failed so too: the rest untried.
    assert calls == [1, THREADS - 1, 1]
