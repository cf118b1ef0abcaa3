"""Recording what happens to a message after it leaves: sent, delivered, opened, clicked, bounced, failed,
blocked, and replies. Each change updates the ``Communication`` (status, ``statusReason``, the engagement
extension, ``received``) with an optimistic-concurrency retry, and becomes an ``event`` record so waiting
journey runs see it (``await opened``, ``await replied``…). Repeated callbacks change nothing the second time.
"""

from __future__ import annotations

import uuid
from typing import Any

from ..errors import PreconditionFailed
from ..journeys.definition import EXT
from ..journeys.feed import emit
from ..store import Store, Write
from ..store.base import prepare
from ..work.clock import fhir_instant, to_datetime

ENGAGEMENT_URL = EXT + "engagement"
PROVIDER_ID_URL = EXT + "provider-message-id"
REASON_SYSTEM = "http://fhir-outreach.org/CodeSystem/delivery-reason"
SOURCE = "channel"
KINDS = ("sent", "delivered", "read", "opened", "clicked", "bounced", "failed")
REPLY_NAMESPACE = uuid.UUID("0b6c8f5e-2d7a-4f1e-9c3b-6a1d2e4f8a90")

# reason codes (REASON_SYSTEM) for messages that were not sent, or not delivered
REASONS = {
    "consent": "No consent covers this message (or a consent denies it)",
    "opted-out": "The patient opted out of this channel (STOP or unsubscribe)",
    "cap": "Frequency cap reached for this patient and channel",
    "expired": "Not sendable before the message expired (quiet hours, retries)",
    "no-address": "The recipient has no usable address for this channel",
    "channel-unavailable": "The channel is not configured",
    "rejected": "The provider refused the message permanently",
    "bounced": "The message bounced",
    "failed": "The provider reported a delivery failure",
}


def _apply(comm: dict[str, Any], kind: str, at: float, detail: str | None, provider_id: str | None) -> bool:
    """Change ``comm`` in place for one engagement; False when it already says so."""
    changed = False
    if provider_id and not any(e.get("url") == PROVIDER_ID_URL for e in comm.get("extension") or []):
        comm.setdefault("extension", []).append({"url": PROVIDER_ID_URL, "valueString": provider_id})
        changed = True
    if kind == "sent":
        if comm.get("status") == "preparation":
            comm["status"], comm["sent"] = "in-progress", fhir_instant(at)
            changed = True
        return changed
    if kind in ("bounced", "failed"):
        if comm.get("status") == "not-done":
            return changed
        comm["status"] = "not-done"
        comm["statusReason"] = {"coding": [{"system": REASON_SYSTEM, "code": kind}], "text": detail or REASONS[kind]}
        comm.setdefault("extension", []).append({"url": ENGAGEMENT_URL, "valueCode": kind})
        return True
    if kind in ("delivered", "read") and comm.get("status") in ("preparation", "in-progress"):
        comm["status"] = "completed"
        comm.setdefault("sent", fhir_instant(at))
        changed = True
    if kind == "read" and not comm.get("received"):
        comm["received"] = fhir_instant(at)
        changed = True
    codes = {e.get("valueCode") for e in comm.get("extension") or [] if e.get("url") == ENGAGEMENT_URL}
    if kind not in codes:
        comm.setdefault("extension", []).append({"url": ENGAGEMENT_URL, "valueCode": kind})
        changed = True
    if kind == "clicked" and "opened" not in codes:  # a click implies the message was opened
        comm["extension"].append({"url": ENGAGEMENT_URL, "valueCode": "opened"})
    return changed


async def record(store: Store, communication_id: str, kind: str, *, at: float, detail: str | None = None,
                 provider_id: str | None = None, base_url: str | None = None) -> bool:
    """Record one engagement on ``Communication/{id}``; True when it changed something."""
    if kind not in KINDS:
        raise ValueError(f"unknown engagement {kind!r}")
    for _ in range(5):
        stored = await store.read("Communication", communication_id)
        if stored is None or stored.resource is None or stored.deleted:
            return False
        comm = dict(stored.resource)
        comm["extension"] = [dict(e) for e in comm.get("extension") or []]
        if not _apply(comm, kind, at, detail, provider_id):
            return False
        try:
            [res] = await store.commit([prepare(Write("Communication", communication_id, comm,
                                                      expect=stored.version), base_url)], now=to_datetime(at))
        except PreconditionFailed:
            continue  # changed meanwhile (another callback): apply to the new version
        await emit(store, res.stored, created=False, source=SOURCE, previous=stored.resource)
        return True
    return False


async def block(store: Store, communication_id: str, reason: str, *, at: float, detail: str | None = None,
                base_url: str | None = None) -> bool:
    """A message that will not be sent: ``not-done`` with the reason (visible in ``journey why``)."""
    for _ in range(5):
        stored = await store.read("Communication", communication_id)
        if stored is None or stored.resource is None:
            return False
        comm = dict(stored.resource)
        if comm.get("status") == "not-done":
            return False
        comm["status"] = "not-done"
        comm["statusReason"] = {"coding": [{"system": REASON_SYSTEM, "code": reason}],
                                "text": detail or REASONS.get(reason, reason)}
        try:
            [res] = await store.commit([prepare(Write("Communication", communication_id, comm,
                                                      expect=stored.version), base_url)], now=to_datetime(at))
        except PreconditionFailed:
            continue
        await emit(store, res.stored, created=False, source=SOURCE, previous=stored.resource)
        return True
    return False


async def record_reply(store: Store, communication_id: str, text: str, *, at: float, key: str,
                       sender: dict[str, Any] | None = None, base_url: str | None = None) -> str | None:
    """A reply to ``Communication/{id}`` (an inbound SMS, a Teams action…) as a new Communication with
    ``inResponseTo``; ``key`` (the provider's message id) makes a repeated callback a no-op. Returns the
    reply's id, or None when the original is unknown."""
    stored = await store.read("Communication", communication_id)
    if stored is None or stored.resource is None:
        return None
    original = stored.resource
    rid = str(uuid.uuid5(REPLY_NAMESPACE, key))
    reply: dict[str, Any] = {
        "resourceType": "Communication", "id": rid, "status": "completed",
        "inResponseTo": [{"reference": f"Communication/{communication_id}"}],
        "subject": original.get("subject"), "received": fhir_instant(at), "sent": fhir_instant(at),
        "medium": original.get("medium"), "payload": [{"contentString": text}],
        "recipient": [{"display": "fhir-outreach"}],
    }
    if sender or original.get("recipient"):
        reply["sender"] = sender or (original.get("recipient") or [None])[0]
    reply = {k: v for k, v in reply.items() if v is not None}
    existing = await store.read("Communication", rid)
    if existing is not None:
        return rid
    from ..errors import Conflict
    from ..store.base import MUST_NOT_EXIST

    try:
        [res] = await store.commit([prepare(Write("Communication", rid, reply, expect=MUST_NOT_EXIST), base_url)],
                                   now=to_datetime(at))
    except Conflict:
        return rid
    await emit(store, res.stored, created=True, source=SOURCE)
    await record(store, communication_id, "read", at=at, base_url=base_url)  # a reply shows it was read
    return rid
