"""The write-back outbox: what journey runs produce, created on the source server exactly once.

The last arrow of the data flow (actions → outbox → write-back). The journey engine stores the
RequestGroup, Communications, Tasks and Provenances of a run locally first; when write-back to a source is
configured (``writeback_source``) it also ``enqueue``s every version it wrote, one durable ``outbox`` record
per version with a deterministic key. ``Outbox.run_once`` (run by every worker) claims due items under a
lease and sends them. The first version of a resource is a conditional create (``If-None-Exist`` on its first
identifier; on its target for a Provenance; on our write-back tag where the source cannot search the
identifier), so a crash between the create and our bookkeeping finds the copy instead of making a second
one. The id the source assigned is kept in a ``remote`` record, and later versions are PUT to it. References
to resources we wrote are rewritten to the source's ids. An item that references something of ours not yet
on the source waits a few seconds without spending an attempt. An unreachable or overloaded source delays
an item with capped exponential backoff and never drops it. A source that refuses it (any other 4xx) leaves
it ``failed``, with the source's OperationOutcome kept for operators (``list_records``).

Records. ``outbox`` (key ``source|Type/id|vN``, group = source): ``pending`` → ``done`` | ``superseded`` (a
newer version was sent already) | ``failed``. ``remote`` (key ``source|Type/id``, group = source): made at
enqueue in state ``pending`` with ``remote`` None; ``done`` with ``{"remote": "Type/rid", "version": N}`` once
the source has the resource; ``failed`` while its creation was refused.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode

from ..errors import FhirError, StoreUnavailable
from ..fhir.client import FhirClient, SourceClients, SourceError, SourceUnavailable
from ..intake.processor import Backoff
from ..store import Store
from ..store.base import Record
from .clock import Clock, SystemClock

log = logging.getLogger("fhir_outreach.outbox")

OUTBOX = "outbox"
REMOTE = "remote"
# Carried by a resource when the source cannot search its identifier: the key of its conditional create.
WRITEBACK_TAG = "http://fhir-outreach.org/CodeSystem/writeback-key"
DEFER_SECONDS = 5.0
RETRY_STATUSES = frozenset({HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS})
_REFERENCE = re.compile(r"([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(/_history/[^/]+)?")
_SERVER_META = ("versionId", "lastUpdated", "source")


class Undeliverable(FhirError):
    """A resource we cannot write back as it stands: a permanent failure decided here, not by the source."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "processing"


def retryable(exc: BaseException) -> bool:
    """The one retry policy of write-back: True to try again later with backoff, False to fail for good.

    The source unreachable, 5xx, 429 and 408 are transient; so is a source name missing from the
    configuration (an operator fixes it and nothing was lost) and any fault of our own. Any other 4xx
    means the source refuses this request, and sending it again will not change that."""
    if isinstance(exc, SourceUnavailable):
        return True
    if isinstance(exc, SourceError):
        status = exc.http_status
        return status == 0 or status in RETRY_STATUSES or status >= HTTPStatus.INTERNAL_SERVER_ERROR
    return not isinstance(exc, Undeliverable)


def outbox_key(source: str, local: str, version: int) -> str:
    return f"{source}|{local}|v{version}"


def remote_key(source: str, local: str) -> str:
    return f"{source}|{local}"


def _identity(resource: dict[str, Any]) -> tuple[str, int]:
    """``Type/id`` and the local version of a stored resource."""
    type_, id_ = resource.get("resourceType"), resource.get("id")
    version = str((resource.get("meta") or {}).get("versionId") or "")
    if not type_ or not id_ or not version.isdigit():
        raise ValueError(f"only stored resources can be written back (resourceType, id and a numeric "
                         f"meta.versionId are required); got {type_}/{id_} version {version or 'none'}")
    return f"{type_}/{id_}", int(version)


