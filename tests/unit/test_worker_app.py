"""A worker's app serves no HTTP (issue 15 item 4): `create_app(http=False)` builds the per-process objects the tasks
use, and no routes, request hooks or console; the API's app is unchanged."""

from __future__ import annotations

from pathlib import Path

from app import create_app, extensions
from app.config import Settings


def settings(tmp_path: Path) -> Settings:
    return Settings(_env_file=None, database_url=f"sqlite:///{tmp_path}/verdict.db",  # type: ignore[call-arg]
                    broker_url=f"sqla+sqlite:///{tmp_path}/broker.db", var_dir=str(tmp_path / "var"))


def test_a_worker_app_has_the_per_process_objects_and_no_http(tmp_path: Path) -> None:
    worker = create_app(settings(tmp_path), http=False)
    for name in (extensions.SETTINGS, extensions.DATABASE, extensions.PROVIDER, extensions.CELERY):
        assert name in worker.extensions
    assert list(worker.url_map.iter_rules()) == []
    assert not worker.before_request_funcs and not worker.blueprints
    api = create_app(settings(tmp_path))
    assert any(rule.rule == "/v1/moderations" for rule in api.url_map.iter_rules())
    assert "console" in {name.split(".")[0] for name in api.blueprints}
