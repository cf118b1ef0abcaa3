"""Web Push against a real peer: a local HTTP server playing the push service, which checks the VAPID
``Authorization`` header (ES256 JWT verified with PyJWT against the key in ``k``, ``aud`` the endpoint's
origin, ``exp`` within 24 h, ``k`` equal to our published application server key) and decrypts the body
with ``http_ece`` using the private key of a browser-side subscription generated here (P-256 ECDH key +
16-octet auth secret), like a browser would. Plus the registration API and the VAPID key handling."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import http_ece
import httpx
import jwt
import orjson
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fhir_outreach.api import channel_push
from fhir_outreach.channels import push
from fhir_outreach.channels.base import DeliveryFailed, Outbound, Sent
from fhir_outreach.errors import SettingsError
from tests.conftest import app_client

SUBJECT = "mailto:outreach@clinic.example.org"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


class Device:
    """The browser side of one subscription: its ECDH key pair and auth secret."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.auth = os.urandom(16)

    def subscription(self, endpoint: str) -> dict[str, Any]:
        point = self.key.public_key().public_bytes(serialization.Encoding.X962,
                                                   serialization.PublicFormat.UncompressedPoint)
        return {"endpoint": endpoint, "expirationTime": None, "keys": {"p256dh": b64(point), "auth": b64(self.auth)}}


class PushService:
    """Plays a push service for the devices registered with it. Checks VAPID and decrypts like the user agent
    would; answers 403 when VAPID fails, 400 when the body does not decrypt, else ``self.answer``."""

    def __init__(self) -> None:
        self.url = ""
        self.devices: dict[str, Device] = {}
        self.public_key = ""  # the application server key the subscriptions were made with
        self.received: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.answer: tuple[int, dict[str, str]] | None = None

    def endpoint(self, device: Device) -> str:
        name = f"d{len(self.devices) + 1}"
        self.devices[name] = device
        return f"{self.url}/push/{name}"

    def _vapid(self, request: Request) -> str | None:
        scheme, _, params = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "vapid":
            return f"Authorization scheme {scheme!r} is not vapid"
        parts = dict(p.strip().split("=", 1) for p in params.split(",") if "=" in p)
        if parts.get("k") != self.public_key:
            return "k is not the application server key of the subscription"
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64(parts["k"]))
        origin = f"{urlsplit(self.url).scheme}://{urlsplit(self.url).netloc}"
        try:
            claims = jwt.decode(parts.get("t", ""), public, algorithms=["ES256"], audience=origin,
                                options={"require": ["exp", "aud", "sub"]})
        except jwt.PyJWTError as exc:
            return f"JWT rejected: {exc}"
        if not time.time() < claims["exp"] <= time.time() + 24 * 3600:
            return "exp is not within the next 24 hours"
        if claims["sub"] != SUBJECT:
            return f"sub {claims['sub']!r}"
        return None

    async def deliver(self, request: Request) -> Response:
        problem = self._vapid(request)
        if problem:
            self.refused.append(problem)
            return Response(problem, status_code=403)
        device = self.devices[request.path_params["name"]]
        body = await request.body()
        try:
            if request.headers.get("content-encoding") != "aes128gcm":
                raise ValueError("Content-Encoding is not aes128gcm")
            plain = http_ece.decrypt(body, private_key=device.key, auth_secret=device.auth, version="aes128gcm")
        except Exception as exc:
            self.refused.append(f"cannot decrypt: {exc!r}")
            return Response("cannot decrypt", status_code=400)
        self.received.append({"device": request.path_params["name"], "payload": orjson.loads(plain),
                              "ttl": request.headers.get("ttl"), "urgency": request.headers.get("urgency"),
                              "size": len(body)})
        if self.answer is not None:
            status, headers = self.answer
            return Response("", status_code=status, headers=headers)
        return Response("", status_code=201, headers={"Location": f"{self.url}/messages/{len(self.received)}"})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/push/{name}", self.deliver, methods=["POST"])])


@pytest.fixture
async def service() -> AsyncIterator[PushService]:
    s = PushService()
    async with serve(s.app()) as url:
        s.url = url
        yield s


def with_routes(app: Any) -> Any:
    if not any(getattr(r, "path", "").startswith("/channels/push/") for r in app.routes):
        app.include_router(channel_push.router)
    return app


class App:
    def __init__(self, settings: Any, token: str | None = "default") -> None:
        self.ctx = app_client(settings) if token == "default" else app_client(settings, token=token)
        with_routes(self.ctx.app)

    async def __aenter__(self) -> httpx.AsyncClient:
        return await self.ctx.__aenter__()

    async def __aexit__(self, *exc: Any) -> None:
        await self.ctx.__aexit__(*exc)


