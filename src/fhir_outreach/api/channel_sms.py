"""SMS provider callbacks under ``/channels/sms``: delivery status and inbound replies, from Twilio (form
posts signed with ``X-Twilio-Signature``) and from the generic JSON provider (signed ``X-Outreach-Signature``).

* ``POST /channels/sms/status`` — Twilio status callback (``MessageSid``, ``MessageStatus``, ``ErrorCode``):
  ``queued``/``accepted``/``sending``/``sent`` → sent, ``delivered`` → delivered, ``read`` → read,
  ``undelivered``/``failed``/``canceled`` → failed (the reason names the ErrorCode). Answered 204.
* ``POST /channels/sms/inbound`` — Twilio inbound message (``From``, ``To``, ``Body``, ``MessageSid``): the reply
  answers the most recent message we sent to that number. STOP words record the SMS opt-out Consent, START
  words make it inactive (``sms.opt_back_in``), and every reply — keywords included — becomes a Communication
  with ``inResponseTo`` so journeys can branch on it. Answered with empty TwiML (``<Response/>``, text/xml),
  so Twilio sends nothing back itself. A number we never texted is logged and answered the same way.
* ``POST /channels/sms/events`` — the generic JSON provider: ``{"type": "status", "id", "status", "error"?}``
  or ``{"type": "inbound", "id", "from", "text"}``. Answered ``{"result": "recorded" | "unchanged"}`` (unchanged: a repeat,
  or a message or number we do not know).

Signatures are checked before anything is parsed into effects: a missing or wrong signature (or an unset
secret) is 401 with an OperationOutcome and changes nothing; a signed but malformed body is 400.

The URL in Twilio's signature is the URL Twilio called, which behind a proxy or load balancer is not what
this process sees. We rebuild it as ``settings.hooks_base`` (``FHIR_OUTREACH_PUBLIC_URL``, else the base URL
without ``/fhir``) + the request path (+ query string): the same base the delivery pipeline puts in
``StatusCallback``, and the base to configure as the number's inbound webhook in Twilio.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..channels import engagement
from ..channels import sms as smslib
from ..errors import InvalidRequest, Unauthorized
from ..fhir.validation import parse_json
from .http import fhir_response, read_body

log = logging.getLogger("fhir_outreach.channels.sms")

router = APIRouter(prefix="/channels/sms")

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
TWILIO_STATUS = {"accepted": "sent", "scheduled": "sent", "queued": "sent", "sending": "sent", "sent": "sent",
                 "delivered": "delivered", "read": "read",
                 "undelivered": "failed", "failed": "failed", "canceled": "failed"}


def _now(request: Request) -> float:
    journeys = getattr(request.app.state, "journeys", None)
    clock = getattr(getattr(journeys, "engine", None), "clock", None)
    return float(clock.now()) if clock is not None else time.time()


def _wake(request: Request) -> None:
    journeys = getattr(request.app.state, "journeys", None)
    if journeys is not None:
        journeys.wake()


def public_url(request: Request) -> str:
    """The URL the provider called, as it saw it: ``hooks_base`` + path (+ query)."""
    query = request.url.query
    base: str = request.app.state.settings.hooks_base
    return base + request.url.path + (f"?{query}" if query else "")


async def _twilio_form(request: Request) -> dict[str, str]:
    """The form body once ``X-Twilio-Signature`` verified (401 otherwise); repeated names keep the last."""
    settings = request.app.state.settings
    body = await read_body(request, settings.max_body_bytes)
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        pairs = None
    token = settings.sms_auth_token
    if not token:
        raise Unauthorized("Twilio callbacks cannot be verified: FHIR_OUTREACH_SMS_AUTH_TOKEN is not set")
    if pairs is None or not smslib.valid_twilio_signature(token, public_url(request), pairs,
                                                          request.headers.get("x-twilio-signature")):
        raise Unauthorized("missing or invalid X-Twilio-Signature")
    return dict(pairs)


def _required(form: dict[str, Any], *names: str) -> list[str]:
    missing = [n for n in names if not isinstance(form.get(n), str) or not str(form.get(n)).strip()]
    if missing:
        raise InvalidRequest(f"missing {', '.join(missing)}", expression=missing)
    return [str(form[n]).strip() for n in names]


async def apply_status(request: Request, provider_id: str, status: str, detail: str | None) -> bool:
    """Record a provider status on the Communication the message carried; False when unknown or no change."""
    store = request.app.state.store
    kind = TWILIO_STATUS.get(status.lower())
    if kind is None:
        log.info("sms status %r for %s ignored (not a status we track)", status, provider_id)
        return False
    sent = await smslib.sent_by_provider_id(store, provider_id)
    if sent is None:
        log.warning("sms status %r for unknown message %s ignored", status, provider_id)
        return False
    changed = await engagement.record(store, str(sent.data["communication"]), kind, at=_now(request),
                                      detail=detail if kind == "failed" else None, provider_id=provider_id,
                                      base_url=request.app.state.settings.fhir_base)
    if changed:
        _wake(request)
    return changed


async def apply_inbound(request: Request, sender: str, text: str, key: str) -> bool:
    """An inbound message from ``sender``: opt-out / opt-in keywords, then the reply Communication."""
    settings = request.app.state.settings
    store = request.app.state.store
    try:
        number = smslib.normalize_number(sender, settings.sms_default_region)
    except ValueError:
        log.warning("inbound sms from unusable number %r ignored", sender)
        return False
    sent = await smslib.last_sent_to(store, number)
    if sent is None:
        log.warning("inbound sms %s from %s ignored: we never sent a message to that number", key, number)
        return False
    at = _now(request)
    word = smslib.keyword(text)
    if word is not None:
        patient = await smslib.patient_of(store, sent)
        if patient is None:
            log.warning("sms %s from %s: no patient for %s, opt-%s not recorded", word, number,
                        sent.data.get("communication"), "out" if word == "stop" else "in")
        elif word == "stop":
            await smslib.opt_out(store, patient, at=at, how=f"SMS reply {text.strip().upper()}",
                                 base_url=settings.fhir_base)
        else:
            await smslib.opt_back_in(store, patient, at=at, base_url=settings.fhir_base)
    reply = await engagement.record_reply(store, str(sent.data["communication"]), text, at=at, key=key,
                                          base_url=settings.fhir_base)
    _wake(request)
    return reply is not None


@router.post("/status")
async def twilio_status(request: Request) -> Response:
    form = await _twilio_form(request)
    sid, status = _required(form, "MessageSid", "MessageStatus")
    code = (form.get("ErrorCode") or "").strip()
    detail = f"Twilio reported {status}" + (f" (error {code})" if code else "")
    await apply_status(request, sid, status, detail)
    return Response(status_code=204)


@router.post("/inbound")
async def twilio_inbound(request: Request) -> Response:
    form = await _twilio_form(request)
    sender, sid = _required(form, "From", "MessageSid")
    await apply_inbound(request, sender, form.get("Body") or "", sid)
    return Response(EMPTY_TWIML, media_type="text/xml")


@router.post("/events")
async def webhook_events(request: Request) -> Response:
    settings = request.app.state.settings
    body = await read_body(request, settings.max_body_bytes)
    if not settings.sms_webhook_secret:
        raise Unauthorized("SMS events cannot be verified: FHIR_OUTREACH_SMS_WEBHOOK_SECRET is not set")
    if not smslib.valid_webhook_signature(settings.sms_webhook_secret, body,
                                          request.headers.get(smslib.SIGNATURE_HEADER.lower())):
        raise Unauthorized(f"missing or invalid {smslib.SIGNATURE_HEADER}")
    event = parse_json(body)
    if not isinstance(event, dict):
        raise InvalidRequest("the body must be a JSON object")
    kind = event.get("type")
    if kind == "status":
        provider_id, status = _required(event, "id", "status")
        error = event.get("error") or event.get("reason")
        detail = f"provider reported {status}" + (f" ({error})" if isinstance(error, str | int) and error else "")
        done = await apply_status(request, provider_id, status, detail)
    elif kind == "inbound":
        provider_id, sender = _required(event, "id", "from")
        text = event.get("text", "")
        if not isinstance(text, str):
            raise InvalidRequest("'text' must be a string", expression=["text"])
        done = await apply_inbound(request, sender, text, f"webhook|{provider_id}")
    else:
        raise InvalidRequest("'type' must be 'status' or 'inbound'", expression=["type"])
    return fhir_response({"result": "recorded" if done else "unchanged"}, media_type="application/json")
