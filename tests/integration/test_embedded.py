"""The README's first command, `verdict dev`, on the embedded default: SQLite, kombu's SQLAlchemy broker on SQLite and
the local engine, API and worker in one command, no server to install.

The service runs as a real subprocess tree (in its own process group) with no DATABASE_URL, BROKER_URL or
MODERATION_PROVIDER in its environment. Submissions go in over HTTP and come out judged by the local engine; SIGTERM
stops everything; the logs never hold moderated text or a key.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from tests.lanes import integration_fixture

VERDICT = str(Path(sys.executable).parent / "verdict")
KEY_RE = re.compile(r"^vk_[0-9a-f]{16}_[A-Za-z0-9_-]{43}$")
START_TIMEOUT = 60.0
VERDICT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def clean_env(var: Path) -> dict[str, str]:
    """This environment without any Verdict setting (DATABASE_URL, BROKER_URL, MODERATION_PROVIDER, ...): the
    embedded default must come from none of them. Only VAR_DIR is set, to keep the files in the test's directory."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env["VAR_DIR"] = str(var)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    base_url: str
    key: str = ""
    texts: list[str] = field(default_factory=list)  # every text submitted, to look for in the logs
    stopped: bool | None = None  # once stopped: whether it stopped by itself

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "--- verdict dev log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def stop(self, timeout: float = STOP_TIMEOUT, *, leader_only: bool = False) -> bool:
        """SIGTERM the whole process group (or only `verdict dev` itself); True if everything exited by itself,
        False if something had to be SIGKILLed. Either way nothing of it is left running afterwards."""
        pgid = self.process.pid
        if self.stopped is not None:
            return self.stopped  # already stopped (by a test, then again by the fixture): the pgid may be reused
        if self.process.poll() is None and group_alive(pgid):
            if leader_only:
                self.process.send_signal(signal.SIGTERM)
            else:
                os.killpg(pgid, signal.SIGTERM)
        clean = True
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            clean = False
        # The leader gone is not enough: no worker, pool process or gunicorn worker may be left behind.
        deadline = time.monotonic() + (5 if clean else 0)
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_alive(pgid):
            clean = False
            os.killpg(pgid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(timeout=10)
        self.stopped = clean
        return clean


def run_verdict(service_env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VERDICT, *args], cwd=cwd, env=service_env, capture_output=True, text=True,  # noqa: S603
                          timeout=60)


def start_service(var: Path) -> Service:
    """`verdict dev --port PORT` in its own process group (so the test can signal all of it), logs to a file."""
    env = clean_env(var)
    port = free_port()
    log_path = var / "verdict-dev.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603
            [VERDICT, "dev", "--port", str(port)], cwd=var, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    svc = Service(process=process, env=env, cwd=var, log_path=log_path, base_url=f"http://127.0.0.1:{port}")
    try:
        _wait_healthy(svc)
        created = run_verdict(env, var, "keys", "create", "--tenant", "demo")
        assert created.returncode == 0, f"{created.stderr}\n{svc.log_tail()}"
        svc.key = created.stdout.splitlines()[-1]
        assert KEY_RE.match(svc.key), created.stdout
    except BaseException:
        svc.stop()
        raise
    return svc


@integration_fixture(scope="module", serial=True)
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = start_service(tmp_path_factory.mktemp("embedded"))
    try:
        yield svc
    finally:
        svc.stop()


def _wait_healthy(svc: Service) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with httpx.Client(base_url=svc.base_url, timeout=2) as client:
        while time.monotonic() < deadline:
            if svc.process.poll() is not None:
                pytest.fail(f"verdict dev exited with {svc.process.returncode}\n{svc.log_tail()}")
            try:
                if client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
    pytest.fail(f"verdict dev not healthy after {START_TIMEOUT:.0f}s\n{svc.log_tail()}")


def _wait_ready(svc: Service) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with svc.client() as client:
        while client.get("/readyz").status_code != 200:
            if time.monotonic() > deadline:
                pytest.fail(f"verdict dev not ready after {START_TIMEOUT:.0f}s\n{svc.log_tail()}")
            time.sleep(0.25)


def submit(svc: Service, client: httpx.Client, body: dict[str, Any]) -> Any:
    texts = [item["input"] for item in body.get("items", [body])]
    svc.texts.extend(t for group in texts for t in ([group] if isinstance(group, str) else group))
    response = client.post("/v1/submissions", json=body)
    assert response.status_code == 202, f"{response.text}\n{svc.log_tail()}"
    return response.json()


def wait_completed(svc: Service, client: httpx.Client, submission_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + VERDICT_TIMEOUT
    while True:
        response = client.get(f"/v1/submissions/{submission_id}", params={"wait": 5})
        assert response.status_code == 200, f"{response.text}\n{svc.log_tail()}"
        body: dict[str, Any] = response.json()
        if body["status"] in {"completed", "failed"}:
            assert body["status"] == "completed", f"{body}\n{svc.log_tail()}"
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"{submission_id} still {body['status']} after {VERDICT_TIMEOUT:.0f}s\n{svc.log_tail()}")


def test_embedded_default_is_in_use(service: Service) -> None:
    # /healthz answers before the worker has opened the broker; /readyz checks the broker, so wait for it first.
    _wait_ready(service)
    assert (service.cwd / "verdict.db").is_file(), service.log_tail()
    # broker.db appears on the broker's first real connection (kombu connects lazily), which on a loaded machine can
    # come after /readyz answers (seen once in a full run beside two other suites).
    deadline = time.monotonic() + START_TIMEOUT
    while not (service.cwd / "broker.db").is_file() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert (service.cwd / "broker.db").is_file(), service.log_tail()
    log = service.log_path.read_text(errors="replace")
    assert "broker   sqla+sqlite:///" in log, service.log_tail()
    assert "provider local" in log, service.log_tail()


