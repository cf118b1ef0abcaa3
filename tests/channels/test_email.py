"""The email channel against a real SMTP peer (``aiosmtpd`` on 127.0.0.1: plain, STARTTLS with a self-signed
certificate, implicit TLS, AUTH, refusals), and the tracking callbacks (pixel, click redirect, DSN webhook)
through the whole app on both stores."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import ipaddress
import re
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from email import policy
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fhir_outreach.api.channel_email import PIXEL, dsn_signature
from fhir_outreach.api.channel_email import router as email_router
from fhir_outreach.channels import signing
from fhir_outreach.channels.base import DeliveryFailed, Outbound
from fhir_outreach.channels.email import (
    DEFAULT_SUBJECT,
    EmailChannel,
    communication_of,
    message_id,
    text_to_html,
    tracked_html,
)
from fhir_outreach.channels.engagement import ENGAGEMENT_URL, REASON_SYSTEM
from fhir_outreach.intake.processor import EVENT
from tests.conftest import app_client
from tests.servers import free_port

FROM = "Care Team <care@clinic.example>"
USER, PASSWORD = "outreach", "s3cret-password"


# --- the SMTP peer ---------------------------------------------------------------------------------------

class Collector:
    """An aiosmtpd handler that keeps every accepted message; some recipients are refused."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.idle_close_after: int | None = None  # close a connection (421) at its next MAIL after n messages
        self.data_delay = 0.0  # seconds before answering DATA
        self._mails: dict[Any, int] = {}

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802
                          mail_options: list[str]) -> str:
        seen = self._mails.get(session.peer, 0)
        if self.idle_close_after is not None and seen >= self.idle_close_after:
            asyncio.get_running_loop().call_soon(server.transport.close)
            return "421 4.4.2 idle too long, closing connection"
        self._mails[session.peer] = seen + 1
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802
                          rcpt_options: list[str]) -> str:
        if address.startswith("nobody@"):
            return f"550 5.1.1 <{address}>: no such user"
        if address.startswith("busy@"):
            return "450 4.2.1 mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        self.received.append({
            "peer": session.peer, "tls": server.transport.get_extra_info("ssl_object") is not None, "authenticated": session.authenticated,
            "mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos),
            "message": email.message_from_bytes(envelope.original_content, policy=policy.default)})
        return "250 2.0.0 accepted"


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USER.encode(), PASSWORD.encode())
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535 itself


@contextmanager
def smtp_server(handler: Collector, port: int | None = None, **kwargs: Any) -> Iterator[Controller]:
    controller = Controller(handler, hostname="127.0.0.1", port=port or free_port(), **kwargs)
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


@pytest.fixture
def collector() -> Collector:
    return Collector()


@pytest.fixture
def plain_server(collector: Collector) -> Iterator[Controller]:
    with smtp_server(collector) as controller:
        yield controller


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the IP in subjectAltName, so hostname checks pass)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture
def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*certificate)
    return ctx


@pytest.fixture
def client_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    """Trusts only the test certificate; hostname checking stays on."""
    return ssl.create_default_context(cafile=str(certificate[0]))


def channel_for(make_settings: Any, controller: Controller, **kwargs: Any) -> EmailChannel:
    settings_kw = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith(("smtp_", "email_"))}
    settings = make_settings(smtp_host="127.0.0.1", smtp_port=controller.port,
                             smtp_security=settings_kw.pop("smtp_security", "none"), email_from=FROM, **settings_kw)
    return EmailChannel(settings, local_hostname="outreach.test", timeout=5, **kwargs)


def outbound(to: str = "jane@example.org", key: str = "c-1", **kw: Any) -> Outbound:
    values: dict[str, Any] = {"communication": f"Communication/{key}", "channel": "email", "to": to,
                              "text": "Hello Jane,\nyour visit is on Monday.\n\nSee http://portal.example/inbox.",
                              "subject": "Your visit", "idempotency_key": key}
    values.update(kw)
    return Outbound(**values)


def parts(msg: EmailMessage) -> tuple[str, str]:
    plain, html = msg.get_body(("plain",)), msg.get_body(("html",))
    assert plain is not None and html is not None
    # the parts travel with CRLF line ends, which the parser keeps
    return plain.get_content().replace("\r\n", "\n"), html.get_content().replace("\r\n", "\n")


