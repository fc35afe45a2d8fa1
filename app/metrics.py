"""Every Prometheus metric Verdict exposes, defined here and only here, and how `GET /metrics` gathers them.

Counters and histograms are counted where things happen (the request hooks, the use cases, the provider, the webhook
sender) and, in a process started by `verdict api`, `verdict worker` or `verdict dev`, kept in prometheus-client's
multiprocess files under METRICS_DIR, so every gunicorn process and every Celery pool process is counted. The gauges
that describe the deployment (queue depth, oldest queued age, webhook backlog, circuit state, upstream budget) are
read when /metrics is scraped, from the database and Redis (app/use_cases/status.py), so they are true whichever
process answers. Labels never carry text, keys or unbounded values; `tenant` is empty unless METRICS_TENANT_LABELS
is on. docs/operations.md ("Metrics") lists them with what each one means.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy import event
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from app.use_cases.status import DeploymentStatus

# prometheus-client's own variable: where the multiprocess files are (`verdict api|worker|dev` set it, app/cli.py).
# Every metric below has labels, so none creates its value (and picks in-memory or multiprocess) at import.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The text format prometheus-client writes (`generate_latest`), version 0.0.4: what every Prometheus scrapes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Submit to verdict includes time queued: up to minutes when the upstream is slow or rate-limited.
_PIPELINE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# ---- HTTP -----------------------------------------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "verdict_http_requests", "HTTP requests answered, by method, route pattern and status.",
    ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "verdict_http_request_duration_seconds", "Time to answer an HTTP request, by method, route pattern and status.",
    ["method", "route", "status"], buckets=_LATENCY_BUCKETS)

# ---- submissions and verdicts -----------------------------------------------------------------------------------
SUBMISSIONS = Counter(
    "verdict_submissions_received", "Submissions stored, by role (input or output) and source (async or sync).",
    ["role", "source", "tenant"])
VERDICTS = Counter(
    "verdict_verdicts", "Verdicts recorded, by decision, provider, cached and degraded.",
    ["decision", "provider", "cached", "degraded", "tenant"])
SUBMIT_TO_VERDICT = Histogram(
    "verdict_submit_to_verdict_seconds", "From a submission stored to its verdict recorded, queueing included.",
    ["source"], buckets=_PIPELINE_BUCKETS)
MODERATION_FAILURES = Counter(
    "verdict_moderation_failures", "Submissions failed (no verdict), by error code.", ["code"])
MODERATION_RETRIES = Counter(
    "verdict_moderation_retries", "Provider answers tried again, by error code and source: a queued submission given "
    "back to the queue (async), or a synchronous call asked again in place (sync).", ["code", "source"])

# ---- the upstream provider --------------------------------------------------------------------------------------
UPSTREAM_CALLS = Counter(
    "verdict_upstream_requests", "Calls made to the upstream provider, by outcome (ok, rate_limited, server_error, "
    "timeout, unreachable, refused, malformed).", ["outcome"])
UPSTREAM_LATENCY = Histogram(
    "verdict_upstream_request_duration_seconds", "Time of one upstream call, by outcome.", ["outcome"],
    buckets=_LATENCY_BUCKETS)
CIRCUIT_TRANSITIONS = Counter(
    "verdict_upstream_circuit_transitions", "Circuit breaker state changes, by the state entered.", ["state"])

# ---- webhooks ---------------------------------------------------------------------------------------------------
WEBHOOK_ATTEMPTS = Counter(
    "verdict_webhook_deliveries", "Webhook delivery attempts concluded, by outcome (succeeded, retry, dead, lost).",
    ["outcome"])
WEBHOOK_LATENCY = Histogram(
    "verdict_webhook_delivery_duration_seconds", "Time of one webhook delivery attempt, by outcome.", ["outcome"],
    buckets=_LATENCY_BUCKETS)

# ---- human review -----------------------------------------------------------------------------------------------
# From a `review` verdict to a person's decision: minutes to hours.
_REVIEW_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)
REVIEW_DECISIONS = Histogram(
    "verdict_review_decision_seconds", "From a review item opened to a reviewer's decision, by decision.",
    ["decision"], buckets=_REVIEW_BUCKETS)

# ---- the audit trail --------------------------------------------------------------------------------------------
AUDIT_EVENTS = Counter("verdict_audit_events", "Audit events written, by action.", ["action", "tenant"])

# The gauges read at scrape time (name: help), collected by DeploymentCollector from a status snapshot.
QUEUE_DEPTH = "verdict_queue_depth"
QUEUE_OLDEST_AGE = "verdict_queue_oldest_age_seconds"
WEBHOOK_BACKLOG = "verdict_webhook_backlog"
WEBHOOK_DEAD = "verdict_webhook_dead_deliveries"
CIRCUIT_STATE = "verdict_upstream_circuit_state"
BUDGET_LIMIT = "verdict_upstream_budget_limit"
BUDGET_REMAINING = "verdict_upstream_budget_remaining"
AUDIT_HEAD_SEQ = "verdict_audit_chain_head_seq"
REVIEW_QUEUE_DEPTH = "verdict_review_queue_depth"
REVIEW_OLDEST_PENDING_AGE = "verdict_review_oldest_pending_age_seconds"
CIRCUIT_VALUES = {"closed": 0.0, "half-open": 1.0, "open": 2.0}


class _Options:
    tenant_labels = False


_OPTIONS = _Options()


def configure(*, tenant_labels: bool) -> None:
    """Per-process options, set by `create_app` from the settings."""
    _OPTIONS.tenant_labels = tenant_labels


def tenant_label(tenant_id: str | None) -> str:
    """The `tenant` label: the tenant's id if the operator turned tenant labels on, else empty (no label)."""
    return (tenant_id or "") if _OPTIONS.tenant_labels else ""


