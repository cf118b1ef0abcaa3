"""Batch and transaction Bundles (``POST /fhir``).

A transaction plans every entry with the same rules as the single interactions (``interactions``), rewrites
``urn:uuid:`` references to the ids it assigns, and commits all writes in one ``Store.commit``: all or
nothing. Entries are processed in the order the specification gives (DELETE, POST, PUT, then GET), and an
error anywhere fails the whole transaction with an OperationOutcome naming ``Bundle.entry[n]``. A batch
runs each entry on its own and reports each outcome in its response entry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..auth import Access, Principal
from ..errors import BusinessRule, FhirError, InvalidRequest, MethodNotAllowed
from ..fhir.validation import validate_resource
from ..store.base import Write, format_instant
from .interactions import CANONICAL_TYPES, Interactions, Result, check_type, new_id, strip_base

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}
_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content", 304: "304 Not Modified"}


def _split_url(url: str, base: str) -> tuple[list[str], list[tuple[str, str]]]:
    parts = urlsplit(strip_base(url, base))
    segments = [s for s in parts.path.strip("/").split("/") if s]
    return segments, parse_qsl(parts.query, keep_blank_values=True)


def _rewrite(node: Any, ids: dict[str, str]) -> Any:
    """Replace references to ``urn:uuid:``/``urn:oid:`` fullUrls with the assigned ``Type/id``."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in ids:
                out[key] = ids[value]
            else:
                out[key] = _rewrite(value, ids)
        return out
    if isinstance(node, list):
        return [_rewrite(v, ids) for v in node]
    return node


@contextlib.contextmanager
def _entry_errors(i: int) -> Iterator[None]:
    """Prefix errors raised while handling entry ``i`` with ``Bundle.entry[i]: ``."""
    try:
        yield
    except FhirError as exc:
        if not exc.diagnostics.startswith("Bundle.entry"):
            exc.diagnostics = f"Bundle.entry[{i}]: {exc.diagnostics}"
        raise