# --- sending ---------------------------------------------------------------------------------------------

async def test_send_envelope_headers_and_both_parts(make_settings: Any, plain_server: Controller,
                                                    collector: Collector) -> None:
    channel = channel_for(make_settings, plain_server)
    text = "Grüße, Jane <b>!\n.a line that starts with a dot\n\nSecond paragraph: https://portal.example/x?a=1&b=2."
    try:
        sent = await channel.send(outbound(text=text, key="comm-42"))
    finally:
        await channel.aclose()
    [got] = collector.received
    assert got["mail_from"] == "care@clinic.example"
    assert got["rcpt_tos"] == ["jane@example.org"]
    msg = got["message"]
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["From"] == FROM
    assert msg["To"] == "jane@example.org"
    assert msg["Subject"] == "Your visit"
    assert msg["X-Outreach-Communication"] == "Communication/comm-42"
    assert msg["Message-ID"] == "<outreach.comm-42@clinic.example>" == sent.provider_id
    assert abs((parsedate_to_datetime(msg["Date"]) - dt.datetime.now(dt.UTC)).total_seconds()) < 60
    plain, html = parts(msg)
    assert plain.rstrip("\n") == text  # dot-stuffing undone by the server, UTF-8 intact
    assert "<p>Grüße, Jane &lt;b&gt;!<br>\n.a line that starts with a dot</p>" in html
    assert '<a href="https://portal.example/x?a=1&amp;b=2">https://portal.example/x?a=1&amp;b=2</a>.' in html
    assert communication_of(sent.provider_id) == "comm-42"


async def test_given_html_and_default_subject(make_settings: Any, plain_server: Controller,
                                              collector: Collector) -> None:
    channel = channel_for(make_settings, plain_server)
    try:
        await channel.send(outbound(subject=None, html="<p>Made <i>by hand</i></p>"))
        await channel.send(outbound(subject="  two\r\nlines  "))
    finally:
        await channel.aclose()
    first, second = (r["message"] for r in collector.received)
    assert first["Subject"] == DEFAULT_SUBJECT
    assert parts(first)[1].strip() == "<p>Made <i>by hand</i></p>"
    assert second["Subject"] == "two lines"  # no header injection from a subject


async def test_message_id_is_deterministic_and_connection_reused(make_settings: Any, plain_server: Controller,
                                                                 collector: Collector) -> None:
    channel = channel_for(make_settings, plain_server)
    try:
        a = await channel.send(outbound(key="c-1"))
        again = await channel.send(outbound(key="c-1", text="resent"))
        b = await channel.send(outbound(key="c-2"))
    finally:
        await channel.aclose()
    assert a.provider_id == again.provider_id == message_id("c-1", FROM)
    assert b.provider_id != a.provider_id
    assert [r["message"]["Message-ID"] for r in collector.received] == [a.provider_id] * 2 + [b.provider_id]
    assert channel.connections == 1
    assert len({r["peer"] for r in collector.received}) == 1
    # a key that cannot be a Message-ID local part is hashed, still deterministically
    odd = message_id("weird key/..", FROM)
    assert odd == message_id("weird key/..", FROM) and " " not in odd and communication_of(odd) != "weird key/.."


async def test_reconnects_after_the_server_went_away(make_settings: Any, collector: Collector) -> None:
    port = free_port()
    with smtp_server(collector, port=port) as controller:
        channel = channel_for(make_settings, controller)
        await channel.send(outbound(key="before"))
    try:
        with pytest.raises(DeliveryFailed) as down:
            await channel.send(outbound(key="while-down"))
        assert not down.value.permanent
        with smtp_server(collector, port=port):
            await channel.send(outbound(key="after"))
    finally:
        await channel.aclose()
    assert [r["message"]["X-Outreach-Communication"] for r in collector.received] == [
        "Communication/before", "Communication/after"]
    assert channel.connections == 2


