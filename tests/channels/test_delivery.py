"""The delivery pipeline with real parts (both stores, a Twilio-compatible SMS provider on a socket) on a
manual clock: quiet hours hold a message and release it on time, caps hold the next outreach message, a
transient provider error is retried and a permanent one blocks with its reason, a missing channel says so,
and a worker that dies after the provider accepted a message but before recording it does not cause a second
SMS when another worker takes the message over."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fhir_outreach.channels.base import Channel, Outbound, Sent
from fhir_outreach.channels.delivery import DELIVERY, Delivery
from fhir_outreach.channels.sms import TwilioChannel
from fhir_outreach.settings import Settings
from fhir_outreach.store import Store, Write
from fhir_outreach.store.base import Record, prepare
from fhir_outreach.work.clock import ManualClock
from tests.channels.sms_peer import SmsPeer

CHANNEL = "http://fhir-outreach.org/CodeSystem/channel"
CATEGORY = "http://fhir-outreach.org/CodeSystem/message-category"
NIGHT = 1_772_402_400.0  # 2026-03-01T22:00:00Z: inside the default quiet hours (21:00-08:00 UTC)
MORNING = 1_772_438_400.0  # 2026-03-02T08:00:00Z: when they end


@pytest.fixture
async def peer() -> AsyncIterator[SmsPeer]:
    async with SmsPeer() as p:
        yield p


def settings_for(make_settings: Any, peer: SmsPeer, **extra: Any) -> Settings:
    return make_settings(sms_provider="twilio", sms_api_url=peer.api_url, sms_account_sid=peer.account_sid,  # type: ignore[no-any-return]
                         sms_auth_token=peer.auth_token, sms_from="+15005550006", **extra)


async def message(store: Store, cid: str, *, category: str = "reminder", clock: ManualClock) -> None:
    await store.commit([prepare(Write("Patient", "p1", {
        "resourceType": "Patient", "id": "p1",
        "telecom": [{"system": "phone", "use": "mobile", "value": "(617) 555-0100"}]}), None)])
    comm = {"resourceType": "Communication", "id": cid, "status": "preparation",
            "subject": {"reference": "Patient/p1"}, "recipient": [{"reference": "Patient/p1"}],
            "medium": [{"coding": [{"system": CHANNEL, "code": "sms"}]}],
            "category": [{"coding": [{"system": CATEGORY, "code": category}]}],
            "payload": [{"contentString": f"message {cid}"}]}
    await store.commit([prepare(Write("Communication", cid, comm), None)])
    await store.add_record(Record(DELIVERY, f"Communication/{cid}", group="sms", due=clock.now(),
                                  data={"communication": f"Communication/{cid}", "medium": "sms",
                                        "created": clock.now()}), now=clock.now())


async def comm(store: Store, cid: str) -> dict[str, Any]:
    stored = await store.read("Communication", cid)
    assert stored is not None and stored.resource is not None
    return stored.resource


async def test_quiet_hours_hold_and_release(store: Store, make_settings: Any, peer: SmsPeer) -> None:
    clock = ManualClock(NIGHT)
    sms = TwilioChannel(peer.api_url, peer.account_sid, peer.auth_token, "+15005550006")
    d = Delivery(store, settings_for(make_settings, peer), {"sms": sms}, key=b"k" * 32, clock=clock)
    await message(store, "c1", clock=clock)
    assert await d.run_once() == 1
    assert peer.messages == [] and (await comm(store, "c1"))["status"] == "preparation"
    [held] = await store.list_records(DELIVERY)
    assert held.due == MORNING and "quiet hours" in str(held.data.get("held"))
    clock.set(MORNING - 1)
    assert await d.run_once() == 0
    clock.set(MORNING)
    assert await d.run_once() == 1
    [sent] = peer.messages
    assert sent.to == "+16175550100" and sent.body == "message c1"
    assert (await comm(store, "c1"))["status"] == "in-progress"
    await sms.aclose()


async def test_caps_hold_the_next_outreach_message(store: Store, make_settings: Any, peer: SmsPeer) -> None:
    clock = ManualClock(MORNING)
    sms = TwilioChannel(peer.api_url, peer.account_sid, peer.auth_token, "+15005550006")
    d = Delivery(store, settings_for(make_settings, peer, cap_per_day=1, quiet_hours="",
                                   consent_outreach="non-restrictive"), {"sms": sms},
                 key=b"k" * 32, clock=clock)
    await message(store, "o1", category="education", clock=clock)
    await d.run_once()
    clock.advance(60)
    await message(store, "o2", category="education", clock=clock)
    await d.run_once()
    assert len(peer.messages) == 1 and (await comm(store, "o2"))["status"] == "preparation"
    clock.advance(86400)
    await d.run_once()
    assert len(peer.messages) == 2 and (await comm(store, "o2"))["status"] == "in-progress"
    await sms.aclose()


async def test_transient_is_retried_permanent_blocks_missing_channel_says_so(
        store: Store, make_settings: Any, peer: SmsPeer) -> None:
    clock = ManualClock(MORNING)
    sms = TwilioChannel(peer.api_url, peer.account_sid, peer.auth_token, "+15005550006")
    d = Delivery(store, settings_for(make_settings, peer, quiet_hours=""), {"sms": sms}, key=b"k" * 32, clock=clock)
    peer.fail_next(503)
    await message(store, "t1", clock=clock)
    await d.run_once()
    [rec] = await store.list_records(DELIVERY)
    assert rec.state == "pending" and rec.attempts == 1 and rec.due > clock.now()
    clock.set(rec.due)
    await d.run_once()
    assert (await comm(store, "t1"))["status"] == "in-progress" and len(peer.messages) == 1

    peer.fail_next(400, code=21211, message="invalid To")
    await message(store, "t2", clock=clock)
    await d.run_once()
    blocked = await comm(store, "t2")
    assert blocked["status"] == "not-done" and blocked["statusReason"]["coding"][0]["code"] == "rejected"
    assert "21211" in blocked["statusReason"]["text"]

    none = Delivery(store, settings_for(make_settings, peer, quiet_hours=""), {}, key=b"k" * 32, clock=clock)
    await message(store, "t3", clock=clock)
    await none.run_once()
    assert (await comm(store, "t3"))["statusReason"]["coding"][0]["code"] == "channel-unavailable"
    await sms.aclose()


class DiesAfterSending:
    """The real SMS adapter, in a worker that stops dead right after the provider accepted the message
    (the test then cancels it, as a kill would end it: nothing after the send runs)."""

    name = "sms"

    def __init__(self, real: Channel) -> None:
        self.real = real
        self.sent = asyncio.Event()

    async def send(self, message: Outbound) -> Sent:
        await self.real.send(message)
        self.sent.set()
        await asyncio.Event().wait()  # never returns
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self.real.aclose()


async def test_a_worker_killed_after_sending_causes_no_second_sms(store: Store, make_settings: Any,
                                                                   peer: SmsPeer) -> None:
    clock = ManualClock(MORNING)
    settings = settings_for(make_settings, peer, quiet_hours="")
    dying = DiesAfterSending(TwilioChannel(peer.api_url, peer.account_sid, peer.auth_token, "+15005550006"))
    first = Delivery(store, settings, {"sms": dying}, key=b"k" * 32, clock=clock, owner="w1", lease_seconds=30)
    await message(store, "k1", clock=clock)
    worker = asyncio.create_task(first.run_once())
    await asyncio.wait_for(dying.sent.wait(), 10)
    worker.cancel()  # killed: no status update, the lease stays until it expires
    with contextlib.suppress(asyncio.CancelledError):
        await worker
    assert len(peer.messages) == 1 and (await comm(store, "k1"))["status"] == "preparation"
    sms = TwilioChannel(peer.api_url, peer.account_sid, peer.auth_token, "+15005550006")
    second = Delivery(store, settings, {"sms": sms}, key=b"k" * 32, clock=clock, owner="w2", lease_seconds=30)
    assert await second.run_once() == 0  # the dead worker's lease still holds
    clock.advance(31)
    assert await second.run_once() == 1
    assert len(peer.messages) == 1  # the provider recognised the idempotency key: one SMS
    done = await comm(store, "k1")
    assert done["status"] == "in-progress"
    provider_ids = [e["valueString"] for e in done["extension"] if e["url"].endswith("provider-message-id")]
    assert provider_ids == [peer.messages[0].sid]
    await sms.aclose()
