"""An async FHIR client for source servers (read-back, searches, Subscription provisioning).

One ``httpx.AsyncClient`` per source, created by the lifespan and reused (keep-alive). Authentication is
an ``httpx.Auth`` flow: static bearer, basic, or SMART Backend Services, which signs a client assertion
(RS384/ES384 JWT with PyJWT), exchanges it for an access token at the token URL and refreshes it before it
expires. httpx errors are translated here, and only here, into ``SourceUnavailable`` (retryable: network
errors, 5xx, 429, from the source or its token URL) or ``SourceError`` (the source said no: 4xx, or an
unusable token response), each naming the request or the token URL.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Generator
from http import HTTPStatus
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from ..errors import FhirError
from ..sources import SourceConfig

FHIR_JSON = "application/fhir+json"


class SourceUnavailable(FhirError):
    """The source could not be reached or answered 5xx/429: try again later."""

    status = HTTPStatus.BAD_GATEWAY
    code = "transient"
    retryable = True


class SourceError(FhirError):
    """The source answered with a 4xx: retrying the same request will not help."""

    status = HTTPStatus.BAD_GATEWAY
    code = "processing"

    def __init__(self, diagnostics: str, *, http_status: int, outcome: Any = None) -> None:
        super().__init__(diagnostics)
        self.http_status = http_status
        self.outcome = outcome


class SmartBackendAuth(httpx.Auth):
    """SMART Backend Services: client_credentials with a private_key_jwt assertion."""

    requires_response_body = True

    def __init__(self, cfg: SourceConfig) -> None:
        assert cfg.private_key_file and cfg.client_id and cfg.token_url
        self.cfg = cfg
        self.key = load_pem_private_key(cfg.private_key_file.read_bytes(), password=None)
        self.alg = "ES384" if isinstance(self.key, ec.EllipticCurvePrivateKey) else "RS384"
        self.token: str | None = None
        self.expires = 0.0

    def _assertion(self) -> str:
        now = int(time.time())
        claims = {"iss": self.cfg.client_id, "sub": self.cfg.client_id, "aud": self.cfg.token_url,
                  "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())}
        headers = {"kid": self.cfg.key_id} if self.cfg.key_id else None
        return jwt.encode(claims, self.key, algorithm=self.alg, headers=headers)  # type: ignore[arg-type]

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.token is None or time.time() > self.expires - 30:
            token_request = httpx.Request("POST", self.cfg.token_url or "", data={
                "grant_type": "client_credentials", "scope": self.cfg.scope,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": self._assertion()})
            response = yield token_request
            failed = f"SMART token request to {self.cfg.token_url} failed with {response.status_code}"
            if response.status_code == 429 or response.status_code >= 500:
                raise SourceUnavailable(failed)
            if response.status_code != 200:
                raise SourceError(failed, http_status=response.status_code)
            try:
                body = response.json()
                token, expires_in = body["access_token"], float(body.get("expires_in", 300))
                if not isinstance(token, str) or not token:
                    raise ValueError("access_token is not a non-empty string")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise SourceError(f"SMART token response from {self.cfg.token_url} is unusable "
                                  f"({type(exc).__name__}: {exc})", http_status=response.status_code) from exc
            self.token = token
            self.expires = time.time() + expires_in
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


def _auth(cfg: SourceConfig) -> httpx.Auth | None:
    if cfg.auth == "bearer":
        token = cfg.token

        class _Bearer(httpx.Auth):
            def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
                request.headers["Authorization"] = f"Bearer {token}"
                yield request

        return _Bearer()
    if cfg.auth == "basic":
        return httpx.BasicAuth(cfg.username or "", cfg.password or "")
    if cfg.auth == "smart":
        return SmartBackendAuth(cfg)
    return None


@contextlib.asynccontextmanager
async def _edge(what: str) -> AsyncIterator[None]:
    try:
        yield
    except httpx.TimeoutException as exc:
        raise SourceUnavailable(f"{what}: timed out") from exc
    except httpx.TransportError as exc:
        raise SourceUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc


class FhirClient:
    def __init__(self, cfg: SourceConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.cfg = cfg
        self.base = cfg.base_url
        self.http = httpx.AsyncClient(auth=_auth(cfg), timeout=cfg.timeout_seconds, transport=transport,
                                      headers={"Accept": FHIR_JSON})

    async def aclose(self) -> None:
        await self.http.aclose()

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else f"{self.base}/{path.lstrip('/')}"

    async def request(self, method: str, path: str, *, json: Any = None, params: Any = None,
                      headers: dict[str, str] | None = None, ok: tuple[int, ...] = (200, 201)) -> httpx.Response:
        url = self.url(path)
        what = f"{method} {url}"
        hdrs = {"Content-Type": FHIR_JSON, **(headers or {})} if json is not None else headers
        async with _edge(what):
            response = await self.http.request(method, url, json=json, params=params, headers=hdrs)
        if response.status_code in ok:
            return response
        if response.status_code == 429 or response.status_code >= 500:
            raise SourceUnavailable(f"{what} answered {response.status_code}")
        outcome = None
        with contextlib.suppress(ValueError):
            outcome = response.json()
        raise SourceError(f"{what} answered {response.status_code}", http_status=response.status_code,
                          outcome=outcome)

    async def read(self, type_: str, id_: str, version: str | None = None) -> dict[str, Any] | None:
        """The resource (that version when given), or None when the source says 404/410."""
        path = f"{type_}/{id_}" + (f"/_history/{version}" if version else "")
        try:
            return (await self.request("GET", path)).json()  # type: ignore[no-any-return]
        except SourceError as exc:
            if exc.http_status in (404, 410):
                return None
            raise

    async def search(self, type_: str, params: list[tuple[str, str]], *, limit: int = 1000) -> list[dict[str, Any]]:
        """All matching resources, following ``next`` links up to ``limit`` resources."""
        out: list[dict[str, Any]] = []
        url: str | None = type_
        query: list[tuple[str, str]] | None = params
        while url and len(out) < limit:
            bundle = (await self.request("GET", url, params=query)).json()
            for entry in bundle.get("entry") or []:
                res = entry.get("resource")
                if isinstance(res, dict) and (entry.get("search") or {}).get("mode", "match") == "match":
                    out.append(res)
            url = next((link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None)
            query = None
        return out[:limit]

    async def get_json(self, path: str, params: Any = None) -> Any:
        return (await self.request("GET", path, params=params)).json()

    async def create(self, resource: dict[str, Any], *, if_none_exist: str | None = None) -> dict[str, Any]:
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else None
        r = await self.request("POST", resource["resourceType"], json=resource, headers=headers)
        return r.json() if r.content else resource  # type: ignore[no-any-return]

    async def update(self, resource: dict[str, Any], *, if_match: str | None = None) -> dict[str, Any]:
        headers = {"If-Match": if_match} if if_match else None
        r = await self.request("PUT", f"{resource['resourceType']}/{resource['id']}", json=resource, headers=headers)
        return r.json() if r.content else resource  # type: ignore[no-any-return]


class SourceClients:
    """The clients of all configured sources, owned by the application lifespan."""

    def __init__(self, sources: list[SourceConfig], transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.clients = {s.name: FhirClient(s, transport=transport) for s in sources}

    def names(self) -> list[str]:
        return list(self.clients)

    def get(self, name: str) -> FhirClient:
        try:
            return self.clients[name]
        except KeyError as exc:
            raise SourceError(f"no source named {name!r} is configured (FHIR_OUTREACH_SOURCES)",
                              http_status=0) from exc

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()
