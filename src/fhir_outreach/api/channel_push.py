"""Web Push registration: the portal (or the patient's app) registers each browser or device that subscribed.

``GET /channels/push/vapid-public-key`` gives the ``applicationServerKey`` for ``pushManager.subscribe``;
``POST /channels/push/subscriptions`` with ``{"patient": "Patient/x", "subscription": <PushSubscription
JSON>}`` stores it (201 new, 200 refreshed); ``DELETE /channels/push/subscriptions?endpoint=...`` retires it
(204; 404 when never registered). Registration needs a bearer token allowed to write Patient (a static token,
or ``system/Patient.write``); the public key is public. Errors are OperationOutcomes.

Endpoints must be https. ``app.state.push_allow_loopback_http = True`` (tests only: there is no setting for
it) also accepts ``http://127.0.0.1`` endpoints, so a local push-service peer can play the push service.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..channels import push
from ..errors import InvalidRequest, NotFound
from ..fhir.validation import parse_json
from .http import fhir_response, read_body

router = APIRouter(prefix="/channels/push")
_PATIENT = re.compile(r"^Patient/[A-Za-z0-9\-.]{1,64}$")


def vapid_key_of(app: Any) -> Any:
    """The app's VAPID private key, loaded once (``app.state.vapid_key`` when the lifespan set it): the key
    for ``PushChannel`` too, so what is published and what signs are the same."""
    state = app.state
    key = getattr(state, "vapid_key", None)
    if key is None:
        settings = state.settings
        key = push.load_vapid_key(settings.vapid_private_key, settings.data_dir)
        state.vapid_key = key
    return key


async def _writer(request: Request) -> None:
    principal = await request.app.state.authenticator.authenticate(request.headers.get("authorization"))
    principal.require("Patient", "write")


def _json(body: dict[str, Any] | None, status: int = 200) -> Response:
    return fhir_response(body, status, media_type="application/json")


@router.get("/vapid-public-key")
async def vapid_public_key(request: Request) -> Response:
    return _json({"publicKey": push.application_server_key(vapid_key_of(request.app))})


@router.post("/subscriptions")
async def add_subscription(request: Request) -> Response:
    await _writer(request)
    body = parse_json(await read_body(request, request.app.state.settings.max_body_bytes))
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object with 'patient' and 'subscription'")
    unknown = sorted(set(body) - {"patient", "subscription"})
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)} (allowed: patient, subscription)",
                             expression=unknown)
    patient = body.get("patient")
    if not isinstance(patient, str) or not _PATIENT.match(patient):
        raise InvalidRequest("'patient' must be a reference like 'Patient/123'", expression=["patient"])
    allow = bool(getattr(request.app.state, "push_allow_loopback_http", False))
    subscription = push.validate_subscription(body.get("subscription"), allow_loopback_http=allow)
    rec, created = await push.register(request.app.state.store, patient, subscription,
                                       user_agent=request.headers.get("user-agent"))
    return _json({"id": rec.key, "patient": patient, "endpoint": subscription["endpoint"]}, 201 if created else 200)


@router.delete("/subscriptions")
async def remove_subscription(request: Request) -> Response:
    await _writer(request)
    endpoint = request.query_params.get("endpoint")
    if not endpoint:
        raise InvalidRequest("'endpoint' (the subscription's endpoint URL) is required", expression=["endpoint"])
    found = await push.unregister(request.app.state.store, endpoint)
    if found is None:
        raise NotFound("no push subscription has this endpoint")
    return Response(status_code=204)
