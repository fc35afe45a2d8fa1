"""app/metrics.py: no metric creates its value at import (so `verdict api|worker|dev` can still choose multiprocess
files after `app` imported prometheus-client), and what a transaction counts is counted only once it commits."""

from __future__ import annotations

from prometheus_client import Counter, Histogram
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from app import metrics


def test_every_metric_has_labels_so_none_has_a_value_at_import() -> None:
    defined = [item for item in vars(metrics).values() if isinstance(item, Counter | Histogram)]
    assert len(defined) >= 12
    for metric in defined:
        assert metric._labelnames, f"{metric._name} has no labels: its value would be made at import"
        assert metric._name.startswith("verdict_")


def test_counts_wait_for_the_commit() -> None:
    counted: list[str] = []
    with Session(create_engine("sqlite://")) as session:
        with session.begin():
            session.execute(text("SELECT 1"))
            metrics.after_commit(session, lambda: counted.append("rolled back"))
            session.rollback()
        with session.begin():
            session.execute(text("SELECT 1"))
            metrics.after_commit(session, lambda: counted.append("committed"))
            assert counted == []
        with session.begin():
            session.execute(text("SELECT 1"))  # a later transaction counts nothing again
    assert counted == ["committed"]


def test_tenant_labels_are_empty_unless_turned_on() -> None:
    assert metrics.tenant_label("ten_x") == ""
    metrics.configure(tenant_labels=True)
    try:
        assert metrics.tenant_label("ten_x") == "ten_x" and metrics.tenant_label(None) == ""
    finally:
        metrics.configure(tenant_labels=False)
