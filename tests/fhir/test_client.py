"""FhirClient against real HTTP peers on 127.0.0.1.

* fhir-outreach itself, served by uvicorn in a background thread, as a source with a static bearer token or
  with SMART Backend Services (a token endpoint that verifies the signed client assertion and issues JWTs
  that fhir-outreach verifies against the issuer's JWKS, both served by a small http.server thread);
* scripted http.server peers for what our server never does: HTTP basic auth, 5xx/429, hanging, odd bodies.

Every peer binds to 127.0.0.1 on a free port and is stopped by the fixture that started it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from fhir_outreach.app import create_app
from fhir_outreach.fhir.client import (
    FhirClient,
    SmartBackendAuth,
    SourceClients,
    SourceError,
    SourceUnavailable,
)
from fhir_outreach.sources import SourceConfig
from tests.conftest import TOKEN, task

ISSUER = "https://issuer.example.org"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
GRANTED = "system/*.read system/*.write"


# --- fhir-outreach as a real HTTP server ------------------------------------------------------------

class OutreachServer:
    """``create_app(settings)`` behind uvicorn in a thread, on a socket bound to 127.0.0.1 beforehand (so
    the base URL, which appears in search links and is the JWT audience, is known to the settings)."""

    def __init__(self, make_settings: Any, for_base: Callable[[str], dict[str, Any]] | None = None,
                 **overrides: Any) -> None:
        # proto=IPPROTO_TCP, or asyncio does not set TCP_NODELAY on accepted connections (40 ms delayed ACKs).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}/fhir"
        try:
            settings = make_settings(base_url=self.base, sqlite_synchronous="NORMAL", **overrides,
                                     **(for_base(self.base) if for_base else {}))
            app = create_app(settings, run_background=False)
        except BaseException:
            self.sock.close()
            raise
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_config=None, access_log=False,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not start on {self.base}")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def outreach(make_settings: Any) -> Iterator[Callable[..., OutreachServer]]:
    started: list[OutreachServer] = []

    def start(for_base: Callable[[str], dict[str, Any]] | None = None, **overrides: Any) -> OutreachServer:
        server = OutreachServer(make_settings, for_base, **overrides)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def source(outreach: Callable[..., OutreachServer]) -> OutreachServer:
    """fhir-outreach accepting the static token ``TOKEN``."""
    return outreach()


@pytest.fixture
async def fhir(source: OutreachServer) -> AsyncIterator[FhirClient]:
    client = FhirClient(SourceConfig(name="self", base_url=source.base, auth="bearer", token=TOKEN))
    try:
        yield client
    finally:
        await client.aclose()


# --- scripted HTTP peers ---------------------------------------------------------------------------

@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def route(self) -> str:
        return urlsplit(self.path).path

    @property
    def query(self) -> list[tuple[str, str]]:
        return parse_qsl(urlsplit(self.path).query, keep_blank_values=True)


Reply = tuple[int, Any, dict[str, str]]


class Peer:
    """An HTTP/1.1 server thread on 127.0.0.1 answering from ``routes``: ``(METHOD, path) -> reply``, where a
    reply is ``(status, body, headers)`` (body: dict → JSON, bytes → raw, None → empty) or a callable taking
    the request and returning one. ``hang`` holds every request until ``release`` is set."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Reply | Callable[[Seen], Reply]] = {}
        self.seen: list[Seen] = []
        self.hang = False
        self.release = threading.Event()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                            self.rfile.read(length) if length else b"")
                peer.seen.append(seen)
                if peer.hang:
                    peer.release.wait(10)
                reply = peer.routes.get((self.command, seen.route),
                                        (404, {"resourceType": "OperationOutcome", "issue": [
                                            {"severity": "error", "code": "not-found"}]}, {}))
                status, body, headers = reply(seen) if callable(reply) else reply
                if isinstance(body, (dict, list)):
                    raw = json.dumps(body).encode()
                    headers = {"Content-Type": "application/fhir+json", **headers}
                else:
                    raw = body or b""
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:  # the client gave up (timeout test)
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    try:
        yield p
    finally:
        p.stop()


def outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code,
                                                           "diagnostics": diagnostics}]}


# --- a SMART token endpoint + the issuer's JWKS ------------------------------------------------------

