"""The journey catalog: OutreachJourney PlanDefinitions and their templates in the local store.

Loading checks a journey with every rule (``definition.parse_journey``) before anything is written; the FHIR
API applies the same check on PlanDefinition/ActivityDefinition writes. A canonical ``url|version`` is
immutable once stored with other content (runs stay on the version they started with; publish a new
version instead). ``Catalog`` caches parsed journeys per process and refreshes the active set every few
seconds, so any number of workers see a newly activated journey without a restart.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import BusinessRule, InvalidJourney
from ..fhir.search import parse_query
from ..intake.topics import load_topics
from ..store import Store, Write
from ..store.base import prepare
from .definition import Journey, is_journey, is_template, parse_journey, parse_template

CONTROL = "journey"  # record kind: pause / stop state per journey url


def _content(resource: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(resource))
    out.pop("meta", None)
    out.pop("id", None)
    out.pop("text", None)
    out.pop("status", None)  # activating or retiring a version is allowed; its content is not editable
    return out


async def find_canonical(store: Store, type_: str, url: str, version: str | None = None) -> list[dict[str, Any]]:
    """Resources of ``type_`` with this url (and version), newest first by version string."""
    pairs = [("url", url)] + ([("version", version)] if version else [])
    query = parse_query(type_, pairs, max_count=1000)
    query.count = 1000
    found = [r.resource for r in (await store.search(query)).resources if r.resource]
    return sorted(found, key=lambda r: str(r.get("version") or ""), reverse=True)


async def templates_for(store: Store, plan: Mapping[str, Any],
                        extra: Sequence[Mapping[str, Any]] = ()) -> dict[str, dict[str, Any]]:
    """The ActivityDefinitions a journey names, from ``extra`` first, then the store, keyed by the
    canonical as written in the journey (``url|version`` or ``url``)."""
    out: dict[str, dict[str, Any]] = {}
    wanted = list(dict.fromkeys(str(a["definitionCanonical"]) for a in plan.get("action") or []
                                if a.get("definitionCanonical")))  # in step order: exports are stable
    for canonical in wanted:
        url, _, version = canonical.partition("|")
        hit = next((dict(t) for t in extra if t.get("url") == url and (not version or t.get("version") == version)),
                   None)
        if hit is None:
            found = await find_canonical(store, "ActivityDefinition", url, version or None)
            hit = found[0] if found else None
        if hit is not None:
            out[canonical] = hit
    return out


_TOPICS: set[str] | None = None


def topic_names() -> set[str]:
    global _TOPICS
    if _TOPICS is None:
        _TOPICS = set(load_topics())
    return _TOPICS


async def check_journey(store: Store, plan: Mapping[str, Any],
                        extra_templates: Sequence[Mapping[str, Any]] = ()) -> Journey:
    return parse_journey(plan, await templates_for(store, plan, extra_templates), known_topics=topic_names())


async def check_write(store: Store, resource: Mapping[str, Any]) -> None:
    """The journey rules for a PlanDefinition / ActivityDefinition written through the FHIR API."""
    if is_journey(resource):
        await check_journey(store, resource)
    elif is_template(resource):
        parse_template(resource)


async def load(store: Store, plan: dict[str, Any], templates: Sequence[dict[str, Any]], *,
               base_url: str | None = None) -> tuple[Journey, list[str]]:
    """Check and store a journey with its templates (all-or-nothing). Returns the journey and what was
    written (``Type/id created|updated|unchanged``)."""
    journey = await check_journey(store, plan, templates)
    writes: list[Write] = []
    report: list[str] = []
    for res in [*templates, plan]:
        type_ = str(res["resourceType"])
        existing = await find_canonical(store, type_, str(res["url"]), str(res["version"]))
        if existing and _content(existing[0]) == _content(res):
            if existing[0].get("status") == res.get("status"):
                report.append(f"{type_}/{existing[0]['id']} unchanged")
                continue
            res = {**res, "id": existing[0]["id"]}
            writes.append(prepare(Write(type_, str(res["id"]), res), base_url))
            report.append(f"{type_}/{res['id']} status {existing[0].get('status')} -> {res.get('status')}")
            continue
        if existing:
            raise BusinessRule(f"{type_} {res['url']}|{res['version']} already exists with other content "
                               f"({type_}/{existing[0]['id']}); give the changed one a new version "
                               "(runs stay on the version they started with)")
        writes.append(prepare(Write(type_, str(res["id"]), res), base_url))
        report.append(f"{type_}/{res['id']} created")
    if plan.get("status") == "active":
        writes += await _retire_others(store, str(plan["url"]), str(plan["version"]), report, base_url)
    if writes:
        await store.commit(writes)
    return journey, report


async def _retire_others(store: Store, url: str, version: str, report: list[str],
                         base_url: str | None) -> list[Write]:
    """One active version per journey: activating a version retires the others. Their runs go on on the
    version they started with; new runs start on the active one."""
    out = []
    for other in await find_canonical(store, "PlanDefinition", url):
        if other.get("version") != version and other.get("status") == "active":
            out.append(prepare(Write("PlanDefinition", str(other["id"]), {**other, "status": "retired"}), base_url))
            report.append(f"PlanDefinition/{other['id']} ({url}|{other.get('version')}) retired")
    return out


async def set_status(store: Store, url: str, version: str | None, status: str) -> list[str]:
    """Set the PlanDefinition status (``active`` starts it, ``retired``/``draft`` stops new runs)."""
    found = await find_canonical(store, "PlanDefinition", url, version)
    if not found:
        raise InvalidJourney([("url", f"no journey {url}{'|' + version if version else ''}")])
    plan = found[0]
    report = [f"PlanDefinition/{plan['id']} {status}"]
    writes = [prepare(Write("PlanDefinition", str(plan["id"]), {**plan, "status": status}), None)]
    if status == "active":
        writes += await _retire_others(store, url, str(plan.get("version")), report, None)
    await store.commit(writes)
    return report


async def journeys(store: Store) -> list[dict[str, Any]]:
    query = parse_query("PlanDefinition", [], max_count=1000)
    query.count = 1000
    return [r.resource for r in (await store.search(query)).resources if r.resource and is_journey(r.resource)]


class Catalog:
    """Parsed journeys for one process: the active set (refreshed every ``refresh_seconds``) and any
    version a run needs, loaded on demand and kept (versions are immutable)."""

    def __init__(self, store: Store, *, refresh_seconds: float = 2.0) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self._active: list[Journey] = []
        self._loaded_at = -1e18
        self._by_canonical: dict[str, Journey] = {}
        self.errors: dict[str, str] = {}

    def invalidate(self) -> None:
        self._loaded_at = -1e18

    async def active(self) -> list[Journey]:
        if time.monotonic() - self._loaded_at < self.refresh_seconds:
            return self._active
        out = []
        for plan in await journeys(self.store):
            if plan.get("status") != "active":
                continue
            canonical = f"{plan.get('url')}|{plan.get('version')}"
            try:
                j = self._by_canonical.get(canonical) or await check_journey(self.store, plan)
            except InvalidJourney as exc:  # stored before a rule existed, or its template was removed
                self.errors[canonical] = exc.diagnostics
                continue
            self._by_canonical[canonical] = j
            out.append(j)
        self._active, self._loaded_at = out, time.monotonic()
        return out

    async def get(self, canonical: str) -> Journey:
        if canonical in self._by_canonical:
            return self._by_canonical[canonical]
        url, _, version = canonical.partition("|")
        found = await find_canonical(self.store, "PlanDefinition", url, version or None)
        if not found:
            raise InvalidJourney([("journey", f"{canonical} is not in the store")])
        j = await check_journey(self.store, found[0])
        self._by_canonical[canonical] = j
        return j


async def set_control(store: Store, url: str, state: str) -> str:
    """Pause (no new runs, runs held), resume, or stop (no new runs, every run of every version ends
    ``stopped``) a journey, by url. Returns the new state."""
    from ..store.base import Record

    if state not in ("running", "paused", "stopped"):
        raise InvalidJourney([("state", f"{state!r} is not running, paused or stopped")])
    versions = await find_canonical(store, "PlanDefinition", url)
    if not versions:
        raise InvalidJourney([("url", f"no journey {url}")])
    canonicals = [f"{p.get('url')}|{p.get('version')}" for p in versions]
    for _ in range(5):
        rec = await store.get_record(CONTROL, url)
        if rec is None:
            if await store.add_record(Record(CONTROL, url, state=state, data={"canonicals": canonicals})):
                return state
            continue
        release = state == "running" and rec.state == "paused"  # the engine puts the parked runs back
        rec.state, rec.data = state, {**rec.data, "canonicals": canonicals, "changed": time.time(),
                                      **({"release": True} if release else {})}
        if await store.save_record(rec):
            return state
    raise BusinessRule(f"journey {url} control kept changing; try again")


def resolve_url(name_or_url: str) -> str:
    from .definition import JOURNEY_URL_BASE

    return name_or_url if "://" in name_or_url else JOURNEY_URL_BASE + name_or_url
