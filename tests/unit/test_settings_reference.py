"""`.env.example` and docs/configuration.md are generated from the descriptions in `Settings`: a setting added,
removed, renamed, or whose default or description changed, fails here until `make settings-docs` is run."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest

from app.config import REGENERATE, SECTIONS, Settings, env_reference, markdown_reference, settings_reference

ROOT = Path(__file__).resolve().parents[2]
GENERATED = {".env.example": env_reference, "docs/configuration.md": markdown_reference}
# A commented-out setting in .env.example: `# NAME=default`.
ENV_LINE = re.compile(r"^# ([A-Z][A-Z0-9_]*)=(.*)$")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the machine running the tests."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def stale(path: str, expected: str) -> str:
    actual = (ROOT / path).read_text(encoding="utf-8") if (ROOT / path).exists() else ""
    if actual == expected:
        return ""
    diff = difflib.unified_diff(actual.splitlines(), expected.splitlines(), f"{path} (committed)",
                                f"{path} (from app/config.py)", lineterm="", n=1)
    return f"{path} is out of date with app/config.py; run `{REGENERATE}` and commit the result:\n" + "\n".join(
        list(diff)[:60])


def env_example_defaults() -> dict[str, str]:
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in map(ENV_LINE.match, text.splitlines()) if m}


def test_every_setting_has_a_description_and_a_section() -> None:
    documented = settings_reference()
    assert sorted(d.name for d in documented) == sorted(name.upper() for name in Settings.model_fields)
    for doc in documented:
        assert doc.section in SECTIONS
        assert len(doc.description) > 10, doc.name
        assert doc.accepts, doc.name


def test_env_example_names_exactly_the_settings() -> None:
    # Checked apart from the full comparison below, so an added, removed or renamed setting is named outright.
    named = set(env_example_defaults())
    fields = {name.upper() for name in Settings.model_fields}
    assert not fields - named, f"missing from .env.example (run `{REGENERATE}`): {sorted(fields - named)}"
    assert not named - fields, f"in .env.example but not a setting (run `{REGENERATE}`): {sorted(named - fields)}"


@pytest.mark.parametrize("path", sorted(GENERATED))
def test_generated_file_matches_the_settings(path: str) -> None:
    message = stale(path, GENERATED[path]())
    assert not message, message


def test_the_defaults_shown_are_the_defaults(tmp_path: Path) -> None:
    """Uncommenting every line of .env.example changes nothing: each shows its setting's true default."""
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in env_example_defaults().items()))
    from_example = Settings(_env_file=env_file)  # type: ignore[call-arg]
    assert from_example.model_dump() == Settings(_env_file=None).model_dump()  # type: ignore[call-arg]


def test_the_cli_prints_the_same_reference() -> None:
    from click.testing import CliRunner

    from app.cli import main

    runner = CliRunner()
    env = runner.invoke(main, ["settings"])
    markdown = runner.invoke(main, ["settings", "--format", "markdown"])
    assert env.exit_code == 0 and env.output == env_reference()
    assert markdown.exit_code == 0 and markdown.output == markdown_reference()


def test_a_setting_without_a_description_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    field = Settings.model_fields["log_level"]
    monkeypatch.setattr(field, "description", None)
    with pytest.raises(ValueError, match="Settings.log_level needs a description"):
        settings_reference()