def message(sub: dict[str, Any], **kw: Any) -> Outbound:
    values: dict[str, Any] = {"communication": "Communication/c1", "channel": "push",
                              "to": orjson.dumps(sub).decode(), "text": "You have a new message in the portal.",
                              "subject": "Your care team", "idempotency_key": "c1"}
    values.update(kw)
    return Outbound(**values)


@pytest.fixture(params=["sqlite", "mongo"])
def settings(request: pytest.FixtureRequest, make_settings: Any) -> Any:
    if request.param == "mongo":
        import uuid

        return make_settings(store=f"{request.getfixturevalue('mongo_base_url')}/p{uuid.uuid4().hex[:12]}",
                             vapid_subject=SUBJECT)
    return make_settings(vapid_subject=SUBJECT)


async def test_registered_device_receives_the_decrypted_notification(settings: Any, service: PushService) -> None:
    ctx = App(settings)
    async with ctx as client:
        ctx.ctx.app.state.push_allow_loopback_http = True
        service.public_key = (await client.get("/channels/push/vapid-public-key")).json()["publicKey"]
        phone, laptop = Device(), Device()
        for device in (phone, laptop):
            r = await client.post("/channels/push/subscriptions", json={
                "patient": "Patient/p1", "subscription": device.subscription(service.endpoint(device))})
            assert r.status_code == 201, r.text
        store = ctx.ctx.app.state.store
        subs = await push.subscriptions_for(store, "Patient/p1")
        assert sorted(s["endpoint"] for s in subs) == [f"{service.url}/push/d1", f"{service.url}/push/d2"]
        assert await push.subscriptions_for(store, "Patient/p2") == []

        channel = push.PushChannel(channel_push.vapid_key_of(ctx.ctx.app), settings.vapid_subject)
        try:
            sent = [await channel.send(message(s, extra={"ttl": 3600, "urgency": "high"})) for s in subs]
        finally:
            await channel.aclose()
    assert service.refused == []
    assert sorted(s.provider_id for s in sent) == [f"{service.url}/messages/1", f"{service.url}/messages/2"]
    assert all(s == Sent(provider_id=s.provider_id, delivered=False) for s in sent)
    assert sorted(r["device"] for r in service.received) == ["d1", "d2"]
    for r in service.received:
        assert r["payload"] == {"title": "Your care team", "body": "You have a new message in the portal.",
                                "communication": "Communication/c1"}
        assert r["ttl"] == "3600" and r["urgency"] == "high"


async def test_the_peer_refuses_a_wrong_vapid_key_and_undecryptable_bodies(tmp_path: Path,
                                                                           service: PushService) -> None:
    """The peer's checks are real: a foreign VAPID key is refused (403, permanent), and a body encrypted for
    keys that are not the device's does not decrypt (400)."""
    ours = push.load_vapid_key(None, tmp_path / "a")
    service.public_key = push.application_server_key(ours)
    device = Device()
    sub = device.subscription(service.endpoint(device))
    intruder = push.PushChannel(push.load_vapid_key(None, tmp_path / "b"), SUBJECT)
    channel = push.PushChannel(ours, SUBJECT)
    try:
        with pytest.raises(DeliveryFailed) as info:
            await intruder.send(message(sub))
        assert info.value.permanent and info.value.code == "http-403"
        assert service.refused == ["k is not the application server key of the subscription"]
        other = Device().subscription(sub["endpoint"])  # right endpoint, someone else's keys
        with pytest.raises(DeliveryFailed) as info:
            await channel.send(message(other))
        assert info.value.permanent and service.refused[-1].startswith("cannot decrypt")
        assert service.received == []
        assert (await channel.send(message(sub))).provider_id.endswith("/messages/1")
    finally:
        await intruder.aclose()
        await channel.aclose()


@pytest.mark.parametrize(("status", "headers", "permanent", "code", "retry_after"), [
    (410, {}, True, "subscription-gone", None),
    (404, {}, True, "subscription-gone", None),
    (429, {"Retry-After": "30"}, False, "http-429", 30.0),
    (503, {}, False, "http-503", None),
    (413, {}, True, "http-413", None),
])
async def test_push_service_answers(tmp_path: Path, service: PushService, status: int, headers: dict[str, str],
                                    permanent: bool, code: str, retry_after: float | None) -> None:
    key = push.load_vapid_key(None, tmp_path)
    service.public_key = push.application_server_key(key)
    device = Device()
    service.answer = (status, headers)
    channel = push.PushChannel(key, SUBJECT)
    try:
        with pytest.raises(DeliveryFailed) as info:
            await channel.send(message(device.subscription(service.endpoint(device))))
    finally:
        await channel.aclose()
    assert (info.value.permanent, info.value.code, info.value.retry_after) == (permanent, code, retry_after)
    assert len(service.received) == 1  # it did arrive and decrypt: the refusal is the answer's


