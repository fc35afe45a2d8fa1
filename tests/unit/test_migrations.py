"""The Alembic history is one line: a second head (two revisions written side by side on one parent) makes
`alembic upgrade head` refuse to run in production, so it must fail here first."""

from __future__ import annotations

from alembic.script import ScriptDirectory

from app.cli import _alembic_config
from app.config import Settings


def test_the_migration_history_has_exactly_one_head() -> None:
    script = ScriptDirectory.from_config(_alembic_config(Settings(_env_file=None)))  # type: ignore[call-arg]
    heads = script.get_heads()
    assert len(heads) == 1, f"several heads {heads}: give one of them the other as down_revision"
    # Every revision reaches the first one: nothing dangles off the line.
    assert [r.down_revision for r in script.walk_revisions()][-1] is None
