"""The request's database session (opened on first use, closed at teardown) and `@transaction`, the one
transaction a view's work runs in. See docs/architecture.md ("Transactions")."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, current_app, g
from sqlalchemy.orm import Session

from app.extensions import DATABASE, current_database
from app.group_commit import Also, GroupCommitter
from app.use_cases.submissions import PreparedSubmissions, store_submissions

F = TypeVar("F", bound=Callable[..., Any])
W = TypeVar("W")


_GROUPED = "verdict.grouped_write"
_SUBMISSIONS_COMMITTER = "verdict.submissions_committer"


def init_app(app: Flask) -> None:
    app.teardown_appcontext(_close_request_session)
    app.extensions[_SUBMISSIONS_COMMITTER] = GroupCommitter(app.extensions[DATABASE], store_submissions)


def request_session() -> Session:
    """The session of the current request. It begins no transaction by itself: open one around its use."""
    if "db_session" not in g:
        g.db_session = current_database().sessions()
    session: Session = g.db_session
    return session


def transaction(view: F) -> F:
    """Run the view in one transaction on the request's session: committed when it returns (and only then are its
    outbox messages sent), rolled back if it raises. Put it below `require_scope`, whose gate has its own. A request
    with a claimed Idempotency-Key keeps its answer in this same transaction (app/api/idempotency.py), so what the
    view created is never committed without the answer a retry replays. A view that handed its write to a group
    committer (`commit_in_group`) only reads in it: the write, with the answer, is committed by the group once the
    view has returned, and the view's answer goes out only then."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        session = request_session()
        try:
            with session.begin():
                result = view(*args, **kwargs)
                keep: Callable[[Any], Also | None] | None = g.pop("idempotency_keep", None)
                grouped: tuple[GroupCommitter[Any], Any] | None = g.pop(_GROUPED, None)
                answer = keep(result) if keep is not None else None
                if grouped is None:
                    if answer is not None:
                        answer(session)
                    return result
        finally:
            g.pop(_GROUPED, None)  # a view that raised after handing in its write: the write is dropped
        committer, write = grouped
        committer.commit(write, also=answer)
        return result

    return wrapper  # type: ignore[return-value]


def commit_in_group(committer: GroupCommitter[W], write: W) -> None:
    """Have `committer` commit `write` with whatever other requests of this process hand in at the same moment
    (app/group_commit.py), once the view returns, instead of in the view's own transaction."""
    if _GROUPED in g:
        raise RuntimeError("a view hands in one write")
    g.setdefault(_GROUPED, (committer, write))


def submissions_committer() -> GroupCommitter[PreparedSubmissions]:
    """This process's group committer of new submissions."""
    committer: GroupCommitter[PreparedSubmissions] = current_app.extensions[_SUBMISSIONS_COMMITTER]
    return committer


def _close_request_session(_exc: BaseException | None) -> None:
    session: Session | None = g.pop("db_session", None)
    if session is not None:
        session.close()
