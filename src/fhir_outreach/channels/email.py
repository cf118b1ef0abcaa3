"""The email channel: SMTP with ``aiosmtplib`` (STARTTLS, implicit TLS or plain; optional AUTH), and the
open/click tracking that the callbacks in ``api/channel_email.py`` answer.

Sending. One SMTP connection is opened on the first send and reused; sends are serialised on it (SMTP is
one transaction at a time). A connection the server closed while idle is noticed before use and replaced;
if it dies while ``MAIL FROM`` is being sent — before anything of the message has left — the transaction
is repeated once on a fresh connection. After that, failures are reported, never retried here:

- ``5xx`` replies (recipient unknown, message refused, AUTH refused) and an address we cannot use are
  *permanent* ``DeliveryFailed``;
- ``4xx`` replies, refused or dropped connections, timeouts, TLS failures and a server lacking what the
  settings ask for (STARTTLS, AUTH — a configuration fault, not the message's) are *transient*.

Each message is ``multipart/alternative``: the text, and the HTML (``Outbound.html``, or built from the
text: escaped, blank-line paragraphs, bare http(s) URLs linked). Headers: ``From`` (``email_from``), ``To``,
``Subject`` (default "Message from your care team"), ``Date``, ``X-Outreach-Communication`` and a
``Message-ID`` derived only from the idempotency key (the Communication id) — ``<outreach.{id}@{domain of
email_from}>`` — so a resend of the same Communication carries the same Message-ID, and a bounce naming it
leads back to the Communication (``communication_of``). The Message-ID is the provider id returned.

Tracking. ``tracked_html`` adds an open pixel and sends every http(s) link through a signed click redirect
(tokens from ``signing.sign`` under the app's channel key), leaving everything else in the HTML untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html as htmlmod
import re
import ssl
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from html.parser import HTMLParser
from typing import Any

import aiosmtplib

from ..settings import Settings
from . import signing
from .base import DeliveryFailed, Outbound, Sent

DEFAULT_SUBJECT = "Message from your care team"
MESSAGE_ID_PREFIX = "outreach."
_SAFE_KEY = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
_OUR_MESSAGE_ID = re.compile(r"<?outreach\.([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)@[^>\s]+>?")
_URL = re.compile(r"https?://[^\s<>\"']+", re.IGNORECASE)
_TRAILING = ".,;:!?)]}'\""


# --- message building ------------------------------------------------------------------------------------

def _domain(address: str) -> str:
    addr = parseaddr(address)[1]
    return addr.rpartition("@")[2] or "localhost"


def message_id(key: str, sender: str) -> str:
    """The Message-ID of the message with idempotency key ``key`` (the same key gives the same id)."""
    domain = _domain(sender)
    if _SAFE_KEY.fullmatch(key) and len(key) <= 64:
        return f"<{MESSAGE_ID_PREFIX}{key}@{domain}>"
    return f"<{MESSAGE_ID_PREFIX}h{hashlib.sha256(key.encode()).hexdigest()[:40]}@{domain}>"


def communication_of(msg_id: str) -> str | None:
    """The Communication id a Message-ID of ours names (None for another's, or a hashed key)."""
    m = _OUR_MESSAGE_ID.fullmatch(msg_id.strip())
    return m.group(1) if m else None


def _linkify(line: str) -> str:
    """One line of text as HTML: escaped, with bare http(s) URLs made links."""
    out, pos = [], 0
    for m in _URL.finditer(line):
        url = m.group(0).rstrip(_TRAILING)
        if not url.lower().removeprefix("http://").removeprefix("https://"):
            continue
        out.append(htmlmod.escape(line[pos:m.start()]))
        out.append(f'<a href="{htmlmod.escape(url)}">{htmlmod.escape(url)}</a>')
        pos = m.start() + len(url)
    out.append(htmlmod.escape(line[pos:]))
    return "".join(out)


def text_to_html(text: str) -> str:
    """The HTML part for a text-only message: escaped, paragraphs at blank lines, line breaks kept,
    bare http(s) URLs made links (so ``tracked_html`` can track them)."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n(?:[ \t]*\n)+", text.replace("\r\n", "\n").strip())
                  if p.strip()]
    body = "\n".join("<p>" + "<br>\n".join(_linkify(line) for line in p.split("\n")) + "</p>"
                     for p in paragraphs)
    return ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head>\n'
            f'<body style="font-family: sans-serif">\n{body}\n</body></html>\n')


def _one_line(value: str) -> str:
    return " ".join(value.split())


def build_message(message: Outbound, sender: str, *, now: datetime | None = None,
                  utf8: bool = False) -> EmailMessage:
    """The MIME message for ``message`` (raises ``ValueError`` for an address that cannot be written)."""
    msg = EmailMessage(policy=policy.SMTPUTF8 if utf8 else policy.SMTP)
    msg["From"] = sender
    msg["To"] = _one_line(message.to)
    msg["Subject"] = _one_line(message.subject or "") or DEFAULT_SUBJECT
    msg["Date"] = format_datetime(now or datetime.now(UTC))
    msg["Message-ID"] = message_id(message.idempotency_key or _bare(message.communication), sender)
    msg["X-Outreach-Communication"] = message.communication
    unsubscribe = message.extra.get("unsubscribe")
    if unsubscribe:  # RFC 2369 + RFC 8058 one-click: mail clients show an unsubscribe button
        msg["List-Unsubscribe"] = f"<{unsubscribe}>"
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg.set_content(message.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    msg.add_alternative(message.html if message.html is not None else text_to_html(message.text),
                        subtype="html", charset="utf-8", cte="quoted-printable")
    return msg


def _bare(reference: str) -> str:
    return reference.rpartition("/")[2]


def _address(value: str) -> str | None:
    """The addr-spec of ``value`` ("Name <a@b>" or "a@b"), or None when it is not one usable address."""
    if any(c in value for c in "\r\n\0"):
        return None
    addr = parseaddr(value)[1]
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain.strip(".") or any(c.isspace() for c in addr):
        return None
    return addr


# --- the channel -----------------------------------------------------------------------------------------

class _Stale(Exception):
    """The reused connection was gone before any of the message was sent."""


class EmailChannel:
    """SMTP delivery configured by the ``smtp_*`` and ``email_from`` settings.

    ``tls_context`` replaces the default (system trust, hostname checked) for STARTTLS and TLS — for a
    private CA or, in tests, a self-signed certificate. ``validate_certs=False`` turns verification off
    and must be asked for explicitly."""

    name = "email"

    def __init__(self, settings: Settings, *, tls_context: ssl.SSLContext | None = None,
                 validate_certs: bool = True, timeout: float = 30.0, local_hostname: str | None = None) -> None:
        if not settings.smtp_host:
            raise ValueError("the email channel needs FHIR_OUTREACH_SMTP_HOST")
        sender = _address(settings.email_from)
        if sender is None:
            raise ValueError(f"FHIR_OUTREACH_EMAIL_FROM is not an email address: {settings.email_from!r}")
        self.host = settings.smtp_host
        self.port = settings.smtp_port
        self.security = settings.smtp_security
        self.username = settings.smtp_username if settings.smtp_password is not None else None
        self.password = settings.smtp_password if self.username is not None else None
        self.from_header = settings.email_from
        self.sender = sender
        self.tls_context = tls_context
        self.validate_certs = validate_certs
        self.timeout = timeout
        self.local_hostname = local_hostname
        self._smtp: aiosmtplib.SMTP | None = None
        self._lock = asyncio.Lock()
        self.connections = 0  # connections opened so far (observability; tests)

    async def send(self, message: Outbound) -> Sent:
        to = _address(message.to)
        if to is None:
            raise DeliveryFailed(f"not an email address: {message.to!r}", permanent=True, code="bad-address")
        utf8 = not (to.isascii() and self.sender.isascii())
        try:
            msg = build_message(message, self.from_header, utf8=utf8)
            raw = msg.as_bytes()
        except (ValueError, TypeError) as exc:
            raise DeliveryFailed(f"cannot write the message: {exc}", permanent=True, code="bad-message") from exc
        msg_id = str(msg["Message-ID"])
        async with self._lock:
            try:
                try:
                    await self._transaction(to, raw, utf8)
                except _Stale:
                    await self._transaction(to, raw, utf8)
            except DeliveryFailed:
                raise
            except Exception as exc:
                self._drop_if_broken(exc)
                raise _failure(exc) from exc
            except BaseException:  # cancelled mid-transaction: the connection's state is unknown
                self._drop_if_broken(None)
                raise
        return Sent(provider_id=msg_id)

    async def aclose(self) -> None:
        async with self._lock:
            smtp, self._smtp = self._smtp, None
            if smtp is not None and smtp.is_connected:
                with contextlib.suppress(Exception):
                    await smtp.quit(timeout=5)
                smtp.close()

    # -- internals --

    async def _connect(self) -> aiosmtplib.SMTP:
        kwargs: dict[str, Any] = {
            "hostname": self.host, "port": self.port, "timeout": self.timeout,
            "use_tls": self.security == "tls", "start_tls": self.security == "starttls",
            "validate_certs": self.validate_certs}
        if self.tls_context is not None:
            kwargs["tls_context"] = self.tls_context
        if self.local_hostname:
            kwargs["local_hostname"] = self.local_hostname
        if self.username is not None:
            kwargs["username"], kwargs["password"] = self.username, self.password
        smtp = aiosmtplib.SMTP(**kwargs)
        try:
            await smtp.connect()
        except BaseException:
            smtp.close()
            raise
        self.connections += 1
        return smtp

    async def _transaction(self, to: str, raw: bytes, utf8: bool) -> None:
        reused = self._smtp is not None and self._smtp.is_connected
        if not reused:
            if self._smtp is not None:
                self._smtp.close()
            self._smtp = None
            self._smtp = await self._connect()
        smtp = self._smtp
        assert smtp is not None
        options: list[str] = []
        if utf8:
            if not smtp.supports_extension("smtputf8"):
                raise DeliveryFailed("the recipient address needs SMTPUTF8, which the server does not offer",
                                     permanent=True, code="bad-address")
            options.append("SMTPUTF8")
        encoding = "utf-8" if utf8 else "ascii"
        try:
            await smtp.mail(self.sender, options=options, encoding=encoding)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            if reused:
                self._smtp = None
                smtp.close()
                raise _Stale() from exc
            raise
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == 421 and reused:  # the server is closing this (idle) connection
                self._smtp = None
                smtp.close()
                raise _Stale() from exc
            await self._reset(smtp)
            raise
        try:
            await smtp.rcpt(to, encoding=encoding)
            await smtp.data(raw)
        except aiosmtplib.SMTPResponseException:
            await self._reset(smtp)
            raise

    async def _reset(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.rset(timeout=5)
        except Exception:
            self._smtp = None
            smtp.close()

    def _drop_if_broken(self, exc: BaseException | None) -> None:
        """Forget the connection unless the failure was a plain reply on a healthy one."""
        smtp = self._smtp
        if smtp is None:
            return
        if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code != 421 and smtp.is_connected:
            return
        self._smtp = None
        smtp.close()


def _failure(exc: BaseException) -> DeliveryFailed:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        detail = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
        code = max(codes) if codes else 550
        return DeliveryFailed(f"recipient refused: {detail}"[:500], permanent=code >= 500, code=f"smtp-{code}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        what = {aiosmtplib.SMTPRecipientRefused: "recipient refused",
                aiosmtplib.SMTPSenderRefused: "sender refused",
                aiosmtplib.SMTPDataError: "message refused",
                aiosmtplib.SMTPAuthenticationError: "authentication refused"}.get(type(exc), "server answered")
        return DeliveryFailed(f"{what}: {exc.code} {exc.message}"[:500], permanent=exc.code >= 500,
                              code=f"smtp-{exc.code}")
    if isinstance(exc, TimeoutError):
        return DeliveryFailed(f"SMTP timeout: {exc}", permanent=False, code="timeout")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPConnectError | OSError):
        return DeliveryFailed(f"SMTP connection failed: {exc}"[:500], permanent=False, code="connection")
    if isinstance(exc, aiosmtplib.SMTPException):
        # the server lacks what the settings ask for (STARTTLS, AUTH): a configuration fault, not the
        # message's — transient, so messages wait (until they expire) for the settings to be fixed
        return DeliveryFailed(f"SMTP server cannot do what the settings ask: {exc}"[:500], permanent=False,
                              code="smtp-config")
    return DeliveryFailed(f"SMTP send failed: {type(exc).__name__}: {exc}"[:500], permanent=False, code="error")


# --- tracking --------------------------------------------------------------------------------------------

PIXEL_PATH = "/channels/email/open/"
CLICK_PATH = "/channels/email/click/"
_ATTR = re.compile(r"""(\s*)([^\s/>"'=][^\s/>=]*)(\s*=\s*(?:'[^']*'|"[^"]*"|(?![\'"])[^\s>]*))?""")
_STRIP_URL = re.compile(r"[\t\n\r]")


def open_token(key: bytes, communication_id: str) -> str:
    return signing.sign(key, {"c": _bare(communication_id)})


def click_token(key: bytes, communication_id: str, url: str) -> str:
    return signing.sign(key, {"c": _bare(communication_id), "u": url})


class _Anchors(HTMLParser):
    """Finds every ``<a ...>`` start tag: (offset in the source, raw tag text, href value)."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[int, str, str]] = []
        self.body_close: int | None = None
        self._lines = [0]
        for i, ch in enumerate(source):
            if ch == "\n":
                self._lines.append(i + 1)
        self._source = source

    def _offset(self) -> int:
        line, col = self.getpos()
        return self._lines[line - 1] + col

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag != "a":
            return
        raw = self.get_starttag_text() or ""
        start = self._offset()
        if self._source[start:start + len(raw)] != raw:  # positions lost: leave this tag alone
            return
        href = next((v for k, v in attrs if k == "href"), None)
        if href is not None:
            self.found.append((start, raw, href))

    def handle_endtag(self, tag: str) -> None:
        if tag == "body":
            self.body_close = self._offset()


def _replace_href(raw: str, new_value: str) -> str:
    """``raw`` (an ``<a ...>`` start tag) with its first href attribute's value replaced."""
    m = re.match(r"<[a-zA-Z][^\s/>]*", raw)
    pos = m.end() if m else 0
    while True:
        a = _ATTR.match(raw, pos)
        if a is None or a.end() == pos:
            return raw
        if a.group(2).lower() == "href" and a.group(3):
            return f'{raw[:a.start(3)]}="{htmlmod.escape(new_value, quote=True)}"{raw[a.end(3):]}'
        pos = a.end()


def tracked_html(html: str, *, key: bytes, communication_id: str, callback_base: str) -> str:
    """``html`` with an open pixel before ``</body>`` (or at the end) and every ``http(s)`` link sent
    through the signed click redirect. Other links (mailto:, tel:, anchors, links already pointing at our
    callbacks) and everything else in the document are left exactly as they were."""
    base = callback_base.rstrip("/")
    parser = _Anchors(html)
    parser.feed(html)
    parser.close()
    out: list[str] = []
    pos = 0
    for start, raw, href in parser.found:
        url = _STRIP_URL.sub("", href).strip()
        if not re.match(r"https?://", url, re.IGNORECASE) or url.startswith(base + "/"):
            continue
        tracked = f"{base}{CLICK_PATH}{click_token(key, communication_id, url)}"
        out.append(html[pos:start])
        out.append(_replace_href(raw, tracked))
        pos = start + len(raw)
    pixel = (f'<img src="{base}{PIXEL_PATH}{open_token(key, communication_id)}.gif" width="1" height="1" '
             'alt="" style="display:block;border:0;width:1px;height:1px">')
    close = parser.body_close
    if close is not None and close >= pos:
        out.append(html[pos:close])
        out.append(pixel)
        out.append(html[close:])
    else:
        out.append(html[pos:])
        out.append(pixel)
    return "".join(out)
