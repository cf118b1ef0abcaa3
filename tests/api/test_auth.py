"""Authentication and authorisation through the whole app: static tokens, the generated first-start token,
``auth=off``, and SMART Backend Services JWTs verified against a JWKS served by a real local HTTP server."""

from __future__ import annotations

import json
import logging
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from fhir_outreach.auth import TOKEN_FILE
from tests.conftest import BASE, TOKEN, app_client, task

ISSUER = "https://issuer.example.org"
AUDIENCE = "https://fhir-outreach.example.org/fhir"
WWW_AUTH = 'Bearer realm="fhir-outreach"'


# --- a real JWKS endpoint ---------------------------------------------------------------------------

class JwksServer:
    """A JWKS document served over HTTP on 127.0.0.1 by a background thread; ``keys`` can be rotated."""

    def __init__(self) -> None:
        self.document: Any = {"keys": []}
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                body = json.dumps(server.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def publish(self, *keys: Key) -> None:
        self.document = {"keys": [k.jwk for k in keys]}


class Key:
    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.jwk = {**RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True),
                    "kid": kid, "use": "sig", "alg": "RS256"}

    def token(self, scope: str | list[str] = "system/*.read system/*.write", *, kid: str | None = None,
              omit: tuple[str, ...] = (), **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "backend-client", "iat": now,
                                "exp": now + 300, "scope": scope}
        body.update(claims)
        for name in omit:
            body.pop(name)
        return jwt.encode(body, self.private, algorithm="RS256", headers={"kid": kid or self.kid})


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {name: Key(name) for name in ("k1", "k2", "other")}


@pytest.fixture
def jwks(keys: dict[str, Key]) -> Iterator[JwksServer]:
    server = JwksServer()
    server.publish(keys["k1"])
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=5)


