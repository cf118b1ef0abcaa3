"""The local change feed: writes made through our own FHIR API that journeys care about become ``event``
records, exactly like notifications from a source server.

Two kinds of change qualify: a resource of a type some active journey triggers on (so the embedded store
alone can run journeys: POST an Encounter, a journey starts), and an engagement with our own outputs — a
portal marking a Communication read, a reply Communication (``inResponseTo``), a Task completed. Other
writes cost nothing extra. The event is added right after the commit; the run side is idempotent, so the
only window is a crash between the commit and this write (the client then sees no response and retries).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from ..intake.processor import EVENT
from ..intake.topics import Topic
from ..store import Store, Write
from ..store.base import CommitResult, Record, StoredResource
from .catalog import Catalog
from .definition import IDENTIFIER_SYSTEM
from .matcher import patient_of

SOURCE = "local"


def _engagement(resource: dict[str, Any]) -> bool:
    if resource.get("resourceType") == "Communication" and resource.get("inResponseTo"):
        return True
    return any(i.get("system") == IDENTIFIER_SYSTEM for i in resource.get("identifier") or []
               if isinstance(i, dict))


async def emit(store: Store, stored: StoredResource, *, created: bool, source: str = SOURCE,
               previous: dict[str, Any] | None = None) -> str:
    """Record a change of ours as an ``event`` (what journeys consume), with the version before it."""
    if previous is None and stored.version > 1:
        prior = await store.vread(stored.type, stored.id, stored.version - 1)
        previous = prior.resource if prior is not None else None
    focus = f"{stored.type}/{stored.id}"
    key = f"{source}|{focus}|v{stored.version}|live"
    await store.add_record(Record(EVENT, key, group=source, data={
        "source": source, "hook": None, "subscription": None, "topic": None, "shape": source,
        "interaction": "create" if created else "update", "focus": focus, "version": str(stored.version),
        "resource": stored.resource, "previous": previous, "patient": patient_of(stored.resource, focus),
        "received": time.time()}))
    return key


class LocalFeed:
    def __init__(self, store: Store, catalog: Catalog, topics: dict[str, Topic],
                 wake: Callable[[], None] | None = None) -> None:
        self.store = store
        self.catalog = catalog
        self.topics = topics
        self.wake = wake

    async def watched_types(self) -> set[str]:
        types: set[str] = set()
        for journey in await self.catalog.active():
            for t in journey.triggers:
                if t.kind == "data" and t.type:
                    types.add(t.type)
                elif t.kind == "topic" and t.topic in self.topics:
                    types.add(self.topics[t.topic].resource)
        return types

    async def __call__(self, pairs: Sequence[tuple[Write, CommitResult]]) -> None:
        added = False
        watched: set[str] | None = None
        for write, res in pairs:
            if write.type in ("PlanDefinition", "ActivityDefinition"):
                self.catalog.invalidate()
                continue
            stored = res.stored
            resource = stored.resource
            if res.existed or res.noop or resource is None:
                continue
            if not _engagement(resource):
                if watched is None:
                    watched = await self.watched_types()
                if write.type not in watched:
                    continue
            await emit(self.store, stored, created=res.created, source=SOURCE)
            added = True
        if added and self.wake is not None:
            self.wake()
