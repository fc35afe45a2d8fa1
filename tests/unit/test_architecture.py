"""The layering, checked on the source (docs/architecture.md): use cases never commit outside the named multi-step
commands, and never import the HTTP or queue layers; the outbox and the pure domain modules import no framework."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "app"
USE_CASES = APP / "use_cases"

# The commands that commit in several steps, each opening its transactions itself; they take a Database.
COMMANDS = {
    ("moderation", "moderate_submissions"),
    ("sync_moderation", "moderate_now"),
    ("webhook_deliveries", "deliver"),
    ("webhook_deliveries", "sweep_deliveries"),
    ("erasure", "erase_expired_content"),
    ("submissions", "await_submission"),
    ("policies", "run_backtest"),
    # Runs after another transaction committed and the broker refused its messages (app/outbox.py).
    ("moderation", "mark_undispatched"),
}
# What ends or opens a transaction: only a command may call these.
TRANSACTION_CALLS = {"commit", "rollback", "begin", "begin_nested", "transaction", "session"}
# Use cases know nothing of HTTP or of the queue: these stay on the other side.
FORBIDDEN_IN_USE_CASES = ("flask", "werkzeug", "celery", "kombu", "app.api", "app.extensions", "app.queue")
FRAMEWORKS = ("flask", "werkzeug", "celery", "kombu")


def modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def transaction_calls(function: ast.AST) -> list[str]:
    return [node.func.attr for node in ast.walk(function)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in TRANSACTION_CALLS]


def outermost_functions(path: Path) -> list[ast.FunctionDef]:
    tree = ast.parse(path.read_text())
    found: list[ast.FunctionDef] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found.append(node)
        elif isinstance(node, ast.ClassDef):
            found.extend(n for n in node.body if isinstance(n, ast.FunctionDef))
    return found


@pytest.mark.parametrize("path", modules(USE_CASES), ids=lambda p: p.stem)
def test_only_the_named_commands_open_or_end_transactions(path: Path) -> None:
    offending = [f"{fn.name}: {', '.join(calls)}" for fn in outermost_functions(path)
                 if (path.stem, fn.name) not in COMMANDS and (calls := transaction_calls(fn))]
    assert offending == [], f"{path.name}: helpers work in the caller's transaction"


def test_every_named_command_exists_takes_a_database_and_opens_its_transactions() -> None:
    for module, name in sorted(COMMANDS):
        (function,) = [fn for fn in outermost_functions(USE_CASES / f"{module}.py") if fn.name == name]
        annotations = [ast.unparse(arg.annotation) for arg in function.args.args if arg.annotation is not None]
        assert annotations[0] == "Database", f"{module}.{name} takes a Database, not a Session"
        assert transaction_calls(function), f"{module}.{name} opens its transactions where a reader sees them"


@pytest.mark.parametrize("path", modules(USE_CASES), ids=lambda p: p.stem)
def test_only_commands_take_a_database(path: Path) -> None:
    takers = [fn.name for fn in outermost_functions(path) if (path.stem, fn.name) not in COMMANDS
              and any(arg.annotation is not None and ast.unparse(arg.annotation) == "Database"
                      for arg in fn.args.args)]
    assert takers == [], f"{path.name}: a helper takes the caller's Session"


@pytest.mark.parametrize("path", modules(USE_CASES), ids=lambda p: p.stem)
def test_use_cases_import_nothing_of_http_or_the_queue(path: Path) -> None:
    bad = sorted(name for name in imported(path)
                 if any(name == f or name.startswith(f"{f}.") for f in FORBIDDEN_IN_USE_CASES))
    assert bad == []


@pytest.mark.parametrize("path", [APP / "outbox.py", APP / "db.py", APP / "audit_chain.py", APP / "models.py",
                                  *modules(APP / "schemas"), *modules(APP / "moderation"),
                                  *modules(APP / "webhooks")], ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_domain_modules_import_no_framework(path: Path) -> None:
    bad = sorted(name for name in imported(path) if any(name == f or name.startswith(f"{f}.") for f in FRAMEWORKS))
    assert bad == []


def test_the_checks_see_a_commit_in_a_helper() -> None:
    # The guard itself must be able to fail: a helper that commits is caught.
    helper = ast.parse("def helper(session):\n    session.add(1)\n    session.commit()\n").body[0]
    assert transaction_calls(helper) == ["commit"]
