"""Intake HTTP: ``/hooks/{key}`` and ``/hooks/{key}/{Type}/{id}`` for every notification shape.

Order of work per delivery: find the hook (404), check its credentials (401/403, nothing stored), read the
body within the size limit (413), parse and normalise it without I/O (a malformed one is stored as
rejected evidence and answered 400 with where and why), store it in the inbox, answer 200. Processing
happens after the response (``intake.processor``). A store fault answers 503 with ``Retry-After``, never a
4xx, because Event Grid drops 4xx deliveries for good. Event Grid's validation handshake is echoed and
the CloudEvents ``OPTIONS`` handshake answered.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ..errors import InvalidRequest
from ..intake import inbox
from ..intake.hooks import HookRegistry, presented_secret
from ..intake.normalize import MalformedNotification, normalize
from .http import fhir_response, read_body
from .routing import FastRouter

router = FastRouter(prefix="/hooks")

_ACCEPTED = {"resourceType": "OperationOutcome", "issue": [
    {"severity": "information", "code": "informational", "diagnostics": "notification accepted"}]}


def _registry(request: Request) -> HookRegistry:
    return request.app.state.hooks


@router.options("/{key}")
async def cloudevents_handshake(request: Request, key: str) -> Response:
    registry = _registry(request)
    hook = await registry.get(key, cached=True)
    headers = {k.lower(): v for k, v in request.headers.items()}
    registry.authenticate(hook, presented=presented_secret(headers, dict(request.query_params)), signature=None,
                          body=b"")
    origin = request.headers.get("webhook-request-origin", "*")
    return Response(status_code=200, headers={"WebHook-Allowed-Origin": origin, "WebHook-Allowed-Rate": "*",
                                              "Allow": "POST, OPTIONS"})


@router.post("/{key}")
async def deliver(request: Request, key: str) -> Response:
    return await _deliver(request, key, [])


@router.route("/{key}/{type_}/{id_}", methods=["POST", "PUT", "DELETE"])
async def deliver_resource(request: Request, key: str, type_: str, id_: str) -> Response:
    return await _deliver(request, key, [type_, id_])


async def _deliver(request: Request, key: str, path: list[str]) -> Response:
    registry = _registry(request)
    settings = request.app.state.settings
    store = request.app.state.store
    hook = await registry.get(key, cached=True)
    headers = {k.lower(): v for k, v in request.headers.items()}
    body = await read_body(request, settings.max_body_bytes)
    registry.authenticate(hook, presented=presented_secret(headers, dict(request.query_params)),
                          signature=headers.get("x-signature"), body=body)
    where: dict[str, Any] = {"hook": key, "source": hook.source, "method": request.method, "path": path,
                             "headers": headers, "body": body}
    try:
        parsed: Any = orjson.loads(body) if body.strip() else None
        drafts = normalize(request.method, path, parsed, headers)
    except orjson.JSONDecodeError as exc:
        await inbox.reject(store, **where, reason=f"not valid JSON: {exc}", where="body")
        raise InvalidRequest(f"the notification body is not valid JSON: {exc}") from exc
    except MalformedNotification as exc:
        await inbox.reject(store, **where, reason=str(exc), where=exc.where)
        raise InvalidRequest(f"unreadable notification: {exc}", expression=[exc.where]) from exc
    await inbox.accept(store, **where)
    request.app.state.intake.wake()
    validation = next((d for d in drafts if d.kind == "validation"), None)
    if validation is not None and validation.validation_code:
        return fhir_response({"validationResponse": validation.validation_code}, media_type="application/json")
    return fhir_response(_ACCEPTED)
