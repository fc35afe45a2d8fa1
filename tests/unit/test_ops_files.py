"""The files in ops/ agree with the code and with each other (issue 16 items 2 and 3), checked without running
anything: the dashboard and the alert rules use only metrics app/metrics.py defines (a real scrape checks the same in
tests/integration/test_metrics_scrape.py), every alert has a promtool test and a section in docs/operations.md, the
Prometheus and Grafana provisioning match docker-compose.yml, and the Dockerfile installs what the README and the
Makefile install."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import Counter, Histogram

from app import metrics
from tests.metric_names import PROMETHEUS_OWN, dashboard_expressions, metric_names_used, rule_expressions

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"


def defined_series() -> set[str]:
    """Every series name app/metrics.py can expose."""
    names: set[str] = set()
    for item in vars(metrics).values():
        if isinstance(item, Counter):
            names.add(f"{item._name}_total")
        elif isinstance(item, Histogram):
            names.update(f"{item._name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
    names.update(value for key, value in vars(metrics).items()
                 if key.isupper() and isinstance(value, str) and value.startswith("verdict_"))
    return names


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(ROOT / "docker-compose.yml")
    return data


def test_the_dashboard_and_rules_use_only_defined_metrics() -> None:
    defined = defined_series()
    assert {"verdict_verdicts_total", "verdict_queue_depth", "verdict_submit_to_verdict_seconds_bucket"} <= defined
    for source, expressions in (("dashboard", dashboard_expressions()), ("rules", rule_expressions())):
        used = metric_names_used(expressions)
        assert used - defined - PROMETHEUS_OWN == set(), source


def test_the_name_extraction_sees_metrics_and_skips_labels_and_functions() -> None:
    # The check itself can fail: it finds the series of an expression, and only those.
    used = metric_names_used(['histogram_quantile(0.95, sum by (le, route) (rate(verdict_x_bucket{route="/a"}[5m])))'
                              ' / on() (sum(verdict_y_total) or vector(0)) and up{job=~"v.*"} == 0'])
    assert used == {"verdict_x_bucket", "verdict_y_total", "up"}


def test_every_dashboard_panel_is_well_formed() -> None:
    dashboard = json.loads((OPS / "grafana" / "dashboards" / "verdict.json").read_text())
    datasource = load_yaml(OPS / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"]
    graphs = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len(graphs) >= 12
    for panel in graphs:
        assert panel["title"] and panel["description"] and panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]
        assert panel["gridPos"]["x"] >= 0 and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_every_alert_has_a_test_and_a_runbook_section() -> None:
    rules = [rule for group in load_yaml(OPS / "prometheus" / "alerts.yml")["groups"] for rule in group["rules"]]
    tests = load_yaml(OPS / "prometheus" / "alerts.test.yml")
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    operations = (ROOT / "docs" / "operations.md").read_text()
    for rule in rules:
        name = rule["alert"]
        assert name in tested, f"{name} has no promtool test in alerts.test.yml"
        assert re.search(rf"^#+ {name}$", operations, re.M), f"docs/operations.md has no section {name}"
        assert rule["annotations"]["runbook"] == f"docs/operations.md#{name.lower()}"
        assert rule["labels"]["severity"] in {"warning", "critical"}


def test_prometheus_scrapes_what_compose_runs() -> None:
    config = load_yaml(OPS / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = compose()["services"]
    assert jobs["verdict-api"]["static_configs"][0]["targets"] == ["api:8000"]
    assert "--bind 0.0.0.0:8000" in " ".join(services["api"]["command"])
    worker_port = services["worker"]["command"][services["worker"]["command"].index("--metrics-port") + 1]
    sd = jobs["verdict-worker"]["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and str(sd["port"]) == worker_port
    assert config["rule_files"] == ["alerts.yml"]
    mounts = services["prometheus"]["volumes"]
    assert "./ops/prometheus:/etc/prometheus:ro" in mounts


def test_grafana_is_provisioned_with_the_dashboard() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    provider = load_yaml(OPS / "grafana" / "provisioning" / "dashboards" / "verdict.yml")["providers"][0]
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in grafana["volumes"] if volume.startswith("./"))
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./ops/grafana/dashboards"] == provider["options"]["path"]
    datasource = load_yaml(OPS / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]


def test_the_dockerfile_installs_what_the_readme_and_makefile_install() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # One Python version everywhere: the image's, the README's first requirement, pyproject's lowest.
    image = re.search(r"^FROM python:(\d+\.\d+)-slim$", dockerfile, re.M)
    assert image is not None
    assert f"Python {image.group(1)}+" in readme
    assert project["project"]["requires-python"].startswith(f">={image.group(1)}")
    # The same project installed by pip: the Makefile adds the dev tools in editable mode, the image does not.
    assert re.search(r"pip install .*-e '\.\[dev\]'", makefile)
    assert re.search(r"^RUN pip install --no-cache-dir \.$", dockerfile, re.M)
    # Everything that install and `verdict migrate` read is copied, and nothing of it is ignored.
    copied = " ".join(re.findall(r"^COPY (.+)$", dockerfile, re.M))
    packages = [name.rstrip("*") for name in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    for needed in ["pyproject.toml", project["project"]["readme"], "alembic.ini", "migrations/",
                   *(f"{package}/" for package in packages)]:
        assert needed in copied, needed
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"app", "workers", "migrations", "alembic.ini", "pyproject.toml", "README.md"} & set(ignored)
    assert re.search(r'^CMD \["verdict", "api"\]$', dockerfile, re.M)
