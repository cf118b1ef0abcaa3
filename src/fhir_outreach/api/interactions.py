"""FHIR REST interactions over a ``Store``, independent of HTTP framing.

Routes in ``api.fhir`` and batch/transaction entries in ``api.bundles`` both come here, so a create in a
transaction follows exactly the rules of a single create. Each write interaction is split into a *plan*
(validation, preconditions, business rules → a ``store.Write``) and the store commit, which lets a
transaction plan every entry first and commit them all-or-nothing.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from ..errors import BusinessRule, Gone, InvalidRequest, InvalidResource, NotFound, PreconditionFailed
from ..fhir.paths import compile_path, date_range, entries_for
from ..fhir.search import Query, parse_query
from ..fhir.searchparams import RESOURCE_TYPES, params_for
from ..fhir.validation import validate_resource
from ..ids import new_id
from ..journeys.catalog import check_write
from ..store.base import MUST_NOT_EXIST, CommitResult, Store, StoredResource, Write, format_instant

ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ETAG_RE = re.compile(r'^(?:W/)?"?(\d+)"?$')
# Canonical resources whose url|version must be unique among live resources (a business rule, 422).
CANONICAL_TYPES = ("PlanDefinition", "ActivityDefinition")


@dataclass
class Result:
    """What an interaction produced: HTTP status, the stored resource (if any) and response headers."""

    status: int
    stored: StoredResource | None = None
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def check_type(type_: str) -> str:
    if type_ not in RESOURCE_TYPES:
        raise NotFound(f"resource type {type_!r} is not supported by this server "
                       f"(see GET /fhir/metadata for the supported types)")
    return type_


def check_id(id_: str) -> str:
    if not ID_RE.match(id_):
        raise InvalidRequest(f"{id_!r} is not a valid FHIR id ([A-Za-z0-9-.]{{1,64}})", expression=["id"])
    return id_


def parse_etag(value: str | None, header: str = "If-Match") -> int | None:
    if value is None:
        return None
    m = _ETAG_RE.match(value.strip())
    if not m:
        raise InvalidRequest(f'{header} must be an ETag like W/"3", got {value!r}', expression=[header])
    return int(m.group(1))





def strip_base(url: str, base: str) -> str:
    return url[len(base) + 1 :] if url.startswith(base + "/") else url


CommitHook = Callable[[Sequence[tuple[Write, CommitResult]]], Awaitable[None]]
JOURNEY_TYPES = ("PlanDefinition", "ActivityDefinition")


class Interactions:
    def __init__(self, store: Store, *, base_url: str, default_count: int = 50, max_count: int = 1000,
                 on_commit: CommitHook | None = None) -> None:
        self.store = store
        self.base = base_url.rstrip("/")
        self.default_count = default_count
        self.max_count = max_count
        self.on_commit = on_commit  # the journey engine's local change feed

    async def committed(self, pairs: Sequence[tuple[Write, CommitResult]]) -> None:
        if self.on_commit is not None:
            await self.on_commit(pairs)

    # --- helpers --------------------------------------------------------------------------------

    def query(self, type_: str, pairs: Sequence[tuple[str, str]], strict: bool = False) -> Query:
        return parse_query(type_, pairs, strict=strict, base_url=self.base, default_count=self.default_count,
                           max_count=self.max_count)

    def condition(self, type_: str, text: str, header: str) -> Query:
        """A conditional-interaction query (If-None-Exist): unknown parameters are errors here."""
        pairs = parse_qsl(text.lstrip("?").split("?", 1)[-1], keep_blank_values=True)
        if not pairs:
            raise InvalidRequest(f"{header} must be a search query like identifier=sys|value", expression=[header])
        query = self.query(type_, pairs, strict=True)
        query.count = 2
        return query

    def headers_for(self, stored: StoredResource, *, location: bool = False) -> dict[str, str]:
        headers = {"ETag": stored.etag,
                   "Last-Modified": stored.last_updated.strftime("%a, %d %b %Y %H:%M:%S GMT")}
        if location:
            headers["Location"] = f"{self.base}/{stored.type}/{stored.id}/_history/{stored.version}"
        return headers

    async def _canonical_rule(self, type_: str, id_: str, resource: dict[str, Any]) -> None:
        if type_ not in CANONICAL_TYPES or not isinstance(resource.get("url"), str):
            return
        pairs = [("url", resource["url"])]
        version = resource.get("version")
        pairs.append(("version", version) if isinstance(version, str) else ("version:missing", "true"))
        q = self.query(type_, pairs)
        q.count = 5
        page = await self.store.search(q)
        clash = [r for r in page.resources if r.id != id_]
        if clash:
            label = f"{resource['url']}|{version}" if version else resource["url"]
            raise BusinessRule(f"{type_} {label} already exists as {type_}/{clash[0].id}; "
                               "give the new one another version", expression=[f"{type_}.version"])

    # --- planning (validation + preconditions → Write) -------------------------------------------

    async def plan_create(self, type_: str, resource: Any, *, if_none_exist: str | None = None,
                          root: str | None = None, planned: tuple[str, str | None] | None = None) -> Write:
        """A create. ``planned`` = (id, matched id or None) when a transaction already resolved the
        If-None-Exist condition; the store then re-checks it atomically (Conflict if it changed)."""
        check_type(type_)
        validate_resource(resource, type_, root=root)
        if type_ in JOURNEY_TYPES:
            await check_write(self.store, resource)
        query = self.condition(type_, if_none_exist, "If-None-Exist") if if_none_exist else None
        if planned is not None:
            rid, match = planned
        else:
            rid = new_id()
            found = (await self.ensure_unique_condition(type_, query)) if query is not None else None
            match = found.id if found is not None else None
        if match is None:
            await self._canonical_rule(type_, rid, resource)  # an existing match is returned, not re-created
        return Write(type_, rid, resource, expect=MUST_NOT_EXIST, if_none_exist=query,
                     condition_planned=planned is not None and query is not None, planned_match=match)

    async def plan_update(self, type_: str, id_: str, resource: Any, *, if_match: str | None = None,
                          root: str | None = None) -> Write:
        check_type(type_)
        check_id(id_)
        validate_resource(resource, type_, root=root)
        body_id = resource.get("id")
        if body_id is None:
            raise InvalidResource(f"an update must carry the resource id ({id_}) in the body",
                                  expression=[f"{root or type_}.id"])
        if body_id != id_:
            raise InvalidResource(f"the body's id {body_id!r} does not match the URL id {id_!r}",
                                  expression=[f"{root or type_}.id"])
        await self._canonical_rule(type_, id_, resource)
        if type_ in JOURNEY_TYPES:
            await check_write(self.store, resource)
        return Write(type_, id_, resource, expect=parse_etag(if_match))

    def plan_delete(self, type_: str, id_: str, *, if_match: str | None = None) -> Write:
        check_type(type_)
        check_id(id_)
        return Write(type_, id_, None, expect=parse_etag(if_match))

    # --- single interactions -----------------------------------------------------------------------

    def result_of(self, write: Write, res: CommitResult) -> Result:
        stored = res.stored
        if write.resource is None:
            return Result(204 if res.noop else 200, stored, headers={} if res.noop else {"ETag": stored.etag})
        if res.existed:
            return Result(200, stored, headers=self.headers_for(stored, location=True))
        return Result(201 if res.created else 200, stored, headers=self.headers_for(stored, location=res.created))

    async def commit_one(self, write: Write) -> Result:
        [res] = await self.store.commit([write])
        await self.committed([(write, res)])
        return self.result_of(write, res)

    async def read(self, type_: str, id_: str) -> StoredResource:
        check_type(type_)
        stored = await self.store.read(type_, check_id(id_))
        if stored is None:
            raise NotFound(f"{type_}/{id_} is not known")
        if stored.deleted:
            raise Gone(f"{type_}/{id_} was deleted (version {stored.version})")
        return stored

    async def vread(self, type_: str, id_: str, vid: str) -> StoredResource:
        check_type(type_)
        if not vid.isdigit():
            raise InvalidRequest(f"version id must be a number, got {vid!r}", expression=["versionId"])
        stored = await self.store.vread(type_, check_id(id_), int(vid))
        if stored is None:
            if await self.store.read(type_, id_) is None:
                raise NotFound(f"{type_}/{id_} is not known")
            raise NotFound(f"{type_}/{id_} has no version {vid}")
        if stored.deleted:
            raise Gone(f"{type_}/{id_} version {vid} is a deletion")
        return stored

    async def conditional_read_check(self, stored: StoredResource, if_none_match: str | None) -> bool:
        """True when the client's ``If-None-Match`` ETag is current (answer 304)."""
        return if_none_match is not None and parse_etag(if_none_match, "If-None-Match") == stored.version

    # --- search and history ----------------------------------------------------------------------

    async def search(self, type_: str, pairs: Sequence[tuple[str, str]], *, strict: bool) -> dict[str, Any]:
        check_type(type_)
        query = self.query(type_, pairs, strict=strict)
        page = await self.store.search(query)
        entries = [self.entry(r, mode="match") for r in page.resources]
        if not query.summary_count:
            entries += [self.entry(r, mode="include") for r in await self._includes(query, page.resources)]
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": page.total}
        bundle["link"] = self._links(f"{type_}", query, page.total)
        if query.ignored:
            entries.append({"resource": {"resourceType": "OperationOutcome", "issue": [
                {"severity": "warning", "code": "not-supported",
                 "diagnostics": f"ignored unknown search parameter '{name}' (Prefer: handling=lenient)"}
                for name in query.ignored]}, "search": {"mode": "outcome"}})
        if entries:
            bundle["entry"] = entries
        return bundle

    def _links(self, path: str, query: Query, total: int) -> list[dict[str, str]]:
        def url(offset: int) -> str:
            params = [*query.used, ("_count", str(query.count))]
            if offset:
                params.append(("_offset", str(offset)))
            return f"{self.base}/{path}?{urlencode(params)}"

        links = [{"relation": "self", "url": url(query.offset)}]
        if not query.summary_count and query.offset + query.count < total and query.count > 0:
            links.append({"relation": "next", "url": url(query.offset + query.count)})
        if query.offset > 0 and not query.summary_count:
            links.append({"relation": "previous", "url": url(max(0, query.offset - query.count))})
        return links

    async def _includes(self, query: Query, matches: list[StoredResource]) -> list[StoredResource]:
        if not matches or not (query.include or query.revinclude):
            return []
        seen = {(m.type, m.id) for m in matches}
        refs: list[tuple[str, str]] = []
        for inc in query.include:
            param = params_for(inc.source_type)[inc.param]
            walker = compile_path(param.expression)
            for m in matches:
                for e in entries_for(param, walker(m.resource or {}), self.base):
                    parts = (e.val or "").split("/")
                    if len(parts) == 2 and (inc.target_type is None or parts[0] == inc.target_type):
                        refs.append((parts[0], parts[1]))
        out = [r for r in await self.store.read_many(refs) if (r.type, r.id) not in seen]
        seen.update((r.type, r.id) for r in out)
        for rev in query.revinclude:
            targets = ",".join(f"{m.type}/{m.id}" for m in matches)
            q = self.query(rev.source_type, [(rev.param, targets)])
            q.count = self.max_count
            page = await self.store.search(q)
            for r in page.resources:
                if (r.type, r.id) not in seen:
                    seen.add((r.type, r.id))
                    out.append(r)
        return out

    def entry(self, stored: StoredResource, *, mode: str | None = None) -> dict[str, Any]:
        e: dict[str, Any] = {"fullUrl": f"{self.base}/{stored.type}/{stored.id}"}
        if stored.resource is not None:
            e["resource"] = stored.resource
        if mode:
            e["search"] = {"mode": mode}
        return e

    async def history(self, type_: str, id_: str | None, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
        check_type(type_)
        if id_ is not None:
            check_id(id_)
            if await self.store.read(type_, id_) is None:
                raise NotFound(f"{type_}/{id_} is not known")
        params = dict(pairs)
        unknown = set(params) - {"_count", "_since", "_offset", "_format"}
        if unknown:
            raise InvalidRequest(f"history does not support parameter(s) {', '.join(sorted(unknown))} "
                                 "(supported: _count, _since, _offset)", expression=sorted(unknown))
        q = self.query(type_, [(k, v) for k, v in pairs if k in ("_count", "_offset")])
        since: datetime | None = None
        if "_since" in params:
            try:
                since = datetime.fromtimestamp(date_range(params["_since"])[0], UTC)
            except ValueError as exc:
                raise InvalidRequest(f"_since: {exc}", expression=["_since"]) from exc
        page = await self.store.history(type_, id_, since=since, offset=q.offset, count=q.count)
        path = f"{type_}/{id_}/_history" if id_ else f"{type_}/_history"
        q.used = [(k, v) for k, v in pairs if k == "_since"]
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history", "total": page.total,
                                  "link": self._links(path, q, page.total)}
        entries = []
        for h in page.entries:
            e = self.entry(h)
            method = {"create": "POST", "update": "PUT", "delete": "DELETE"}[h.method]
            e["request"] = {"method": method, "url": h.type if method == "POST" else f"{h.type}/{h.id}"}
            e["response"] = {"status": {"create": "201 Created", "update": "200 OK", "delete": "204 No Content"}[
                h.method], "etag": h.etag, "lastModified": format_instant(h.last_updated)}
            entries.append(e)
        if entries:
            bundle["entry"] = entries
        return bundle

    async def ensure_unique_condition(self, type_: str, query: Query) -> StoredResource | None:
        page = await self.store.search(query)
        if page.total > 1:
            raise PreconditionFailed(f"If-None-Exist matched {page.total} {type_} resources; "
                                     "the condition must match at most one")
        return page.resources[0] if page.resources else None
