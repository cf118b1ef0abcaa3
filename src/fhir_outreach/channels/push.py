"""Web Push: notifications to a patient's registered browsers and devices (RFC 8030 push protocol, RFC 8291
message encryption, RFC 8292 VAPID), through ``pywebpush``.

A browser subscribes with our VAPID public key (``applicationServerKey``) and gives the portal its
``PushSubscription`` JSON (``endpoint`` + ``keys.p256dh`` + ``keys.auth``); the portal registers it here per
patient (``api/channel_push.py``; records of kind ``push-subscription``, key sha256(endpoint), group the
patient). To send, the JSON payload ``{"title", "body", "communication"}`` is encrypted for that subscription
(``aes128gcm``, by pywebpush) and POSTed to the endpoint with ``TTL`` and a VAPID ``Authorization: vapid
t=<ES256 JWT>, k=<public key>`` header (``aud`` the endpoint's origin, ``exp`` 12 h ahead: at most 24 h is
allowed). The push service answers ``201 Created`` with a ``Location`` naming the message (some answer
200/202); ``404``/``410`` mean the subscription is gone for good — permanent, code ``subscription-gone``, and
the caller should drop it with ``unregister``; ``429`` and ``5xx`` are transient.

The VAPID key is ``FHIR_OUTREACH_VAPID_PRIVATE_KEY`` (a PEM file path, or base64url of the raw 32-byte
scalar or of DER), else ``<data_dir>/vapid-private.pem``, generated on first use with mode 0600. Changing it
invalidates every subscription (browsers bind a subscription to the key).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02, VapidException
from pywebpush import WebPusher, WebPushException

from ..errors import InvalidRequest, SettingsError
from ..store import Store
from ..store.base import Record
from .base import DeliveryFailed, Outbound, Sent, http_failure

SUBSCRIPTION = "push-subscription"
VAPID_KEY_FILE = "vapid-private.pem"
DEFAULT_TTL_SECONDS = 24 * 3600
VAPID_LIFETIME_SECONDS = 12 * 3600
# RFC 8291: push services accept at least 4096 octets of encrypted payload; aes128gcm adds an 86-octet
# header (salt, record size, key id = our 65-octet ephemeral key), a 16-octet tag and a 1-octet delimiter.
MAX_PLAINTEXT = 4096 - 86 - 16 - 1
URGENCIES = ("very-low", "low", "normal", "high")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- the VAPID key ------------------------------------------------------------------------------------------

def _parse_key(text: str, origin: str) -> ec.EllipticCurvePrivateKey:
    text = text.strip()
    try:
        if "-----BEGIN" in text:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        else:
            raw = _unb64(text.replace("\n", ""))
            if len(raw) == 32:
                key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
            else:
                key = serialization.load_der_private_key(raw, password=None)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise SettingsError(f"invalid setting FHIR_OUTREACH_VAPID_PRIVATE_KEY: {origin} is not a PEM, DER or "
                            f"raw base64url EC private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SettingsError(f"invalid setting FHIR_OUTREACH_VAPID_PRIVATE_KEY: {origin} is not a P-256 EC key")
    return key


def load_vapid_key(configured: str | None, data_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The VAPID private key from settings (PEM file path or base64url), else ``data_dir/vapid-private.pem``
    (created 0600 on first use; another process creating it first wins)."""
    if configured:
        path = Path(configured)
        if path.is_file():
            return _parse_key(path.read_text(), str(path))
        if "/" in configured and not configured.startswith("-----"):
            raise SettingsError(f"invalid setting FHIR_OUTREACH_VAPID_PRIVATE_KEY: no such file {configured}")
        return _parse_key(configured, "the value")
    path = data_dir / VAPID_KEY_FILE
    if path.exists():
        return _parse_key(path.read_text(), str(path))
    data_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first
        time.sleep(0.1)
        return _parse_key(path.read_text(), str(path))
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key


def application_server_key(key: ec.EllipticCurvePrivateKey) -> str:
    """The public key as the browser's ``pushManager.subscribe({applicationServerKey})`` wants it: the
    uncompressed P-256 point, base64url without padding."""
    return _b64(key.public_key().public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint))


# --- subscriptions --------------------------------------------------------------------------------------------

def endpoint_key(endpoint: str) -> str:
    return hashlib.sha256(endpoint.encode()).hexdigest()


