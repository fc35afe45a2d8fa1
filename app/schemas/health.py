"""Schemas of `/healthz` and `/readyz`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class ReadinessOut(BaseModel):
    status: Literal["ready"] = "ready"
    checks: dict[str, Literal["ok"]]
