"""Signed links and callback tokens: tracking pixels, click redirects, Teams action buttons.

A token is ``base64url(json payload).base64url(HMAC-SHA256)`` under a key derived from the hook master key
(so every ``serve`` process sharing that key accepts every other's links). Payloads carry what the callback
needs (the Communication, the action, the redirect target) and optionally an expiry; a token that does not
verify is refused without saying which part was wrong.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

import orjson


class BadToken(ValueError):
    pass


def derive_key(master: bytes, purpose: str = "channel-links") -> bytes:
    return hmac.new(master, purpose.encode(), hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(key: bytes, payload: dict[str, Any], *, ttl_seconds: float | None = None) -> str:
    body = dict(payload)
    if ttl_seconds is not None:
        body["exp"] = int(time.time() + ttl_seconds)
    raw = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    mac = hmac.new(key, raw, hashlib.sha256).digest()
    return f"{_b64(raw)}.{_b64(mac)}"


def verify(key: bytes, token: str, *, now: float | None = None) -> dict[str, Any]:
    try:
        raw_b64, mac_b64 = token.split(".", 1)
        raw, mac = _unb64(raw_b64), _unb64(mac_b64)
    except (ValueError, TypeError) as exc:
        raise BadToken("malformed token") from exc
    if not hmac.compare_digest(mac, hmac.new(key, raw, hashlib.sha256).digest()):
        raise BadToken("bad signature")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadToken("malformed token") from exc
    if not isinstance(payload, dict):
        raise BadToken("malformed token")
    exp = payload.get("exp")
    if exp is not None and (now if now is not None else time.time()) > float(exp):
        raise BadToken("expired token")
    return payload