class Issuer(Peer):
    """POST /token verifies the client assertion and issues an RS256 access token for ``audience``;
    GET /jwks.json publishes the issuer's public key. ``fail`` makes /token answer that status instead."""

    def __init__(self, clients: dict[str, Any], key: rsa.RSAPrivateKey) -> None:
        super().__init__()
        self.clients = clients  # client_id -> public key
        self.token_url = f"{self.url}/token"
        self.jwks_url = f"{self.url}/jwks.json"
        self.audience = ""
        self.fail: int | None = None
        self.assertion_headers: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.jtis: set[str] = set()
        self.key = key
        jwk = {**RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True), "kid": "issuer-1", "use": "sig",
               "alg": "RS256"}
        self.routes[("GET", "/jwks.json")] = (200, {"keys": [jwk]}, {"Content-Type": "application/json"})
        self.routes[("POST", "/token")] = self._token

    @property
    def token_calls(self) -> int:
        return sum(1 for s in self.seen if s.route == "/token")

    def _token(self, seen: Seen) -> Reply:
        if self.fail is not None:
            return self.fail, {"error": "invalid_client", "error_description": "scripted failure"}, {}
        try:
            if not seen.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                raise ValueError(f"token request content type {seen.headers.get('content-type')!r}")
            form = dict(parse_qsl(seen.body.decode()))
            if form.get("grant_type") != "client_credentials":
                raise ValueError(f"grant_type {form.get('grant_type')!r}")
            if form.get("client_assertion_type") != JWT_BEARER:
                raise ValueError(f"client_assertion_type {form.get('client_assertion_type')!r}")
            assertion = form["client_assertion"]
            header = jwt.get_unverified_header(assertion)
            client_id = jwt.decode(assertion, options={"verify_signature": False})["iss"]
            public = self.clients[client_id]
            alg = "ES384" if isinstance(public, ec.EllipticCurvePublicKey) else "RS384"
            claims = jwt.decode(assertion, public, algorithms=[alg], audience=self.token_url, issuer=client_id,
                                options={"require": ["iss", "sub", "aud", "exp", "jti"]})
            if claims["sub"] != client_id:
                raise ValueError(f"sub {claims['sub']!r} is not the client id")
            if claims["exp"] > time.time() + 600:
                raise ValueError("assertion lives too long")
            if claims["jti"] in self.jtis:
                raise ValueError("replayed jti")
            self.jtis.add(claims["jti"])
        except (ValueError, KeyError, jwt.PyJWTError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return 400, {"error": "invalid_client", "error_description": str(exc)}, {}
        self.assertion_headers.append(header)
        now = int(time.time())
        access = jwt.encode({"iss": ISSUER, "sub": client_id, "aud": self.audience, "scope": GRANTED,
                             "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())},
                            self.key, algorithm="RS256", headers={"kid": "issuer-1"})
        return 200, {"access_token": access, "token_type": "bearer", "expires_in": 300, "scope": GRANTED}, {
            "Content-Type": "application/json", "Cache-Control": "no-store"}


@dataclass
class Keys:
    issuer: Any = field(default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))
    rsa: Any = field(default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))
    ec: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))


@pytest.fixture(scope="module")
def client_keys() -> Keys:
    return Keys()


def pem_file(path: Path, key: Any) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


@pytest.fixture
def issuer(client_keys: Keys) -> Iterator[Issuer]:
    server = Issuer({"rsa-client": client_keys.rsa.public_key(), "ec-client": client_keys.ec.public_key()},
                    client_keys.issuer)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def smart_source(outreach: Callable[..., OutreachServer], issuer: Issuer) -> OutreachServer:
    """fhir-outreach accepting only JWTs from ``issuer`` (no static token)."""
    server = outreach(lambda base: {"jwt_audience": base}, api_tokens=[], jwt_issuer=ISSUER,
                      jwt_jwks_url=issuer.jwks_url)
    issuer.audience = server.base
    return server


def smart_config(source: OutreachServer, issuer: Issuer, key_file: Path, client_id: str, **extra: Any) -> SourceConfig:
    return SourceConfig(name="smart", base_url=source.base, auth="smart", client_id=client_id,
                        token_url=issuer.token_url, private_key_file=key_file, **extra)


