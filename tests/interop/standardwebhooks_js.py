"""Verifying webhooks with the JavaScript Standard Webhooks library, an implementation independent of the Python
one Verdict signs with: if both accept Verdict's signatures, Verdict follows the specification, not one library.

`make interop` (which `make test` runs) installs it from the lock file beside `verify.mjs`. Without Node.js the
check is skipped on a developer's machine and fails under CI=true, like any missing service.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.webhook_receiver import ReceivedRequest

HERE = Path(__file__).resolve().parent / "standardwebhooks-js"


def _node() -> str:
    node = shutil.which("node")
    installed = (HERE / "node_modules" / "standardwebhooks").is_dir()
    if node and installed:
        return node
    missing = "Node.js" if not node else f"the library (run `make interop`, which installs it into {HERE})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"The JavaScript Standard Webhooks check needs {missing}.", pytrace=False)
    pytest.skip(f"the JavaScript Standard Webhooks check needs {missing}")


def check_with_js(secret: str, requests: Sequence[ReceivedRequest]) -> list[dict[str, Any]]:
    """What the JavaScript library says of each request: {"ok": true, "payload": ...} or {"ok": false, "error": ...}."""
    lines = "".join(
        json.dumps({"secret": secret, "headers": r.headers, "body": r.body.decode()}) + "\n" for r in requests
    )
    done = subprocess.run([_node(), str(HERE / "verify.mjs")], input=lines, capture_output=True, text=True,  # noqa: S603
                          timeout=60, check=False)
    results: list[dict[str, Any]] = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(requests), done.stderr
    assert (done.returncode == 0) == all(r["ok"] for r in results), done.stderr
    return results


def verify_with_js(secret: str, requests: Sequence[ReceivedRequest]) -> list[Any]:
    """The payloads of `requests` as the JavaScript library verified them; fails the test if any does not verify."""
    results = check_with_js(secret, requests)
    failures = [r["error"] for r in results if not r["ok"]]
    assert not failures, f"JavaScript Standard Webhooks refused: {failures}"
    return [r["payload"] for r in results]
