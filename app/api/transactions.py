"""The request's database session (opened on first use, closed at teardown) and `@transaction`, the one
transaction a view's work runs in. See docs/architecture.md ("Transactions")."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, g
from sqlalchemy.orm import Session

from app.extensions import current_database

F = TypeVar("F", bound=Callable[..., Any])


def init_app(app: Flask) -> None:
    app.teardown_appcontext(_close_request_session)


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
    view created is never committed without the answer a retry replays."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        session = request_session()
        with session.begin():
            result = view(*args, **kwargs)
            keep: Callable[[Session, Any], None] | None = g.pop("idempotency_keep", None)
            if keep is not None:
                keep(session, result)
            return result

    return wrapper  # type: ignore[return-value]


def _close_request_session(_exc: BaseException | None) -> None:
    session: Session | None = g.pop("db_session", None)
    if session is not None:
        session.close()
