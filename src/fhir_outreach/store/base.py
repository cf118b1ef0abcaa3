"""The storage contract every backend implements, and the logic they share.

A store keeps FHIR resources as JSON with full version history and the search-index entries extracted at
write time (``fhir.paths``). Writes go through ``commit``: a list of ``Write`` items applied all-or-nothing,
each with an optional expected version (optimistic concurrency) or an ``If-None-Exist`` query. The store,
not the caller, assigns ``meta.versionId`` and ``meta.lastUpdated``. Backends translate their own driver
errors into ``errors.*`` at this edge. The same contract suite (``tests/store``) runs against each backend.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, runtime_checkable

from ..fhir.paths import IndexEntry, extract
from ..fhir.search import Query

Method = Literal["create", "update", "delete"]

# ``expect`` values of a Write besides a version number.
ANY_VERSION = None  # no precondition
MUST_NOT_EXIST = 0  # create: fails with Conflict if a live resource has this id


@dataclass(frozen=True, slots=True)
class StoredResource:
    type: str
    id: str
    version: int
    last_updated: datetime
    deleted: bool
    resource: dict[str, Any] | None  # None for a deletion
    method: Method = "update"

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'


@dataclass(slots=True)
class Write:
    """One change. ``resource`` None means delete. ``expect``: None (any), 0 (must not exist), n (version n
    must be current, else ``PreconditionFailed``). ``if_none_exist``: a query; when it matches one
    resource the write is skipped and that resource returned (conditional create)."""

    type: str
    id: str
    resource: dict[str, Any] | None
    expect: int | None = ANY_VERSION
    if_none_exist: Query | None = None
    index: list[IndexEntry] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class CommitResult:
    stored: StoredResource
    created: bool  # a new resource (or re-created after delete)
    existed: bool = False  # conditional create matched an existing resource; nothing was written
    noop: bool = False  # delete of something absent or already deleted


@dataclass(frozen=True, slots=True)
class HistoryPage:
    entries: list[StoredResource]
    total: int


@dataclass(frozen=True, slots=True)
class SearchPage:
    resources: list[StoredResource]
    total: int


@runtime_checkable
class Store(Protocol):
    """The async storage contract. ``open``/``close`` are owned by the application lifespan."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...

    async def commit(self, writes: Sequence[Write], *, now: datetime | None = None) -> list[CommitResult]:
        """Apply all writes or none. Raises Conflict / PreconditionFailed / StoreUnavailable."""
        ...

    async def read(self, type_: str, id_: str) -> StoredResource | None:
        """The current version (``deleted`` True if the last version is a deletion), or None."""
        ...

    async def vread(self, type_: str, id_: str, version: int) -> StoredResource | None: ...

    async def history(self, type_: str, id_: str | None, *, since: datetime | None, offset: int,
                      count: int) -> HistoryPage:
        """Versions newest first, of one resource (id given) or of a whole type."""
        ...

    async def search(self, query: Query) -> SearchPage:
        """Live resources matching ``query`` in its sort order, one page (``offset``/``count``) and total."""
        ...

    async def read_many(self, refs: Sequence[tuple[str, str]]) -> list[StoredResource]:
        """Live resources for (type, id) pairs, in no particular order; missing ones are skipped."""
        ...


def prepare(write: Write, base_url: str | None) -> Write:
    """Fill a write's index entries (done once, before any backend work)."""
    if write.resource is not None and not write.index:
        write.index = extract(write.resource, base_url)
    return write


def stamp(resource: dict[str, Any], id_: str, version: int, now: datetime) -> dict[str, Any]:
    """A copy of ``resource`` with id, ``meta.versionId`` and ``meta.lastUpdated`` set by the store."""
    out = copy.copy(resource)
    out["id"] = id_
    meta = dict(out.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = format_instant(now)
    out["meta"] = meta
    return out


def format_instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utcnow() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=(now.microsecond // 1000) * 1000)