# === bearer ========================================================================================

async def test_bearer_read_search_create_update(fhir: FhirClient) -> None:
    created = await fhir.create(task("p1"))
    assert created["resourceType"] == "Task" and created["id"] and created["meta"]["versionId"] == "1"

    read = await fhir.read("Task", created["id"])
    assert read == created

    updated = await fhir.update({**created, "status": "ready"}, if_match='W/"1"')
    assert updated["status"] == "ready" and updated["meta"]["versionId"] == "2"
    assert (await fhir.read("Task", created["id"]))["status"] == "ready"
    assert (await fhir.read("Task", created["id"], version="1"))["status"] == "requested"

    found = await fhir.search("Task", [("patient", "Patient/p1"), ("status", "ready")])
    assert [r["id"] for r in found] == [created["id"]]
    assert await fhir.search("Task", [("status", "cancelled")]) == []

    # Conditional create finds the existing Task instead of creating another.
    again = await fhir.create(task("p1"), if_none_exist=f"_id={created['id']}")
    assert again["id"] == created["id"]
    assert len(await fhir.search("Task", [])) == 1

    # A stale If-Match is the source saying no.
    with pytest.raises(SourceError) as err:
        await fhir.update({**created, "status": "cancelled"}, if_match='W/"1"')
    assert err.value.http_status == 412 and not err.value.retryable
    assert err.value.outcome["resourceType"] == "OperationOutcome"


async def test_bearer_update_creates_with_client_id(fhir: FhirClient) -> None:
    patient = await fhir.update({"resourceType": "Patient", "id": "pat-1", "gender": "female"})
    assert patient["id"] == "pat-1" and patient["meta"]["versionId"] == "1"
    assert (await fhir.read("Patient", "pat-1"))["gender"] == "female"


async def test_wrong_bearer_token_is_a_401_source_error(source: OutreachServer) -> None:
    client = FhirClient(SourceConfig(name="self", base_url=source.base, auth="bearer", token=TOKEN + "x"))
    try:
        with pytest.raises(SourceError) as err:
            await client.read("Task", "t1")
    finally:
        await client.aclose()
    assert err.value.http_status == 401
    assert str(err.value) == f"GET {source.base}/Task/t1 answered 401"
    assert err.value.outcome["issue"][0]["code"] == "login"
    assert err.value.outcome["issue"][0]["diagnostics"] == "invalid bearer token"


async def test_no_auth_against_a_protected_source_is_401(source: OutreachServer) -> None:
    client = FhirClient(SourceConfig(name="self", base_url=source.base))
    try:
        with pytest.raises(SourceError) as err:
            await client.search("Task", [])
    finally:
        await client.aclose()
    assert err.value.http_status == 401
    assert "missing 'Authorization: Bearer <token>' header" in err.value.outcome["issue"][0]["diagnostics"]


# === SMART Backend Services =========================================================================

async def test_smart_rs384_token_is_fetched_once_and_accepted(
        smart_source: OutreachServer, issuer: Issuer, client_keys: Keys, tmp_path: Path) -> None:
    cfg = smart_config(smart_source, issuer, pem_file(tmp_path / "rsa.pem", client_keys.rsa), "rsa-client",
                       key_id="client-key-1")
    client = FhirClient(cfg)
    try:
        created = await client.create(task("p9"))
        assert (await client.read("Task", created["id"]))["id"] == created["id"]
        await client.update({**created, "status": "ready"})
        assert [r["status"] for r in await client.search("Task", [("patient", "p9")])] == ["ready"]
        assert await client.read("Task", "missing") is None
        assert issuer.errors == []
        assert issuer.token_calls == 1  # one token for all five requests
        assert issuer.assertion_headers[0]["alg"] == "RS384"
        assert issuer.assertion_headers[0]["kid"] == "client-key-1"
        form = dict(parse_qsl(next(s for s in issuer.seen if s.route == "/token").body.decode()))
        assert form["scope"] == cfg.scope

        # Near expiry the token is refreshed (a fresh assertion, a new jti) and the new one works too.
        auth = client.http.auth
        assert isinstance(auth, SmartBackendAuth)
        first = auth.token
        auth.expires = time.time() + 10  # within the 30 s margin
        assert (await client.read("Task", created["id"]))["status"] == "ready"
        assert issuer.token_calls == 2 and auth.token != first and len(issuer.jtis) == 2
        assert issuer.errors == []
    finally:
        await client.aclose()
    # The source really verified the JWT: it fetched the issuer's keys (there is no static token).
    assert any(s.route == "/jwks.json" for s in issuer.seen)


