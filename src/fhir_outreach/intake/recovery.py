"""Gap recovery and source-subscription health: the jobs that repair what delivery alone cannot.

``recover`` claims recorded gaps (missing event numbers, missed heartbeats) and re-reads them: first with
the Subscriptions ``$events`` operation when the source supports it (the result goes through the inbox
like any delivery, so de-duplication applies), otherwise with a ``_lastUpdated`` search from a little
before the last in-order event. ``check_health`` polls each hook's Subscription on its source: one in
``error`` or ``off`` is put back to ``requested`` (the source re-handshakes), and a hook whose heartbeat is
overdue gets a recovery scheduled. Every action is written as an ``audit`` record.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from ..fhir.client import SourceError, SourceUnavailable
from ..store.base import Record
from . import inbox
from .hooks import Hook
from .processor import AUDIT, RECOVERY, Processor

log = logging.getLogger("fhir_outreach.intake")
_NOT_SUPPORTED = (400, 404, 405, 422, 501)


def _instant(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def audit(processor: Processor, hook: Hook, action: str, detail: str, **extra: Any) -> None:
    await processor.store.add_record(Record(AUDIT, uuid.uuid4().hex, state=action, group=hook.source, data={
        "hook": hook.key, "action": action, "detail": detail, "at": time.time(), **extra}))


async def recover(processor: Processor, limit: int = 10) -> int:
    """Work through due recovery records; returns how many were claimed."""
    claimed = await processor.store.claim_records(RECOVERY, owner=processor.owner, now=time.time(),
                                                  lease_seconds=120, limit=limit)
    for rec in claimed:
        try:
            hook = await processor.hooks.get(rec.data["hook"])
            how = await _recover_one(processor, hook, rec)
        except (SourceUnavailable, SourceError) as exc:
            rec.attempts += 1
            rec.due = time.time() + processor.backoff.delay(rec.attempts)
            rec.lease_owner, rec.lease_until = None, 0.0
            rec.data = {**rec.data, "error": exc.diagnostics}
            await processor.store.save_record(rec)
            continue
        rec.state, rec.lease_owner, rec.lease_until = "done", None, 0.0
        rec.data = {**rec.data, "how": how, "done": time.time()}
        await processor.store.save_record(rec)
        await audit(processor, hook, "recovered", f"events {rec.data['first']}-{rec.data['last']} via {how}")
    return len(claimed)


async def _recover_one(processor: Processor, hook: Hook, rec: Record) -> str:
    client = processor.sources.get(hook.source)
    first, last = rec.data["first"], rec.data["last"]
    if hook.remote_id and hook.topic:
        try:
            bundle = await client.get_json(f"Subscription/{hook.remote_id}/$events",
                                           params={"eventsSinceNumber": str(first), "eventsUntilNumber": str(last)})
        except SourceError as exc:
            if exc.http_status not in _NOT_SUPPORTED:
                raise
        else:
            await inbox.accept(processor.store, hook=hook.key, source=hook.source, method="POST", path=[],
                               headers={"content-type": "application/fhir+json"}, body=orjson.dumps(bundle),
                               origin="recovery-$events")
            return "$events"
    since_epoch = rec.data.get("since") or (time.time() - 24 * 3600)
    found = await processor.search_changes(hook, since=_instant(since_epoch - 60))
    await processor.ingest_resources(hook, found, shape="recovery-search", origin=rec)
    return f"_lastUpdated search ({len(found)} resources)"


async def check_health(processor: Processor, *, now: float | None = None) -> int:
    """Poll every hook's source Subscription; repair error/off ones; catch missed heartbeats."""
    moment = time.time() if now is None else now
    actions = 0
    for hook in await processor.hooks.all():
        if hook.heartbeat_period and moment - hook.last_seen > 2 * hook.heartbeat_period:
            window = int(moment // (hook.heartbeat_period * 2))
            await processor.store.add_record(Record(RECOVERY, f"{hook.key}|heartbeat-{window}", group=hook.source,
                                                    due=moment, data={
                "hook": hook.key, "first": hook.last_event_number + 1, "last": hook.last_event_number + 1,
                "reason": f"no heartbeat for {moment - hook.last_seen:.0f}s", "since": hook.last_event_time}))
            await audit(processor, hook, "heartbeat-missed", f"last heard {moment - hook.last_seen:.0f}s ago")
            actions += 1
        if not hook.remote_id:
            continue
        try:
            actions += await _repair(processor, hook)
        except (SourceUnavailable, SourceError) as exc:
            await audit(processor, hook, "health-check-failed", exc.diagnostics)
    return actions


async def _repair(processor: Processor, hook: Hook) -> int:
    client = processor.sources.get(hook.source)
    sub = await client.read("Subscription", hook.remote_id or "")
    if sub is None:
        await audit(processor, hook, "subscription-missing", f"Subscription/{hook.remote_id} is gone on the source")
        return 1
    status = sub.get("status")
    await processor.hooks.update(hook.key, lambda h: setattr(h, "status", status))
    if status not in ("error", "off"):
        return 0
    fixed = {k: v for k, v in sub.items() if k not in ("error", "meta")}
    fixed["status"] = "requested"
    await client.update(fixed)
    await audit(processor, hook, "reactivated", f"Subscription/{hook.remote_id} was {status} "
                f"({sub.get('error', 'no reason given')}); set to requested")
    # Whatever happened while it was off must be read again.
    await processor.store.add_record(Record(RECOVERY, f"{hook.key}|reactivated-{int(time.time())}", group=hook.source,
                                            due=time.time(), data={
        "hook": hook.key, "first": hook.last_event_number + 1, "last": hook.last_event_number + 1,
        "reason": f"subscription was {status}", "since": hook.last_event_time}))
    return 1
