"""Helpers for tests (and ops/chaos) that run server processes of their own: a free port, waiting for /healthz,
stopping a process group, a real `verdict api` (gunicorn) process, and private PostgreSQL and Redis servers that can be
stopped and started again mid-run."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg
import redis

VERDICT = str(Path(sys.executable).parent / "verdict")
ROOT = Path(__file__).resolve().parents[2]


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
    """`verdict api` bound to a free port (or `port`) on 127.0.0.1 (one gunicorn worker unless `args` say otherwise),
    in its own process group, healthy before the constructor returns."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
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


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or name]
    return found[-1]


class PrivatePostgres:
    """A PostgreSQL cluster of one's own (initdb in a temporary folder, a free port, the machine's binaries).
    PostgreSQL refuses to run as root, so under root its commands run as the machine's `postgres` user, in a folder
    that user owns."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="verdict-pg-"))
        self.port = free_port()
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.directory, user.pw_uid, user.pw_gid)
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
        self.data = self.directory / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/verdict"

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as_postgres, *args], check=True, capture_output=True, timeout=120)  # noqa: S603

    def init(self) -> None:
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        self.start()
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE verdict")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory} -c fsync=off"
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.directory / "server.log"), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        # Immediate: the server quits at once, as after a crash, and recovers from its WAL on the next start.
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class PrivateRedis:
    """A redis-server of one's own (its own port, nothing kept on disk), stopped and started again on the same
    port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20) -> None:
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(  # noqa: S603
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while not _pings(client):
                assert time.monotonic() < deadline, f"the private redis-server did not answer within {timeout}s"
                time.sleep(0.1)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # gone at once, with nothing saved: its messages are lost too
            self.process.wait(timeout=10)
        self.process = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class WorkerProcess:
    """One `celery worker` process tree (with beat embedded unless `beat=False`), started and stopped (or killed)."""

    def __init__(self, env: dict[str, str], log_path: Path, *, concurrency: int = 2, beat: bool = True,
                 name: str | None = None, queues: str | None = None) -> None:
        self.env = env
        self.log_path = log_path
        self.concurrency = concurrency
        self.beat = beat
        self.name = name
        self.queues = queues  # `-Q`: every queue unless given
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> WorkerProcess:
        schedule = self.log_path.with_suffix(".schedule")
        options = ["--beat", "--schedule", str(schedule)] if self.beat else []
        if self.name is not None:
            options += ["--hostname", self.name]
        if self.queues is not None:
            options += ["--queues", self.queues]
        self._spawn([sys.executable, "-m", "celery", "-A", "workers.entry", "worker", *options,
                     "--concurrency", str(self.concurrency), "--loglevel", "INFO", "--without-gossip",
                     "--without-mingle", "--without-heartbeat"])
        self._wait_for(b" ready.", "worker", timeout)
        return self

    def _spawn(self, argv: list[str]) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log,  # noqa: S603
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._log_start = self.log_path.stat().st_size

    def _wait_for(self, marker: bytes, what: str, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{what} exited with {self.process.returncode}:\n{self.log_tail()}")
            with self.log_path.open("rb") as log:  # this start's lines only (a restart appends to the same log)
                log.seek(self._log_start)
                if marker in log.read():
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{what} not ready after {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole process tree: no warm shutdown, no acknowledgements, no goodbyes."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            stop_process_group(self.process)
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class BeatProcess(WorkerProcess):
    """`verdict beat` on its own (exactly one per deployment), for a run whose workers have no embedded beat."""

    def start(self, timeout: float = 60) -> BeatProcess:
        self._spawn([VERDICT, "beat", "--schedule", str(self.log_path.with_suffix(".schedule")), "--loglevel",
                     "INFO"])
        self._wait_for(b"beat: Starting", "beat", timeout)
        return self
