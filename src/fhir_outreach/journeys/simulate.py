"""``journey simulate``: run one journey against recorded events under a virtual clock, in a throw-away
store, and print a deterministic transcript (same input, byte-identical output). Nothing is written
anywhere else.

Events are NDJSON, one object per line, in time order:
``{"at": "2026-01-05T09:00:00Z", "resource": {...}}`` — a resource written at that time (``"interaction"``
defaults to create for a new id, update otherwise). Patients, Conditions and other data the journey reads are
given the same way. Between events, timers fire at their due times; after the last event the clock runs on
until no run is waiting (or ``horizon`` has passed).
"""

from __future__ import annotations

import tempfile
from datetime import datetime
from typing import Any

import orjson

from ..errors import InvalidJourney
from ..store.base import CommitResult, Write, prepare
from ..store.sqlite import SqliteStore
from ..work.clock import ManualClock, fhir_instant, to_datetime
from . import catalog
from .catalog import Catalog
from .explain import render, why_of
from .feed import LocalFeed
from .runner import RUN, Engine

BASE = "http://simulation.invalid/fhir"


def _when(text: str, line: int) -> float:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise InvalidJourney([(f"events line {line}", f"'at' {text!r} is not an ISO dateTime")]) from exc


def parse_events(text: str) -> list[tuple[float, dict[str, Any]]]:
    events = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidJourney([(f"events line {n}", f"invalid JSON: {exc}")]) from exc
        res = item.get("resource") if isinstance(item, dict) else None
        if not isinstance(res, dict) or not res.get("resourceType") or not res.get("id") or "at" not in item:
            raise InvalidJourney([(f"events line {n}", "needs 'at' and a 'resource' with resourceType and id")])
        events.append((_when(item["at"], n), res))
    if [t for t, _ in events] != sorted(t for t, _ in events):
        raise InvalidJourney([("events", "lines must be in time order")])
    return events


async def _next_due(store: SqliteStore) -> float | None:
    dues = [r.due for state in ("pending", "waiting", "awaiting")
            for r in await store.list_records(RUN, state=state, limit=100_000)]
    return min(dues) if dues else None


async def simulate(plan: dict[str, Any], templates: list[dict[str, Any]], events_text: str, *,
                   horizon_days: float = 800.0) -> str:
    events = parse_events(events_text)
    plan = {**plan, "status": "active"}
    with tempfile.TemporaryDirectory(prefix="fhir-outreach-sim-") as tmp:
        store = SqliteStore(f"sqlite:///{tmp}/sim.db", base_url=BASE, synchronous="NORMAL")
        await store.open()
        try:
            start = events[0][0] if events else 1_767_225_600.0
            clock = ManualClock(start)
            await catalog.load(store, plan, templates, base_url=BASE)
            cat = Catalog(store, refresh_seconds=0.0)
            engine = Engine(store, clock=clock, catalog=cat, base_url=BASE, owner="simulation", lease_seconds=1.0)
            feed = LocalFeed(store, cat, engine.topics)
            log: list[str] = []

            async def run_timers(until: float) -> None:
                while True:
                    due = await _next_due(store)
                    if due is None or due > until:
                        return
                    clock.set(max(due, clock.now()))
                    await engine.drain()

            for at, res in events:
                await run_timers(at)
                clock.set(at)
                existing = await store.read(res["resourceType"], res["id"])
                write = prepare(Write(res["resourceType"], res["id"], res), BASE)
                [result] = await store.commit([write], now=to_datetime(at))
                log.append(f"{fhir_instant(at)}  {'update' if existing else 'create'} "
                           f"{res['resourceType']}/{res['id']}")
                await feed([(write, CommitResult(result.stored, result.created))])
                await engine.drain()
            await run_timers(clock.now() + horizon_days * 86400)
            runs = await store.list_records(RUN, limit=100_000)
            out = [f"simulation of {plan.get('url')}|{plan.get('version')}: {len(events)} events, {len(runs)} runs",
                   *log, ""]
            for rec in sorted(runs, key=lambda r: (float(r.data.get("started") or 0), r.key)):
                out.append(render(why_of(rec.key, rec.data)))
            return "\n".join(out)
        finally:
            await store.close()