class BundleProcessor:
    def __init__(self, interactions: Interactions, principal: Principal,
                 get_handler: Callable[[list[str], list[tuple[str, str]]], Awaitable[dict[str, Any]]]) -> None:
        self.ix = interactions
        self.principal = principal
        self.get_handler = get_handler  # runs a GET entry (read / search / history) → resource

    async def process(self, bundle: Any) -> dict[str, Any]:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise InvalidRequest("POST /fhir expects a Bundle of type batch or transaction")
        btype = bundle.get("type")
        if btype not in ("batch", "transaction"):
            raise InvalidRequest(f"Bundle.type must be batch or transaction, got {btype!r}",
                                 expression=["Bundle.type"])
        entries = bundle.get("entry") or []
        if not isinstance(entries, list):
            raise InvalidRequest("Bundle.entry must be an array", expression=["Bundle.entry"])
        if btype == "transaction":
            validate_resource(bundle, "Bundle")
            return await self._transaction(entries)
        return await self._batch(entries)

    def _request(self, i: int, entry: Any) -> tuple[str, str, dict[str, Any]]:
        where = f"Bundle.entry[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
            raise InvalidRequest(f"{where}.request is required", expression=[f"{where}.request"])
        req = entry["request"]
        method, url = req.get("method"), req.get("url")
        if method not in _ORDER:
            raise MethodNotAllowed(f"{where}.request.method {method!r} is not supported (DELETE, POST, PUT, GET)",
                                   expression=[f"{where}.request.method"])
        if not isinstance(url, str) or not url:
            raise InvalidRequest(f"{where}.request.url is required", expression=[f"{where}.request.url"])
        return method, url, req

    def _authorize(self, type_: str, method: str) -> None:
        access: Access = "read" if method == "GET" else "write"
        self.principal.require(type_, access)

    async def _plan(self, i: int, entry: dict[str, Any], method: str, url: str,
                    req: dict[str, Any], planned: tuple[str, str | None] | None = None) -> Write | None:
        where = f"Bundle.entry[{i}]"
        segments, _ = _split_url(url, self.ix.base)
        if not segments:
            raise InvalidRequest(f"{where}.request.url {url!r} names no resource type",
                                 expression=[f"{where}.request.url"])
        type_ = check_type(segments[0])
        self._authorize(type_, method)
        resource = entry.get("resource")
        if method == "POST":
            if len(segments) != 1:
                raise InvalidRequest(f"{where}: POST url must be the resource type, got {url!r}",
                                     expression=[f"{where}.request.url"])
            return await self.ix.plan_create(type_, resource, if_none_exist=req.get("ifNoneExist"),
                                             root=f"{where}.resource", planned=planned)
        if method in ("PUT", "DELETE"):
            if len(segments) != 2:
                raise InvalidRequest(f"{where}: {method} url must be Type/id (conditional {method} is not "
                                     f"supported), got {url!r}", expression=[f"{where}.request.url"])
            if method == "PUT":
                return await self.ix.plan_update(type_, segments[1], resource, if_match=req.get("ifMatch"),
                                                 root=f"{where}.resource")
            return self.ix.plan_delete(type_, segments[1], if_match=req.get("ifMatch"))
        return None  # GET

    async def _transaction(self, entries: list[Any]) -> dict[str, Any]:
        requests = []
        for i, entry in enumerate(entries):
            method, url, req = self._request(i, entry)
            requests.append((i, entry, method, url, req))
        # Assign ids to creates first, so that references between entries can be rewritten.
        ids: dict[str, str] = {}
        planned: dict[int, tuple[str, str | None]] = {}
        for i, entry, method, url, req in requests:
            full = entry.get("fullUrl")
            if method == "POST":
                with _entry_errors(i):
                    type_ = check_type((_split_url(url, self.ix.base)[0] or ["?"])[0])
                    existing = None
                    if req.get("ifNoneExist"):
                        q = self.ix.condition(type_, req["ifNoneExist"], f"Bundle.entry[{i}].request.ifNoneExist")
                        existing = await self.ix.ensure_unique_condition(type_, q)
                planned[i] = (existing.id, existing.id) if existing else (new_id(), None)
                if isinstance(full, str) and full:
                    ids[full] = f"{type_}/{planned[i][0]}"
            elif method == "PUT" and isinstance(full, str) and full.startswith("urn:"):
                ids[full] = strip_base(url, self.ix.base)
        writes: list[tuple[int, Write]] = []
        gets: list[tuple[int, str]] = []
        for i, entry, method, url, req in sorted(requests, key=lambda r: _ORDER[r[2]]):
            if ids and isinstance(entry.get("resource"), dict):
                entry = {**entry, "resource": _rewrite(entry["resource"], ids)}
            with _entry_errors(i):
                write = await self._plan(i, entry, method, url, req, planned.get(i))
            if write is None:
                gets.append((i, url))
            else:
                writes.append((i, write))
        self._check_duplicates(writes)
        try:
            results = await self.ix.store.commit([w for _, w in writes])
        except FhirError as exc:  # name the entry whose resource the store refused
            for i, w in writes:
                if f"{w.type}/{w.id}" in exc.diagnostics and not exc.diagnostics.startswith("Bundle.entry"):
                    exc.diagnostics = f"Bundle.entry[{i}]: {exc.diagnostics}"
                    break
            raise
        await self.ix.committed([(w, r) for (_, w), r in zip(writes, results, strict=True)])
        out: dict[int, dict[str, Any]] = {}
        for (i, write), res in zip(writes, results, strict=True):
            out[i] = self._response_entry(self.ix.result_of(write, res))
        for i, url in gets:
            out[i] = await self._get_entry(url)
        return {"resourceType": "Bundle", "type": "transaction-response",
                "entry": [out[i] for i in range(len(entries))]}

    @staticmethod
    def _check_duplicates(writes: list[tuple[int, Write]]) -> None:
        seen: dict[tuple[str, str], int] = {}
        canonicals: dict[tuple[str, str, str], int] = {}
        for i, w in writes:
            res = w.resource or {}
            if w.type in CANONICAL_TYPES and isinstance(res.get("url"), str):
                ckey = (w.type, res["url"], str(res.get("version")))
                if ckey in canonicals:
                    raise BusinessRule(f"Bundle.entry[{i}] and Bundle.entry[{canonicals[ckey]}] are both {w.type} "
                                       f"{res['url']}|{res.get('version')}; url|version must be unique",
                                       expression=[f"Bundle.entry[{i}].resource.version"])
                canonicals[ckey] = i
            key = (w.type, w.id)
            if key in seen:
                raise InvalidRequest(f"Bundle.entry[{i}] and Bundle.entry[{seen[key]}] both change {w.type}/{w.id}; "
                                     "a transaction may change a resource only once",
                                     expression=[f"Bundle.entry[{i}]"])
            seen[key] = i

    async def _get_entry(self, url: str) -> dict[str, Any]:
        segments, pairs = _split_url(url, self.ix.base)
        if segments:
            self._authorize(check_type(segments[0]), "GET")
        resource = await self.get_handler(segments, pairs)
        return {"resource": resource, "response": {"status": "200 OK"}}

    def _response_entry(self, result: Result) -> dict[str, Any]:
        response: dict[str, Any] = {"status": _STATUS_TEXT.get(result.status, str(result.status))}
        entry: dict[str, Any] = {"response": response}
        stored = result.stored
        if stored is not None and result.status != 204:
            response["etag"] = stored.etag
            response["lastModified"] = format_instant(stored.last_updated)
            if "Location" in result.headers:
                response["location"] = f"{stored.type}/{stored.id}/_history/{stored.version}"
            if stored.resource is not None:
                entry["fullUrl"] = f"{self.ix.base}/{stored.type}/{stored.id}"
                entry["resource"] = stored.resource
        return entry

    async def _batch(self, entries: list[Any]) -> dict[str, Any]:
        """Each entry on its own: planned in order, then all writes committed concurrently (each its own
        commit, so they share group commits), then the reads."""
        out: list[dict[str, Any] | None] = [None] * len(entries)
        writes: list[tuple[int, Write]] = []
        gets: list[tuple[int, str]] = []
        for i, entry in enumerate(entries):
            try:
                method, url, req = self._request(i, entry)
                if method == "GET":
                    gets.append((i, url))
                    continue
                write = await self._plan(i, entry, method, url, req)
                assert write is not None
                writes.append((i, write))
            except FhirError as exc:
                out[i] = _error_entry(exc)
        results = await asyncio.gather(*(self.ix.commit_one(w) for _, w in writes), return_exceptions=True)
        for (i, _), res in zip(writes, results, strict=True):
            if isinstance(res, FhirError):
                out[i] = _error_entry(res)
            elif isinstance(res, BaseException):
                raise res
            else:
                out[i] = self._response_entry(res)
        for i, url in gets:
            try:
                out[i] = await self._get_entry(url)
            except FhirError as exc:
                out[i] = _error_entry(exc)
        return {"resourceType": "Bundle", "type": "batch-response", "entry": out}


def _error_entry(exc: FhirError) -> dict[str, Any]:
    return {"response": {"status": f"{int(exc.status)} {exc.status.phrase}", "outcome": exc.to_outcome()}}