@pytest.fixture
def jwt_settings(make_settings: Any, jwks: JwksServer) -> Any:
    return make_settings(api_tokens=[], jwt_issuer=ISSUER, jwt_jwks_url=jwks.url, jwt_audience=AUDIENCE)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_outcome(resp: httpx.Response, status: int, code: str, diagnostics: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/fhir+json")
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "error"
    assert body["issue"][0]["code"] == code
    assert body["issue"][0]["diagnostics"] == diagnostics


async def task_total(client: httpx.AsyncClient, headers: dict[str, str]) -> int:
    resp = await client.get(f"{BASE}/Task/_history", params={"_count": "0"}, headers=headers)
    assert resp.status_code == 200, resp.text
    return int(resp.json()["total"])


# --- static and generated tokens -------------------------------------------------------------------

async def test_static_token_grants_full_access_and_others_are_refused(make_settings: Any) -> None:
    async with app_client(make_settings(), token=None) as c:
        created = await c.post(f"{BASE}/Task", json=task(), headers=bearer(TOKEN))
        assert created.status_code == 201, created.text
        found = await c.get(f"{BASE}/Task", headers={"Authorization": f"bearer {TOKEN}"})
        assert found.status_code == 200 and found.json()["total"] == 1

        wrong = await c.post(f"{BASE}/Task", json=task(), headers=bearer(TOKEN + "x"))
        assert_outcome(wrong, 401, "login", "invalid bearer token")
        assert wrong.headers["www-authenticate"] == WWW_AUTH
        # A JWT-shaped token is not accepted when no JWT issuer is configured.
        shaped = await c.get(f"{BASE}/Task", headers=bearer("a.b.c"))
        assert_outcome(shaped, 401, "login", "invalid bearer token")
        assert await task_total(c, bearer(TOKEN)) == 1


async def test_generated_token_on_first_start_is_private_reused_and_accepted(
        make_settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(api_tokens=[])
    path = settings.data_dir / TOKEN_FILE
    assert not path.exists()
    caplog.set_level(logging.INFO, logger="fhir_outreach.auth")

    async with app_client(settings, token=None) as c:
        assert path.is_file()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = path.read_text().strip()
        assert len(token) >= 32
        assert any(r.levelno == logging.WARNING and str(path) in r.getMessage() for r in caplog.records)
        assert token not in caplog.text  # the secret itself is never logged

        refused = await c.get(f"{BASE}/Task")
        assert_outcome(refused, 401, "login", "missing 'Authorization: Bearer <token>' header")
        ok = await c.post(f"{BASE}/Task", json=task(), headers=bearer(token))
        assert ok.status_code == 201, ok.text

    caplog.clear()
    async with app_client(settings, token=token) as c:  # second start: the same file, the same token
        assert path.read_text().strip() == token
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert not any(r.levelno >= logging.WARNING for r in caplog.records if r.name == "fhir_outreach.auth")
        assert any(str(path) in r.getMessage() for r in caplog.records if r.name == "fhir_outreach.auth")
        resp = await c.get(f"{BASE}/Task")
        assert resp.status_code == 200 and resp.json()["total"] == 1


async def test_no_token_file_when_tokens_are_configured(make_settings: Any) -> None:
    settings = make_settings()
    async with app_client(settings) as c:
        assert (await c.get(f"{BASE}/Task")).status_code == 200
    assert not (settings.data_dir / TOKEN_FILE).exists()


async def test_auth_off_warns_and_accepts_requests_without_token(
        make_settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(auth="off", api_tokens=[])
    caplog.set_level(logging.WARNING, logger="fhir_outreach.auth")
    async with app_client(settings, token=None) as c:
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "fhir_outreach.auth"]
        assert len(warnings) == 1 and "AUTHENTICATION IS OFF" in warnings[0].getMessage()
        created = await c.post(f"{BASE}/Task", json=task())
        assert created.status_code == 201, created.text
        # Any header at all is ignored, even a nonsense one.
        read = await c.get(f"{BASE}/Task/{created.json()['id']}", headers={"Authorization": "Basic Zm9vOmJhcg=="})
        assert read.status_code == 200 and read.json()["id"] == created.json()["id"]
        meta = await c.get(f"{BASE}/metadata")
        assert "Authentication is OFF" in meta.json()["rest"][0]["security"]["description"]
    assert not (settings.data_dir / TOKEN_FILE).exists()


# --- JWT bearer tokens -----------------------------------------------------------------------------

async def test_jwt_read_scope_can_search_but_not_create(jwt_settings: Any, keys: dict[str, Key]) -> None:
    writer = bearer(keys["k1"].token("system/*.write system/*.read"))
    reader = bearer(keys["k1"].token("system/Task.read"))
    async with app_client(jwt_settings, token=None) as c:
        assert (await c.post(f"{BASE}/Task", json=task("seed"), headers=writer)).status_code == 201

        found = await c.get(f"{BASE}/Task", headers=reader)
        assert found.status_code == 200 and found.json()["total"] == 1

        denied = await c.post(f"{BASE}/Task", json=task("p2"), headers=reader)
        assert_outcome(denied, 403, "forbidden", "the token's scopes do not allow write access to Task "
                                                 "(needs system/Task.write or a SMART v2 equivalent)")
        other_type = await c.get(f"{BASE}/Patient", headers=reader)
        assert_outcome(other_type, 403, "forbidden", "the token's scopes do not allow read access to Patient "
                                                     "(needs system/Patient.read or a SMART v2 equivalent)")
        # A transaction writing Task with a read-only token is refused as a whole.
        tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": task("p3"), "request": {"method": "POST", "url": "Task"}}]}
        denied_tx = await c.post(BASE, json=tx, headers=reader)
        assert denied_tx.status_code == 403, denied_tx.text
        assert denied_tx.json()["issue"][0]["code"] == "forbidden"
        assert denied_tx.json()["issue"][0]["diagnostics"].startswith("Bundle.entry[0]: ")
        assert await task_total(c, writer) == 1


async def test_jwt_wildcard_read_write_scopes_can_create(jwt_settings: Any, keys: dict[str, Key]) -> None:
    headers = bearer(keys["k1"].token("system/*.write system/*.read"))
    async with app_client(jwt_settings, token=None) as c:
        created = await c.post(f"{BASE}/Task", json=task(), headers=headers)
        assert created.status_code == 201, created.text
        read = await c.get(f"{BASE}/Task/{created.json()['id']}", headers=headers)
        assert read.status_code == 200 and read.json()["for"] == {"reference": "Patient/p1"}


async def test_jwt_smart_v2_scopes(jwt_settings: Any, keys: dict[str, Key]) -> None:
    cruds = bearer(keys["k1"].token("system/Task.cruds"))
    rs = bearer(keys["k1"].token(["system/Task.rs"]))  # scope as a list claim, SMART v2 read+search only
    async with app_client(jwt_settings, token=None) as c:
        created = await c.post(f"{BASE}/Task", json=task(), headers=cruds)
        assert created.status_code == 201, created.text
        tid = created.json()["id"]
        updated = await c.put(f"{BASE}/Task/{tid}", json={**created.json(), "status": "ready"}, headers=cruds)
        assert updated.status_code == 200, updated.text
        assert (await c.get(f"{BASE}/Task", headers=rs)).json()["total"] == 1
        denied = await c.delete(f"{BASE}/Task/{tid}", headers=rs)
        assert_outcome(denied, 403, "forbidden", "the token's scopes do not allow write access to Task "
                                                 "(needs system/Task.write or a SMART v2 equivalent)")
        denied_type = await c.post(f"{BASE}/Patient", json={"resourceType": "Patient"}, headers=cruds)
        assert denied_type.status_code == 403, denied_type.text
        assert (await c.delete(f"{BASE}/Task/{tid}", headers=cruds)).status_code == 204


@pytest.mark.parametrize(("make_token", "diagnostics"), [
    pytest.param(lambda k: k["k1"].token(exp=int(time.time()) - 60, iat=int(time.time()) - 400),
                 "JWT rejected: Signature has expired", id="expired"),
    pytest.param(lambda k: k["k1"].token(aud="https://somebody-else.example.org/fhir"),
                 "JWT rejected: Audience doesn't match", id="wrong-audience"),
    pytest.param(lambda k: k["k1"].token(iss="https://evil.example.org"),
                 "JWT rejected: Invalid issuer", id="wrong-issuer"),
    pytest.param(lambda k: k["other"].token(kid="k1"),
                 "JWT rejected: Signature verification failed", id="signed-by-another-key"),
    pytest.param(lambda k: jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 300,
                                       "scope": "system/*.write"}, None, algorithm="none", headers={"kid": "k1"}),
                 "JWT rejected: The specified alg value is not allowed", id="alg-none"),
    pytest.param(lambda k: k["k1"].token(omit=("exp",)),
                 'JWT rejected: Token is missing the "exp" claim', id="no-expiry"),
])
async def test_jwt_rejected(jwt_settings: Any, keys: dict[str, Key], make_token: Any, diagnostics: str) -> None:
    good = bearer(keys["k1"].token())
    async with app_client(jwt_settings, token=None) as c:
        resp = await c.post(f"{BASE}/Task", json=task(), headers=bearer(make_token(keys)))
        assert_outcome(resp, 401, "login", diagnostics)
        assert resp.headers["www-authenticate"] == WWW_AUTH
        assert await task_total(c, good) == 0