def test_readyz(service: Service) -> None:
    with service.client() as client:
        response = client.get("/readyz")
    assert response.status_code == 200, f"{response.text}\n{service.log_tail()}"
    assert response.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_submission_is_judged_by_the_local_engine(service: Service) -> None:
    text = "you are a worthless idiot, shut up"
    with service.client() as client:
        accepted = submit(service, client, {"input": text, "role": "output", "metadata": {"user": "u-7"},
                                            "conversation_id": f"c-{uuid.uuid4().hex}"})
        body = wait_completed(service, client, accepted["id"])
    verdict = body["verdict"]
    assert verdict["provider"] == "local"
    assert verdict["model"] == "verdict-local-3"
    assert verdict["decision"] in {"allow", "review", "block"}
    # Abuse is one of the categories the local engine judges: this text is well past the default block threshold.
    assert verdict["decision"] == "block", verdict
    assert verdict["flagged"] is True
    assert verdict["categories"]["harassment"] is True
    assert verdict["degraded"] is False
    assert sorted(verdict["not_judged"]) == sorted(
        ["harassment/threatening", "self-harm/intent", "self-harm/instructions", "sexual/minors"])
    assert all(verdict["category_scores"][c] is None for c in verdict["not_judged"])
    assert body["metadata"] == {"user": "u-7"}
    assert body["role"] == "output"


def test_batch_of_three_all_complete(service: Service) -> None:
    items = [{"input": "good morning, lovely weather"},
             {"input": ["first of two", "shut up you stupid idiot"]},
             {"input": "thanks for your help", "role": "output"}]
    with service.client() as client:
        accepted = submit(service, client, {"items": items})
        assert len(accepted["data"]) == 3
        bodies = [wait_completed(service, client, item["id"]) for item in accepted["data"]]
    assert [b["id"] for b in bodies] == [item["id"] for item in accepted["data"]]
    assert all(b["verdict"]["provider"] == "local" for b in bodies)
    assert [b["text_count"] for b in bodies] == [1, 2, 1]
    assert len(bodies[1]["verdict"]["results"]) == 2
    assert bodies[0]["verdict"]["decision"] == "allow"
    assert bodies[1]["verdict"]["decision"] == "block"


def test_sigterm_stops_everything_and_logs_hold_no_text_or_key(service: Service) -> None:
    # Self-sufficient: one more submission, so this test has a text to look for even when run alone.
    text = f"a sentence nobody should find in a log {uuid.uuid4().hex}"
    with service.client() as client:
        accepted = submit(service, client, {"input": text})
        wait_completed(service, client, accepted["id"])

    clean = service.stop()
    assert clean, f"verdict dev did not exit within {STOP_TIMEOUT:.0f}s of SIGTERM\n{service.log_tail()}"

    log = service.log_path.read_text(errors="replace")
    # The logs are not empty: the verdict was logged, by id.
    assert accepted["id"] in log, service.log_tail()
    secret = service.key[len("vk_") + 16 + 1:]
    assert service.key not in log, "the API key appears in the logs"
    assert secret not in log, "the API key's secret appears in the logs"
    for submitted in service.texts:
        assert submitted not in log, f"moderated text appears in the logs: {submitted!r}\n{service.log_tail()}"
        marker = submitted.rsplit(" ", 1)[-1]
        if len(marker) >= 32:  # a text's unique marker (this test's own text has one): not even a part may appear
            assert marker not in log, f"part of a moderated text appears in the logs: {marker!r}\n{service.log_tail()}"


@pytest.mark.integration
@pytest.mark.serial
def test_sigterm_to_verdict_dev_alone_stops_the_whole_tree(tmp_path: Path) -> None:
    # What `docker stop` or a plain supervisor does: only the main process is signalled; it must stop the API and
    # the worker it started.
    svc = start_service(tmp_path)
    try:
        with svc.client() as client:
            wait_completed(svc, client, submit(svc, client, {"input": f"hello there {uuid.uuid4().hex}"})["id"])
    finally:
        clean = svc.stop(leader_only=True)
    assert clean, f"verdict dev left processes behind after SIGTERM\n{svc.log_tail()}"
    assert svc.process.returncode == 0, svc.log_tail()


@pytest.mark.integration
@pytest.mark.serial
def test_sigkill_to_verdict_dev_leaves_no_orphan(tmp_path: Path) -> None:
    # A killed `verdict dev` gets no chance to stop its children: the worker dies with it (PR_SET_PDEATHSIG), the
    # gunicorn workers see their arbiter gone, and nothing of the tree keeps running or holding the broker.
    svc = start_service(tmp_path)
    pgid = svc.process.pid
    try:
        _wait_ready(svc)
        members = _group_members(pgid)
        assert len(members) >= 3, f"expected verdict dev, a gunicorn worker and a celery worker: {members}"
        svc.process.kill()
        svc.process.wait(timeout=10)
        deadline = time.monotonic() + STOP_TIMEOUT
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _group_members(pgid)
        assert not left, f"orphans left after SIGKILL of verdict dev: {left}\n{svc.log_tail()}"
    finally:
        svc.stopped = None if svc.process.poll() is None else svc.stopped
        svc.stop()


def _group_members(pgid: int) -> list[str]:
    """(pid, command line) of every live process in process group `pgid`, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            state, group = fields[0], int(fields[2])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if group == pgid and state != "Z":
            found.append(f"{entry.name} {cmdline[:80]}")
    return found
