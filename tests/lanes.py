"""The two test lanes: a test that starts a process or a server is marked `integration` (by the fixtures it uses, or
by hand), `make test-fast` runs the others, and a guard fails every test whose marker does not match what it does.
Tests that run Celery workers are also marked `serial`: under pytest-xdist they run one at a time, first.

How the lanes are chosen and run: docs/testing.md.
"""

from __future__ import annotations

import fcntl
import multiprocessing.process
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, TypeVar

import pytest

INTEGRATION = "integration"
# Never beside another `serial` test: those that run Celery workers, whose 10 s leases and timed retries do not
# survive sharing two cores with a second worker tree. (xdist's own `xdist_group` is not used: with pytest 9.2 it
# silently stops grouping, pytest-dev/pytest-xdist#1386.)
SERIAL = "serial"

# PEP 578 audit events raised when this interpreter starts another process. multiprocessing's spawn and forkserver
# start methods raise none of them, so `BaseProcess.start` is watched as well.
PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                            "os.forkpty"})

F = TypeVar("F", bound=Callable[..., Any])

_STARTS_SERVERS = "_verdict_starts_servers"
_SERIAL = "_verdict_serial"


def integration_fixture(function: F | None = None, /, *, serial: bool = False, **options: Any) -> Any:
    """`pytest.fixture` for a fixture that starts a process or a server, or hands the test something that does: every
    test using it, directly or through another fixture, is marked `integration` (and, with `serial=True`, `serial`)."""

    def decorate(fixture_function: F) -> F:
        setattr(fixture_function, _STARTS_SERVERS, True)
        setattr(fixture_function, _SERIAL, serial)
        return pytest.fixture(**options)(fixture_function)  # type: ignore[no-any-return]

    return decorate(function) if function is not None else decorate


def fixture_defs(item: pytest.Item) -> list[pytest.FixtureDef[Any]]:
    """The fixture definitions pytest resolved for `item`, its fixtures' own fixtures included. `_fixtureinfo` is
    private, but it is the one place that says which of several fixtures of one name a test gets."""
    info = getattr(item, "_fixtureinfo", None)
    return [d for defs in info.name2fixturedefs.values() for d in defs] if info is not None else []


class LaneError(RuntimeError):
    """A test outside the integration lane tried to start a process or a server."""


class LaneGuard:
    """Watches what the running test starts: refuses it outside the integration lane, and remembers it inside, so a
    test marked `integration` that starts nothing is found too."""

    def __init__(self) -> None:
        self.item: pytest.Item | None = None
        self.started: list[str] = []
        self.fixture_stack: list[pytest.FixtureDef[Any]] = []
        # Fixtures seen starting something in this process: a test using one is rightly in the lane.
        self.starting_fixtures: set[pytest.FixtureDef[Any]] = set()
        self._pid = os.getpid()

    def saw(self, what: str) -> None:
        if self.item is None or os.getpid() != self._pid:  # between tests, or in a forked child
            return
        self.started.append(what)
        if self.fixture_stack:
            self.starting_fixtures.update(self.fixture_stack)
        if self.item.get_closest_marker(INTEGRATION) is None:
            raise LaneError(outside_the_lane(self.item, what))

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event not in PROCESS_EVENTS or self.item is None or os.getpid() != self._pid:
            return
        self.saw(describe_process(event, args))
        if event == "subprocess.Popen" and runs_a_worker(args[1]) and self.item.get_closest_marker(SERIAL) is None:
            raise LaneError(f"{self.item.nodeid} runs a Celery worker but is not marked `serial`: start it with a "
                            "fixture made with `integration_fixture(serial=True)`, or mark the test "
                            "`@pytest.mark.serial`. See docs/testing.md.")


def runs_a_worker(command: Any) -> bool:
    """`celery ... worker`, `verdict worker` or `verdict dev` (which runs one inside)."""
    words = [os.path.basename(os.fsdecode(w)) for w in command] if isinstance(command, list | tuple) else []
    return ("celery" in words and "worker" in words) or ("verdict" in words[:1] and bool({"worker", "dev"} & {
        *words[1:2]}))


