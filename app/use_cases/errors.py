"""The ways a use case refuses, as plain exceptions of the domain; the API maps each kind to its HTTP answer in one
place (app/api/errors.py), and the CLI to its message."""

from __future__ import annotations


class DomainError(Exception):
    """A refusal for the caller: `message` for people (naming the field, if any), `code` for programs, `param` the
    offending field."""

    default_code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param


class InvalidInput(DomainError):
    """What was asked for cannot be: an unknown policy, an unsafe URL, a bad cursor."""


class NotFound(DomainError):
    """No such object for this tenant; another tenant's object is refused exactly like a missing one."""

    default_code = "not_found"

    def __init__(self, message: str = "No such object.", *, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message, code=code, param=param)


class Conflict(DomainError):
    """The object's state forbids it now (a limit reached, an attempt under way, one already exists)."""

    default_code = "conflict"


class PreconditionFailed(DomainError):
    """The request's precondition does not hold: an `If-Match` naming a version that is no longer current (a lost
    update refused)."""

    default_code = "precondition_failed"


class Unavailable(DomainError):
    """A dependency could not answer; `retry_after` (seconds), when known, says when to try again."""

    def __init__(self, message: str, *, code: str, retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class AuthenticationFailed(DomainError):
    """The presented credential is missing or not valid. `reason` says why, for the audit trail; `key_id` and
    `tenant_id` name the key the credential pointed at, when that key exists."""

    default_code = "invalid_api_key"

    def __init__(self, message: str, *, reason: str, key_id: str | None = None,
                 tenant_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.key_id = key_id
        self.tenant_id = tenant_id