def _loopback_http(endpoint: str) -> bool:
    parts = urlsplit(endpoint)
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")


def validate_subscription(value: Any, *, allow_loopback_http: bool = False) -> dict[str, Any]:
    """A browser ``PushSubscription`` JSON, checked and reduced to what sending needs; InvalidRequest naming
    the field otherwise. Endpoints must be https (plain http only to the loopback, and only when allowed)."""
    if not isinstance(value, dict):
        raise InvalidRequest("'subscription' must be a PushSubscription JSON object", expression=["subscription"])
    endpoint = value.get("endpoint")
    if not isinstance(endpoint, str) or len(endpoint) > 2048:
        raise InvalidRequest("'subscription.endpoint' must be a URL", expression=["subscription.endpoint"])
    parts = urlsplit(endpoint)
    if not parts.hostname or not (parts.scheme == "https" or (allow_loopback_http and _loopback_http(endpoint))):
        raise InvalidRequest("'subscription.endpoint' must be an https URL of a push service",
                             expression=["subscription.endpoint"])
    keys = value.get("keys")
    if not isinstance(keys, dict):
        raise InvalidRequest("'subscription.keys' must hold 'p256dh' and 'auth'", expression=["subscription.keys"])
    p256dh, auth = keys.get("p256dh"), keys.get("auth")
    try:
        point = _unb64(p256dh) if isinstance(p256dh, str) else b""
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        if len(point) != 65:
            raise ValueError("not an uncompressed point")
    except (ValueError, binascii.Error) as exc:
        raise InvalidRequest("'subscription.keys.p256dh' must be a base64url uncompressed P-256 public key",
                             expression=["subscription.keys.p256dh"]) from exc
    try:
        secret = _unb64(auth) if isinstance(auth, str) else b""
    except (ValueError, binascii.Error):
        secret = b""
    if len(secret) != 16:
        raise InvalidRequest("'subscription.keys.auth' must be the base64url 16-octet authentication secret",
                             expression=["subscription.keys.auth"])
    out: dict[str, Any] = {"endpoint": endpoint, "keys": {"p256dh": p256dh, "auth": auth}}
    expiration = value.get("expirationTime")
    if isinstance(expiration, int | float) and not isinstance(expiration, bool):
        out["expirationTime"] = expiration
    return out


async def register(store: Store, patient: str, subscription: dict[str, Any], *, now: float | None = None,
                   user_agent: str | None = None) -> tuple[Record, bool]:
    """Store (or refresh) one device's subscription for ``patient``; True when it was new."""
    key = endpoint_key(subscription["endpoint"])
    data: dict[str, Any] = {"patient": patient, "subscription": subscription}
    if user_agent:
        data["user_agent"] = user_agent[:300]
    for _ in range(5):
        existing = await store.get_record(SUBSCRIPTION, key)
        if existing is None:
            rec = Record(SUBSCRIPTION, key, state="active", group=patient, data=data)
            if await store.add_record(rec, now=now):
                return rec, True
            continue
        existing.state, existing.group, existing.data = "active", patient, data
        if await store.save_record(existing, now=now):
            return existing, False
    raise InvalidRequest("the subscription changed concurrently; try again")


async def unregister(store: Store, endpoint: str, *, now: float | None = None) -> bool | None:
    """Retire the subscription of ``endpoint`` (the user unsubscribed, or the push service said 404/410).
    True when it was active, False when already retired, None when never registered."""
    for _ in range(5):
        existing = await store.get_record(SUBSCRIPTION, endpoint_key(endpoint))
        if existing is None:
            return None
        if existing.state != "active":
            return False
        existing.state = "removed"
        if await store.save_record(existing, now=now):
            return True
    return False


async def subscriptions_for(store: Store, patient_ref: str, *, now: float | None = None) -> list[dict[str, Any]]:
    """The active subscriptions of ``Patient/x`` (newest first), as ``PushSubscription`` JSON objects whose
    ``json.dumps`` is what ``Outbound.to`` carries; ones past their ``expirationTime`` are left out."""
    moment_ms = (time.time() if now is None else now) * 1000
    records = await store.list_records(SUBSCRIPTION, state="active", group=patient_ref, limit=100)
    out = []
    for rec in records:
        sub = rec.data.get("subscription")
        if not isinstance(sub, dict):
            continue
        expiration = sub.get("expirationTime")
        if isinstance(expiration, int | float) and expiration < moment_ms:
            continue
        out.append(sub)
    return out


