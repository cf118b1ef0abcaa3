"""The inbox: every delivery is written here, raw, before it is acknowledged.

An inbox record holds what the source sent (method, path below the hook, the headers that matter, the raw
body) and is claimed later by the processor. A delivery that cannot be read is kept too, in state
``rejected`` with the reason, as evidence of what a server sent. Keys are random: each delivery is its own
piece of evidence; de-duplication happens on the normalised events.
"""

from __future__ import annotations

import time
from typing import Any

from ..ids import new_id
from ..store import Store
from ..store.base import Record

INBOX = "inbox"
# Headers worth keeping as evidence (secrets such as Authorization are never stored).
KEPT_HEADERS = ("content-type", "user-agent", "x-medplum-subscription", "x-medplum-interaction",
                "x-medplum-deleted-resource", "aeg-event-type", "aeg-subscription-name", "aeg-delivery-count",
                "ce-id", "ce-type", "ce-source", "traceparent", "x-trace-id", "x-signature")


def kept_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k in KEPT_HEADERS}


async def accept(store: Store, *, hook: str, source: str, method: str, path: list[str], headers: dict[str, str],
                 body: bytes, origin: str = "delivery") -> Record:
    """Durably store a delivery for processing; returns the record (state ``pending``)."""
    rec = Record(INBOX, new_id(), state="pending", group=source, due=time.time(), data={
        "hook": hook, "method": method, "path": path, "headers": kept_headers(headers),
        "body": body.decode("utf-8", errors="replace"), "received": time.time(), "origin": origin})
    await store.add_record(rec)
    return rec


async def reject(store: Store, *, hook: str, source: str, method: str, path: list[str], headers: dict[str, str],
                 body: bytes, reason: str, where: str) -> Record:
    """Keep an unreadable delivery as evidence (state ``rejected``); it is never processed."""
    rec = Record(INBOX, new_id(), state="rejected", group=source, data={
        "hook": hook, "method": method, "path": path, "headers": kept_headers(headers),
        "body": body[:65536].decode("utf-8", errors="replace"), "truncated": len(body) > 65536,
        "received": time.time(), "reason": reason, "where": where})
    await store.add_record(rec)
    return rec


def summary(rec: Record) -> dict[str, Any]:
    data = rec.data
    return {"id": rec.key, "state": rec.state, "source": rec.group, "hook": data.get("hook"),
            "method": data.get("method"), "path": data.get("path"), "received": data.get("received"),
            "attempts": rec.attempts, "reason": data.get("reason") or data.get("error"),
            "events": data.get("events")}
