"""The security suite: the tests docs/security.md names under each OWASP API Top 10 (2023) item. Printed as pytest
node ids by `python -m tests.security_suite` (`make test PYTEST_ARGS="$(.venv/bin/python -m tests.security_suite)"`);
tests/unit/test_security_doc.py holds the page to the suite."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"
ITEMS = [f"API{n}" for n in range(1, 11)]
_NODE = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")
_HEADING = re.compile(r"^## (API\d+) ", re.MULTILINE)


def tests_by_item(text: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """Each OWASP item's section and the (file, test) pairs it names."""
    text = DOC.read_text() if text is None else text
    found: dict[str, list[tuple[str, str]]] = {}
    headings = list(_HEADING.finditer(text))
    for index, heading in enumerate(headings):
        end = headings[index + 1].start() if index + 1 < len(headings) else text.find("\n## ", heading.end())
        section = text[heading.end():end if end != -1 else len(text)]
        found[heading.group(1)] = _NODE.findall(section)
    return found


def node_ids() -> list[str]:
    return sorted({f"{path}::{name}" for pairs in tests_by_item().values() for path, name in pairs})


if __name__ == "__main__":
    print(" ".join(node_ids()))
