"""Group commit: the writes that concurrent threads of one process hand in at the same moment are committed in one
transaction, by one of those threads (the leader), with no thread of its own and no wait added at low load. See
docs/architecture.md ("Group commit")."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import structlog
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.db import Database

log = structlog.get_logger(__name__)

W = TypeVar("W")

# Another write of the same request that must commit with it (its idempotency answer), on the group's session.
Also = Callable[[Session], None]


class _Slot(Generic[W]):
    __slots__ = ("write", "also", "turn", "done", "error")

    def __init__(self, write: W, also: Also | None) -> None:
        self.write = write
        self.also = also
        self.turn = threading.Event()  # set when the write is done, or when its thread is to lead the next group
        self.done = False
        self.error: BaseException | None = None


class GroupCommitter(Generic[W]):
    """Commits writes of one kind, `store(session, writes)` writing any number of them in the caller's transaction.

    `commit(write)` returns once the write is committed (or raises what made it fail). The first thread to call it
    while no group is being committed leads: it takes every write waiting at that moment, its own included, and
    commits them in one transaction; the writes handed in meanwhile wait, and form the next group, which the first
    of them leads. A thread alone (low load) leads a group of one at once. If a group's transaction fails, each of
    its writes is committed again alone, in a transaction of its own, so a bad write fails only its own request; once
    one of those fails as the database does when it is away (OperationalError), the rest fail with it untried."""

    def __init__(self, database: Database, store: Callable[[Session, Sequence[W]], None]) -> None:
        self._database = database
        self.store = store
        self._lock = threading.Lock()
        self._waiting: list[_Slot[W]] = []
        self._leading = False

    @property
    def waiting(self) -> int:
        """How many writes wait for the next group (the one being committed is not counted)."""
        with self._lock:
            return len(self._waiting)

    def commit(self, write: W, *, also: Also | None = None) -> None:
        slot = _Slot(write, also)
        with self._lock:
            self._waiting.append(slot)
            lead = not self._leading
            self._leading = True
        if not lead:
            slot.turn.wait()
        if not slot.done:  # its turn to lead (the first, or handed on by the group before)
            self._lead()
        if slot.error is not None:
            raise slot.error

    def _lead(self) -> None:
        with self._lock:
            group, self._waiting = self._waiting, []
        try:
            self._commit_group(group)
        finally:
            for slot in group:
                if not slot.done:  # the leader itself was interrupted: none of its group may wait for ever
                    slot.error = slot.error or RuntimeError("the group commit was interrupted")
                    slot.done = True
            with self._lock:
                following = self._waiting[0] if self._waiting else None
                self._leading = following is not None
            if following is not None:
                following.turn.set()  # the first write that came meanwhile leads the next group
            for slot in group:
                slot.turn.set()

    def _commit_group(self, group: list[_Slot[W]]) -> None:
        try:
            self._transaction(group)
        except Exception as exc:
            if len(group) == 1:
                group[0].error, group[0].done = exc, True
                return
            log.warning("group_commit_failed", writes=len(group), error_type=type(exc).__name__)
            away: OperationalError | None = None
            for slot in group:
                if away is not None:
                    # The database is away (a write of its own failed so): the others are not tried one by one,
                    # each waiting for its own connection to fail, but answered alike (a 503).
                    slot.error, slot.done = away, True
                    continue
                try:
                    self._transaction([slot])
                except OperationalError as own:
                    slot.error, away = own, own
                except Exception as own:  # noqa: BLE001 - raised in the thread whose write it is
                    slot.error = own
                slot.done = True
            return
        for slot in group:
            slot.done = True

    def _transaction(self, group: Sequence[_Slot[W]]) -> None:
        with self._database.transaction() as session:
            self.store(session, [slot.write for slot in group])
            for slot in group:
                if slot.also is not None:
                    slot.also(session)
