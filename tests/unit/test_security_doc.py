"""docs/security.md is the security suite's index (issue 17, item 8): every OWASP API Top 10 (2023) item has a section
naming at least one test, and every test it names exists, so renaming or deleting a security test fails here."""

from __future__ import annotations

import ast

from tests import security_suite as suite
from tests.security_suite import DOC, ITEMS, ROOT, node_ids


def _defined_tests(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_owasp_item_has_a_section_with_tests() -> None:
    found = suite.tests_by_item()
    assert list(found) == ITEMS, f"docs/security.md sections: {list(found)}"
    empty = [item for item, tests in found.items() if not tests]
    assert not empty, f"no test named for {empty}"


def test_every_test_the_page_names_exists() -> None:
    missing = []
    for node in node_ids():
        path, name = node.split("::")
        if not (ROOT / path).is_file() or name not in _defined_tests(path):
            missing.append(node)
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"


def test_the_checker_finds_a_missing_test() -> None:
    # The check above must be able to fail: a page naming a test nobody wrote is caught.
    text = DOC.read_text().replace("test_every_v1_route_is_keyed", "test_a_test_nobody_wrote", 1)
    names = {name for pairs in suite.tests_by_item(text).values() for _, name in pairs}
    assert "test_a_test_nobody_wrote" in names
    assert "test_a_test_nobody_wrote" not in _defined_tests("tests/integration/test_security.py")