# --- sending --------------------------------------------------------------------------------------------------

def notification(message: Outbound, default_title: str = "Message from your care team") -> bytes:
    """The plaintext payload: ``{"title", "body", "communication"}``, the body shortened to fit one push."""
    title = message.subject or default_title
    text, body = message.text, message.text

    def encode(b: str) -> bytes:
        return orjson.dumps({"title": title, "body": b, "communication": message.communication})

    overhead = len(encode("…"))
    keep = len(text)
    raw = encode(body)
    while len(raw) > MAX_PLAINTEXT and keep > 0:
        # shrink in proportion to the bytes over budget (characters may take several bytes once escaped)
        keep = min(keep - 1, int(keep * max(0, MAX_PLAINTEXT - overhead) / max(1, len(raw) - overhead + 3)))
        body = text[:keep].rstrip() + "…" if keep > 0 else ""
        raw = encode(body)
    return raw


class PushChannel:
    """Sends to the subscription JSON in ``Outbound.to``. ``Outbound.extra`` may set ``ttl`` (seconds) and
    ``urgency`` (very-low | low | normal | high)."""

    name = "push"

    def __init__(self, vapid_key: ec.EllipticCurvePrivateKey, subject: str, *,
                 ttl_seconds: int = DEFAULT_TTL_SECONDS, client: httpx.AsyncClient | None = None,
                 timeout: float = 10.0) -> None:
        self.vapid = Vapid02(private_key=vapid_key)
        self.subject = subject
        self.ttl_seconds = int(ttl_seconds)
        self._own = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    def _headers(self, endpoint: str, message: Outbound) -> dict[str, str]:
        parts = urlsplit(endpoint)
        claims = {"sub": self.subject, "aud": f"{parts.scheme}://{parts.netloc}",
                  "exp": int(time.time()) + VAPID_LIFETIME_SECONDS}
        try:
            auth = self.vapid.sign(claims)
        except VapidException as exc:
            raise DeliveryFailed(f"cannot sign the VAPID header: {exc} (check FHIR_OUTREACH_VAPID_SUBJECT)",
                                 permanent=True, code="config") from exc
        ttl = message.extra.get("ttl", self.ttl_seconds)
        urgency = message.extra.get("urgency", "normal")
        headers = {"Authorization": auth["Authorization"], "TTL": str(max(0, int(ttl))),
                   "Content-Encoding": "aes128gcm", "Content-Type": "application/octet-stream",
                   "Urgency": urgency if urgency in URGENCIES else "normal"}
        return headers

    async def send(self, message: Outbound) -> Sent:
        try:
            subscription = orjson.loads(message.to)
            subscription = validate_subscription(subscription, allow_loopback_http=True)
        except (orjson.JSONDecodeError, InvalidRequest) as exc:
            raise DeliveryFailed(f"the push address is not a usable subscription: {exc}", permanent=True,
                                 code="no-address") from exc
        endpoint = subscription["endpoint"]
        try:
            body = WebPusher(subscription).encode(notification(message), "aes128gcm")["body"]
        except (WebPushException, ValueError) as exc:
            raise DeliveryFailed(f"cannot encrypt for this subscription: {exc}", permanent=True,
                                 code="no-address") from exc
        headers = self._headers(endpoint, message)
        try:
            resp = await self._client.post(endpoint, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise DeliveryFailed(f"push service timed out: {exc!r}", permanent=False, code="timeout") from exc
        except httpx.TransportError as exc:
            raise DeliveryFailed(f"cannot reach the push service: {exc!r}", permanent=False,
                                 code="network") from exc
        if resp.status_code in (200, 201, 202):
            return Sent(provider_id=resp.headers.get("location") or message.idempotency_key
                        or message.communication.removeprefix("Communication/"))
        if resp.status_code in (404, 410):
            raise DeliveryFailed(f"push service answered {resp.status_code}: the subscription is gone",
                                 permanent=True, code="subscription-gone")
        raise http_failure(resp.status_code, resp.text, retry_after=resp.headers.get("retry-after"))

    async def aclose(self) -> None:
        if self._own:
            await self._client.aclose()
