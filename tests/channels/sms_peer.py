"""A local SMS provider speaking the Twilio Messages API contract (and a generic JSON webhook provider), served
by uvicorn on a real socket (127.0.0.1, free port) inside the test's event loop.

Twilio side, as the peer enforces it:
* ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``, HTTP basic auth ``AccountSid:AuthToken`` (401,
  code 20003 otherwise; another account in the path: 404, code 20404), form-encoded (415 otherwise);
  ``To`` required and E.164 (21604 / 21211), ``Body`` required (21602), ``From`` or ``MessagingServiceSid``
  required (21603); answers 201 with the Message resource (``sid`` ``SM…``, ``status`` ``queued``).
* ``I-Twilio-Idempotency-Token``: a token seen before answers the same message again; nothing new is stored.
* ``fail_next``: the next request(s) answer a given HTTP status / Twilio error code / ``Retry-After``.

Callbacks back to the app under test are explicit helpers (``status_callback``, ``inbound``,
``webhook_event``) that POST through any httpx client (the in-process app client) and sign exactly as the
provider does: ``X-Twilio-Signature`` = base64(HMAC-SHA1(auth token, URL + sorted name+value pairs)), computed
here independently of the code under test; ``X-Outreach-Signature`` = ``sha256=`` hex HMAC-SHA256 of the body.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

E164 = re.compile(r"^\+[1-9]\d{1,14}$")


def sign_twilio(auth_token: str, url: str, params: dict[str, str]) -> str:
    data = url + "".join(k + params[k] for k in sorted(params))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def sign_webhook(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass
class Failure:
    status: int
    code: int | None = None
    message: str = "failure requested by the test"
    retry_after: str | None = None


@dataclass
class PeerMessage:
    sid: str
    to: str
    sender: str | None
    service: str | None
    body: str
    status_callback: str | None
    token: str | None
    status: str = "queued"
    raw: dict[str, str] = field(default_factory=dict)


class SmsPeer:
    """``async with SmsPeer() as peer``: ``peer.api_url`` is the Twilio API root, ``peer.webhook_url`` the
    JSON provider endpoint."""

    def __init__(self, *, account_sid: str | None = None, auth_token: str | None = None,
                 webhook_secret: str = "webhook-secret-0123456789", public_base: str = "http://testserver") -> None:
        self.account_sid = account_sid or "AC" + secrets.token_hex(16)
        self.auth_token = auth_token or secrets.token_hex(16)
        self.webhook_secret = webhook_secret
        self.public_base = public_base.rstrip("/")
        self.messages: list[PeerMessage] = []
        self.by_token: dict[str, PeerMessage] = {}
        self.webhook_messages: list[dict[str, Any]] = []
        self.webhook_by_id: dict[str, str] = {}
        self.requests: list[dict[str, Any]] = []  # every API request: method, path, headers, form/json
        self.failures: list[Failure] = []
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    # --- control -----------------------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhook/messages"

    def fail_next(self, status: int, *, code: int | None = None, message: str = "failure requested by the test",
                  retry_after: str | None = None, times: int = 1) -> None:
        self.failures.extend(Failure(status, code, message, retry_after) for _ in range(times))

    def message(self, sid: str) -> PeerMessage:
        return next(m for m in self.messages if m.sid == sid)

    # --- server --------------------------------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/2010-04-01/Accounts/{account}/Messages.json", self._create, methods=["POST"]),
            Route("/2010-04-01/Accounts/{account}/Messages/{sid}.json", self._fetch, methods=["GET"]),
            Route("/webhook/messages", self._webhook, methods=["POST"]),
        ])

    async def __aenter__(self) -> SmsPeer:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(self.app(), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        for _ in range(500):
            if self._server.started:
                break
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("the SMS peer did not start")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._server is not None and self._task is not None
        self._server.should_exit = True
        await self._task

    @staticmethod
    def _twilio_error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse({"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
                             "status": status}, status_code=status, headers=headers)

    def _failure(self) -> Response | None:
        if not self.failures:
            return None
        f = self.failures.pop(0)
        headers = {"Retry-After": f.retry_after} if f.retry_after else None
        if f.code is not None:
            return self._twilio_error(f.status, f.code, f.message, headers)
        return Response(f.message, status_code=f.status, headers=headers, media_type="text/plain")

    def _authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return hmac.compare_digest(f"{user}:{password}", f"{self.account_sid}:{self.auth_token}")

    def _view(self, m: PeerMessage) -> dict[str, Any]:
        return {"sid": m.sid, "account_sid": self.account_sid, "to": m.to, "from": m.sender,
                "messaging_service_sid": m.service, "body": m.body, "status": m.status, "num_segments": "1",
                "direction": "outbound-api", "api_version": "2010-04-01", "error_code": None, "error_message": None,
                "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{m.sid}.json"}

    async def _create(self, request: Request) -> Response:
        raw = await request.body()
        form_pairs = parse_qsl(raw.decode(), keep_blank_values=True)
        form = dict(form_pairs)
        self.requests.append({"method": request.method, "path": request.url.path, "headers": dict(request.headers),
                              "form": form})
        if not self._authorized(request):
            return self._twilio_error(401, 20003, "Authenticate", {"WWW-Authenticate": 'Basic realm="Twilio API"'})
        if request.path_params["account"] != self.account_sid:
            return self._twilio_error(404, 20404, "The requested resource was not found")
        failure = self._failure()
        if failure is not None:
            return failure
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype != "application/x-www-form-urlencoded":
            return self._twilio_error(415, 20415, f"unsupported Content-Type {ctype!r}")
        token = request.headers.get("i-twilio-idempotency-token")
        if token and token in self.by_token:
            return JSONResponse(self._view(self.by_token[token]), status_code=201)
        if not form.get("To"):
            return self._twilio_error(400, 21604, "A 'To' phone number is required.")
        if not E164.match(form["To"]):
            return self._twilio_error(400, 21211, f"The 'To' number {form['To']} is not a valid phone number.")
        if not form.get("Body"):
            return self._twilio_error(400, 21602, "Message body is required.")
        if not form.get("From") and not form.get("MessagingServiceSid"):
            return self._twilio_error(400, 21603, "The 'From' phone number or MessagingServiceSid is required.")
        m = PeerMessage(sid="SM" + secrets.token_hex(16), to=form["To"], sender=form.get("From"),
                        service=form.get("MessagingServiceSid"), body=form["Body"],
                        status_callback=form.get("StatusCallback"), token=token,
                        status="accepted" if form.get("MessagingServiceSid") else "queued", raw=form)
        self.messages.append(m)
        if token:
            self.by_token[token] = m
        return JSONResponse(self._view(m), status_code=201)

    async def _fetch(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._twilio_error(401, 20003, "Authenticate")
        found = [m for m in self.messages if m.sid == request.path_params["sid"]]
        if not found:
            return self._twilio_error(404, 20404, "The requested resource was not found")
        return JSONResponse(self._view(found[0]))

    async def _webhook(self, request: Request) -> Response:
        body = await request.body()
        self.requests.append({"method": request.method, "path": request.url.path, "headers": dict(request.headers),
                              "body": body})
        given = request.headers.get("x-outreach-signature", "")
        if not hmac.compare_digest(given.encode(), sign_webhook(self.webhook_secret, body).encode()):
            return JSONResponse({"error": "bad signature"}, status_code=401)
        failure = self._failure()
        if failure is not None:
            return failure
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return JSONResponse({"error": "not JSON"}, status_code=400)
        if not isinstance(payload, dict) or not payload.get("id") or not E164.match(str(payload.get("to"))) \
                or not payload.get("text"):
            return JSONResponse({"error": "id, to (E.164) and text are required"}, status_code=422)
        key = str(payload["id"])
        if key not in self.webhook_by_id:
            self.webhook_by_id[key] = "wh-" + secrets.token_hex(8)
            self.webhook_messages.append({**payload, "message_id": self.webhook_by_id[key]})
        return JSONResponse({"message_id": self.webhook_by_id[key], "status": "accepted"}, status_code=202)

    # --- callbacks to the app under test --------------------------------------------------------------------

    async def post_signed(self, client: httpx.AsyncClient, url: str, params: dict[str, str], *,
                          signature: str | None = None) -> httpx.Response:
        """POST ``params`` form-encoded to ``url`` (absolute, as the provider sees it) with Twilio's signature
        (or ``signature`` as given, to test refusals)."""
        sig = sign_twilio(self.auth_token, url, params) if signature is None else signature
        return await client.post(url, data=params, headers={"X-Twilio-Signature": sig})

    async def status_callback(self, client: httpx.AsyncClient, sid: str, status: str, *,
                              error_code: str | None = None, signature: str | None = None) -> httpx.Response:
        """What Twilio posts to the message's StatusCallback when its status changes."""
        m = self.message(sid)
        assert m.status_callback, "the message was sent without a StatusCallback"
        m.status = status
        params = {"AccountSid": self.account_sid, "ApiVersion": "2010-04-01", "MessageSid": sid, "SmsSid": sid,
                  "MessageStatus": status, "SmsStatus": status, "To": m.to, "From": m.sender or "+15005550006"}
        if m.service:
            params["MessagingServiceSid"] = m.service
        if error_code:
            params["ErrorCode"] = error_code
        return await self.post_signed(client, m.status_callback, params, signature=signature)

    async def inbound(self, client: httpx.AsyncClient, sender: str, body: str, *, to: str = "+15005550006",
                      url: str | None = None, signature: str | None = None,
                      sid: str | None = None) -> httpx.Response:
        """What Twilio posts to a number's messaging webhook when someone texts it."""
        sid = sid or "SM" + secrets.token_hex(16)
        params = {"AccountSid": self.account_sid, "ApiVersion": "2010-04-01", "MessageSid": sid, "SmsSid": sid,
                  "SmsMessageSid": sid, "SmsStatus": "received", "From": sender, "To": to, "Body": body,
                  "NumMedia": "0", "NumSegments": "1", "FromCountry": "US", "ToCountry": "US"}
        return await self.post_signed(client, url or f"{self.public_base}/channels/sms/inbound", params,
                                      signature=signature)

    async def webhook_event(self, client: httpx.AsyncClient, event: dict[str, Any] | bytes, *,
                            signature: str | None = None, url: str | None = None) -> httpx.Response:
        """The JSON provider's signed event (status or inbound) to ``/channels/sms/events``."""
        body = event if isinstance(event, bytes) else orjson.dumps(event)
        sig = sign_webhook(self.webhook_secret, body) if signature is None else signature
        return await client.post(url or f"{self.public_base}/channels/sms/events", content=body,
                                 headers={"Content-Type": "application/json", "X-Outreach-Signature": sig})
