"""The application factory: builds the FastAPI app from injected ``Settings`` (and optionally a store).

The lifespan owns every resource (store, authenticator, HTTP client); there are no module-level globals.
One exception handler turns any ``errors.FhirError`` into an OperationOutcome with its HTTP status, and
framework errors (unknown route 404, wrong method 405, unexpected exceptions 500) are rendered the same way.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from . import __version__
from .api import admin as admin_routes
from .api import channel_email, channel_push, channel_sms, channel_teams
from .api import fhir as fhir_routes
from .api import hooks as hook_routes
from .api.capability import capability_statement
from .api.http import fhir_response
from .api.interactions import Interactions
from .api.routing import OutreachApp, error_response, internal_error, method_not_allowed, not_found
from .auth import Authenticator
from .errors import FhirError, InvalidRequest
from .intake.service import IntakeService
from .journeys.service import JourneyService
from .settings import Settings
from .store import Store, open_store
from .store.base import format_instant, utcnow
from .work.clock import Clock


def create_app(settings: Settings, store: Store | None = None, *, run_background: bool = True,
               source_transport: httpx.AsyncBaseTransport | None = None, tune_gc: bool = False,
               clock: Clock | None = None, channels: dict[str, Any] | None = None) -> FastAPI:
    """The application. ``run_background=False`` leaves intake processing to the caller (tests drain it
    explicitly); ``source_transport`` routes calls to source servers (tests point it at an ASGI app); ``clock``
    replaces the journey engine's system clock (tests run weeks of waits on a ``ManualClock``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        the_store = store or make_store(settings)
        await the_store.open()
        http = httpx.AsyncClient(timeout=10)
        authenticator = Authenticator(settings, http)
        authenticator.prepare()
        app.state.settings = settings
        app.state.store = the_store
        app.state.authenticator = authenticator
        intake = IntakeService(settings, the_store, transport=source_transport)
        journeys = JourneyService(settings, the_store, intake.sources, clock=clock, channels=channels)
        app.state.journeys = journeys
        app.state.interactions = Interactions(the_store, base_url=settings.fhir_base,
                                              default_count=settings.default_count, max_count=settings.max_count,
                                              on_commit=journeys.feed)
        app.state.capability = capability_statement(settings.fhir_base, auth_on=authenticator.enabled,
                                                    jwt=bool(settings.jwt_issuer), started=format_instant(utcnow()))
        app.state.intake = intake
        app.state.hooks = intake.hooks
        app.state.channel_key = journeys.channel_key
        intake.on_events = journeys.wake
        if settings.serve_worker and run_background:
            intake.start()
            journeys.start()
        if tune_gc:
            # Objects alive after start-up (models, compiled paths, routes) never become garbage: keep them
            # out of the collector's generations and collect young objects less often. Measured: intake p99
            # from 65 ms to about 20 ms (bench/bench_intake.py). Only for a real server process.
            gc.freeze()
            gc.set_threshold(20_000, 20, 20)
        try:
            yield
        finally:
            await journeys.aclose()
            await intake.aclose()
            await http.aclose()
            await the_store.close()

    app = OutreachApp(title="fhir-outreach", version=__version__, lifespan=lifespan,
                      docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.use_fast_routes(("/fhir", "/hooks"), [fhir_routes.router, hook_routes.router])
    app.include_router(admin_routes.router)
    for channel_router in (channel_email.router, channel_sms.router, channel_teams.router, channel_push.router):
        app.include_router(channel_router)

    @app.get("/healthz")
    async def healthz(request: Request) -> Response:
        await request.app.state.store.ping()
        return fhir_response({"status": "ok", "version": __version__}, media_type="application/json")

    @app.exception_handler(FhirError)
    async def fhir_error(request: Request, exc: FhirError) -> Response:
        return error_response(request.scope, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return not_found(request.scope)
        if exc.status_code == 405:
            return method_not_allowed(request.scope, request.app.router.routes)
        return fhir_response({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "processing", "diagnostics": str(exc.detail)}]}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request.scope, InvalidRequest(f"invalid request: {exc.errors()[0].get('msg', exc)}"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        return internal_error(request.scope, exc)

    return app


def app_from_environment() -> FastAPI:
    """The app built from FHIR_OUTREACH_* settings: the factory each serve process imports when
    FHIR_OUTREACH_PROCESSES > 1 (uvicorn starts the processes; the CLI validated the settings first)."""
    from .settings import load_settings

    return create_app(load_settings(), tune_gc=True)


def make_store(settings: Settings) -> Store:
    """The store the settings name (not yet opened)."""
    return open_store(settings.store, base_url=settings.fhir_base, sqlite_synchronous=settings.sqlite_synchronous)