async def test_gone_subscription_is_retired(settings: Any, service: PushService) -> None:
    ctx = App(settings)
    async with ctx as client:
        ctx.ctx.app.state.push_allow_loopback_http = True
        service.public_key = (await client.get("/channels/push/vapid-public-key")).json()["publicKey"]
        device = Device()
        sub = device.subscription(service.endpoint(device))
        assert (await client.post("/channels/push/subscriptions",
                                  json={"patient": "Patient/p1", "subscription": sub})).status_code == 201
        service.answer = (410, {})
        store = ctx.ctx.app.state.store
        channel = push.PushChannel(channel_push.vapid_key_of(ctx.ctx.app), SUBJECT)
        try:
            [stored] = await push.subscriptions_for(store, "Patient/p1")
            with pytest.raises(DeliveryFailed) as info:
                await channel.send(message(stored))
        finally:
            await channel.aclose()
        assert info.value.code == "subscription-gone"
        assert await push.unregister(store, stored["endpoint"]) is True
        assert await push.subscriptions_for(store, "Patient/p1") == []


async def test_long_bodies_are_shortened_to_fit_one_push(tmp_path: Path, service: PushService) -> None:
    key = push.load_vapid_key(None, tmp_path)
    service.public_key = push.application_server_key(key)
    device = Device()
    channel = push.PushChannel(key, SUBJECT)
    try:
        await channel.send(message(device.subscription(service.endpoint(device)), text="é" * 5000))
    finally:
        await channel.aclose()
    [got] = service.received
    assert got["size"] <= 4096
    assert got["payload"]["body"].endswith("…") and set(got["payload"]["body"][:-1]) == {"é"}
    assert len(orjson.dumps(got["payload"])) <= push.MAX_PLAINTEXT


# --- the registration API -------------------------------------------------------------------------------------

def good(endpoint: str = "https://push.example.org/send/abc") -> dict[str, Any]:
    return Device().subscription(endpoint)


async def test_registration_needs_a_token(make_settings: Any) -> None:
    async with App(make_settings(), token=None) as client:
        r = await client.post("/channels/push/subscriptions", json={"patient": "Patient/p1", "subscription": good()})
        assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"
        r = await client.delete("/channels/push/subscriptions", params={"endpoint": "https://push.example.org/x"})
        assert r.status_code == 401
        r = await client.get("/channels/push/vapid-public-key")  # public: the browser needs it to subscribe
        assert r.status_code == 200


def _bad_subscriptions() -> dict[str, Any]:
    sub = good()
    return {
        "no subscription": {"patient": "Patient/p1"},
        "subscription not an object": {"patient": "Patient/p1", "subscription": "https://push.example.org/x"},
        "no keys": {"patient": "Patient/p1", "subscription": {"endpoint": sub["endpoint"]}},
        "no auth": {"patient": "Patient/p1", "subscription": {**sub, "keys": {"p256dh": sub["keys"]["p256dh"]}}},
        "short auth": {"patient": "Patient/p1", "subscription": {**sub, "keys": {**sub["keys"], "auth": b64(b"x" * 8)}}},
        "p256dh not a point": {"patient": "Patient/p1",
                               "subscription": {**sub, "keys": {**sub["keys"], "p256dh": b64(b"\x04" + b"1" * 64)}}},
        "http endpoint": {"patient": "Patient/p1", "subscription": {**sub, "endpoint": "http://push.example.org/x"}},
        "loopback http not allowed": {"patient": "Patient/p1",
                                      "subscription": {**sub, "endpoint": "http://127.0.0.1:9/push/x"}},
        "bad patient": {"patient": "p1", "subscription": sub},
        "unknown field": {"patient": "Patient/p1", "subscription": sub, "extra": 1},
    }


async def test_bad_registrations_are_refused(make_settings: Any) -> None:
    ctx = App(make_settings())
    async with ctx as client:
        for name, body in _bad_subscriptions().items():
            r = await client.post("/channels/push/subscriptions", json=body)
            assert r.status_code == 400, (name, r.text)
            assert r.json()["resourceType"] == "OperationOutcome", name
        r = await client.post("/channels/push/subscriptions", content=b"{nope")
        assert r.status_code == 400
        assert await ctx.ctx.app.state.store.count_records(push.SUBSCRIPTION) == {}


