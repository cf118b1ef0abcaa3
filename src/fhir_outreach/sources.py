"""Source FHIR servers: the configuration of each server fhir-outreach listens to and reads back from.

Configured in settings (``FHIR_OUTREACH_SOURCES`` as JSON, or ``[[sources]]`` tables in the TOML file).
Credentials are for *our* calls to the source (read-back, searches, provisioning): none, a static bearer
token, HTTP basic, or SMART Backend Services (client credentials with a signed JWT assertion).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Short name used in hook records, logs and counts")
    base_url: str = Field(description="FHIR base URL of the source server")
    kind: Literal["generic", "hapi", "medplum", "azure", "firely", "sekmet"] = "generic"
    auth: Literal["none", "bearer", "basic", "smart"] = "none"
    token: str | None = None
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    token_url: str | None = None
    private_key_file: Path | None = None
    key_id: str | None = None
    scope: str = "system/*.read system/Subscription.write"
    timeout_seconds: float = Field(15.0, gt=0)
    subscription_days: int = Field(365, ge=1, description="How far ahead provisioned Subscriptions end")
    subscription_mode: Literal["auto", "topic", "classic"] = Field(
        "auto", description="auto: topic-based when the source declares backport topics, else classic criteria")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,39}", value):
            raise ValueError("a source name is 1-40 lower-case letters, digits, '-' or '_'")
        return value

    @field_validator("base_url")
    @classmethod
    def _base(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("base_url must be an absolute http(s) URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _credentials(self) -> SourceConfig:
        need = {"bearer": ("token",), "basic": ("username", "password"),
                "smart": ("client_id", "token_url", "private_key_file")}.get(self.auth, ())
        missing = [n for n in need if getattr(self, n) in (None, "")]
        if missing:
            raise ValueError(f"source {self.name!r}: auth={self.auth} needs {', '.join(missing)}")
        return self
