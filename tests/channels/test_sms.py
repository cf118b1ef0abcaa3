"""SMS channel: E.164 numbers, the Twilio-compatible client and the JSON webhook client against a real local
provider (``sms_peer``), and the provider callbacks (status, inbound replies, STOP/START, signatures) against
the whole app on both stores."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.consent import Consent

from fhir_outreach.api import channel_sms
from fhir_outreach.channels import engagement, sms
from fhir_outreach.channels.base import DeliveryFailed, Outbound
from fhir_outreach.channels.optout import opt_out_consent
from fhir_outreach.fhir.validation import validate_resource
from fhir_outreach.intake.processor import EVENT
from fhir_outreach.settings import Settings
from fhir_outreach.store import Store
from tests.channels.sms_peer import SmsPeer, sign_twilio, sign_webhook
from tests.conftest import app_client

SENDER = "+15005550006"
PUBLIC = "http://testserver"


# --- numbers and signatures ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "region", "expected"), [
    ("(415) 555-0123", "US", "+14155550123"),
    ("415.555.2671", "US", "+14155552671"),
    ("+1 202 456 1111", "GB", "+12024561111"),  # a country code wins over the default region
    ("tel:+1-202-456-1111", "US", "+12024561111"),
    ("020 7946 0958", "GB", "+442079460958"),
    ("+44 (0)20 7946 0958", "US", "+442079460958"),
    ("00 44 20 7946 0958", "FR", "+442079460958"),  # international dialling prefix of the region
    ("06 12 34 56 78", "FR", "+33612345678"),
    ("0151 23456789", "de", "+4915123456789"),  # region in any case
    ("+61 2 9374 4000", "US", "+61293744000"),
])
def test_normalize_number(text: str, region: str, expected: str) -> None:
    assert sms.normalize_number(text, region) == expected


@pytest.mark.parametrize(("text", "region"), [
    ("", "US"), ("   ", "US"), ("abc", "US"), ("12345", "US"), ("+1 202 456 11111", "US"),
    ("(000) 000-0000", "US"), ("+999 1234567", "US"), ("0612345678", "US"), ("202-456-1111", "ZZ"),
])
def test_normalize_number_refuses(text: str, region: str) -> None:
    with pytest.raises(ValueError, match="phone number"):
        sms.normalize_number(text, region)


def test_twilio_signature_matches_twilios_documented_examples() -> None:
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675309", "Digits": "1234", "From": "+14158675309",
              "To": "+18005551212"}
    assert sms.twilio_signature("12345", url, params.items()) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    other = {**params, "Caller": "+12349013030", "From": "+12349013030"}
    assert sms.twilio_signature("12345", url, other.items()) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    pairs = list(params.items())
    assert sms.valid_twilio_signature("12345", url, pairs, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not sms.valid_twilio_signature("12346", url, pairs, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not sms.valid_twilio_signature("12345", url + "&x=1", pairs, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not sms.valid_twilio_signature("12345", url, [*pairs, ("Body", "")], "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not sms.valid_twilio_signature("12345", url, pairs, None)
    # signed with the default port spelled out, checked against the URL without it (and the other way round)
    with_port = "https://mycompany.com:443/myapp.php?foo=1&bar=2"
    assert sms.valid_twilio_signature("12345", url, pairs, sms.twilio_signature("12345", with_port, pairs))
    assert sms.valid_twilio_signature("12345", with_port, pairs, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")


def test_keywords() -> None:
    for word in ("STOP", " stop ", "StopAll", "unsubscribe", "CANCEL", "end", "Quit\n"):
        assert sms.keyword(word) == "stop", word
    for word in ("START", "unstop"):
        assert sms.keyword(word) == "start", word
    for word in ("yes", "stop please", "no", "", "STOPP"):
        assert sms.keyword(word) is None, word


# --- the Twilio-compatible client against the peer -------------------------------------------------------

@pytest.fixture
async def peer() -> AsyncIterator[SmsPeer]:
    async with SmsPeer() as p:
        yield p


def outbound(key: str | None = None, to: str = "+14155550123", text: str = "Your care team has a message for you",
             callback_base: str = PUBLIC) -> Outbound:
    key = key or uuid.uuid4().hex
    return Outbound(communication=f"Communication/{key}", channel="sms", to=to, text=text, idempotency_key=key,
                    callback_base=callback_base)


def twilio(peer: SmsPeer, sender: str = SENDER, token: str | None = None) -> sms.TwilioChannel:
    return sms.TwilioChannel(peer.api_url, peer.account_sid, token or peer.auth_token, sender)


async def test_twilio_send_speaks_the_messages_api(peer: SmsPeer) -> None:
    channel = twilio(peer)
    try:
        sent = await channel.send(outbound("comm-1", to="(415) 555-0123", text="Hello & welcome = 100%"))
    finally:
        await channel.aclose()
    assert sent.provider_id.startswith("SM") and not sent.delivered
    [request] = peer.requests
    assert request["path"] == f"/2010-04-01/Accounts/{peer.account_sid}/Messages.json"
    assert request["headers"]["content-type"].startswith("application/x-www-form-urlencoded")
    assert request["headers"]["i-twilio-idempotency-token"] == "comm-1"
    assert request["form"] == {"To": "+14155550123", "From": SENDER, "Body": "Hello & welcome = 100%",
                               "StatusCallback": f"{PUBLIC}/channels/sms/status"}
    [message] = peer.messages
    assert (message.sid, message.to, message.body) == (sent.provider_id, "+14155550123", "Hello & welcome = 100%")


async def test_twilio_messaging_service_sender(peer: SmsPeer) -> None:
    service = "MG" + "a" * 32
    channel = twilio(peer, sender=service)
    try:
        await channel.send(outbound(callback_base=""))
    finally:
        await channel.aclose()
    form = peer.requests[-1]["form"]
    assert form["MessagingServiceSid"] == service
    assert "From" not in form and "StatusCallback" not in form
    assert peer.messages[0].service == service


async def test_twilio_idempotency_key_means_one_message(peer: SmsPeer) -> None:
    channel = twilio(peer)
    try:
        first = await channel.send(outbound("comm-1"))
        again = await channel.send(outbound("comm-1"))  # e.g. a retry after a crash before the status update
        other = await channel.send(outbound("comm-2"))
    finally:
        await channel.aclose()
    assert again.provider_id == first.provider_id
    assert other.provider_id != first.provider_id
    assert [m.sid for m in peer.messages] == [first.provider_id, other.provider_id]
    assert len(peer.requests) == 3


async def test_twilio_bad_credentials_are_permanent(peer: SmsPeer) -> None:
    channel = twilio(peer, token="wrong-token-000000")
    try:
        with pytest.raises(DeliveryFailed) as info:
            await channel.send(outbound())
    finally:
        await channel.aclose()
    assert info.value.permanent and info.value.code == "twilio-20003"
    assert not peer.messages


@pytest.mark.parametrize(("status", "code", "retry_after", "expected_after"), [
    (429, 20429, "7", 7.0), (500, None, None, None), (503, None, "2.5", 2.5), (502, 20500, None, None),
])
async def test_twilio_transient_failures(peer: SmsPeer, status: int, code: int | None, retry_after: str | None,
                                         expected_after: float | None) -> None:
    peer.fail_next(status, code=code, retry_after=retry_after)
    channel = twilio(peer)
    try:
        with pytest.raises(DeliveryFailed) as info:
            await channel.send(outbound("comm-1"))
        assert not info.value.permanent
        assert info.value.retry_after == expected_after
        assert str(status) in info.value.reason
        assert not peer.messages
        sent = await channel.send(outbound("comm-1"))  # the retry goes through
    finally:
        await channel.aclose()
    assert [m.sid for m in peer.messages] == [sent.provider_id]


@pytest.mark.parametrize(("status", "code"), [(400, 21211), (400, 21610), (400, 21614), (503, 21610)])
async def test_twilio_permanent_error_codes(peer: SmsPeer, status: int, code: int) -> None:
    peer.fail_next(status, code=code, message="refused", retry_after="5")
    channel = twilio(peer)
    try:
        with pytest.raises(DeliveryFailed) as info:
            await channel.send(outbound())
    finally:
        await channel.aclose()
    assert info.value.permanent, "a Twilio code no retry can fix is permanent whatever the HTTP status"
    assert info.value.code == f"twilio-{code}"
    assert info.value.retry_after is None
    assert f"Twilio error {code}" in info.value.reason


async def test_twilio_peer_rejects_a_bad_number_with_21211(peer: SmsPeer) -> None:
    """The provider's own 21211 (not a failure we injected): a syntactically E.164 but unroutable number
    never reaches it, as we refuse it first; a number it refuses comes back permanent."""
    channel = twilio(peer)
    try:
        with pytest.raises(DeliveryFailed) as info:
            await channel.send(outbound(to="12"))
        assert info.value.permanent and info.value.code == "no-address"
        assert not peer.requests, "an invalid number must not be sent to the provider"
        form = channel.form(outbound())
        form["To"] = "4155550123"  # not E.164: the peer answers 21211 like Twilio
        response = await channel.http.post(channel.url, data=form)
        failure = sms.twilio_failure(response.status_code, response.json(), response.text, None)
    finally:
        await channel.aclose()
    assert response.status_code == 400 and response.json()["code"] == 21211
    assert failure.permanent and failure.code == "twilio-21211"


async def test_twilio_unreachable_provider_is_transient() -> None:
    async with SmsPeer() as gone:
        url, sid, token = gone.api_url, gone.account_sid, gone.auth_token
    channel = sms.TwilioChannel(url, sid, token, SENDER, timeout=2)
    try:
        with pytest.raises(DeliveryFailed) as info:
            await channel.send(outbound())
    finally:
        await channel.aclose()
    assert not info.value.permanent and info.value.code == "network"


def test_sms_channel_from_settings(make_settings: Any) -> None:
    assert sms.sms_channel(make_settings()) is None
    with pytest.raises(ValueError, match="sms_auth_token"):
        sms.sms_channel(make_settings(sms_provider="twilio", sms_account_sid="AC1", sms_from=SENDER))
    with pytest.raises(ValueError, match="sms_webhook_secret"):
        sms.sms_channel(make_settings(sms_provider="webhook", sms_api_url="http://127.0.0.1:9/x"))


# --- the generic JSON webhook provider ---------------------------------------------------------------------

async def test_webhook_send_is_signed_and_idempotent(peer: SmsPeer) -> None:
    channel = sms.WebhookSmsChannel(peer.webhook_url, peer.webhook_secret, SENDER)
    try:
        sent = await channel.send(outbound("comm-9", to="+1 415 555 0123", text="Reply YES to confirm"))
        again = await channel.send(outbound("comm-9", to="+1 415 555 0123", text="Reply YES to confirm"))
    finally:
        await channel.aclose()
    assert sent.provider_id.startswith("wh-") and again.provider_id == sent.provider_id
    [message] = peer.webhook_messages
    assert {k: message[k] for k in ("id", "to", "from", "text", "status_callback")} == {
        "id": "comm-9", "to": "+14155550123", "from": SENDER, "text": "Reply YES to confirm",
        "status_callback": f"{PUBLIC}/channels/sms/events"}
    request = peer.requests[0]
    assert request["headers"]["x-outreach-signature"] == sign_webhook(peer.webhook_secret, request["body"])


async def test_webhook_wrong_secret_and_failures(peer: SmsPeer) -> None:
    wrong = sms.WebhookSmsChannel(peer.webhook_url, "not-the-secret", SENDER)
    right = sms.WebhookSmsChannel(peer.webhook_url, peer.webhook_secret, SENDER)
    try:
        with pytest.raises(DeliveryFailed) as refused:
            await wrong.send(outbound())
        peer.fail_next(503, retry_after="3")
        with pytest.raises(DeliveryFailed) as busy:
            await right.send(outbound())
    finally:
        await wrong.aclose()
        await right.aclose()
    assert refused.value.permanent and refused.value.code == "http-401"
    assert not busy.value.permanent and busy.value.retry_after == 3.0
    assert not peer.webhook_messages


# --- sent-message records on both stores ------------------------------------------------------------------

async def test_remember_sent_and_last_sent_to(store: Store) -> None:
    assert await sms.remember_sent(store, "SM1", "Communication/c1", "+14155550123", "Patient/p1", at=1000.0)
    assert not await sms.remember_sent(store, "SM1", "c1", "+14155550123", "Patient/p1", at=1001.0)
    await sms.remember_sent(store, "SM2", "c2", "+14155550123", None, at=2000.0)
    await sms.remember_sent(store, "SM3", "c3", "+14155550999", "Patient/p3", at=3000.0)
    rec = await sms.sent_by_provider_id(store, "SM1")
    assert rec is not None and rec.group == "+14155550123"
    assert rec.data == {"communication": "c1", "patient": "Patient/p1", "at": 1000.0}
    last = await sms.last_sent_to(store, "+14155550123")
    assert last is not None and last.key == "SM2"
    assert await sms.last_sent_to(store, "+14155550000") is None


# --- callbacks against the app ----------------------------------------------------------------------------

@dataclass
class Harness:
    client: httpx.AsyncClient
    app: Any
    settings: Settings
    peer: SmsPeer

    @property
    def store(self) -> Store:
        store: Store = self.app.state.store
        return store

    async def comm(self, cid: str) -> dict[str, Any]:
        stored = await self.store.read("Communication", cid)
        assert stored is not None and stored.resource is not None
        return dict(stored.resource)

    async def events_for(self, focus: str) -> list[dict[str, Any]]:
        return [r.data for r in await self.store.list_records(EVENT, limit=1000) if r.data.get("focus") == focus]

    async def replies_to(self, cid: str) -> list[dict[str, Any]]:
        r = await self.client.get("/fhir/Communication", params={"_count": "100"})
        assert r.status_code == 200, r.text
        return [e["resource"] for e in r.json().get("entry") or []
                if any(x.get("reference") == f"Communication/{cid}" for x in e["resource"].get("inResponseTo") or [])]

    async def snapshot(self) -> tuple[Any, ...]:
        """Everything a callback could change: Communications and Consents (with versions), event records."""
        out: list[list[Any]] = []
        for type_ in ("Communication", "Consent"):
            r = await self.client.get(f"/fhir/{type_}", params={"_count": "100"})
            out.append(sorted((e["resource"]["id"], e["resource"]["meta"]["versionId"])
                              for e in r.json().get("entry") or []))
        out.append(sorted(rec.key for rec in await self.store.list_records(EVENT, limit=1000)))
        return tuple(out)

    async def send(self, cid: str, patient: str = "p1", to: str = "+14155550123") -> str:
        """What the delivery pipeline does: the Communication, the send, 'sent' with the provider id, and
        ``remember_sent``."""
        r = await self.client.put(f"/fhir/Patient/{patient}", json={
            "resourceType": "Patient", "id": patient, "telecom": [{"system": "sms", "value": to}]})
        assert r.status_code in (200, 201), r.text
        r = await self.client.put(f"/fhir/Communication/{cid}", json={
            "resourceType": "Communication", "id": cid, "status": "preparation",
            "subject": {"reference": f"Patient/{patient}"}, "recipient": [{"reference": f"Patient/{patient}"}],
            "medium": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode",
                                    "code": "SMSWRIT"}]}],
            "payload": [{"contentString": "Reply YES to book a call"}]})
        assert r.status_code in (200, 201), r.text
        channel = sms.sms_channel(self.settings)
        assert isinstance(channel, sms.TwilioChannel)
        try:
            sent = await channel.send(Outbound(communication=f"Communication/{cid}", channel="sms", to=to,
                                               text="Reply YES to book a call", idempotency_key=cid,
                                               callback_base=self.settings.hooks_base))
        finally:
            await channel.aclose()
        assert await engagement.record(self.store, cid, "sent", at=time.time(), provider_id=sent.provider_id)
        await sms.remember_sent(self.store, sent.provider_id, cid, to, f"Patient/{patient}")
        return sent.provider_id


@pytest.fixture(params=["sqlite", "mongo"])
async def harness(request: pytest.FixtureRequest, make_settings: Any, peer: SmsPeer) -> AsyncIterator[Harness]:
    extra: dict[str, Any] = {}
    if request.param == "mongo":
        extra["store"] = f"{request.getfixturevalue('mongo_base_url')}/sms{uuid.uuid4().hex[:12]}"
    settings = make_settings(sms_provider="twilio", sms_api_url=peer.api_url, sms_account_sid=peer.account_sid,
                             sms_auth_token=peer.auth_token, sms_from=SENDER,
                             sms_webhook_secret=peer.webhook_secret, **extra)
    assert settings.hooks_base == PUBLIC
    ac = app_client(settings)
    if not any(str(getattr(r, "path", "")).startswith("/channels/sms") for r in ac.app.routes):
        ac.app.include_router(channel_sms.router)  # until app.py includes it
    async with ac as client:
        yield Harness(client, ac.app, settings, peer)


async def test_status_delivered_completes_the_communication(harness: Harness) -> None:
    sid = await harness.send("c1")
    comm = await harness.comm("c1")
    assert comm["status"] == "in-progress"
    r = await harness.peer.status_callback(harness.client, sid, "sent")
    assert r.status_code == 204, r.text
    assert (await harness.comm("c1"))["meta"]["versionId"] == comm["meta"]["versionId"]  # nothing new
    r = await harness.peer.status_callback(harness.client, sid, "delivered")
    assert r.status_code == 204, r.text
    comm = await harness.comm("c1")
    assert comm["status"] == "completed"
    assert {"url": engagement.ENGAGEMENT_URL, "valueCode": "delivered"} in comm["extension"]
    assert {"url": engagement.PROVIDER_ID_URL, "valueString": sid} in comm["extension"]
    events = await harness.events_for("Communication/c1")
    assert any(e["version"] == comm["meta"]["versionId"] and e["resource"]["status"] == "completed" for e in events)
    before = await harness.snapshot()
    r = await harness.peer.status_callback(harness.client, sid, "delivered")  # Twilio retries: no change
    assert r.status_code == 204
    assert await harness.snapshot() == before


async def test_status_undelivered_is_not_done_with_the_error_code(harness: Harness) -> None:
    sid = await harness.send("c1")
    r = await harness.peer.status_callback(harness.client, sid, "undelivered", error_code="30003")
    assert r.status_code == 204, r.text
    comm = await harness.comm("c1")
    assert comm["status"] == "not-done"
    assert comm["statusReason"]["coding"] == [{"system": engagement.REASON_SYSTEM, "code": "failed"}]
    assert "30003" in comm["statusReason"]["text"] and "undelivered" in comm["statusReason"]["text"]
    assert {"url": engagement.ENGAGEMENT_URL, "valueCode": "failed"} in comm["extension"]
    assert any(e["resource"]["status"] == "not-done" for e in await harness.events_for("Communication/c1"))


async def test_status_for_an_unknown_message_changes_nothing(harness: Harness) -> None:
    await harness.send("c1")
    before = await harness.snapshot()
    params = {"MessageSid": "SM" + "0" * 32, "MessageStatus": "delivered", "AccountSid": harness.peer.account_sid}
    r = await harness.peer.post_signed(harness.client, f"{PUBLIC}/channels/sms/status", params)
    assert r.status_code == 204
    assert await harness.snapshot() == before


async def test_inbound_reply_answers_the_last_message_to_that_number(harness: Harness) -> None:
    await harness.send("c1")
    await harness.send("c2")  # the newer message to the same number: the one a reply answers
    r = await harness.peer.inbound(harness.client, "+14155550123", "yes", sid="SM" + "1" * 32)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/xml")
    assert r.text.endswith("<Response/>")
    assert await harness.replies_to("c1") == []
    [reply] = await harness.replies_to("c2")
    assert reply["payload"] == [{"contentString": "yes"}]
    assert reply["status"] == "completed" and reply["subject"] == {"reference": "Patient/p1"}
    assert await harness.events_for(f"Communication/{reply['id']}"), "the reply must become a journey event"
    original = await harness.comm("c2")
    assert {"url": engagement.ENGAGEMENT_URL, "valueCode": "read"} in original["extension"]
    # Twilio retrying the same inbound message records nothing more
    before = await harness.snapshot()
    r = await harness.peer.inbound(harness.client, "+14155550123", "yes", sid="SM" + "1" * 32)
    assert r.status_code == 200
    assert await harness.snapshot() == before
    assert not [c for c in (await harness.client.get("/fhir/Consent")).json().get("entry") or []]


async def test_inbound_stop_records_an_sms_opt_out_and_start_lifts_it(harness: Harness) -> None:
    await harness.send("c1")
    r = await harness.peer.inbound(harness.client, "+14155550123", "  Stop ")
    assert r.status_code == 200 and r.text.endswith("<Response/>")
    consent_id = opt_out_consent("Patient/p1", "sms", 0, "x")["id"]
    r = await harness.client.get("/fhir/Consent", params={"patient": "Patient/p1"})
    assert r.status_code == 200, r.text
    [consent] = [e["resource"] for e in r.json()["entry"]]
    assert consent["id"] == consent_id and consent["status"] == "active"
    assert consent["provision"]["type"] == "deny"
    assert consent["provision"]["code"][0]["coding"][0]["code"] == "sms"
    assert "STOP" in consent["policyRule"]["text"]
    Consent.model_validate({k: v for k, v in consent.items() if k != "meta"})
    validate_resource(consent, "Consent")
    [reply] = await harness.replies_to("c1")  # the STOP is a reply too: journeys may branch on it
    assert reply["payload"] == [{"contentString": "  Stop "}]

    r = await harness.peer.inbound(harness.client, "+14155550123", "START")
    assert r.status_code == 200
    lifted = (await harness.client.get(f"/fhir/Consent/{consent_id}")).json()
    assert lifted["status"] == "inactive" and "end" in lifted["provision"]["period"]
    validate_resource(lifted, "Consent")

    r = await harness.peer.inbound(harness.client, "+14155550123", "unsubscribe")
    assert r.status_code == 200
    again = (await harness.client.get(f"/fhir/Consent/{consent_id}")).json()
    assert again["status"] == "active" and "end" not in again["provision"]["period"]
    assert len(await harness.replies_to("c1")) == 3


async def test_inbound_from_an_unknown_number_records_nothing(harness: Harness) -> None:
    await harness.send("c1")
    before = await harness.snapshot()
    for sender in ("+14155550999", "not a number"):
        r = await harness.peer.inbound(harness.client, sender, "STOP")
        assert r.status_code == 200 and r.text.endswith("<Response/>")
    assert await harness.snapshot() == before


@pytest.mark.parametrize("path", ["status", "inbound"])
async def test_bad_twilio_signature_is_401_and_changes_nothing(harness: Harness, path: str) -> None:
    sid = await harness.send("c1")
    before = await harness.snapshot()
    peer = harness.peer
    if path == "status":
        params = {"MessageSid": sid, "MessageStatus": "delivered"}
    else:
        params = {"MessageSid": "SM" + "2" * 32, "From": "+14155550123", "To": SENDER, "Body": "STOP"}
    url = f"{PUBLIC}/channels/sms/{path}"
    attempts = [
        sign_twilio("not-the-auth-token", url, params),  # another key
        sign_twilio(peer.auth_token, f"http://127.0.0.1:8080/channels/sms/{path}", params),  # another URL
        sign_twilio(peer.auth_token, url, {**params, "Body": "yes"}),  # another body
        "",
    ]
    for signature in attempts:
        r = await peer.post_signed(harness.client, url, params, signature=signature)
        assert r.status_code == 401, r.text
        assert r.json()["resourceType"] == "OperationOutcome"
        assert r.json()["issue"][0]["code"] == "login"
    r = await harness.client.post(url, data=params)  # no header at all
    assert r.status_code == 401
    assert await harness.snapshot() == before
    assert (await harness.comm("c1"))["status"] == "in-progress"


async def test_malformed_twilio_callbacks_are_400(harness: Harness) -> None:
    sid = await harness.send("c1")
    before = await harness.snapshot()
    for path, params in [("status", {"MessageSid": sid}), ("status", {"MessageStatus": "delivered"}),
                         ("inbound", {"MessageSid": "SM" + "3" * 32, "Body": "yes"}),
                         ("inbound", {"From": "+14155550123", "Body": "yes"})]:
        r = await harness.peer.post_signed(harness.client, f"{PUBLIC}/channels/sms/{path}", params)
        assert r.status_code == 400, (path, params, r.text)
        assert r.json()["resourceType"] == "OperationOutcome"
    assert await harness.snapshot() == before


async def test_webhook_provider_events(harness: Harness) -> None:
    sid = await harness.send("c1")
    peer = harness.peer
    r = await peer.webhook_event(harness.client, {"type": "status", "id": sid, "status": "delivered"})
    assert r.status_code == 200, r.text
    assert r.json() == {"result": "recorded"}
    assert (await harness.comm("c1"))["status"] == "completed"
    r = await peer.webhook_event(harness.client, {"type": "inbound", "id": "in-1", "from": "(415) 555-0123",
                                                  "text": "NO"})
    assert r.status_code == 200 and r.json() == {"result": "recorded"}
    [reply] = await harness.replies_to("c1")
    assert reply["payload"] == [{"contentString": "NO"}]
    r = await peer.webhook_event(harness.client, {"type": "inbound", "id": "in-2", "from": "+14155550999",
                                                  "text": "hi"})
    assert r.status_code == 200 and r.json() == {"result": "unchanged"}


async def test_webhook_provider_bad_signature_and_malformed(harness: Harness) -> None:
    sid = await harness.send("c1")
    peer = harness.peer
    before = await harness.snapshot()
    event = {"type": "status", "id": sid, "status": "failed", "error": "carrier rejected"}
    for signature in ("", "sha256=" + "0" * 64, sign_webhook("other-secret", b"{}"),
                      sign_webhook(peer.webhook_secret, b'{"type":"status"}')):
        r = await peer.webhook_event(harness.client, event, signature=signature)
        assert r.status_code == 401, r.text
        assert r.json()["resourceType"] == "OperationOutcome"
    for body in (b"not json", b"[1, 2]", b'{"type": "status", "id": "x"}', b'{"type": "other", "id": "x"}',
                 b'{"type": "inbound", "id": "x", "from": "+14155550123", "text": 5}'):
        r = await peer.webhook_event(harness.client, body)
        assert r.status_code == 400, (body, r.text)
    assert await harness.snapshot() == before
    r = await peer.webhook_event(harness.client, event)
    assert r.status_code == 200 and r.json() == {"result": "recorded"}
    comm = await harness.comm("c1")
    assert comm["status"] == "not-done" and "carrier rejected" in comm["statusReason"]["text"]


async def test_callbacks_refused_when_no_secret_is_configured(make_settings: Any) -> None:
    ac = app_client(make_settings())
    if not any(str(getattr(r, "path", "")).startswith("/channels/sms") for r in ac.app.routes):
        ac.app.include_router(channel_sms.router)
    async with ac as client:
        params = {"MessageSid": "SM1", "MessageStatus": "delivered"}
        r = await client.post("/channels/sms/status", data=params,
                              headers={"X-Twilio-Signature": sign_twilio("", f"{PUBLIC}/channels/sms/status", params)})
        assert r.status_code == 401 and "SMS_AUTH_TOKEN" in r.json()["issue"][0]["diagnostics"]
        r = await client.post("/channels/sms/events", content=b"{}",
                              headers={"X-Outreach-Signature": sign_webhook("", b"{}")})
        assert r.status_code == 401 and "SMS_WEBHOOK_SECRET" in r.json()["issue"][0]["diagnostics"]