async def test_register_refresh_and_delete(settings: Any) -> None:
    ctx = App(settings)
    async with ctx as client:
        store = ctx.ctx.app.state.store
        sub = good()
        r = await client.post("/channels/push/subscriptions", json={"patient": "Patient/p1", "subscription": sub})
        assert r.status_code == 201, r.text
        key = hashlib.sha256(sub["endpoint"].encode()).hexdigest()
        assert r.json() == {"id": key, "patient": "Patient/p1", "endpoint": sub["endpoint"]}
        rec = await store.get_record(push.SUBSCRIPTION, key)
        assert rec is not None and rec.group == "Patient/p1" and rec.state == "active"
        assert rec.data["subscription"] == {"endpoint": sub["endpoint"], "keys": sub["keys"]}
        assert await push.subscriptions_for(store, "Patient/p1") == [rec.data["subscription"]]

        renewed = {**sub, "keys": good()["keys"]}  # the same endpoint with new keys, now for Patient/p2
        r = await client.post("/channels/push/subscriptions", json={"patient": "Patient/p2", "subscription": renewed})
        assert r.status_code == 200
        assert await push.subscriptions_for(store, "Patient/p1") == []
        [now] = await push.subscriptions_for(store, "Patient/p2")
        assert now["keys"] == renewed["keys"]

        r = await client.delete("/channels/push/subscriptions", params={"endpoint": sub["endpoint"]})
        assert r.status_code == 204
        assert await push.subscriptions_for(store, "Patient/p2") == []
        assert (await client.delete("/channels/push/subscriptions", params={"endpoint": sub["endpoint"]})).status_code == 204
        r = await client.delete("/channels/push/subscriptions", params={"endpoint": "https://push.example.org/none"})
        assert r.status_code == 404
        assert (await client.delete("/channels/push/subscriptions")).status_code == 400
        # registering again brings it back
        r = await client.post("/channels/push/subscriptions", json={"patient": "Patient/p2", "subscription": sub})
        assert r.status_code == 200 and len(await push.subscriptions_for(store, "Patient/p2")) == 1


async def test_expired_subscriptions_are_left_out(make_settings: Any) -> None:
    ctx = App(make_settings())
    async with ctx as client:
        sub = {**good(), "expirationTime": (time.time() - 60) * 1000}
        assert (await client.post("/channels/push/subscriptions",
                                  json={"patient": "Patient/p1", "subscription": sub})).status_code == 201
        assert await push.subscriptions_for(ctx.ctx.app.state.store, "Patient/p1") == []


# --- the VAPID key --------------------------------------------------------------------------------------------

async def test_vapid_key_is_generated_once_0600_and_published(make_settings: Any, tmp_path: Path) -> None:
    settings = make_settings()
    async with App(settings) as client:
        published = (await client.get("/channels/push/vapid-public-key")).json()["publicKey"]
    path = settings.data_dir / push.VAPID_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert len(unb64(published)) == 65 and unb64(published)[0] == 4
    assert push.application_server_key(push.load_vapid_key(None, settings.data_dir)) == published
    async with App(settings) as client:  # a restart keeps the key (subscriptions stay valid)
        assert (await client.get("/channels/push/vapid-public-key")).json()["publicKey"] == published


def test_configured_vapid_keys(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    expected = push.application_server_key(key)
    raw = b64(key.private_numbers().private_value.to_bytes(32, "big"))
    assert push.application_server_key(push.load_vapid_key(raw, tmp_path)) == expected
    der = b64(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()))
    assert push.application_server_key(push.load_vapid_key(der, tmp_path)) == expected
    pem = tmp_path / "vapid.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption()))
    assert push.application_server_key(push.load_vapid_key(str(pem), tmp_path)) == expected
    assert not (tmp_path / push.VAPID_KEY_FILE).exists()  # configured keys generate nothing
    for bad in ("not a key", str(tmp_path / "missing.pem"), b64(b"short")):
        with pytest.raises(SettingsError, match="FHIR_OUTREACH_VAPID_PRIVATE_KEY"):
            push.load_vapid_key(bad, tmp_path)
    rsa_free = ec.generate_private_key(ec.SECP384R1())  # the wrong curve
    other = tmp_path / "p384.pem"
    other.write_bytes(rsa_free.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    with pytest.raises(SettingsError, match="P-256"):
        push.load_vapid_key(str(other), tmp_path)
