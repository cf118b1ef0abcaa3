"""Email callbacks under ``/channels/email``: the open pixel, the click redirect and the bounce (DSN) webhook.

``GET /channels/email/open/{token}.gif``
    The open pixel ``channels.email.tracked_html`` puts in each message. A token that verifies records
    ``opened`` on its Communication; the answer is always the 1x1 transparent GIF (never cached), whether or
    not the token was good — a mail client has nothing useful to do with an error.

``GET /channels/email/click/{token}``
    A tracked link: records ``clicked`` (which implies ``opened``) and answers ``302`` to the http(s) URL
    *signed into the token*. A token that does not verify, or names anything but an absolute http(s) URL,
    is answered ``400`` (OperationOutcome) — this is never an open redirect.

``POST /channels/email/dsn``
    Delivery status from the mail system (a bounce processor, the MTA's DSN parser, an ESP webhook relay).
    The body is JSON::

        {"message_id": "<outreach.{communication id}@example.org>",   # the Message-ID we sent, or
         "communication": "Communication/{id}",                       # the Communication itself ("{id}" too)
         "status": "bounced" | "failed" | "delivered",
         "diagnostic": "550 5.1.1 <jane@example.org>: no such user"}  # optional, becomes statusReason.text

    and must be signed: header ``X-Outreach-Signature: sha256=<hex>``, the HMAC-SHA256 of the raw body
    under ``dsn_key(channel key)`` = ``signing.derive_key(app.state.channel_key, "email-dsn")`` (the channel
    key derives from the hook master key, so every ``serve`` process accepts the same signatures).
    ``bounced``/``failed`` make the Communication ``not-done`` with that ``statusReason``; ``delivered``
    makes it ``completed``. A repeated report changes nothing. Answers: ``200`` ``{"communication",
    "status", "changed"}``; ``401`` missing or wrong signature; ``400`` body not a JSON object of that shape;
    ``404`` no such Communication (or a Message-ID that is not ours / not the one it was sent with). Nothing
    is recorded unless the answer is 200.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from ..channels import engagement, signing
from ..channels.email import communication_of
from ..errors import FhirError, InvalidRequest, NotFound, Unauthorized
from .http import fhir_response, read_body

router = APIRouter(prefix="/channels/email")
log = logging.getLogger(__name__)

# 1x1 transparent GIF (GIF89a, one transparent palette entry)
PIXEL = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00"
         b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
NO_STORE = {"Cache-Control": "no-store, no-cache, must-revalidate, private", "Pragma": "no-cache"}
SIGNATURE_HEADER = "x-outreach-signature"
DSN_STATUSES = ("bounced", "failed", "delivered")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NOT_ASCII = re.compile(r"[^\x21-\x7e]")


def dsn_key(channel_key: bytes) -> bytes:
    """The HMAC key of DSN webhook signatures."""
    return signing.derive_key(channel_key, "email-dsn")


def dsn_signature(channel_key: bytes, body: bytes) -> str:
    """The ``X-Outreach-Signature`` value for ``body`` (for senders and tests)."""
    return "sha256=" + hmac.new(dsn_key(channel_key), body, hashlib.sha256).hexdigest()


def _now(request: Request) -> float:
    """The journey engine's clock when it has one (tests run it virtually), else the wall clock."""
    clock = getattr(getattr(getattr(request.app.state, "journeys", None), "engine", None), "clock", None)
    return float(clock.now()) if clock is not None else time.time()


async def _record(request: Request, communication_id: str, kind: str, **kwargs: Any) -> bool:
    """Record one engagement; wakes the journey engine when it changed something (waits on it)."""
    state = request.app.state
    changed = await engagement.record(state.store, communication_id, kind, at=_now(request),
                                      base_url=state.settings.fhir_base, **kwargs)
    journeys = getattr(state, "journeys", None)
    if changed and journeys is not None:
        journeys.wake()
    return changed


@router.get("/open/{token}.gif")
async def open_pixel(request: Request, token: str) -> Response:
    try:
        payload = signing.verify(request.app.state.channel_key, token)
    except signing.BadToken:
        payload = {}
    communication = payload.get("c")
    if isinstance(communication, str) and communication:
        try:
            await _record(request, communication, "opened")
        except (FhirError, OSError) as exc:  # the pixel is answered anyway; the open is lost
            log.warning("open of Communication/%s not recorded: %s", communication, exc)
    return Response(PIXEL, media_type="image/gif", headers=NO_STORE)


def _target(payload: dict[str, Any]) -> str | None:
    url = payload.get("u")
    if not isinstance(url, str) or _CONTROL.search(url) or url != url.strip():
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not host:
        return None
    return _NOT_ASCII.sub(lambda m: quote(m.group(0), safe=""), url)


