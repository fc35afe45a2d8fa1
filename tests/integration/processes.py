"""Helpers for tests that run `verdict` server processes of their own: a free port, waiting for /healthz, stopping a
process group, and a real `verdict api` (gunicorn) process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

VERDICT = str(Path(sys.executable).parent / "verdict")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_healthy(process: subprocess.Popen[bytes], base_url: str, log_path: Path, timeout: float = 60) -> None:
    """Until `base_url`/healthz answers 200; fails with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
        time.sleep(0.3)


def stop_process_group(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM to the process's group (started with `start_new_session=True`), then SIGKILL if it is still running
    after `timeout` seconds; returns once the process has exited."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class ApiProcess:
    """`verdict api` bound to a free port on 127.0.0.1 (one gunicorn worker unless `args` say otherwise), in its own
    process group, healthy before the constructor returns."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        argv = [VERDICT, "api", "--bind", f"127.0.0.1:{self.port}", *(args or ("--workers", "1"))]
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log,  # noqa: S603 - our own command
                                            stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(self.process, self.base_url, log_path)

    def stop(self) -> None:
        stop_process_group(self.process)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