async def test_smart_ec_p384_key_signs_with_es384(
        smart_source: OutreachServer, issuer: Issuer, client_keys: Keys, tmp_path: Path) -> None:
    client = FhirClient(smart_config(smart_source, issuer, pem_file(tmp_path / "ec.pem", client_keys.ec),
                                     "ec-client"))
    try:
        created = await client.create({"resourceType": "Patient", "gender": "other"})
        assert (await client.read("Patient", created["id"]))["gender"] == "other"
        assert await client.search("Patient", [("gender", "other")]) == [created]
    finally:
        await client.aclose()
    assert issuer.errors == []
    assert issuer.token_calls == 1
    assert [h["alg"] for h in issuer.assertion_headers] == ["ES384"]
    assert "kid" not in issuer.assertion_headers[0]


async def test_smart_assertion_signed_by_the_wrong_key_is_refused(
        smart_source: OutreachServer, issuer: Issuer, client_keys: Keys, tmp_path: Path) -> None:
    # The token endpoint really verifies: an EC key presented as the RSA client fails its check.
    client = FhirClient(smart_config(smart_source, issuer, pem_file(tmp_path / "ec.pem", client_keys.ec),
                                     "rsa-client"))
    try:
        with pytest.raises(SourceError) as err:
            await client.read("Task", "t1")
    finally:
        await client.aclose()
    assert err.value.http_status == 400
    assert len(issuer.errors) == 1
    assert not any(s.route.startswith("/fhir") for s in issuer.seen)


async def test_smart_token_endpoint_400_is_a_source_error_naming_the_token_url(
        smart_source: OutreachServer, issuer: Issuer, client_keys: Keys, tmp_path: Path) -> None:
    issuer.fail = 400
    client = FhirClient(smart_config(smart_source, issuer, pem_file(tmp_path / "rsa.pem", client_keys.rsa),
                                     "rsa-client"))
    try:
        with pytest.raises(SourceError) as err:
            await client.read("Task", "t1")
        assert err.value.http_status == 400 and not err.value.retryable
        assert issuer.token_url in str(err.value) and "400" in str(err.value)
        # Nothing was cached: the next request asks again.
        with pytest.raises(SourceError):
            await client.search("Task", [])
        assert issuer.token_calls == 2
    finally:
        await client.aclose()


@pytest.mark.parametrize("status", [503, 429])
async def test_smart_token_endpoint_unavailable_is_retryable(
        smart_source: OutreachServer, issuer: Issuer, client_keys: Keys, tmp_path: Path, status: int) -> None:
    issuer.fail = status
    client = FhirClient(smart_config(smart_source, issuer, pem_file(tmp_path / "rsa.pem", client_keys.rsa),
                                     "rsa-client"))
    try:
        with pytest.raises(SourceUnavailable) as err:
            await client.read("Task", "t1")
        assert err.value.retryable and issuer.token_url in str(err.value) and str(status) in str(err.value)
        issuer.fail = None  # the endpoint recovers
        assert await client.read("Task", "t1") is None
    finally:
        await client.aclose()


async def test_smart_token_endpoint_unreachable_is_unavailable(
        smart_source: OutreachServer, client_keys: Keys, tmp_path: Path) -> None:
    cfg = SourceConfig(name="smart", base_url=smart_source.base, auth="smart", client_id="rsa-client",
                       token_url=f"http://127.0.0.1:{closed_port()}/token",
                       private_key_file=pem_file(tmp_path / "rsa.pem", client_keys.rsa))
    client = FhirClient(cfg)
    try:
        with pytest.raises(SourceUnavailable) as err:
            await client.read("Task", "t1")
    finally:
        await client.aclose()
    assert "ConnectError" in str(err.value)