async def test_reused_connection_closed_by_the_server_is_replaced(make_settings: Any, plain_server: Controller,
                                                                 collector: Collector) -> None:
    """The server drops the idle connection only when the next MAIL arrives (421): the message goes out
    once, on a fresh connection, and the caller never sees the failure."""
    channel = channel_for(make_settings, plain_server)
    try:
        await channel.send(outbound(key="first"))
        collector.idle_close_after = 1
        await channel.send(outbound(key="second"))
        # ... but a 421 on a fresh connection is reported (transient), not looped on
        collector.idle_close_after = 0
        with pytest.raises(DeliveryFailed) as closing:
            await channel.send(outbound(key="third"))
        assert not closing.value.permanent and closing.value.code == "smtp-421"
    finally:
        await channel.aclose()
    assert [r["message"]["X-Outreach-Communication"] for r in collector.received] == [
        "Communication/first", "Communication/second"]
    assert len({r["peer"] for r in collector.received}) == 2
    assert channel.connections == 3


async def test_cancelled_send_does_not_poison_the_connection(make_settings: Any, plain_server: Controller,
                                                             collector: Collector) -> None:
    channel = channel_for(make_settings, plain_server)
    try:
        collector.data_delay = 1.0
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(channel.send(outbound(key="slow")), 0.3)
        collector.data_delay = 0.0
        sent = await channel.send(outbound(key="next"))
    finally:
        await channel.aclose()
    assert sent.provider_id == message_id("next", FROM)
    assert channel.connections == 2  # the half-done transaction's connection was not reused
    assert "Communication/next" in [r["message"]["X-Outreach-Communication"] for r in collector.received]


async def test_starttls_with_auth(make_settings: Any, collector: Collector, server_tls: ssl.SSLContext,
                                  client_tls: ssl.SSLContext) -> None:
    with smtp_server(collector, tls_context=server_tls, require_starttls=True, authenticator=authenticator,
                     auth_required=True) as controller:
        channel = channel_for(make_settings, controller, smtp_security="starttls", smtp_username=USER,
                              smtp_password=PASSWORD, tls_context=client_tls)
        try:
            sent = await channel.send(outbound())
        finally:
            await channel.aclose()
        [got] = collector.received
        assert got["tls"] is True and got["authenticated"] is True
        assert got["message"]["Message-ID"] == sent.provider_id

        # the certificate is checked: without the test CA the send fails (transient), nothing is sent
        untrusting = channel_for(make_settings, controller, smtp_security="starttls", smtp_username=USER,
                                 smtp_password=PASSWORD)
        with pytest.raises(DeliveryFailed) as failed:
            await untrusting.send(outbound(key="untrusted"))
        assert not failed.value.permanent
        # ... unless verification is switched off explicitly
        lax = channel_for(make_settings, controller, smtp_security="starttls", smtp_username=USER,
                          smtp_password=PASSWORD, validate_certs=False)
        await lax.send(outbound(key="lax"))
        await lax.aclose()

        wrong = channel_for(make_settings, controller, smtp_security="starttls", smtp_username=USER,
                            smtp_password="wrong-password", tls_context=client_tls)
        with pytest.raises(DeliveryFailed) as refused:
            await wrong.send(outbound(key="wrong-password"))
        assert refused.value.permanent and refused.value.code == "smtp-535"

        # plain text against a server that insists on STARTTLS: refused with 530, never sent in clear
        plain = channel_for(make_settings, controller, smtp_security="none")
        with pytest.raises(DeliveryFailed) as cleartext:
            await plain.send(outbound(key="cleartext"))
        assert cleartext.value.permanent and cleartext.value.code == "smtp-530"
    assert [r["message"]["X-Outreach-Communication"] for r in collector.received] == [
        "Communication/c-1", "Communication/lax"]


async def test_starttls_required_but_not_offered(make_settings: Any, plain_server: Controller,
                                                 collector: Collector) -> None:
    channel = channel_for(make_settings, plain_server, smtp_security="starttls")
    with pytest.raises(DeliveryFailed) as failed:
        await channel.send(outbound())
    assert not failed.value.permanent and failed.value.code == "smtp-config"
    assert collector.received == []


