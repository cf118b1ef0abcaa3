"""Settings: environment variables prefixed ``FHIR_OUTREACH_`` and an optional TOML settings file.

The file is named by ``FHIR_OUTREACH_SETTINGS_FILE`` (or ``--settings`` on the command line); environment
variables win over the file. ``load_settings`` turns any validation failure into a ``SettingsError`` whose
message is one line naming the setting, which the CLI prints before exiting with status 2. Settings are
built once by the CLI (or a test) and injected into the application; nothing reads the environment later.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import SettingsError
from .sources import SourceConfig

ENV_PREFIX = "FHIR_OUTREACH_"
DEFAULT_STORE = "sqlite:///data/fhir-outreach.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    store: str = Field(DEFAULT_STORE, description="Store URL: sqlite:///path/file.db or mongodb://host/db")
    data_dir: Path = Field(Path("data"), description="Directory for the generated token and local files")
    host: str = Field("127.0.0.1", description="Listen address")
    port: int = Field(8080, ge=1, le=65535, description="Listen port")
    base_url: str | None = Field(None, description="Public base URL of the FHIR API (default http://host:port/fhir)")
    api_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated static bearer tokens (full access)")
    auth: Literal["on", "off"] = Field("on", description="'off' disables authentication (logs a warning)")
    jwt_issuer: str | None = Field(None, description="Accepted JWT issuer (enables JWT bearer tokens)")
    jwt_audience: str | None = Field(None, description="Required JWT audience (default: the base URL)")
    jwt_jwks_url: str | None = Field(None, description="JWKS URL with the issuer's signing keys")
    jwt_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["RS256", "ES256", "RS384", "ES384"], description="Accepted JWT algorithms")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest accepted request body")
    default_count: int = Field(50, ge=1, description="Default page size of searches")
    max_count: int = Field(1000, ge=1, description="Largest accepted _count")
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="SQLite PRAGMA synchronous (FULL fsyncs every group commit)")
    worker_poll_seconds: float = Field(1.0, gt=0, description="How often an idle worker polls the store")
    processes: int = Field(1, ge=1, le=64, description="Number of serve processes (uvicorn workers) on the port")
    serve_worker: bool = Field(True, description="Run background work (intake processing...) inside serve too")
    sources: list[SourceConfig] = Field(
        default_factory=list, description="Source FHIR servers (JSON list; see 'Source servers')")
    hook_master_key: str | None = Field(
        None, min_length=32, description="Secret all hook secrets derive from (default: generated in the data dir)")
    public_url: str | None = Field(
        None, description="Public base URL that sources use to reach /hooks (default: base URL without /fhir)")
    health_interval_seconds: float = Field(
        60.0, gt=0, description="How often source Subscriptions and heartbeats are checked")
    writeback_source: str | None = Field(
        None, description="Name of the source server that journey outcomes are also written to (default: none)")
    journey_lease_seconds: float = Field(
        60.0, gt=0, description="How long a worker holds a journey run while it executes steps")
    # --- channels (delivery of journey messages) -------------------------------------------------
    smtp_host: str | None = Field(None, description="SMTP server for email (unset: the email channel is off)")
    smtp_port: int = Field(587, ge=1, le=65535, description="SMTP port")
    smtp_security: Literal["starttls", "tls", "none"] = Field("starttls", description="SMTP transport security")
    smtp_username: str | None = Field(None, description="SMTP user (with a password: AUTH)")
    smtp_password: str | None = Field(None, description="SMTP password")
    email_from: str = Field("outreach@localhost", description="From address of outreach email")
    sms_provider: Literal["none", "twilio", "webhook"] = Field("none", description="SMS provider API")
    sms_api_url: str | None = Field(None, description="SMS provider base URL (Twilio API root or a JSON webhook URL)")
    sms_account_sid: str | None = Field(None, description="Twilio-compatible account SID")
    sms_auth_token: str | None = Field(None, description="Twilio-compatible auth token (also signs callbacks)")
    sms_from: str | None = Field(None, description="Sender number (E.164) or messaging service id")
    sms_webhook_secret: str | None = Field(None, description="HMAC secret of the generic JSON SMS provider")
    sms_default_region: str = Field("US", description="Region for phone numbers written without a country code")
    teams_webhook_url: str | None = Field(
        None, description="Teams incoming-webhook / Workflows URL used when a Practitioner has none of their own")
    vapid_private_key: str | None = Field(None, description="VAPID private key (PEM file path or base64url) for Web Push")
    vapid_subject: str = Field("mailto:outreach@localhost", description="VAPID subject (mailto: or https: URL)")
    quiet_hours: str | None = Field("21:00-08:00", description="Local hours with no patient messages (HH:MM-HH:MM)")
    default_timezone: str = Field("UTC", description="Time zone for quiet hours when the patient has none")
    cap_per_day: int = Field(3, ge=0, description="Most outreach messages per patient per channel per rolling day")
    cap_per_week: int = Field(10, ge=0, description="Most outreach messages per patient per channel per rolling week")
    message_expiry_hours: float = Field(72.0, gt=0, description="A message not sendable within this many hours is dropped")
    consent_outreach: Literal["restrictive", "non-restrictive", "disabled"] = Field(
        "restrictive", description="Consent enforcement for outreach messages")
    consent_transactional: Literal["restrictive", "non-restrictive", "disabled"] = Field(
        "non-restrictive", description="Consent enforcement for transactional messages")
    channel_rate_per_second: float = Field(
        50.0, gt=0, description="Most sends per second per channel and worker (provider rate limits)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level")

    @field_validator("api_tokens", "jwt_algorithms", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_tokens")
    @classmethod
    def _token_length(cls, value: list[str]) -> list[str]:
        for token in value:
            if len(token) < 16:
                raise ValueError("every token must be at least 16 characters long")
        return value

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
            return value
        if value.startswith(("mongodb://", "mongodb+srv://")):
            return value
        raise ValueError("must be sqlite:///path/to/file.db or mongodb://host[:port]/dbname")

    @field_validator("base_url")
    @classmethod
    def _base(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an absolute http(s) URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _sources_unique(self) -> Settings:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"FHIR_OUTREACH_SOURCES: source names must be unique ({', '.join(dupes)})")
        if self.writeback_source and self.writeback_source not in names:
            raise ValueError(f"FHIR_OUTREACH_WRITEBACK_SOURCE: no source named {self.writeback_source!r} "
                             f"(configured: {', '.join(names) or 'none'})")
        return self

    @field_validator("quiet_hours")
    @classmethod
    def _quiet(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d", value.strip()):
            raise ValueError(f"quiet hours must look like HH:MM-HH:MM (e.g. 21:00-08:00), got {value!r}")
        return value.strip()

    @field_validator("default_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as Europe/Paris)") from exc
        return value

    @model_validator(mode="after")
    def _jwt_complete(self) -> Settings:
        if self.jwt_issuer and not self.jwt_jwks_url:
            raise ValueError("FHIR_OUTREACH_JWT_JWKS_URL is required when FHIR_OUTREACH_JWT_ISSUER is set")
        return self

    @property
    def fhir_base(self) -> str:
        return self.base_url or f"http://{self.host}:{self.port}/fhir"

    @property
    def hooks_base(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        return self.fhir_base.removesuffix("/fhir")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlSource(settings_cls)


class _TomlSource(PydanticBaseSettingsSource):
    """Values from the TOML file named by FHIR_OUTREACH_SETTINGS_FILE (keys without the prefix)."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self.data: dict[str, Any] = {}
        name = os.environ.get(ENV_PREFIX + "SETTINGS_FILE")
        if name:
            path = Path(name)
            try:
                self.data = tomllib.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError as exc:
                raise SettingsError(f"{ENV_PREFIX}SETTINGS_FILE: no such file {path}") from exc
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise SettingsError(f"{ENV_PREFIX}SETTINGS_FILE: cannot read {path}: {reason}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise SettingsError(f"{ENV_PREFIX}SETTINGS_FILE: {path} is not valid TOML: {exc}") from exc

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


def load_settings(**overrides: Any) -> Settings:
    """Settings from overrides, the environment and the settings file; one-line SettingsError if bad.

    An unknown ``FHIR_OUTREACH_*`` variable is an error too: a typo must not silently fall back to a default.
    """
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {ENV_PREFIX + "SETTINGS_FILE"}
    unknown = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]} (known: {', '.join(sorted(known))})")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a rule across settings; its message names the variables
            raise SettingsError(f"invalid settings: {msg}") from exc
        field = str(err["loc"][0])
        if err["type"] == "extra_forbidden" and field not in overrides:  # only the file can add unknown keys
            raise SettingsError(f"unknown setting {field!r} in the file named by {ENV_PREFIX}SETTINGS_FILE "
                                f"(known: {', '.join(Settings.model_fields)})") from exc
        name = ENV_PREFIX + field.upper()
        given = err.get("input")
        shown = f" (got {given!r})" if isinstance(given, str | int | float) and "token" not in field else ""
        raise SettingsError(f"invalid setting {name}: {msg}{shown}") from exc
