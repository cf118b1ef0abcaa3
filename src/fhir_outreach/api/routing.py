"""A lean router for the hot paths (``/fhir`` and ``/hooks``).

FastAPI's per-route machinery (included-router matching, dependency solving, its middleware stack) cost
more CPU per request than everything fhir-outreach itself does for a create or a notification, so these
routes are plain Starlette routes dispatched by ``OutreachApp`` before FastAPI sees the request. Handlers
keep FastAPI's shape (``async def h(request, **path_params)``); errors become OperationOutcomes here, the
same way ``app``'s exception handlers render them for the remaining FastAPI routes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route, Router
from starlette.types import Receive, Scope, Send

from ..errors import FhirError, MethodNotAllowed, NotFound
from .http import fhir_response

log = logging.getLogger("fhir_outreach")
Handler = Callable[..., Awaitable[Response]]
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


class FastRouter:
    """Collects routes with FastAPI-like decorators; ``asgi()`` builds the Starlette router."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.routes: list[Route] = []

    def route(self, path: str, methods: list[str]) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            async def endpoint(request: Request) -> Response:
                return await fn(request, **request.path_params)

            self.routes.append(Route(self.prefix + path, endpoint, methods=methods, name=fn.__name__))
            return fn

        return register

    def get(self, path: str) -> Callable[[Handler], Handler]:
        return self.route(path, ["GET"])

    def post(self, path: str) -> Callable[[Handler], Handler]:
        return self.route(path, ["POST"])

    def put(self, path: str) -> Callable[[Handler], Handler]:
        return self.route(path, ["PUT"])

    def delete(self, path: str) -> Callable[[Handler], Handler]:
        return self.route(path, ["DELETE"])

    def options(self, path: str) -> Callable[[Handler], Handler]:
        return self.route(path, ["OPTIONS"])


def outcome_response(err: FhirError, headers: dict[str, str] | None = None) -> Response:
    extra = dict(headers or {})
    if err.status == 401:
        extra["WWW-Authenticate"] = 'Bearer realm="fhir-outreach"'
    if err.retryable:
        extra["Retry-After"] = "5"
    return fhir_response(err.to_outcome(), int(err.status), extra or None)


def allowed_methods(scope: Scope, routes: list[Any]) -> list[str]:
    """Methods some route accepts at this path (RFC 9110 requires them in a 405's Allow header)."""
    return [m for m in METHODS if any(r.matches({**scope, "method": m})[0] == Match.FULL for r in routes)]


def method_not_allowed(scope: Scope, routes: list[Any]) -> Response:
    allowed = allowed_methods(scope, routes)
    err = MethodNotAllowed(f"{scope['method']} is not allowed on {scope['path']} (allowed: {', '.join(allowed)})")
    return outcome_response(err, {"Allow": ", ".join(allowed)})


def not_found(scope: Scope) -> Response:
    return outcome_response(NotFound(f"no FHIR endpoint at {scope['method']} {scope['path']}"))


def internal_error(scope: Scope, exc: BaseException) -> Response:
    log.error("unexpected error on %s %s", scope["method"], scope["path"], exc_info=exc)
    return fhir_response({"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "exception",
        "diagnostics": f"internal error ({type(exc).__name__}); see the server log"}]}, 500)


def error_response(scope: Scope, exc: FhirError) -> Response:
    if exc.status >= 500:
        log.error("%s %s failed: %s", scope["method"], scope["path"], exc.diagnostics)
    return outcome_response(exc)


class OutreachApp(FastAPI):
    """FastAPI for the operator and docs routes; the lean router first for ``/fhir`` and ``/hooks``."""

    def use_fast_routes(self, prefixes: tuple[str, ...], routers: list[FastRouter]) -> None:
        self._fast_prefixes = prefixes
        self._fast = Router(routes=[r for router in routers for r in router.routes])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        prefixes = getattr(self, "_fast_prefixes", ())
        if scope["type"] == "http" and scope["path"].startswith(prefixes):
            scope["app"] = self
            await self._dispatch(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._fast(scope, receive, send)
            return
        except FhirError as exc:
            response = error_response(scope, exc)
        except HTTPException as exc:
            response = method_not_allowed(scope, self._fast.routes) if exc.status_code == 405 else not_found(scope)
        except Exception as exc:
            response = internal_error(scope, exc)
        await response(scope, receive, send)