def flag(value: bool) -> str:
    return "true" if value else "false"


# ---- counting what a transaction did, once it commits ------------------------------------------------------------
_AFTER_COMMIT = "verdict.metrics"


def after_commit(session: Session, count: Callable[[], None]) -> None:
    """Count something once the session's transaction commits (a rolled-back verdict was never recorded)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(count)


@event.listens_for(Session, "after_commit")
def _count_committed(session: Session) -> None:
    for count in session.info.pop(_AFTER_COMMIT, []):
        count()


@event.listens_for(Session, "after_transaction_end")
def _forget_rolled_back(session: Session, transaction: Any) -> None:
    if transaction.parent is None:
        session.info.pop(_AFTER_COMMIT, None)


def submissions_received(session: Session, tenant_id: str, roles: Iterable[str], source: str) -> None:
    tenant, counted = tenant_label(tenant_id), list(roles)

    def count() -> None:
        for role in counted:
            SUBMISSIONS.labels(role, source, tenant).inc()

    after_commit(session, count)


def verdict_recorded(session: Session, *, decision: str, provider: str, cached: bool, degraded: bool,
                     tenant_id: str, source: str, seconds: float) -> None:
    labels = (decision, provider, flag(cached), flag(degraded), tenant_label(tenant_id))

    def count() -> None:
        VERDICTS.labels(*labels).inc()
        SUBMIT_TO_VERDICT.labels(source).observe(max(0.0, seconds))

    after_commit(session, count)


def audit_event_written(session: Session, action: str, tenant_id: str | None) -> None:
    labels = (action, tenant_label(tenant_id))
    after_commit(session, lambda: AUDIT_EVENTS.labels(*labels).inc())


def review_decided(session: Session, *, decision: str, seconds: float) -> None:
    after_commit(session, lambda: REVIEW_DECISIONS.labels(decision).observe(max(0.0, seconds)))


def webhook_attempt_concluded(session: Session, outcome: str, latency_ms: int | None) -> None:
    def count() -> None:
        WEBHOOK_ATTEMPTS.labels(outcome).inc()
        WEBHOOK_LATENCY.labels(outcome).observe((latency_ms or 0) / 1000)

    after_commit(session, count)


# ---- multiprocess files -----------------------------------------------------------------------------------------


def metric_dirs(metrics_dir: Path) -> list[Path]:
    """The multiprocess directories one scrape reads: this process's own, and the other process kinds' under the
    same METRICS_DIR (a worker on this host), each once."""
    found: list[Path] = []
    own = os.environ.get(MULTIPROC_ENV)
    if own:
        found.append(Path(own).resolve())
    root = metrics_dir.resolve()
    if root.is_dir():
        found += [d for d in sorted(root.iterdir()) if d.is_dir() and d.resolve() not in found]
    return found


class DeploymentCollector(Collector):
    """The gauges that describe the deployment, from one status snapshot taken at scrape time."""

    def __init__(self, snapshot: Callable[[], DeploymentStatus]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not query the database

    def collect(self) -> Iterator[Metric]:
        status = self._snapshot()
        depth = GaugeMetricFamily(QUEUE_DEPTH, "Submissions waiting for a verdict, by status (queued, processing).",
                                  labels=["status"])
        depth.add_metric(["queued"], status.queue.queued)
        depth.add_metric(["processing"], status.queue.processing)
        yield depth
        yield GaugeMetricFamily(QUEUE_OLDEST_AGE, "Seconds the oldest queued submission has been due (0: none).",
                                value=status.queue.oldest_queued_age_seconds or 0.0)
        backlog = GaugeMetricFamily(WEBHOOK_BACKLOG, "Webhook deliveries not yet concluded, by status (pending, "
                                    "delivering).", labels=["status"])
        backlog.add_metric(["pending"], status.webhooks.pending)
        backlog.add_metric(["delivering"], status.webhooks.delivering)
        yield backlog
        yield GaugeMetricFamily(WEBHOOK_DEAD, "Webhook deliveries dead (retries exhausted or 410), not redelivered.",
                                value=status.webhooks.dead)
        if status.reviews is not None:
            reviews = GaugeMetricFamily(REVIEW_QUEUE_DEPTH, "Review items by status (pending, expired claims "
                                        "included; claimed; decided).", labels=["status"])
            for name, count in sorted(status.reviews.counts.items()):
                reviews.add_metric([name], count)
            yield reviews
            yield GaugeMetricFamily(REVIEW_OLDEST_PENDING_AGE, "Seconds the oldest pending review item has waited "
                                    "(0: none).", value=status.reviews.oldest_pending_age_seconds or 0.0)
        upstream = status.upstream
        if upstream.circuit is not None:
            yield GaugeMetricFamily(CIRCUIT_STATE, "The upstream circuit breaker: 0 closed, 1 half-open, 2 open.",
                                    value=CIRCUIT_VALUES.get(upstream.circuit, 2.0))
        if upstream.budget is not None:
            limit = GaugeMetricFamily(BUDGET_LIMIT, "The upstream's per-minute limit in force (configured, or learned "
                                      "from its headers), by kind (requests, tokens); absent when unlimited.",
                                      labels=["kind"])
            remaining = GaugeMetricFamily(BUDGET_REMAINING, "What is left of the upstream's per-minute limit in the "
                                          "current window, by kind (requests, tokens).", labels=["kind"])
            for kind, (cap, left) in {"requests": (upstream.budget.requests_limit, upstream.budget.requests_left),
                                      "tokens": (upstream.budget.tokens_limit, upstream.budget.tokens_left)}.items():
                if cap is not None and left is not None:
                    limit.add_metric([kind], cap)
                    remaining.add_metric([kind], left)
            yield limit
            yield remaining
        if _OPTIONS.tenant_labels:
            heads = GaugeMetricFamily(AUDIT_HEAD_SEQ, "The last sequence number of each tenant's audit chain.",
                                      labels=["tenant"])
            for head in status.audit_heads:
                heads.add_metric([head.chain_id], head.seq)
            yield heads


def scrape(metrics_dir: Path, snapshot: Callable[[], DeploymentStatus]) -> bytes:
    """The text of one scrape: every process's counters (multiprocess files, or this process's own when it keeps
    none) and the deployment gauges."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_ENV):
        registry.register(_ProcessFiles(metric_dirs(metrics_dir)))
    else:
        registry.register(_Delegate(REGISTRY))
    registry.register(DeploymentCollector(snapshot))
    return generate_latest(registry)


class _ProcessFiles(Collector):
    """Every process's counters and histograms, merged from the multiprocess files of several directories into one
    family per metric (two MultiProcessCollectors would each write the same families, which Prometheus refuses)."""

    def __init__(self, directories: list[Path]) -> None:
        self._directories = directories

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        files = [str(path) for directory in self._directories for path in sorted(directory.glob("*.db"))]
        return iter(_multiprocess.MultiProcessCollector.merge(files, accumulate=True))  # type: ignore[no-untyped-call]


class _Delegate(Collector):
    """This process's own metrics, when it keeps no multiprocess files (the in-process test app)."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        return iter(self._source.collect())


def serve_worker_metrics(port: int) -> None:
    """`verdict worker --metrics-port`: serve this worker's processes' counters (its multiprocess directory) on
    `port`, from a thread of the worker's main process."""
    registry = CollectorRegistry(auto_describe=False)
    own = os.environ.get(MULTIPROC_ENV)
    registry.register(_ProcessFiles([Path(own)]) if own else _Delegate(REGISTRY))
    start_http_server(port, registry=registry)
