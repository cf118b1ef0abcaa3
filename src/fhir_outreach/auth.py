"""Authentication and authorisation of API callers: static bearer tokens and SMART-style JWTs.

Secure by default: with no token configured and auth on, the first start generates a token, stores it in
``<data_dir>/api-token`` with owner-only permissions and logs how to use it. Static tokens grant full access.
JWT bearer tokens (SMART Backend Services style) are verified against the issuer's JWKS (fetched with httpx
and cached), the issuer, the audience and expiry; their ``scope`` grants ``system/<Type|*>.<read|write|*>``
(SMART v1) or ``system/<Type|*>.<cruds>`` (SMART v2). ``auth=off`` is an explicit setting that logs a
warning at every start. Errors are ``Unauthorized`` (401) and ``Forbidden`` (403).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import jwt

from .errors import Forbidden, Unauthorized
from .settings import Settings

log = logging.getLogger("fhir_outreach.auth")

Access = Literal["read", "write"]
TOKEN_FILE = "api-token"
_V2_LETTERS = {"read": set("rs"), "write": set("cud")}


@dataclass(frozen=True)
class Principal:
    name: str
    full_access: bool = False
    scopes: frozenset[str] = field(default_factory=frozenset)

    def allows(self, resource_type: str, access: Access) -> bool:
        if self.full_access:
            return True
        for scope in self.scopes:
            context, _, rest = scope.partition("/")
            if context not in ("system", "user") or "." not in rest:
                continue
            stype, _, perm = rest.partition(".")
            perm = perm.split("?", 1)[0]
            if stype not in ("*", resource_type):
                continue
            if perm in ("*", access) or (perm and set(perm) <= set("cruds") and set(perm) & _V2_LETTERS[access]):
                return True
        return False

    def require_admin(self) -> None:
        """Operator endpoints (/admin): static tokens, or a JWT with ``system/*.*`` (or ``system/*.cruds``)."""
        if not (self.full_access or {"system/*.*", "system/*.cruds"} & self.scopes):
            raise Forbidden("operator endpoints need a static API token or the system/*.* scope")

    def require(self, resource_type: str, access: Access) -> None:
        if not self.allows(resource_type, access):
            raise Forbidden(f"the token's scopes do not allow {access} access to {resource_type} "
                            f"(needs system/{resource_type}.{access} or a SMART v2 equivalent)")


ANONYMOUS = Principal("anonymous (auth off)", full_access=True)


def ensure_token_file(data_dir: Path) -> tuple[str, bool]:
    """The generated token in ``data_dir`` (created with mode 0600 if absent) and whether it was new."""
    path = data_dir / TOKEN_FILE
    if path.exists():
        return path.read_text().strip(), False
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another serve process of this deployment created it first
        time.sleep(0.1)
        return path.read_text().strip(), False
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token, True


class Authenticator:
    """Turns an ``Authorization`` header into a ``Principal``; owned by the application lifespan."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.enabled = settings.auth == "on"
        self.tokens: list[str] = list(settings.api_tokens)
        self._http = http
        self._jwks: jwt.PyJWKSet | None = None
        self._jwks_at = 0.0
        # Unknown kids force a JWKS refresh at most this often, so forged tokens cannot make us hammer the issuer.
        self.min_refresh_seconds = 10.0

    def prepare(self) -> None:
        """Log the auth mode; generate the first-start token when nothing else is configured."""
        if not self.enabled:
            log.warning("AUTHENTICATION IS OFF (FHIR_OUTREACH_AUTH=off): anyone who can reach this port can "
                        "read and write every resource")
            return
        if not self.tokens and not self.settings.jwt_issuer:
            token, new = ensure_token_file(self.settings.data_dir)
            self.tokens.append(token)
            path = self.settings.data_dir / TOKEN_FILE
            if new:
                log.warning("No API token configured: generated one in %s (mode 0600). Use it as\n"
                            "  curl -H \"Authorization: Bearer $(cat %s)\" %s/Task", path, path,
                            self.settings.fhir_base)
            else:
                log.info("Using the API token in %s", path)

    async def authenticate(self, header: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if not header:
            raise Unauthorized("missing 'Authorization: Bearer <token>' header")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("the Authorization header must use the Bearer scheme")
        for known in self.tokens:
            if hmac.compare_digest(known.encode(), token.encode()):
                return Principal("static-token", full_access=True)
        if self.settings.jwt_issuer and token.count(".") == 2:
            return await self._verify_jwt(token)
        raise Unauthorized("invalid bearer token")

    async def _keys(self, refresh: bool = False) -> jwt.PyJWKSet:
        if self._jwks is None or refresh or time.monotonic() - self._jwks_at > 300:
            assert self.settings.jwt_jwks_url
            client = self._http or httpx.AsyncClient(timeout=10)
            try:
                resp = await client.get(self.settings.jwt_jwks_url)
                resp.raise_for_status()
                document = resp.json()
            except (httpx.HTTPError, ValueError) as exc:
                raise Unauthorized(f"cannot fetch the issuer's JWKS to verify the token: {exc}") from exc
            finally:
                if self._http is None:
                    await client.aclose()
            try:
                if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
                    raise jwt.PyJWKSetError('not a JWK Set (a JSON object with a "keys" array)')
                self._jwks = jwt.PyJWKSet.from_dict(document)
            except jwt.PyJWTError as exc:
                raise Unauthorized(f"the issuer's JWKS has no usable keys: {exc}") from exc
            self._jwks_at = time.monotonic()
        return self._jwks

    async def _verify_jwt(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"malformed JWT: {exc}") from exc
        kid = header.get("kid")
        key = None
        for refresh in (False, True):
            if refresh and time.monotonic() - self._jwks_at < self.min_refresh_seconds:
                break  # an unknown kid may force a refresh, but not more often than this
            keyset = await self._keys(refresh)
            key = next((k for k in keyset.keys if kid is None or k.key_id == kid), None)
            if key is not None:
                break
        if key is None:
            raise Unauthorized(f"no key with kid {kid!r} in the issuer's JWKS")
        try:
            claims = jwt.decode(token, key.key, algorithms=self.settings.jwt_algorithms,
                                audience=self.settings.jwt_audience or self.settings.fhir_base,
                                issuer=self.settings.jwt_issuer, options={"require": ["exp", "iss", "aud"]})
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"JWT rejected: {exc}") from exc
        raw = claims.get("scope", claims.get("scp", ""))
        scopes = frozenset(raw.split() if isinstance(raw, str) else raw)
        return Principal(str(claims.get("sub") or claims.get("client_id") or "jwt"), scopes=scopes)