@pytest.mark.parametrize("body", [b"not json", b'{"token_type": "bearer"}'])
async def test_smart_token_endpoint_garbage_is_a_source_error(
        smart_source: OutreachServer, peer: Peer, client_keys: Keys, tmp_path: Path, body: bytes) -> None:
    peer.routes[("POST", "/token")] = (200, body, {"Content-Type": "application/json"})
    cfg = SourceConfig(name="smart", base_url=smart_source.base, auth="smart", client_id="rsa-client",
                       token_url=f"{peer.url}/token",
                       private_key_file=pem_file(tmp_path / "rsa.pem", client_keys.rsa))
    client = FhirClient(cfg)
    try:
        with pytest.raises(SourceError) as err:
            await client.read("Task", "t1")
    finally:
        await client.aclose()
    assert f"{peer.url}/token" in str(err.value)


# === basic ==========================================================================================

async def test_basic_auth_header_reaches_the_peer(peer: Peer) -> None:
    patient = {"resourceType": "Patient", "id": "x", "gender": "male"}
    expected = "Basic " + base64.b64encode(b"outreach:s3cr3t:with:colons").decode()

    def answer(seen: Seen) -> Reply:
        if seen.headers.get("authorization") != expected:
            return 401, outcome("login", "bad credentials"), {"WWW-Authenticate": 'Basic realm="fhir"'}
        return 200, patient, {}

    peer.routes[("GET", "/fhir/Patient/x")] = answer
    client = FhirClient(SourceConfig(name="basic", base_url=f"{peer.url}/fhir/", auth="basic",
                                     username="outreach", password="s3cr3t:with:colons"))
    try:
        assert await client.read("Patient", "x") == patient
    finally:
        await client.aclose()
    [seen] = peer.seen
    assert seen.method == "GET" and seen.path == "/fhir/Patient/x"
    assert seen.headers["authorization"] == expected
    assert seen.headers["accept"] == "application/fhir+json"

    wrong = FhirClient(SourceConfig(name="basic", base_url=f"{peer.url}/fhir", auth="basic",
                                    username="outreach", password="nope"))
    try:
        with pytest.raises(SourceError) as err:
            await wrong.read("Patient", "x")
    finally:
        await wrong.aclose()
    assert err.value.http_status == 401 and err.value.outcome["issue"][0]["diagnostics"] == "bad credentials"


# === error mapping ==================================================================================

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when this returns: nobody listens there