@router.get("/unsubscribe/{token}")
@router.post("/unsubscribe/{token}")
async def unsubscribe(request: Request, token: str) -> Response:
    """The unsubscribe link of every outreach email (and its RFC 8058 one-click POST): records an opt-out
    Consent for the patient's email, which governance honours before every later send."""
    from ..channels.optout import record_opt_out

    try:
        payload = signing.verify(request.app.state.channel_key, token)
    except signing.BadToken as exc:
        raise InvalidRequest("this unsubscribe link is not valid") from exc
    patient = payload.get("p")
    if not isinstance(patient, str) or not patient.startswith("Patient/"):
        raise InvalidRequest("this unsubscribe link is not valid")
    state = request.app.state
    journeys = getattr(state, "journeys", None)
    now = journeys.engine.clock.now() if journeys is not None else time.time()
    await record_opt_out(state.store, patient, "email", at=now, how="email unsubscribe link",
                         base_url=state.settings.fhir_base)
    if request.method == "POST":
        return fhir_response({"unsubscribed": patient, "channel": "email"}, 200, media_type="application/json")
    return Response("<!doctype html><title>Unsubscribed</title><p>You will no longer receive email from your "
                    "care team. Portal messages are not affected.</p>", media_type="text/html; charset=utf-8")


@router.get("/click/{token}")
async def click(request: Request, token: str) -> Response:
    try:
        payload = signing.verify(request.app.state.channel_key, token)
    except signing.BadToken as exc:
        raise InvalidRequest("this link is not valid") from exc
    communication = payload.get("c")
    target = _target(payload)
    if target is None or not isinstance(communication, str) or not communication:
        raise InvalidRequest("this link is not valid")
    try:
        await _record(request, communication, "clicked")
    except (FhirError, OSError) as exc:  # the patient still gets where the link goes
        log.warning("click on Communication/%s not recorded: %s", communication, exc)
    return Response(status_code=302, headers={"Location": target, "Referrer-Policy": "no-referrer", **NO_STORE})


def _authenticate(request: Request, body: bytes) -> None:
    presented = request.headers.get(SIGNATURE_HEADER, "")
    expected = dsn_signature(request.app.state.channel_key, body)
    if not presented or not hmac.compare_digest(presented.strip().lower().encode(), expected.encode()):
        raise Unauthorized(f"missing or wrong {SIGNATURE_HEADER.title()} "
                           "(sha256=<hex HMAC-SHA256 of the body under the email-dsn key>)")


def _parse(body: bytes) -> tuple[str | None, str | None, str, str | None]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    msg_id, comm, status, diagnostic = (data.get(k) for k in ("message_id", "communication", "status",
                                                              "diagnostic"))
    if status not in DSN_STATUSES:
        raise InvalidRequest(f"'status' must be one of {', '.join(DSN_STATUSES)}", expression=["status"])
    for name, value in (("message_id", msg_id), ("communication", comm), ("diagnostic", diagnostic)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InvalidRequest(f"'{name}' must be a non-empty string", expression=[name])
    if msg_id is None and comm is None:
        raise InvalidRequest("name the message: 'message_id' or 'communication'", expression=["message_id"])
    return msg_id, comm, str(status), diagnostic[:1000] if diagnostic else None


@router.post("/dsn")
async def dsn(request: Request) -> Response:
    state = request.app.state
    body = await read_body(request, state.settings.max_body_bytes)
    _authenticate(request, body)
    msg_id, comm, status, diagnostic = _parse(body)
    if comm is not None:
        kind, _, cid = comm.strip().rpartition("/")
        if kind not in ("", "Communication"):
            raise InvalidRequest("'communication' must be Communication/{id}", expression=["communication"])
    else:
        assert msg_id is not None
        cid = communication_of(msg_id) or ""
        if not cid:
            raise NotFound(f"no message {msg_id}")
    stored = await state.store.read("Communication", cid) if cid else None
    if stored is None or stored.resource is None or stored.deleted:
        raise NotFound(f"no message {msg_id or comm}")
    if msg_id is not None:
        sent_as = {e.get("valueString") for e in stored.resource.get("extension") or []
                   if e.get("url") == engagement.PROVIDER_ID_URL}
        if (sent_as and msg_id.strip() not in sent_as) or (comm is not None and communication_of(msg_id) not in
                                                             (cid, None)):
            raise NotFound(f"no message {msg_id} for Communication/{cid}")
    changed = await _record(request, cid, status, detail=diagnostic)
    return fhir_response({"communication": f"Communication/{cid}", "status": status, "changed": changed},
                         media_type="application/json")