async def test_implicit_tls(make_settings: Any, collector: Collector, server_tls: ssl.SSLContext,
                            client_tls: ssl.SSLContext) -> None:
    with smtp_server(collector, ssl_context=server_tls) as controller:
        channel = channel_for(make_settings, controller, smtp_security="tls", tls_context=client_tls)
        try:
            await channel.send(outbound())
        finally:
            await channel.aclose()
    [got] = collector.received
    assert got["tls"] is True


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
async def test_auth_on_a_plain_connection(make_settings: Any, collector: Collector) -> None:
    with smtp_server(collector, authenticator=authenticator, auth_required=True,
                     auth_require_tls=False) as controller:
        anonymous = channel_for(make_settings, controller)
        with pytest.raises(DeliveryFailed) as refused:
            await anonymous.send(outbound(key="anonymous"))
        assert refused.value.permanent and refused.value.code == "smtp-530"  # authentication required
        channel = channel_for(make_settings, controller, smtp_username=USER, smtp_password=PASSWORD)
        try:
            await channel.send(outbound(key="authenticated"))
        finally:
            await channel.aclose()
    [got] = collector.received
    assert got["authenticated"] is True
    assert got["message"]["X-Outreach-Communication"] == "Communication/authenticated"


async def test_refusals_permanent_and_transient(make_settings: Any, plain_server: Controller,
                                                collector: Collector) -> None:
    channel = channel_for(make_settings, plain_server)
    try:
        with pytest.raises(DeliveryFailed) as unknown:
            await channel.send(outbound(to="nobody@example.org"))
        assert unknown.value.permanent and unknown.value.code == "smtp-550"
        assert "no such user" in unknown.value.reason
        with pytest.raises(DeliveryFailed) as busy:
            await channel.send(outbound(to="busy@example.org"))
        assert not busy.value.permanent and busy.value.code == "smtp-450"
        with pytest.raises(DeliveryFailed) as bad:
            await channel.send(outbound(to="not an address"))
        assert bad.value.permanent and bad.value.code == "bad-address"
        await channel.send(outbound(to="jane@example.org"))  # the same connection is still good
    finally:
        await channel.aclose()
    assert [r["rcpt_tos"] for r in collector.received] == [["jane@example.org"]]
    assert channel.connections == 1


async def test_server_down_is_transient(make_settings: Any) -> None:
    settings = make_settings(smtp_host="127.0.0.1", smtp_port=free_port(), smtp_security="none", email_from=FROM)
    channel = EmailChannel(settings, timeout=5, local_hostname="outreach.test")
    with pytest.raises(DeliveryFailed) as failed:
        await channel.send(outbound())
    assert not failed.value.permanent and failed.value.code == "connection"
    await channel.aclose()