async def enqueue(store: Store, source: str, resources: Sequence[dict[str, Any]], *,
                  now: float | None = None) -> int:
    """Queue each resource version for write-back to ``source``; returns how many were new.

    One ``outbox`` record per version (a duplicate is a no-op). Items carry a sequence number, so that a
    run's items are sent in the order given. The ``remote`` record is made first: from then on references
    to the resource wait for its creation instead of going out unrewritten. Items are due at ``now``
    (default: the current time; pass the clock's time when the ``Outbox`` runs under another clock)."""
    now = time.time() if now is None else now
    base = time.time_ns()
    added = 0
    for i, resource in enumerate(resources):
        local, version = _identity(resource)
        key = outbox_key(source, local, version)
        await store.add_record(Record(REMOTE, remote_key(source, local), group=source, data={
            "local": local, "remote": None, "version": None, "partial": False, "creator": key}), now=now)
        item = Record(OUTBOX, key, group=source, due=now, data={
            "source": source, "local": local, "version": version, "seq": base + i, "resource": resource})
        if await store.add_record(item, now=now):
            added += 1
    return added


class Outbox:
    """Sends claimed outbox items to their source. Any number may run against one store."""

    def __init__(self, store: Store, sources: SourceClients, *, owner: str, lease_seconds: float = 60.0,
                 backoff: Backoff | None = None, defer_seconds: float = DEFER_SECONDS,
                 clock: Clock | None = None) -> None:
        self.store = store
        self.sources = sources
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.backoff = backoff or Backoff()
        self.defer_seconds = defer_seconds
        self.clock = clock or SystemClock()
        # Per source: resource type → the search parameters its CapabilityStatement declares (None: unknown).
        self._search_params: dict[str, dict[str, frozenset[str]] | None] = {}

    async def run_once(self, limit: int = 50) -> int:
        """Send up to ``limit`` due outbox items; returns how many were claimed."""
        claimed = await self.store.claim_records(OUTBOX, owner=self.owner, now=self.clock.now(),
                                                 lease_seconds=self.lease_seconds, limit=limit)
        for rec in sorted(claimed, key=lambda r: int(r.data.get("seq") or 0)):
            await self.send(rec)
        return len(claimed)

    async def send(self, rec: Record) -> None:
        try:
            await self._deliver(rec)
        except StoreUnavailable:
            raise  # nothing can be recorded; the lease runs out and the item is claimed again
        except Exception as exc:
            if retryable(exc):
                if not isinstance(exc, FhirError):
                    log.exception("outbox item %s failed", rec.key)
                await self._retry(rec, exc)
            else:
                await self._fail(rec, exc)

    # --- one item -----------------------------------------------------------------------------------

    async def _deliver(self, rec: Record) -> None:
        source, local, version = rec.group, rec.data["local"], int(rec.data["version"])
        remote = await self._remote(source, local, rec.key)
        mapped = remote.data.get("remote")
        if mapped:
            sent = int(remote.data.get("version") or 0)
            if version < sent:
                await self._finish(rec, "superseded", remote=mapped, note=f"version {sent} was sent already")
                return
            if version == sent and not remote.data.get("partial"):
                # Sent before a crash that lost only our bookkeeping.
                await self._finish(rec, "done", remote=mapped)
                return
        elif remote.state != "failed" and await self._other_creator(remote, rec.key):
            await self._defer(rec, f"waiting for {remote.data['creator']} to create {local}")
            return
        body, waiting = await self._rewrite(source, rec.data["resource"])
        client = self.sources.get(source)
        if mapped:
            await self._update(rec, remote, client, body, waiting)
        else:
            await self._create(rec, remote, client, body, waiting)

    async def _create(self, rec: Record, remote: Record, client: FhirClient, body: dict[str, Any],
                      waiting: set[str]) -> None:
        source, local, version = rec.group, rec.data["local"], int(rec.data["version"])
        stripped: set[str] = set()
        if body["resourceType"] == "RequestGroup":
            # A run lists what it produced, and those resources point back at the run: create the run without
            # the actions' references still waiting, then PUT it whole once they exist (below, on the next claim).
            body, stripped = _strip_action_resources(body, waiting)
            still = {_local_of(ref) for ref in _references(body)}
            waiting = {ref for ref in waiting if ref in still}
        if waiting:
            await self._defer(rec, f"waiting for {', '.join(sorted(waiting))} to be created on {source}")
            return
        condition, body, tagged = await self._condition(source, client, _outgoing(body), local)
        created = await client.create(body, if_none_exist=condition)
        if not created.get("id"):
            raise Undeliverable(f"{source} did not return the {body['resourceType']} it created, so its id is "
                                "unknown (does it answer Prefer: return=minimal?)")
        mapped = f"{body['resourceType']}/{created['id']}"

        def change(r: Record) -> None:
            r.state = "done"
            r.data = {**r.data, "remote": mapped, "version": max(version, int(r.data.get("version") or 0)),
                      "partial": bool(stripped), "tagged": tagged, "error": None}
        await self._save_remote(remote, change)
        if stripped:
            await self._defer(rec, f"created as {mapped} without {', '.join(sorted(stripped))}; "
                                   "sent whole once they exist")
        else:
            await self._finish(rec, "done", remote=mapped)
            log.info("outbox: %s v%d created on %s as %s", local, version, source, mapped)

    async def _update(self, rec: Record, remote: Record, client: FhirClient, body: dict[str, Any],
                      waiting: set[str]) -> None:
        source, version = rec.group, int(rec.data["version"])
        if waiting:
            await self._defer(rec, f"waiting for {', '.join(sorted(waiting))} to be created on {source}")
            return
        mapped = str(remote.data["remote"])
        body = _outgoing(body, id_=mapped.split("/", 1)[1])
        if remote.data.get("tagged"):
            body = _tag(body, rec.data["local"])
        await client.update(body)

        def change(r: Record) -> None:
            sent = int(r.data.get("version") or 0)
            partial = bool(r.data.get("partial")) and sent > version
            r.data = {**r.data, "version": max(version, sent), "partial": partial}
        await self._save_remote(remote, change)
        await self._finish(rec, "done", remote=mapped)
        log.info("outbox: %s v%d sent to %s as %s", rec.data["local"], version, source, mapped)

    async def _condition(self, source: str, client: FhirClient, body: dict[str, Any],
                         local: str) -> tuple[str, dict[str, Any], bool]:
        """The If-None-Exist query that finds this resource on the source if it is there already, the body
        to send (with our key tag when the query relies on it) and whether it carries that tag."""
        type_ = body["resourceType"]
        identifier = next((i for i in body.get("identifier") or [] if isinstance(i, dict) and i.get("value")),
                          None)
        if type_ != "Provenance" and identifier and await self._supports(source, client, type_, "identifier"):
            system = identifier.get("system")
            value = _escape(identifier["value"])
            token = f"{_escape(system)}|{value}" if system else value
            return urlencode({"identifier": token}), body, False
        can_tag = await self._supports(source, client, type_, "_tag")
        query: list[tuple[str, str]] = []
        if type_ == "Provenance":
            target = next((t.get("reference") for t in body.get("target") or [] if isinstance(t, dict)), None)
            if not target:
                raise Undeliverable("a Provenance without a target reference cannot be created exactly once")
            query.append(("target", target))
        elif not can_tag:
            raise Undeliverable(f"{source} can search {type_} neither by identifier nor by _tag, so it cannot be "
                                "created exactly once" + ("" if identifier else " (and it has no identifier)"))
        if can_tag:
            body = _tag(body, local)
            query.append(("_tag", f"{WRITEBACK_TAG}|{_escape(local)}"))
        return urlencode(query), body, can_tag

    async def _supports(self, source: str, client: FhirClient, type_: str, param: str) -> bool:
        """Whether the source declares ``param`` for ``type_`` (an unknown or unlisted capability: assumed)."""
        if source not in self._search_params:
            try:
                statement = await client.get_json("metadata")
            except SourceError as exc:
                log.warning("%s: no CapabilityStatement (%s); assuming standard search parameters",
                            source, exc.diagnostics)
                statement = None
            self._search_params[source] = _declared_search_params(statement)
        declared = self._search_params[source]
        if declared is None:
            return True
        if type_ not in declared:  # not listed at all: only the parameters common to all resources can work
            return param.startswith("_")
        return not declared[type_] or param in declared[type_]

    async def _rewrite(self, source: str, resource: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
        """The resource with references to what we wrote pointing at the source's ids, and the references
        to resources of ours not yet created there."""
        mapping: dict[str, str] = {}
        waiting: set[str] = set()
        own = _local_of(f"{resource['resourceType']}/{resource['id']}")
        for ref in set(_references(resource)):
            local = _local_of(ref)
            if local is None or local == own:
                continue
            rec = await self.store.get_record(REMOTE, remote_key(source, local))
            if rec is None:
                continue  # not ours (the patient, the trigger...): the source knows it by this id
            if rec.data.get("remote"):
                mapping[ref] = str(rec.data["remote"])  # a version of ours means nothing there: unversioned
            elif rec.state == "failed":
                raise Undeliverable(f"references {local}, whose write-back to {source} failed: "
                                    f"{(rec.data.get('error') or {}).get('diagnostics', 'see its outbox item')}")
            else:
                waiting.add(local)
        return _replace(resource, mapping), waiting

    # --- bookkeeping ----------------------------------------------------------------------------------

    async def _remote(self, source: str, local: str, creator: str) -> Record:
        key = remote_key(source, local)
        rec = await self.store.get_record(REMOTE, key)
        if rec is None:  # enqueued by hand or before a crash between the two writes of enqueue
            await self.store.add_record(Record(REMOTE, key, group=source, data={
                "local": local, "remote": None, "version": None, "partial": False, "creator": creator}))
            rec = await self.store.get_record(REMOTE, key)
            assert rec is not None
        return rec

    async def _other_creator(self, remote: Record, key: str) -> bool:
        """Whether another (earlier) outbox item is to create the resource: later versions wait for it."""
        creator = remote.data.get("creator")
        return bool(creator) and creator != key and await self.store.get_record(OUTBOX, str(creator)) is not None

    async def _save_remote(self, rec: Record, change: Callable[[Record], None]) -> None:
        for _ in range(10):
            change(rec)
            if await self.store.save_record(rec):
                return
            fresh = await self.store.get_record(REMOTE, rec.key)
            assert fresh is not None
            rec = fresh
        raise RuntimeError(f"remote record {rec.key}: too many concurrent changes")

    async def _finish(self, rec: Record, state: str, **extra: Any) -> None:
        rec.state = state
        rec.lease_owner, rec.lease_until = None, 0.0
        rec.data = {**{k: v for k, v in rec.data.items() if k != "waiting"}, **extra, "finished": self.clock.now()}
        if not await self.store.save_record(rec):
            log.warning("outbox item %s was re-claimed by another worker before it finished", rec.key)

    async def _defer(self, rec: Record, reason: str) -> None:
        """Not yet: try again in a few seconds, without counting an attempt."""
        rec.due = self.clock.now() + self.defer_seconds
        rec.lease_owner, rec.lease_until = None, 0.0
        rec.data = {**rec.data, "waiting": reason}
        await self.store.save_record(rec)

    async def _retry(self, rec: Record, exc: Exception) -> None:
        rec.attempts += 1
        rec.due = self.clock.now() + self.backoff.delay(rec.attempts)
        rec.lease_owner, rec.lease_until = None, 0.0
        rec.data = {**rec.data, "error": _problem(exc)}
        log.warning("outbox item %s: %s (attempt %d, next in %.0fs)", rec.key, rec.data["error"]["diagnostics"],
                    rec.attempts, rec.due - self.clock.now())
        await self.store.save_record(rec)

    async def _fail(self, rec: Record, exc: Exception) -> None:
        problem = _problem(exc)
        log.error("outbox item %s failed for good: %s", rec.key, problem["diagnostics"])
        await self._finish(rec, "failed", error=problem)
        remote = await self._remote(rec.group, rec.data["local"], rec.key)
        if not remote.data.get("remote"):  # never created: what references it must not wait for ever

            def change(r: Record) -> None:
                if not r.data.get("remote"):
                    r.state = "failed"
                    r.data = {**r.data, "error": problem}
            await self._save_remote(remote, change)


# --- pure helpers ------------------------------------------------------------------------------------


def _problem(exc: Exception) -> dict[str, Any]:
    """What an operator needs to see about a failure: diagnostics, the HTTP status and OperationOutcome."""
    if isinstance(exc, SourceError):
        said = _outcome_text(exc.outcome)
        return {"diagnostics": f"{exc.diagnostics}: {said}" if said else exc.diagnostics,
                "http_status": exc.http_status, "outcome": exc.outcome}
    if isinstance(exc, FhirError):
        return {"diagnostics": exc.diagnostics, "outcome": exc.to_outcome()}
    return {"diagnostics": f"{type(exc).__name__}: {exc}"}


def _outcome_text(outcome: Any) -> str:
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return ""
    return "; ".join(str(i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code"))
                     for i in outcome.get("issue") or [] if isinstance(i, dict))


def _declared_search_params(statement: Any) -> dict[str, frozenset[str]] | None:
    if not isinstance(statement, dict) or not statement.get("rest"):
        return None
    out: dict[str, frozenset[str]] = {}
    for rest in statement["rest"]:
        if rest.get("mode", "server") != "server":
            continue
        for res in rest.get("resource") or []:
            out[str(res.get("type"))] = frozenset(str(p.get("name")) for p in res.get("searchParam") or [])
    return out


def _local_of(reference: str) -> str | None:
    """``Type/id`` of a relative (optionally versioned) reference, else None."""
    m = _REFERENCE.fullmatch(reference)
    return f"{m.group(1)}/{m.group(2)}" if m else None


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def _replace(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: (mapping.get(v, v) if k == "reference" and isinstance(v, str) else _replace(v, mapping))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_replace(item, mapping) for item in node]
    return node


def _strip_action_resources(group: dict[str, Any], waiting: set[str]) -> tuple[dict[str, Any], set[str]]:
    """A RequestGroup without the ``action.resource`` references to resources in ``waiting``."""
    stripped: set[str] = set()

    def actions(items: list[Any]) -> list[Any]:
        out = []
        for action in items:
            if isinstance(action, dict):
                action = dict(action)
                local = _local_of(str((action.get("resource") or {}).get("reference") or ""))
                if local in waiting:
                    stripped.add(local)
                    del action["resource"]
                if isinstance(action.get("action"), list):
                    action["action"] = actions(action["action"])
            out.append(action)
        return out

    body = dict(group)
    if isinstance(body.get("action"), list):
        body["action"] = actions(body["action"])
    return body, stripped


def _outgoing(resource: dict[str, Any], *, id_: str | None = None) -> dict[str, Any]:
    """The body to send: the source's id (none for a create); meta without what the server assigns."""
    body = copy.deepcopy(resource)
    body.pop("id", None)
    if id_ is not None:
        body["id"] = id_
    meta = {k: v for k, v in (body.pop("meta", None) or {}).items() if k not in _SERVER_META}
    if meta:
        body["meta"] = meta
    return body


def _tag(body: dict[str, Any], local: str) -> dict[str, Any]:
    tag = {"system": WRITEBACK_TAG, "code": local}
    meta = dict(body.get("meta") or {})
    tags = [t for t in meta.get("tag") or [] if not (isinstance(t, dict) and t.get("system") == WRITEBACK_TAG)]
    meta["tag"] = [*tags, tag]
    return {**body, "meta": meta}


def _escape(value: str) -> str:
    """A token part escaped for FHIR search (``\\``, ``,``, ``$`` and ``|`` are special)."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("$", "\\$").replace("|", "\\|")