def describe_process(event: str, args: tuple[Any, ...]) -> str:
    if event == "subprocess.Popen" and len(args) > 1:
        command = args[1] if isinstance(args[1], list | tuple) else [args[1]]
        return f"a process ({os.path.basename(os.fsdecode(command[0])) if command else '?'})"
    return f"a process ({event})"


def outside_the_lane(item: pytest.Item, what: str) -> str:
    return (f"{item.nodeid} started {what} but is not marked `integration`: use a fixture made with "
            "`tests.lanes.integration_fixture`, or mark the test `@pytest.mark.integration`. The fast lane "
            "(`make test-fast`) starts no process and no server; see docs/testing.md.")


_guard = LaneGuard()


def _watch_listen(original: Callable[..., None]) -> Callable[..., None]:
    def listen(self: socket.socket, *args: Any) -> None:
        try:
            address = self.getsockname()
        except OSError:
            address = "?"
        _guard.saw(f"a server (listening on {address})")
        original(self, *args)

    return listen


def _watch_process_start(original: Callable[..., None]) -> Callable[..., None]:
    def start(self: multiprocessing.process.BaseProcess) -> None:
        _guard.saw(f"a process (multiprocessing {self.name})")
        original(self)

    return start


def pytest_configure(config: pytest.Config) -> None:
    # An audit hook cannot be removed; it only ever reads `_guard`, which is idle between tests.
    sys.addaudithook(_guard.audit)
    config.add_cleanup(_restore(socket.socket, "listen", _watch_listen))
    config.add_cleanup(_restore(multiprocessing.process.BaseProcess, "start", _watch_process_start))


def _restore(owner: type, name: str, wrap: Callable[[Callable[..., None]], Callable[..., None]]) -> Callable[[], None]:
    """Wrap `owner.name` for the run; returns what puts the original back."""
    original = getattr(owner, name)
    setattr(owner, name, wrap(original))
    return lambda: setattr(owner, name, original)


def pytest_itemcollected(item: pytest.Item) -> None:
    functions = [d.func for d in fixture_defs(item)]
    if any(getattr(f, _STARTS_SERVERS, False) for f in functions):
        item.add_marker(INTEGRATION)
    if any(getattr(f, _SERIAL, False) for f in functions):
        item.add_marker(SERIAL)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`serial` tests first, in their own order: the xdist worker that takes them starts on the longest chain at
    once, while the other workers run everything else. Every worker collects, and so orders, the same way."""
    items[:] = sorted(items, key=lambda item: item.get_closest_marker(SERIAL) is None)


class SerialLock:
    """One lock file per pytest-xdist run: a `serial` test holds it exclusively from its setup to its teardown, so two
    never run at once, whatever worker each was sent to. A run without xdist needs no lock."""

    def __init__(self) -> None:
        run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
        self.path = Path(tempfile.gettempdir()) / f"verdict-tests-serial-{run}.lock" if run else None

    def hold(self) -> Callable[[], None]:
        if self.path is None:
            return lambda: None
        handle = self.path.open("a")
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits while another worker runs a serial test

        def release() -> None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

        return release


_serial_lock = SerialLock()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any]) -> Generator[None, Any, Any]:
    _guard.fixture_stack.append(fixturedef)
    try:
        return (yield)
    finally:
        _guard.fixture_stack.pop()


_call_passed = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, Any, Any]:
    release = _serial_lock.hold() if item.get_closest_marker(SERIAL) is not None else (lambda: None)
    _guard.item, _guard.started = item, []
    try:
        return (yield)
    finally:
        _guard.item = None
        release()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report: pytest.TestReport = yield
    if report.when == "call":
        item.stash[_call_passed] = report.passed
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, Any, Any]:
    result = yield
    if not item.stash.get(_call_passed, False):
        return result  # a failure or skip says more than the lane would
    if item.get_closest_marker(INTEGRATION) is None:
        if _guard.started:  # refused at the time, but the test swallowed the LaneError
            pytest.fail(outside_the_lane(item, _guard.started[0]), pytrace=False)
    elif not _guard.started and _guard.starting_fixtures.isdisjoint(fixture_defs(item)):
        pytest.fail(f"{item.nodeid} is marked `integration` but started no process or server, and no fixture it "
                    "uses did: it belongs in the fast lane (drop the marker). See docs/testing.md.", pytrace=False)
    return result