async def test_closed_port_is_unavailable_and_names_connect_error() -> None:
    base = f"http://127.0.0.1:{closed_port()}/fhir"
    client = FhirClient(SourceConfig(name="gone", base_url=base))
    try:
        with pytest.raises(SourceUnavailable) as err:
            await client.read("Patient", "x")
    finally:
        await client.aclose()
    assert err.value.retryable
    assert str(err.value).startswith(f"GET {base}/Patient/x: ConnectError")
    assert isinstance(err.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize("status", [503, 500, 429])
async def test_5xx_and_429_are_unavailable(peer: Peer, status: int) -> None:
    peer.routes[("GET", "/fhir/Patient/x")] = (status, outcome("transient", "busy"), {"Retry-After": "1"})
    peer.routes[("POST", "/fhir/Patient")] = (status, b"", {})
    client = FhirClient(SourceConfig(name="busy", base_url=f"{peer.url}/fhir"))
    try:
        with pytest.raises(SourceUnavailable) as err:
            await client.read("Patient", "x")
        assert str(err.value) == f"GET {peer.url}/fhir/Patient/x answered {status}" and err.value.retryable
        with pytest.raises(SourceUnavailable) as err:
            await client.create({"resourceType": "Patient"})
        assert str(err.value) == f"POST {peer.url}/fhir/Patient answered {status}"
    finally:
        await client.aclose()


async def test_read_404_and_410_are_none(fhir: FhirClient) -> None:
    assert await fhir.read("Patient", "nobody") is None  # 404 from the real server
    created = await fhir.create({"resourceType": "Patient", "gender": "unknown"})
    deleted = await fhir.request("DELETE", f"Patient/{created['id']}", ok=(200, 204))
    assert deleted.status_code in (200, 204)
    assert await fhir.read("Patient", created["id"]) is None  # 410 Gone
    assert await fhir.read("Patient", created["id"], version="2") is None  # the deletion version: 410
    assert (await fhir.read("Patient", created["id"], version="1"))["gender"] == "unknown"
    assert await fhir.read("Patient", created["id"], version="7") is None  # no such version: 404
    # Other verbs do not hide a 404.
    with pytest.raises(SourceError) as err:
        await fhir.get_json("Patient/nobody")
    assert err.value.http_status == 404 and err.value.outcome["issue"][0]["code"] == "not-found"


async def test_read_404_and_410_from_a_scripted_peer_are_none(peer: Peer) -> None:
    peer.routes[("GET", "/fhir/Patient/gone")] = (410, outcome("deleted", "gone"), {})
    client = FhirClient(SourceConfig(name="p", base_url=f"{peer.url}/fhir"))
    try:
        assert await client.read("Patient", "gone") is None
        assert await client.read("Patient", "never") is None
    finally:
        await client.aclose()
    assert [s.path for s in peer.seen] == ["/fhir/Patient/gone", "/fhir/Patient/never"]


async def test_400_is_a_source_error_carrying_the_operation_outcome(fhir: FhirClient, source: OutreachServer) -> None:
    with pytest.raises(SourceError) as err:
        await fhir.create({"resourceType": "Patient", "gender": 12})
    assert err.value.http_status == 400 and not err.value.retryable
    assert str(err.value) == f"POST {source.base}/Patient answered 400"
    assert err.value.outcome["resourceType"] == "OperationOutcome"
    assert err.value.outcome["issue"][0]["severity"] == "error"

    with pytest.raises(SourceError) as err:  # read does not swallow a 400
        await fhir.read("Patient", "x", version="abc")
    assert err.value.http_status == 400
    assert err.value.outcome["issue"][0]["diagnostics"] == "version id must be a number, got 'abc'"


async def test_400_without_json_has_no_outcome(peer: Peer) -> None:
    peer.routes[("GET", "/fhir/Patient")] = (400, b"<html>bad</html>", {"Content-Type": "text/html"})
    client = FhirClient(SourceConfig(name="p", base_url=f"{peer.url}/fhir"))
    try:
        with pytest.raises(SourceError) as err:
            await client.search("Patient", [("name", "x")])
    finally:
        await client.aclose()
    assert err.value.http_status == 400 and err.value.outcome is None
    assert peer.seen[0].query == [("name", "x")]


async def test_a_peer_that_never_answers_times_out(peer: Peer) -> None:
    peer.hang = True
    client = FhirClient(SourceConfig(name="slow", base_url=f"{peer.url}/fhir", timeout_seconds=0.5))
    started = time.monotonic()
    try:
        with pytest.raises(SourceUnavailable) as err:
            await client.read("Patient", "x")
    finally:
        await client.aclose()
    elapsed = time.monotonic() - started
    assert str(err.value) == f"GET {peer.url}/fhir/Patient/x: timed out" and err.value.retryable
    assert isinstance(err.value.__cause__, httpx.TimeoutException)
    assert 0.4 < elapsed < 3


async def test_create_and_update_with_empty_bodies_return_what_was_sent(peer: Peer) -> None:
    peer.routes[("POST", "/fhir/Patient")] = (201, None, {"Location": f"{peer.url}/fhir/Patient/1/_history/1"})
    peer.routes[("PUT", "/fhir/Patient/1")] = (200, None, {})
    client = FhirClient(SourceConfig(name="p", base_url=f"{peer.url}/fhir"))
    try:
        sent = {"resourceType": "Patient", "gender": "male"}
        assert await client.create(sent, if_none_exist="identifier=a|b") == sent
        assert await client.update({**sent, "id": "1"}, if_match='W/"1"') == {**sent, "id": "1"}
    finally:
        await client.aclose()
    post, put = peer.seen
    assert post.headers["content-type"] == "application/fhir+json"
    assert post.headers["if-none-exist"] == "identifier=a|b"
    assert json.loads(post.body) == sent
    assert put.headers["if-match"] == 'W/"1"' and json.loads(put.body)["id"] == "1"


async def test_unknown_source_name() -> None:
    clients = SourceClients([SourceConfig(name="a", base_url="http://127.0.0.1:9/fhir")])
    try:
        assert clients.get("a").base == "http://127.0.0.1:9/fhir"
        with pytest.raises(SourceError) as err:
            clients.get("b")
        assert err.value.http_status == 0 and "'b'" in str(err.value)
    finally:
        await clients.aclose()


# === search paging ==================================================================================

async def test_search_follows_next_links_and_honours_limit(fhir: FhirClient, source: OutreachServer) -> None:
    ids = {(await fhir.create(task(f"p{i % 3}", identifier=[{"value": str(i)}])))["id"] for i in range(25)}
    assert len(ids) == 25

    first = await fhir.get_json("Task", params=[("_count", "10")])
    assert first["total"] == 25 and len(first["entry"]) == 10
    assert next(link["url"] for link in first["link"] if link["relation"] == "next").startswith(source.base)

    found = await fhir.search("Task", [("_count", "10")])
    assert len(found) == 25 and {r["id"] for r in found} == ids  # three pages, nothing twice

    assert len(await fhir.search("Task", [("_count", "10")], limit=12)) == 12
    assert len(await fhir.search("Task", [("_count", "10")], limit=10)) == 10
    assert len(await fhir.search("Task", [("_count", "10"), ("patient", "p0")])) == 9


async def test_search_limit_stops_fetching_pages(peer: Peer) -> None:
    def page(seen: Seen) -> Reply:
        offset = int(dict(seen.query).get("_offset", "0"))
        entries = [{"resource": {"resourceType": "Patient", "id": str(offset + i)}, "search": {"mode": "match"}}
                   for i in range(10)]
        nxt = f"{peer.url}/fhir/Patient?_count=10&_offset={offset + 10}"
        return 200, {"resourceType": "Bundle", "type": "searchset", "entry": entries,
                     "link": [{"relation": "next", "url": nxt}]}, {}

    peer.routes[("GET", "/fhir/Patient")] = page  # an endless result set
    client = FhirClient(SourceConfig(name="p", base_url=f"{peer.url}/fhir"))
    try:
        found = await client.search("Patient", [("_count", "10")], limit=25)
    finally:
        await client.aclose()
    assert [r["id"] for r in found] == [str(i) for i in range(25)]
    assert len(peer.seen) == 3
    assert peer.seen[0].query == [("_count", "10")]
    assert peer.seen[2].query == [("_count", "10"), ("_offset", "20")]  # the link as given, no params added


async def test_search_skips_include_and_outcome_entries(fhir: FhirClient) -> None:
    await fhir.update({"resourceType": "Patient", "id": "p1"})
    await fhir.update({"resourceType": "Patient", "id": "p2"})
    for i in range(5):
        await fhir.create(task("p1" if i % 2 else "p2"))

    raw = await fhir.get_json("Task", params=[("_include", "Task:patient"), ("_count", "2"), ("bogus", "1")])
    modes = [e["search"]["mode"] for e in raw["entry"]]
    assert modes.count("match") == 2 and "include" in modes and "outcome" in modes  # the peer sends them all

    found = await fhir.search("Task", [("_include", "Task:patient"), ("_count", "2"), ("bogus", "1")])
    assert len(found) == 5 and {r["resourceType"] for r in found} == {"Task"}


async def test_search_skips_entries_of_a_scripted_peer(peer: Peer) -> None:
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "Observation", "id": "o1"}},  # no search.mode: a match
        {"resource": {"resourceType": "Observation", "id": "o2"}, "search": {"mode": "match"}},
        {"resource": {"resourceType": "Patient", "id": "p"}, "search": {"mode": "include"}},
        {"resource": {"resourceType": "OperationOutcome"}, "search": {"mode": "outcome"}},
        {"fullUrl": "urn:uuid:no-resource", "search": {"mode": "match"}},
    ]}
    peer.routes[("GET", "/fhir/Observation")] = (200, bundle, {})
    client = FhirClient(SourceConfig(name="p", base_url=f"{peer.url}/fhir"))
    try:
        found = await client.search("Observation", [("code", "x")])
    finally:
        await client.aclose()
    assert [r["id"] for r in found] == ["o1", "o2"]


async def test_concurrent_requests_share_one_client(fhir: FhirClient) -> None:
    created = await asyncio.gather(*(fhir.create(task(f"c{i}")) for i in range(8)))
    read = await asyncio.gather(*(fhir.read("Task", c["id"]) for c in created))
    assert [r["id"] for r in read] == [c["id"] for c in created]