async def test_unknown_kid_refreshes_the_jwks_once_then_works(
        jwt_settings: Any, keys: dict[str, Key], jwks: JwksServer) -> None:
    ac = app_client(jwt_settings, token=None)
    async with ac as c:
        ac.app.state.authenticator.min_refresh_seconds = 0  # the issuer rotates right away in this test
        first = await c.get(f"{BASE}/Task", headers=bearer(keys["k1"].token()))
        assert first.status_code == 200, first.text
        again = await c.get(f"{BASE}/Task", headers=bearer(keys["k1"].token()))
        assert again.status_code == 200
        assert jwks.hits == 1  # cached

        jwks.publish(keys["k2"])  # the issuer rotates its signing key
        rotated = await c.post(f"{BASE}/Task", json=task(), headers=bearer(keys["k2"].token()))
        assert rotated.status_code == 201, rotated.text
        assert jwks.hits == 2  # exactly one refresh for the unknown kid

        # k1 is gone from the refreshed set: its tokens are now refused (after one more refresh attempt).
        old = await c.get(f"{BASE}/Task", headers=bearer(keys["k1"].token()))
        assert_outcome(old, 401, "login", "no key with kid 'k1' in the issuer's JWKS")
        assert jwks.hits == 3


async def test_unknown_kids_cannot_force_more_than_one_refresh_per_interval(
        jwt_settings: Any, keys: dict[str, Key], jwks: JwksServer) -> None:
    async with app_client(jwt_settings, token=None) as c:
        assert (await c.get(f"{BASE}/Task", headers=bearer(keys["k1"].token()))).status_code == 200
        for _ in range(5):  # forged tokens with unknown kids, right after the first fetch
            resp = await c.get(f"{BASE}/Task", headers=bearer(keys["other"].token(kid="forged")))
            assert resp.status_code == 401
        assert jwks.hits == 1


async def test_unusable_jwks_is_401_not_500(jwt_settings: Any, keys: dict[str, Key], jwks: JwksServer) -> None:
    async with app_client(jwt_settings, token=None) as c:
        for document in ({"keys": []}, [1, 2], {"keys": [{"kty": "nonsense", "kid": "k1"}]}):
            jwks.document = document
            resp = await c.get(f"{BASE}/Task", headers=bearer(keys["k1"].token()))
            assert resp.status_code == 401, (document, resp.text)
            outcome = resp.json()
            assert outcome["issue"][0]["code"] == "login"
            assert outcome["issue"][0]["diagnostics"].startswith("the issuer's JWKS has no usable keys"), outcome


async def test_unreachable_jwks_is_401(make_settings: Any, keys: dict[str, Key]) -> None:
    settings = make_settings(api_tokens=[], jwt_issuer=ISSUER, jwt_audience=AUDIENCE,
                             jwt_jwks_url="http://127.0.0.1:9/jwks.json")
    async with app_client(settings, token=None) as c:
        resp = await c.get(f"{BASE}/Task", headers=bearer(keys["k1"].token()))
        assert resp.status_code == 401, resp.text
        assert resp.json()["issue"][0]["diagnostics"].startswith(
            "cannot fetch the issuer's JWKS to verify the token: ")


async def test_open_endpoints_without_token(jwt_settings: Any) -> None:
    async with app_client(jwt_settings, token=None) as c:
        health = await c.get("http://testserver/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        meta = await c.get(f"{BASE}/metadata")
        assert meta.status_code == 200 and meta.json()["resourceType"] == "CapabilityStatement"
        assert meta.json()["rest"][0]["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
