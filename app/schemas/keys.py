"""Schemas of `/v1/keys`. A secret appears in one answer only: the creation."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.schemas.common import IsoDatetime

Scope = Literal["submit", "read", "audit", "review", "admin"]


class KeyCreateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    scopes: list[Scope] = Field(min_length=1, max_length=5, description="What the key may do.")
    name: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = Field(
        default=None, description="A label for people; never secret. Required with `review`: the reviewer's name.")
    expires_at: IsoDatetime | None = Field(
        default=None, strict=False,
        description="ISO 8601 with a zone, in the future; after it the key is refused (401).")
    rate_limit_rpm: int | None = Field(default=None, ge=1, le=2**31 - 1, description=(
        "Requests per minute for this key; at most the tenant's limit. Unset: the tenant's limit."))
    rate_limit_tpm: int | None = Field(default=None, ge=1, le=2**31 - 1, description=(
        "Tokens per minute for this key; at most the tenant's limit. Unset: the tenant's limit."))


class KeyOut(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    prefix: str = Field(description="The key's first, non-secret part (`vk_<id>`), to recognise it.")
    name: str | None
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None = Field(description="When the key was last used (to the minute).")
    rate_limit_rpm: int = Field(description="The requests per minute in force for this key.")
    rate_limit_tpm: int = Field(description="The tokens per minute in force for this key.")
    links: dict[str, str]


class KeyWithSecret(KeyOut):
    secret: str = Field(description="The key itself, `vk_<id>_<secret>`: shown here once, never again.")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyOut]
    has_more: bool = False
