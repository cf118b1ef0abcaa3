"""SMS: phone numbers in E.164, a Twilio-compatible client, a generic JSON webhook provider, and the record of
what was sent to which number (how replies and status callbacks find their Communication).

Wire protocols, as built here:

* **Twilio Messages API** — ``POST {api_url}/2010-04-01/Accounts/{sid}/Messages.json``, form-encoded ``To``,
  ``From`` (or ``MessagingServiceSid`` when the configured sender starts with ``MG``), ``Body`` and
  ``StatusCallback`` = ``{callback_base}/channels/sms/status``; HTTP basic auth ``sid:token``. The answer
  (201) is the Message resource; its ``sid`` is the provider message id. Errors carry a JSON body
  ``{"code", "message", "more_info", "status"}``; the HTTP status decides transient vs permanent
  (``base.http_failure``), and a few Twilio error codes are permanent whatever the status.
* **Idempotency** — every request carries ``I-Twilio-Idempotency-Token: <Outbound.idempotency_key>`` (the
  Communication id). What we could confirm: Twilio documents and *sends* this header on its own webhook
  requests (so receivers can drop a retried webhook; many receivers dedupe on it). We found no Twilio
  documentation saying the REST API honours it on ``Messages.json`` requests. We send it anyway: a
  Twilio-compatible provider that honours it (our test peer does) turns a resend after a crash into a
  no-op, and Twilio ignores unknown request headers. With real Twilio the protection against a double send
  is therefore the delivery pipeline's own record, not this header.
* **Generic JSON provider** — ``POST sms_api_url`` with ``{"id", "to", "from", "text", "status_callback"}``
  and ``X-Outreach-Signature: sha256=<hex HMAC-SHA256(body, sms_webhook_secret)>``; the answer's ``id`` or
  ``message_id`` is the provider message id (our ``id`` when it names none). Its status and inbound events
  come back to ``/channels/sms/events`` signed the same way.

``remember_sent`` keeps an ``sms-sent`` record per provider message (key: provider id; group: the E.164
number; data: communication id, patient reference, time). The delivery pipeline calls it right after a
successful send; the callbacks (``api/channel_sms.py``) use it to find the Communication a status update or
an inbound reply belongs to — the store cannot search Communications by extension.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
import phonenumbers

from ..errors import PreconditionFailed
from ..store import Store, Write
from ..store.base import Record, prepare
from ..work.clock import fhir_instant, to_datetime
from .base import DeliveryFailed, Outbound, Sent, http_failure
from .optout import opt_out_consent, record_opt_out

log = logging.getLogger("fhir_outreach.channels.sms")

SENT = "sms-sent"  # Record kind: provider message id -> Communication, by number
STATUS_PATH = "/channels/sms/status"
INBOUND_PATH = "/channels/sms/inbound"
EVENTS_PATH = "/channels/sms/events"
SIGNATURE_HEADER = "X-Outreach-Signature"
IDEMPOTENCY_HEADER = "I-Twilio-Idempotency-Token"

# Twilio error codes that no retry can fix (https://www.twilio.com/docs/api/errors/<code>).
PERMANENT_TWILIO_CODES = {
    21211: "invalid 'To' phone number",
    21408: "sending to this region is not enabled",
    21606: "the 'From' number cannot send SMS",
    21608: "the 'To' number is not verified (trial account)",
    21610: "the recipient unsubscribed from this sender (replied STOP)",
    21612: "the 'To' number cannot be reached from this sender",
    21614: "the 'To' number is not a mobile number",
    21635: "the 'To' number is a landline",
}
STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
START_WORDS = frozenset({"START", "UNSTOP"})


# --- numbers ---------------------------------------------------------------------------------------------

def normalize_number(text: str, default_region: str) -> str:
    """``text`` as an E.164 number (``+14155550123``); numbers without a country code are read in
    ``default_region`` (ISO 3166 alpha-2). ValueError when it is not a possible, valid number."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty phone number")
    try:
        parsed = phonenumbers.parse(text.strip(), (default_region or "").upper() or None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number: {text!r} ({exc})") from exc
    if not phonenumbers.is_possible_number(parsed) or not phonenumbers.is_valid_number(parsed):
        raise ValueError(f"not a valid phone number: {text!r}")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


# --- signatures ------------------------------------------------------------------------------------------

def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """Twilio's request signature (``X-Twilio-Signature``): the full URL Twilio requested (query string
    included), then every POST parameter sorted by name, each name immediately followed by its value;
    HMAC-SHA1 of that string under the auth token, base64-encoded. Repeated names contribute each of their
    values, sorted. https://www.twilio.com/docs/usage/security#validating-requests"""
    grouped: dict[str, list[str]] = {}
    for key, value in params:
        grouped.setdefault(key, []).append(value)
    data = url + "".join(key + value for key in sorted(grouped) for value in sorted(grouped[key]))
    mac = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


def _url_variants(url: str) -> list[str]:
    """The URL as given, and with the scheme's default port added or removed: Twilio has signed both forms
    over the years, and its own validators accept either."""
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    out = [url]
    if default is None or not parts.hostname:
        return out
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    auth = parts.netloc.rpartition("@")[0]
    prefix = f"{auth}@" if auth else ""
    if parts.port is None:
        out.append(urlunsplit(parts._replace(netloc=f"{prefix}{host}:{default}")))
    elif parts.port == default:
        out.append(urlunsplit(parts._replace(netloc=f"{prefix}{host}")))
    return out


def valid_twilio_signature(auth_token: str, url: str, params: Sequence[tuple[str, str]],
                           signature: str | None) -> bool:
    if not signature or not auth_token:
        return False
    return any(hmac.compare_digest(twilio_signature(auth_token, u, params).encode(), signature.strip().encode())
               for u in _url_variants(url))


def webhook_signature(secret: str, body: bytes) -> str:
    """``X-Outreach-Signature`` of the generic JSON provider: ``sha256=<hex HMAC-SHA256 of the raw body>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def valid_webhook_signature(secret: str | None, body: bytes, signature: str | None) -> bool:
    if not secret or not signature:
        return False
    return hmac.compare_digest(webhook_signature(secret, body).encode(), signature.strip().encode())


# --- adapters --------------------------------------------------------------------------------------------

def _number_or_fail(to: str, region: str) -> str:
    try:
        return normalize_number(to, region)
    except ValueError as exc:
        raise DeliveryFailed(str(exc), permanent=True, code="no-address") from exc


def _transport_failure(exc: httpx.HTTPError) -> DeliveryFailed:
    return DeliveryFailed(f"provider unreachable: {type(exc).__name__}: {exc}", permanent=False, code="network")


class TwilioChannel:
    """A Twilio-compatible Messages API client (one shared HTTP client; close with ``aclose``)."""

    name = "sms"

    def __init__(self, api_url: str, account_sid: str, auth_token: str, sender: str, *,
                 default_region: str = "US", timeout: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not (api_url and account_sid and auth_token and sender):
            raise ValueError("the Twilio SMS channel needs sms_api_url, sms_account_sid, sms_auth_token and sms_from")
        self.url = f"{api_url.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"
        self.sender = sender
        self.region = default_region
        self.http = httpx.AsyncClient(auth=(account_sid, auth_token), timeout=timeout, transport=transport)

    def form(self, message: Outbound) -> dict[str, str]:
        form = {"To": _number_or_fail(message.to, self.region), "Body": message.text}
        if self.sender.startswith("MG"):
            form["MessagingServiceSid"] = self.sender
        else:
            form["From"] = self.sender
        if message.callback_base:
            form["StatusCallback"] = message.callback_base.rstrip("/") + STATUS_PATH
        return form

    async def send(self, message: Outbound) -> Sent:
        form = self.form(message)
        headers = {"Accept": "application/json"}
        if message.idempotency_key:
            headers[IDEMPOTENCY_HEADER] = message.idempotency_key
        try:
            response = await self.http.post(self.url, data=form, headers=headers)
        except httpx.HTTPError as exc:
            raise _transport_failure(exc) from exc
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        if response.is_success:
            sid = body.get("sid") if isinstance(body, dict) else None
            if not isinstance(sid, str) or not sid:
                raise DeliveryFailed(f"provider answered {response.status_code} without a message sid",
                                     permanent=False, code="bad-answer")
            return Sent(provider_id=sid)
        raise twilio_failure(response.status_code, body, response.text, response.headers.get("retry-after"))

    async def aclose(self) -> None:
        await self.http.aclose()


def twilio_failure(status: int, body: Any, text: str, retry_after: str | None) -> DeliveryFailed:
    """``http_failure`` with Twilio's error code in the reason; permanent for codes no retry can fix."""
    code = body.get("code") if isinstance(body, dict) else None
    detail = str(body.get("message") or text) if isinstance(body, dict) else text
    failure = http_failure(status, f"Twilio error {code}: {detail}" if code else detail, retry_after=retry_after)
    if isinstance(code, int):
        failure.code = f"twilio-{code}"
        if code in PERMANENT_TWILIO_CODES:
            failure.permanent = True
            failure.retry_after = None
            failure.reason = f"{failure.reason} ({PERMANENT_TWILIO_CODES[code]})"
            failure.args = (failure.reason,)
    return failure


class WebhookSmsChannel:
    """The generic JSON SMS provider: a signed POST per message."""

    name = "sms"

    def __init__(self, api_url: str, secret: str, sender: str | None = None, *, default_region: str = "US",
                 timeout: float = 10.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not (api_url and secret):
            raise ValueError("the webhook SMS channel needs sms_api_url and sms_webhook_secret")
        self.url = api_url
        self.secret = secret
        self.sender = sender
        self.region = default_region
        self.http = httpx.AsyncClient(timeout=timeout, transport=transport)

    def payload(self, message: Outbound) -> dict[str, Any]:
        return {"id": message.idempotency_key, "to": _number_or_fail(message.to, self.region),
                "from": self.sender, "text": message.text,
                "status_callback": message.callback_base.rstrip("/") + EVENTS_PATH if message.callback_base else None}

    async def send(self, message: Outbound) -> Sent:
        body = orjson.dumps(self.payload(message))
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   SIGNATURE_HEADER: webhook_signature(self.secret, body)}
        if message.idempotency_key:
            headers["Idempotency-Key"] = message.idempotency_key
        try:
            response = await self.http.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise _transport_failure(exc) from exc
        if not response.is_success:
            raise http_failure(response.status_code, response.text, retry_after=response.headers.get("retry-after"))
        try:
            answer: Any = response.json() if response.content.strip() else {}
        except ValueError:
            answer = {}
        found = (answer.get("id") or answer.get("message_id")) if isinstance(answer, dict) else None
        provider_id = str(found) if found else message.idempotency_key
        if not provider_id:
            raise DeliveryFailed("provider answered without a message id", permanent=False, code="bad-answer")
        return Sent(provider_id=provider_id)

    async def aclose(self) -> None:
        await self.http.aclose()


def sms_channel(settings: Any, *, transport: httpx.AsyncBaseTransport | None = None
                ) -> TwilioChannel | WebhookSmsChannel | None:
    """The SMS adapter the settings configure (None when ``sms_provider`` is ``none``); ValueError naming
    the missing settings when the provider is chosen but incomplete."""
    if settings.sms_provider == "twilio":
        return TwilioChannel(settings.sms_api_url or "https://api.twilio.com", settings.sms_account_sid or "",
                             settings.sms_auth_token or "", settings.sms_from or "",
                             default_region=settings.sms_default_region, transport=transport)
    if settings.sms_provider == "webhook":
        return WebhookSmsChannel(settings.sms_api_url or "", settings.sms_webhook_secret or "", settings.sms_from,
                                 default_region=settings.sms_default_region, transport=transport)
    return None


# --- what was sent where ---------------------------------------------------------------------------------

def _bare(communication: str) -> str:
    return communication.removeprefix("Communication/")


async def remember_sent(store: Store, provider_id: str, communication_id: str, to_number: str,
                        patient_ref: str | None, *, at: float | None = None) -> bool:
    """Note that provider message ``provider_id`` carried ``Communication/{communication_id}`` to
    ``to_number`` (E.164) for ``patient_ref``. Idempotent (same provider id: no-op); True when added."""
    moment = time.time() if at is None else at
    return await store.add_record(Record(SENT, provider_id, state="sent", group=to_number, data={
        "communication": _bare(communication_id), "patient": patient_ref, "at": moment}), now=moment)


async def sent_by_provider_id(store: Store, provider_id: str) -> Record | None:
    return await store.get_record(SENT, provider_id)


async def last_sent_to(store: Store, number: str) -> Record | None:
    """The most recent message we sent to ``number`` (E.164): what an inbound reply from it answers."""
    found = await store.list_records(SENT, group=number, limit=1)
    return found[0] if found else None


async def patient_of(store: Store, sent: Record) -> str | None:
    """The patient a sent message was for: as remembered, else the Communication's subject."""
    patient = sent.data.get("patient")
    if isinstance(patient, str) and patient:
        return patient
    stored = await store.read("Communication", str(sent.data.get("communication")))
    subject = (stored.resource or {}).get("subject") if stored is not None else None
    ref = subject.get("reference") if isinstance(subject, Mapping) else None
    return ref if isinstance(ref, str) else None


# --- opt-out and opt back in -----------------------------------------------------------------------------

def keyword(text: str) -> str | None:
    """``stop`` or ``start`` when a reply is one of the carrier opt-out / opt-in keywords (the whole body,
    trimmed, any case), else None."""
    word = (text or "").strip().upper()
    if word in STOP_WORDS:
        return "stop"
    if word in START_WORDS:
        return "start"
    return None


async def _set_opt_out_status(store: Store, patient_ref: str, *, active: bool, at: float,
                              base_url: str | None) -> bool:
    """Turn the patient's SMS opt-out Consent (``optout.opt_out_consent`` id) active or inactive."""
    rid = opt_out_consent(patient_ref, "sms", at, "sms")["id"]
    for _ in range(5):
        stored = await store.read("Consent", rid)
        if stored is None or stored.resource is None or stored.deleted:
            return False
        consent = dict(stored.resource)
        if (consent.get("status") == "active") == active:
            return False
        provision = dict(consent.get("provision") or {})
        period = dict(provision.get("period") or {})
        if active:
            consent["status"], consent["dateTime"] = "active", fhir_instant(at)
            period = {"start": fhir_instant(at)}
        else:
            consent["status"] = "inactive"
            period["end"] = fhir_instant(at)
        provision["period"] = period
        consent["provision"] = provision
        try:
            await store.commit([prepare(Write("Consent", rid, consent, expect=stored.version), base_url)],
                               now=to_datetime(at))
        except PreconditionFailed:
            continue
        return True
    return False


async def opt_out(store: Store, patient_ref: str, *, at: float, how: str, base_url: str | None = None) -> str:
    """STOP: the SMS opt-out Consent exists and is active (re-activated after an earlier START)."""
    ref = await record_opt_out(store, patient_ref, "sms", at=at, how=how, base_url=base_url)
    await _set_opt_out_status(store, patient_ref, active=True, at=at, base_url=base_url)
    return ref


async def opt_back_in(store: Store, patient_ref: str, *, at: float, base_url: str | None = None) -> bool:
    """START / UNSTOP: the SMS opt-out Consent becomes ``inactive`` (its provision period ends now).

    Chosen over recording a permit Consent: a permit would read as consent to outreach in restrictive mode
    (more than "resume texting me") and would leave deny and permit to be reconciled; marking the deny
    inactive restores exactly the state before STOP, keeps the history (every version is kept), and a
    later STOP turns the same Consent active again. True when something changed."""
    return await _set_opt_out_status(store, patient_ref, active=False, at=at, base_url=base_url)
