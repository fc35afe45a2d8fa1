"""The one error shape every failure of the API answers with."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    type: str = Field(description="The kind of error: `invalid_request_error`, `authentication_error`, "
                      "`permission_error`, `not_found_error`, `conflict_error`, `precondition_failed`, "
                      "`request_too_large`, `rate_limit_error`, `api_error`, `service_unavailable`.")
    message: str = Field(description="For people: what went wrong, naming the field where there is one.")
    param: str | None = Field(description="The offending field, query parameter or header (`items[3].input`).")
    code: str = Field(description="For programs: a stable code (`missing_scope`, `text_too_long`, …).")


class ErrorResponse(BaseModel):
    """Every error of the API has this one shape."""

    error: ErrorDetail
