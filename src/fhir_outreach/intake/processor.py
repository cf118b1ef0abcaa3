"""The inbox processor: claimed inbox deliveries become normalised, de-duplicated, ordered events.

Runs in every ``serve`` (in-process) and ``worker`` process; inbox items are claimed under a lease, so
any number of processors may run. For each delivery it re-normalises the raw body (``normalize``), then per
draft: reads the resource back from the source when it was not included (that version, when known),
searches the source for empty pings (``_lastUpdated`` since the hook's checkpoint), drops duplicates by a
deterministic event key, refuses to roll a resource back (an older version than the last seen one is
stored as ``superseded`` and not acted on), attaches ``previous`` (the last seen version), applies the hook's
topic criteria where the source could not (classic criteria say "is finished", the topic "became
finished": the rest is stored ``filtered``), updates the
hook's liveness and detects gaps in event numbers (scheduling a recovery). Every step is idempotent, so a
crash anywhere is repaired by processing the same inbox item again after its lease expires. A source that
cannot be reached delays the item with backoff; nothing is dropped.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson

from ..fhir.client import SourceClients, SourceError, SourceUnavailable
from ..fhir.fhirpath import FhirPathError, evaluate_boolean
from ..store import Store
from ..store.base import Record
from .hooks import Hook, HookRegistry
from .inbox import INBOX
from .normalize import Draft, MalformedNotification, normalize, parse_reference
from .topics import Topic, load_topics

log = logging.getLogger("fhir_outreach.intake")

EVENT = "event"
LASTSEEN = "lastseen"
RECOVERY = "recovery"
AUDIT = "audit"
MAX_BACKOFF = 600.0


@dataclass
class Backoff:
    base: float = 2.0
    cap: float = MAX_BACKOFF

    def delay(self, attempts: int) -> float:
        return float(min(self.cap, self.base * 2 ** max(0, attempts - 1)))


def event_key(source: str, hook: str, d: Draft, last_version: str | None) -> str:
    """The deterministic identity of a change: duplicates of one change share it."""
    if d.version is not None:
        return f"{source}|{d.focus}|v{d.version}|{'deleted' if d.interaction == 'delete' else 'live'}"
    if d.source_event_id:
        return f"{source}|eventgrid|{d.source_event_id}"
    if d.event_number is not None and d.subscription:
        return f"{source}|{d.subscription}|n{d.event_number}"
    if d.interaction == "delete":
        return f"{source}|{d.focus}|deleted-after-v{last_version}"
    digest = hashlib.sha256(orjson.dumps(d.resource, option=orjson.OPT_SORT_KEYS)).hexdigest()[:24]
    return f"{source}|{d.focus}|h{digest}"


def _version_num(v: str | None) -> int | None:
    return int(v) if v is not None and v.isdigit() else None


def is_older(draft_version: str | None, draft_updated: str | None, seen: dict[str, Any]) -> bool:
    """Whether a change is older than what was last seen (so acting on it would roll the resource back)."""
    a, b = _version_num(draft_version), _version_num(seen.get("version"))
    if a is not None and b is not None:
        return a < b
    if draft_updated and seen.get("lastUpdated"):
        return str(draft_updated) < str(seen["lastUpdated"])
    return False


class Processor:
    def __init__(self, store: Store, hooks: HookRegistry, sources: SourceClients, *, owner: str,
                 lease_seconds: float = 60.0, backoff: Backoff | None = None) -> None:
        self.store = store
        self.hooks = hooks
        self.sources = sources
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.backoff = backoff or Backoff()
        self._topics: dict[str, Topic] | None = None

    async def run_once(self, limit: int = 50) -> int:
        """Process up to ``limit`` due inbox items; returns how many were claimed."""
        claimed = await self.store.claim_records(INBOX, owner=self.owner, now=time.time(),
                                                 lease_seconds=self.lease_seconds, limit=limit)
        for rec in claimed:
            await self.process(rec)
        return len(claimed)

    async def process(self, rec: Record) -> None:
        data = rec.data
        try:
            hook = await self.hooks.get(data["hook"])
            body = data.get("body") or ""
            parsed = orjson.loads(body) if body.strip() else None
            drafts = normalize(data["method"], list(data.get("path") or []), parsed, data.get("headers") or {})
            keys = []
            for draft in drafts:
                keys += await self._handle(hook, draft, rec)
        except SourceUnavailable as exc:
            await self._retry(rec, exc.diagnostics)
            return
        except (MalformedNotification, orjson.JSONDecodeError) as exc:  # accepted earlier, so a code change
            await self._finish(rec, "rejected", reason=str(exc))
            return
        except SourceError as exc:
            await self._retry(rec, exc.diagnostics)
            return
        except Exception as exc:  # never lose the item: log, back off, try again
            log.exception("inbox item %s failed", rec.key)
            await self._retry(rec, f"{type(exc).__name__}: {exc}")
            return
        await self._finish(rec, "done", events=keys)

    async def _finish(self, rec: Record, state: str, **extra: Any) -> None:
        rec.state = state
        rec.lease_owner, rec.lease_until = None, 0.0
        rec.data = {**rec.data, **extra, "processed": time.time()}
        if not await self.store.save_record(rec):
            log.warning("inbox item %s was re-claimed by another processor before it finished", rec.key)

    async def _retry(self, rec: Record, error: str) -> None:
        rec.attempts += 1
        rec.due = time.time() + self.backoff.delay(rec.attempts)
        rec.lease_owner, rec.lease_until = None, 0.0
        rec.data = {**rec.data, "error": error}
        log.warning("inbox item %s: %s (attempt %d, next in %.0fs)", rec.key, error, rec.attempts,
                    rec.due - time.time())
        await self.store.save_record(rec)

    # --- per draft ----------------------------------------------------------------------------------

    async def _handle(self, hook: Hook, d: Draft, rec: Record) -> list[str]:
        if d.kind in ("handshake", "heartbeat", "query-status"):
            await self._liveness(hook, d)
            return []
        if d.kind == "validation":
            return []
        if d.kind == "poll":
            return await self._poll(hook, d, rec)
        return [await self._event(hook, d, rec)]

    async def _liveness(self, hook: Hook, d: Draft) -> None:
        def change(h: Hook) -> None:
            h.last_seen = time.time()
            h.status = d.status or h.status
            if d.kind == "handshake" and h.last_event_number == 0 and d.events_since_start:
                h.last_event_number = d.events_since_start  # counting starts here
        updated = await self.hooks.update(hook.key, change)
        if d.kind != "handshake" and d.events_since_start and d.events_since_start > updated.last_event_number:
            await self.schedule_recovery(updated, updated.last_event_number + 1, d.events_since_start,
                                         reason=f"{d.kind} reports {d.events_since_start} events, "
                                                f"last received {updated.last_event_number}")

    async def _poll(self, hook: Hook, d: Draft, rec: Record) -> list[str]:
        """An empty ping (classic without payload, or a topic with ``empty`` content): search what changed."""
        keys = await self.ingest_resources(hook, await self.search_changes(hook), shape=d.shape, origin=rec)
        if d.event_number is not None:
            await self._numbering(hook, d)
        return keys

    async def search_changes(self, hook: Hook, since: str | None = None) -> list[dict[str, Any]]:
        """Resources of the hook's criteria (or type) changed since ``since`` (default: the hook's
        checkpoint); advances the checkpoint."""
        rtype, params = _criteria_params(hook)
        if rtype is None:
            log.warning("hook %s has no criteria or resource type to search; poll ignored", hook.key)
            return []
        since = since or hook.checkpoint
        query = list(params)
        if since:
            query.append(("_lastUpdated", f"ge{since}"))
        query += [("_sort", "_lastUpdated"), ("_count", "100")]
        found = await self.sources.get(hook.source).search(rtype, query)
        newest = max([str((r.get("meta") or {}).get("lastUpdated") or "") for r in found] + [since or ""])
        if newest and newest != since:
            def advance(h: Hook) -> None:
                h.checkpoint = max(h.checkpoint or "", newest)
            await self.hooks.update(hook.key, advance)
        return found

    async def ingest_resources(self, hook: Hook, resources: list[dict[str, Any]], *, shape: str,
                               origin: Record) -> list[str]:
        """Events for resources found by a search (poll or recovery): same dedup and ordering rules."""
        keys = []
        for res in resources:
            meta = res.get("meta") or {}
            version = str(meta["versionId"]) if meta.get("versionId") is not None else None
            draft = Draft("event", shape, "create" if version == "1" else "update",
                          f"{res['resourceType']}/{res['id']}", version, res, topic=hook.topic)
            keys.append(await self._event(hook, draft, origin))
        return keys

    async def _event(self, hook: Hook, d: Draft, rec: Record) -> str:
        assert d.focus is not None
        rtype, rid = d.focus.split("/", 1)
        if d.needs_fetch:
            fetched = await self.sources.get(hook.source).read(rtype, rid, d.version)
            if fetched is None and d.version is not None:  # that version may be gone: read the current one
                fetched = await self.sources.get(hook.source).read(rtype, rid)
            if fetched is None:
                d.interaction = "delete"
            else:
                d.resource = fetched
                d.version = d.version or (str(fetched.get("meta", {}).get("versionId"))
                                          if fetched.get("meta", {}).get("versionId") else None)
                d.interaction = d.interaction or ("create" if d.version == "1" else "update")
        d.subscription = _subscription_ref(d.subscription) or (
            f"Subscription/{hook.remote_id}" if hook.remote_id else None)
        seen_rec = await self.store.get_record(LASTSEEN, f"{hook.source}|{d.focus}")
        seen = seen_rec.data if seen_rec else {}
        key = event_key(hook.source, hook.key, d, seen.get("version"))
        updated = (d.resource or {}).get("meta", {}).get("lastUpdated")
        stale = bool(seen) and is_older(d.version, updated, seen)
        event = {
            "source": hook.source, "hook": hook.key, "subscription": d.subscription,
            "topic": d.topic or hook.topic, "shape": d.shape, "interaction": d.interaction, "focus": d.focus,
            "version": d.version, "event_number": d.event_number, "timestamp": d.timestamp,
            "resource": d.resource, "previous": None if stale else seen.get("resource"),
            "context": d.context, "inbox": rec.key, "received": rec.data.get("received"),
            "patient": _patient_of(d),
        }
        matched, why = (None, None) if stale else self._topic_verdict(hook, d, seen.get("resource"))
        event["topic_matched"], event["topic_note"] = matched, why
        state = "superseded" if stale else "filtered" if matched is False else "pending"
        await self.store.add_record(Record(EVENT, key, state=state, group=hook.source, data=event))
        if not stale:  # also after a duplicate: a crash may have come between the two writes
            await self._remember(hook, d, seen_rec)
        if d.event_number is not None:
            await self._numbering(hook, d)
        return key

    def _topic_verdict(self, hook: Hook, d: Draft, previous: dict[str, Any] | None) -> tuple[bool | None, str | None]:
        """Whether a change is what the hook's topic is about. A topic-based source has already decided
        (None); for classic criteria, Medplum and Event Grid we apply the topic's interactions and its
        FHIRPath on ``%current``/``%previous`` here (e.g. "became finished", not "is finished")."""
        if hook.mode == "topic" or not hook.trigger:
            return None, None
        if self._topics is None:
            self._topics = load_topics()
        topic = self._topics.get(hook.trigger)
        if topic is None:
            return None, None
        if d.interaction not in topic.interactions:
            return False, f"{d.interaction} is not an interaction of topic {topic.name}"
        if not topic.fhirpath or d.resource is None:
            return True, None
        try:
            ok = evaluate_boolean(topic.fhirpath, d.resource, {"current": d.resource, "previous": previous})
        except FhirPathError as exc:  # recorded on the event; the change is kept for journeys to judge
            return None, exc.diagnostics
        return bool(ok), None if ok else f"topic {topic.name} criteria not met"

    async def _remember(self, hook: Hook, d: Draft, seen_rec: Record | None) -> None:
        """Keep the newest version seen per resource (for %previous and for ordering)."""
        version = d.version
        if version is None and d.interaction == "delete" and seen_rec is not None:
            version = seen_rec.data.get("version")  # a delete without a version keeps the last one known
        data = {"version": version, "deleted": d.interaction == "delete",
                "lastUpdated": (d.resource or {}).get("meta", {}).get("lastUpdated"), "resource": d.resource}
        key = f"{hook.source}|{d.focus}"
        for _ in range(10):
            if seen_rec is None:
                if await self.store.add_record(Record(LASTSEEN, key, state="seen", group=hook.source, data=data)):
                    return
            else:
                if is_older(version, data["lastUpdated"], seen_rec.data):
                    return  # someone stored a newer one meanwhile
                seen_rec.data = data
                if await self.store.save_record(seen_rec):
                    return
            seen_rec = await self.store.get_record(LASTSEEN, key)

    async def _numbering(self, hook: Hook, d: Draft) -> None:
        number = d.event_number
        assert number is not None
        before = hook.last_event_number

        def change(h: Hook) -> None:
            h.last_seen = time.time()
            if number > h.last_event_number:
                h.last_event_number = number
                h.last_event_time = time.time()

        updated = await self.hooks.update(hook.key, change)
        hook.last_event_number = updated.last_event_number
        if before and number > before + 1:
            await self.schedule_recovery(updated, before + 1, number - 1,
                                         reason=f"event {number} arrived after {before}")

    async def schedule_recovery(self, hook: Hook, first: int, last: int, *, reason: str) -> None:
        """Record a gap; the recovery job re-reads it with $events or a _lastUpdated search. Idempotent."""
        key = f"{hook.key}|{first}-{last}"
        added = await self.store.add_record(Record(RECOVERY, key, group=hook.source, due=time.time() + 5.0, data={
            "hook": hook.key, "first": first, "last": last, "reason": reason,
            "since": hook.last_event_time or None}))
        if added:
            log.info("gap on hook %s (%s): events %d-%d scheduled for recovery", hook.key, reason, first, last)


def _subscription_ref(ref: str | None) -> str | None:
    """``Subscription/{id}`` for any form a source uses (absolute URL, relative, bare id)."""
    if not ref:
        return None
    try:
        _, rid, _ = parse_reference(ref if "/" in ref else f"Subscription/{ref}")
    except MalformedNotification:
        return ref
    return f"Subscription/{rid}"


def _criteria_params(hook: Hook) -> tuple[str | None, list[tuple[str, str]]]:
    if hook.criteria:
        rtype, _, query = hook.criteria.partition("?")
        params = [tuple(p.split("=", 1)) for p in query.split("&") if "=" in p]
        return rtype, params  # type: ignore[return-value]
    return hook.resource_type, []


def _patient_of(d: Draft) -> str | None:
    if d.focus and d.focus.startswith("Patient/"):
        return d.focus
    res = d.resource or {}
    for key in ("subject", "patient", "for", "beneficiary"):
        ref = res.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str) and "Patient/" in ref["reference"]:
            try:
                t, rid, _ = parse_reference(ref["reference"])
            except MalformedNotification:
                continue
            return f"{t}/{rid}"
    for ctx in d.context:
        if "Patient/" in ctx:
            t, rid, _ = parse_reference(ctx)
            return f"{t}/{rid}"
    return None
