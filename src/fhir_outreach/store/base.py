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

from ..errors import Conflict, PreconditionFailed
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
    resource the write is skipped and that resource returned (conditional create). In a transaction the
    caller resolves the condition while planning (to rewrite references); it then sets
    ``condition_planned`` and ``planned_match`` (the id it found, or None), and the store raises
    ``Conflict`` if at commit time the condition resolves to anything else."""

    type: str
    id: str
    resource: dict[str, Any] | None
    expect: int | None = ANY_VERSION
    if_none_exist: Query | None = None
    index: list[IndexEntry] = field(default_factory=list)
    condition_planned: bool = False
    planned_match: str | None = None


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


@dataclass(slots=True)
class Record:
    """A durable work or bookkeeping item (inbox delivery, normalised event, checkpoint, timer, outbox...).

    ``kind`` + ``key`` is unique: keys are deterministic, so adding a duplicate is a no-op. ``state``,
    ``due`` and the lease (``lease_owner``, ``lease_until``) drive claiming; ``rev`` makes every save a
    compare-and-set. ``group`` is a label for operator counts (e.g. the source server). Times are epoch
    seconds (floats) on every backend.
    """

    kind: str
    key: str
    state: str = "pending"
    data: dict[str, Any] = field(default_factory=dict)
    group: str = ""
    due: float = 0.0
    attempts: int = 0
    lease_owner: str | None = None
    lease_until: float = 0.0
    created: float = 0.0
    updated: float = 0.0
    rev: int = 0


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

    # --- records: durable work items with deterministic keys and leases -------------------------

    async def add_record(self, record: Record, *, now: float | None = None) -> bool:
        """Insert ``record`` unless its (kind, key) exists; True when inserted. Sets created/updated/rev=1."""
        ...

    async def get_record(self, kind: str, key: str) -> Record | None: ...

    async def save_record(self, record: Record, *, now: float | None = None) -> bool:
        """Compare-and-set: store ``record`` if the stored rev still equals ``record.rev`` (then rev+1).

        Returns False when another writer got there first (the caller re-reads and decides)."""
        ...

    async def claim_records(self, kind: str, *, owner: str, now: float, lease_seconds: float, limit: int,
                            states: Sequence[str] = ("pending",)) -> list[Record]:
        """Atomically lease up to ``limit`` records in ``states`` that are due (``due <= now``) and not leased
        (``lease_until <= now``), oldest due first. Anyone may claim an expired lease."""
        ...

    async def list_records(self, kind: str, *, state: str | None = None, group: str | None = None,
                           limit: int = 50, offset: int = 0) -> list[Record]:
        """Records newest first (by ``created``), optionally filtered by state and group."""
        ...

    async def count_records(self, kind: str) -> dict[tuple[str, str], int]:
        """Number of records of ``kind`` per (group, state)."""
        ...


def check_planned_condition(write: Write, matched: list[StoredResource]) -> StoredResource | None:
    """The shared If-None-Exist rule once a backend has run the query (at most 2 results): the match to
    return instead of writing, or None to go on and create. Raises PreconditionFailed / Conflict."""
    if len(matched) > 1:
        raise PreconditionFailed(f"If-None-Exist matched {len(matched)} {write.type} resources; "
                                 "the condition must match at most one")
    found = matched[0] if matched else None
    if write.condition_planned and (found.id if found else None) != write.planned_match:
        now = f"{write.type}/{found.id}" if found else "nothing"
        was = f"{write.type}/{write.planned_match}" if write.planned_match else "nothing"
        raise Conflict(f"{write.type}: the If-None-Exist condition matched {was} when the transaction was planned "
                       f"but matches {now} at commit; retry the transaction")
    return found


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