async def test_timeout_is_transient(make_settings: Any) -> None:
    """A peer that accepts the connection and never greets."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = make_settings(smtp_host="127.0.0.1", smtp_port=port, smtp_security="none", email_from=FROM)
    channel = EmailChannel(settings, timeout=0.5, local_hostname="outreach.test")
    try:
        with pytest.raises(DeliveryFailed) as failed:
            await channel.send(outbound())
        assert not failed.value.permanent and failed.value.code == "timeout"
    finally:
        await channel.aclose()
        server.close()


def test_channel_needs_a_host_and_a_from_address(make_settings: Any) -> None:
    with pytest.raises(ValueError, match="SMTP_HOST"):
        EmailChannel(make_settings())
    with pytest.raises(ValueError, match="EMAIL_FROM"):
        EmailChannel(make_settings(smtp_host="127.0.0.1", email_from="nobody"))


# --- tracking HTML ---------------------------------------------------------------------------------------

KEY = b"k" * 32
BASE = "https://outreach.example"


def test_tracked_html_rewrites_http_links_only() -> None:
    source = ('<html><body>\n<p title="see href=http://x.example">Hi</p>\n'
              '<a class="btn" href="https://portal.example/a?x=1&amp;y=2" data-href="keep">Portal</a>\n'
              "<A HREF='http://other.example/b' target=_blank>b</A>\n"
              "<a href=http://bare.example/c>c</a>\n"
              '<a href="mailto:care@clinic.example">mail</a> <a href="#top">top</a> <a name="x">n</a>\n'
              f'<a href="{BASE}/channels/email/click/already">ours</a>\n'
              "<!-- <a href=\"http://comment.example\"> -->\n"
              '<script>var s = "<a href=\'http://script.example\'>";</script>\n'
              "</body></html>")
    out = tracked_html(source, key=KEY, communication_id="Communication/c-9", callback_base=BASE + "/")
    hrefs = re.findall(r"""(?i)<a\b[^>]*?\shref=(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", out)
    links = [a or b or c for a, b, c in hrefs]
    tracked = [h for h in links if h.startswith(f"{BASE}/channels/email/click/") and not h.endswith("/already")]
    assert len(tracked) == 3
    targets = [signing.verify(KEY, h.rsplit("/", 1)[1]) for h in tracked]
    assert targets == [{"c": "c-9", "u": "https://portal.example/a?x=1&y=2"},
                       {"c": "c-9", "u": "http://other.example/b"}, {"c": "c-9", "u": "http://bare.example/c"}]
    # other attributes, untracked links, comments and scripts untouched
    assert 'class="btn"' in out and 'data-href="keep">Portal</a>' in out and "target=_blank>b</A>" in out
    assert '<p title="see href=http://x.example">' in out
    for kept in ('href="mailto:care@clinic.example"', 'href="#top"', '<a name="x">',
                 f'href="{BASE}/channels/email/click/already"', '<a href="http://comment.example">',
                 "<a href='http://script.example'>"):
        assert kept in out
    # the pixel, just before </body>
    pixel = re.search(r'<img src="([^"]+)"[^>]*>\s*</body></html>$', out)
    assert pixel is not None
    token = pixel.group(1).removeprefix(f"{BASE}/channels/email/open/").removesuffix(".gif")
    assert signing.verify(KEY, token) == {"c": "c-9"}
    # nothing but the hrefs and the pixel changed
    assert re.sub(r'<img src="[^"]+"[^>]*>', "", out).count("\n") == source.count("\n")


def test_tracked_html_without_body_appends_the_pixel() -> None:
    out = tracked_html("<p>Hello <a href='https://x.example'>x</a></p>", key=KEY, communication_id="c-1",
                       callback_base=BASE)
    assert out.startswith("<p>Hello <a href=\"https://outreach.example/channels/email/click/")
    assert out.endswith('style="display:block;border:0;width:1px;height:1px">')


def test_text_to_html() -> None:
    html = text_to_html("Dear <Jane> & co,\n\n\nsee https://p.example/x.\nBye (http://q.example/y)")
    assert "<p>Dear &lt;Jane&gt; &amp; co,</p>" in html
    assert ('<p>see <a href="https://p.example/x">https://p.example/x</a>.<br>\n'
            'Bye (<a href="http://q.example/y">http://q.example/y</a>)</p>') in html


# --- callbacks through the app ---------------------------------------------------------------------------

class EmailApp:
    def __init__(self, http: httpx.AsyncClient, app: Any) -> None:
        self.http = http
        self.app = app
        self.store = app.state.store
        self.key: bytes = app.state.channel_key

    async def communication(self, cid: str = "m-1", status: str = "in-progress") -> dict[str, Any]:
        body = {"resourceType": "Communication", "id": cid, "status": status,
                "subject": {"reference": "Patient/p1"}, "recipient": [{"reference": "Patient/p1"}],
                "payload": [{"contentString": "Hello"}]}
        r = await self.http.put(f"/fhir/Communication/{cid}", json=body)
        assert r.status_code in (200, 201), r.text
        return await self.read(cid)

    async def read(self, cid: str = "m-1") -> dict[str, Any]:
        r = await self.http.get(f"/fhir/Communication/{cid}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def events(self, cid: str = "m-1") -> list[Any]:
        return [e for e in await self.store.list_records(EVENT, limit=1000)
                if e.data.get("focus") == f"Communication/{cid}"]


def engagements(comm: dict[str, Any]) -> list[str]:
    return [e["valueCode"] for e in comm.get("extension") or [] if e["url"] == ENGAGEMENT_URL]


@pytest.fixture(params=["sqlite", "mongo"])
async def email_app(request: pytest.FixtureRequest, make_settings: Any) -> AsyncIterator[EmailApp]:
    if request.param == "mongo":
        url = request.getfixturevalue("mongo_base_url")
        settings = make_settings(store=f"{url}/em{uuid.uuid4().hex[:12]}")
    else:
        settings = make_settings()
    ac = app_client(settings)
    if not any(getattr(r, "path", "").startswith("/channels/email/") for r in ac.app.routes):
        ac.app.include_router(email_router)
    async with ac as http:
        yield EmailApp(http, ac.app)


def _path(url: str) -> str:
    return url.removeprefix("http://testserver")


async def test_open_pixel_records_opened(email_app: EmailApp) -> None:
    await email_app.communication()
    html = tracked_html("<html><body><p>Hi</p></body></html>", key=email_app.key, communication_id="m-1",
                        callback_base="http://testserver")
    pixel = re.search(r'<img src="([^"]+)"', html)
    assert pixel is not None

    r = await email_app.http.get(_path(pixel.group(1)), headers={"Authorization": ""})
    assert r.status_code == 200 and r.content == PIXEL
    assert r.headers["content-type"] == "image/gif" and "no-store" in r.headers["cache-control"]
    comm = await email_app.read()
    assert engagements(comm) == ["opened"] and comm["status"] == "in-progress"
    assert len(await email_app.events()) == 1
    version = comm["meta"]["versionId"]

    again = await email_app.http.get(_path(pixel.group(1)))
    assert again.content == PIXEL
    assert (await email_app.read())["meta"]["versionId"] == version  # a second open changes nothing


async def test_bad_pixel_token_still_gif_records_nothing(email_app: EmailApp) -> None:
    await email_app.communication()
    forged = signing.sign(b"another key" * 3, {"c": "m-1"})
    good = signing.sign(email_app.key, {"c": "m-1"})
    tampered = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
    for token in (forged, tampered, "garbage"):
        r = await email_app.http.get(f"/channels/email/open/{token}.gif")
        assert r.status_code == 200 and r.content == PIXEL
    comm = await email_app.read()
    assert engagements(comm) == [] and comm["meta"]["versionId"] == "1"
    assert await email_app.events() == []


async def test_click_redirects_and_records(email_app: EmailApp) -> None:
    await email_app.communication()
    target = "https://portal.example/inbox?msg=1&lang=en"
    html = tracked_html(f'<a href="{target.replace("&", "&amp;")}">Open</a>', key=email_app.key,
                        communication_id="Communication/m-1", callback_base="http://testserver")
    link = re.search(r'<a href="([^"]+)"', html)
    assert link is not None

    r = await email_app.http.get(_path(link.group(1)), headers={"Authorization": ""})
    assert r.status_code == 302
    assert r.headers["location"] == target
    assert r.headers["referrer-policy"] == "no-referrer"
    comm = await email_app.read()
    assert sorted(engagements(comm)) == ["clicked", "opened"]
    assert len(await email_app.events()) == 1


async def test_click_bad_tokens_are_400_and_change_nothing(email_app: EmailApp) -> None:
    await email_app.communication()
    good = signing.sign(email_app.key, {"c": "m-1", "u": "https://portal.example/"})
    mac = good.split(".")[1]
    evil_payload = signing.sign(b"x" * 32, {"c": "m-1", "u": "https://evil.example/"}).split(".")[0]
    cases = [
        f"{evil_payload}.{mac}",  # payload swapped under the good signature
        signing.sign(b"another key" * 3, {"c": "m-1", "u": "https://evil.example/"}),  # wrong key
        signing.sign(email_app.key, {"c": "m-1", "u": "javascript:alert(1)"}),  # signed, but not http(s)
        signing.sign(email_app.key, {"c": "m-1", "u": "https://x.example/\r\nSet-Cookie: a=b"}),
        signing.sign(email_app.key, {"c": "m-1"}),  # a pixel token is no link
        "not-a-token",
    ]
    for token in cases:
        r = await email_app.http.get(f"/channels/email/click/{token}")
        assert r.status_code == 400, token
        assert r.json()["resourceType"] == "OperationOutcome"
        assert "location" not in r.headers
    comm = await email_app.read()
    assert engagements(comm) == [] and comm["meta"]["versionId"] == "1"
    assert await email_app.events() == []


async def dsn_post(app: EmailApp, body: dict[str, Any] | bytes, signature: str | None = "good") -> httpx.Response:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Content-Type": "application/json", "Authorization": ""}
    if signature == "good":
        headers["X-Outreach-Signature"] = dsn_signature(app.key, raw)
    elif signature is not None:
        headers["X-Outreach-Signature"] = signature
    return await app.http.post("/channels/email/dsn", content=raw, headers=headers)


async def test_dsn_bounce_makes_the_message_not_done(email_app: EmailApp) -> None:
    await email_app.communication()
    msg_id = message_id("m-1", FROM)
    r = await dsn_post(email_app, {"message_id": msg_id, "status": "bounced",
                                   "diagnostic": "550 5.1.1 no such user"})
    assert r.status_code == 200, r.text
    assert r.json() == {"communication": "Communication/m-1", "status": "bounced", "changed": True}
    comm = await email_app.read()
    assert comm["status"] == "not-done"
    assert comm["statusReason"]["coding"] == [{"system": REASON_SYSTEM, "code": "bounced"}]
    assert comm["statusReason"]["text"] == "550 5.1.1 no such user"
    assert len(await email_app.events()) == 1
    repeat = await dsn_post(email_app, {"message_id": msg_id, "status": "bounced"})
    assert repeat.status_code == 200 and repeat.json()["changed"] is False


async def test_dsn_delivered_by_communication(email_app: EmailApp) -> None:
    await email_app.communication("m-2")
    r = await dsn_post(email_app, {"communication": "Communication/m-2", "status": "delivered"})
    assert r.status_code == 200, r.text
    comm = await email_app.read("m-2")
    assert comm["status"] == "completed" and engagements(comm) == ["delivered"]


async def test_dsn_refusals_change_nothing(email_app: EmailApp) -> None:
    await email_app.communication()
    body = orjson.dumps({"message_id": message_id("m-1", FROM), "status": "bounced"})
    cases = [
        (401, await dsn_post(email_app, body, signature=None)),
        (401, await dsn_post(email_app, body, signature="sha256=" + "0" * 64)),
        (401, await dsn_post(email_app, body, signature=dsn_signature(b"another key", body))),
        (401, await dsn_post(email_app, body + b" ", signature=dsn_signature(email_app.key, body))),
        (400, await dsn_post(email_app, b"{not json")),
        (400, await dsn_post(email_app, b"[1, 2]")),
        (400, await dsn_post(email_app, {"message_id": message_id("m-1", FROM), "status": "exploded"})),
        (400, await dsn_post(email_app, {"status": "bounced"})),
        (404, await dsn_post(email_app, {"message_id": message_id("nope", FROM), "status": "bounced"})),
        (404, await dsn_post(email_app, {"message_id": "<abc@elsewhere.example>", "status": "bounced"})),
        (404, await dsn_post(email_app, {"communication": "Communication/nope", "status": "failed"})),
    ]
    for expected, r in cases:
        assert r.status_code == expected, (expected, r.text)
        assert r.json()["resourceType"] == "OperationOutcome"
    comm = await email_app.read()
    assert comm["status"] == "in-progress" and comm["meta"]["versionId"] == "1"
    assert await email_app.events() == []


async def test_dsn_for_a_message_id_it_was_not_sent_with(email_app: EmailApp) -> None:
    """A Communication that records the Message-ID it was sent with only accepts reports naming that id."""
    from fhir_outreach.channels import engagement

    await email_app.communication()
    await engagement.record(email_app.store, "m-1", "sent", at=0, provider_id="<outreach.m-1@clinic.example>")
    before = await email_app.read()
    r = await dsn_post(email_app, {"message_id": "<outreach.m-1@other.example>", "status": "bounced"})
    assert r.status_code == 404
    assert (await email_app.read())["meta"]["versionId"] == before["meta"]["versionId"]
    ok = await dsn_post(email_app, {"message_id": "<outreach.m-1@clinic.example>", "status": "failed"})
    assert ok.status_code == 200 and (await email_app.read())["status"] == "not-done"
