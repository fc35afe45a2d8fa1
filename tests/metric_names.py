"""The metric names the Grafana dashboard and the alert rules in ops/ use, for the tests that check each one exists
(tests/unit/test_ops_files.py against app/metrics.py, tests/integration/test_metrics_scrape.py against a real
scrape)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "verdict.json"
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
# Prometheus's own series, which the rules may use beside Verdict's.
PROMETHEUS_OWN = {"up"}


def metric_names_used(expressions: list[str]) -> set[str]:
    """The series names a list of PromQL expressions select: identifiers that are not functions, keywords, label
    names (in braces, or after by/on/without/ignoring) or strings."""
    words = {"sum", "max", "min", "avg", "count", "rate", "increase", "irate", "histogram_quantile", "vector", "by",
             "on", "without", "ignoring", "and", "or", "unless", "offset", "bool", "group_left", "group_right"}
    names: set[str] = set()
    for expression in expressions:
        text = re.sub(r'"[^"]*"', '""', expression)
        text = re.sub(r"\{[^}]*\}", "", text)
        text = re.sub(r"\b(by|on|without|ignoring)\s*\([^)]*\)", "", text)
        text = re.sub(r"\[[^\]]*\]", "", text)
        names.update(word for word in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text) if word not in words)
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def rule_expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
