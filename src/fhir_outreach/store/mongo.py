"""MongoDB backend: the scale-out store (replica set or sharded cluster) behind the same ``Store`` contract.

It sits where ``store.sqlite`` sits, under the REST facade, intake, journeys and workers. The current
version of every resource, its version history and the search-index entries ``fhir.paths`` extracted at
write time are documents of one ``resources`` collection (shapes under *document shapes* below), so that a
create is one ``insert_many`` round trip and every search starts with a single-field index lookup.
Correctness never rests on multi-document transactions: a single write commits the moment its immutable
version document is inserted (its unique ``_id`` picks the winner among concurrent writers, and any process
may roll a committed version forward into the current document); a multi-write commit is all-or-nothing
through an undo journal in ``commits``, rolled back by the committer on failure or by any process once it
is stale. Work records (inbox, timers, outbox) live in ``records`` and change only by compare-and-set on
their ``rev``. PyMongo errors become ``errors.*`` in ``_translate`` only. Comments marked ``nx-27017:``
name each way the code is shaped around the SQLite-backed wire-protocol server the tests use, while
staying plain, portable MongoDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
from bson.errors import BSONError
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    PyMongoError,
    WTimeoutError,
)

from ..errors import (
    CommitInProgress,
    Conflict,
    FhirError,
    InvalidRequest,
    PreconditionFailed,
    StoreUnavailable,
)
from ..fhir.search import Clause, Pred, Query
from .base import (
    MUST_NOT_EXIST,
    CommitResult,
    HistoryPage,
    Method,
    Record,
    SearchPage,
    StoredResource,
    Write,
    check_planned_condition,
    prepare,
    stamp,
    utcnow,
)

DEFAULT_DATABASE = "fhir_outreach"
DUPLICATE_KEY = 11000
MAX_ATTEMPTS = 8  # re-reads after losing a race before giving up with Conflict
CHUNK = 500  # ids per ``$in`` query
SMALL = 100  # up to this many search candidates are fetched with their bodies in one round trip
PREFIX_END = "\U0010ffff"  # upper bound of a string-prefix range (the same bound the SQLite backend uses)

# Which kinds of clause can drive a search (looked up through the entry index) and how selective they
# usually are; the SQLite backend ranks them the same way.
_DRIVER_RANK = {"ref": 0, "ref_id": 0, "id": 0, "str_exact": 1, "uri": 1, "token": 2, "str_prefix": 3,
                "date": 4}

Doc = dict[str, Any]

# Projections (nx-27017: inclusion projections are cheaper there than returning or excluding fields).
_STORED = {"t": 1, "ht": 1, "id": 1, "vn": 1, "lu": 1, "m": 1, "res": 1, "lt": 1, "del": 1}
_CANDIDATE = {"t": 1, "id": 1, "vn": 1, "lu": 1, "m": 1, "lt": 1, "ix": 1}
_CANDIDATE_WITH_BODY = {**_CANDIDATE, "res": 1}


@contextlib.contextmanager
def _translate() -> Iterator[None]:
    """The one edge where PyMongo (and BSON) errors become ``errors.*``."""
    try:
        yield
    except FhirError:
        raise
    except DuplicateKeyError as exc:
        raise Conflict(f"concurrent write: {exc}") from exc
    except BulkWriteError as exc:
        if _first_error(exc)[1] == DUPLICATE_KEY:
            raise Conflict("concurrent write (duplicate key)") from exc
        raise StoreUnavailable(f"MongoDB write failed: {exc}") from exc
    except (ConnectionFailure, ExecutionTimeout, WTimeoutError) as exc:
        raise StoreUnavailable(f"MongoDB unavailable: {exc}") from exc
    except PyMongoError as exc:
        raise StoreUnavailable(f"MongoDB error: {exc}") from exc
    except (BSONError, OverflowError) as exc:  # e.g. an integer beyond 64 bits
        raise InvalidRequest(f"resource cannot be stored: {exc}") from exc


def _first_error(exc: BulkWriteError) -> tuple[int, int]:
    """(index, code) of the first failed operation of a bulk write."""
    errors = exc.details.get("writeErrors") or [{}]
    first = min(errors, key=lambda e: e.get("index", 0))
    return int(first.get("index", 0)), int(first.get("code", 0))


def database_name(url: str) -> str:
    """The database named by the URL path (``mongodb://host/name``), else ``fhir_outreach``."""
    if not url.startswith(("mongodb://", "mongodb+srv://")):
        raise ValueError("a MongoDB store URL looks like mongodb://host:27017/fhir_outreach")
    return unquote(urlsplit(url).path.lstrip("/")) or DEFAULT_DATABASE


# --- document shapes --------------------------------------------------------------------------------
#
# current, _id "Type/id": t (type), id, vn (version), lu (last updated, epoch seconds), lh (lu + 1 ms, the
#   upper end _lastUpdated searches compare with), m (method), res (the FHIR JSON, None once deleted), ix (the
#   index entries as one JSON string of [param, sys, val, lo, hi] lists), ne (their number), lt (the type,
#   only while live), del (True once deleted), gc ([version, count] of the entry documents this version made
#   obsolete, for the next writer to sweep should this one die first), txn (the multi-write commit that
#   wrote it, until that commit is finished).
# version, _id "Type/id/_history/n": hk ("Type/id"), ht (type), id, vn, lu, m, res, ix, ne, txn: all that is
#   needed to rebuild the current document and the entries of that version.
# entry, _id "Type/id#n#i" (entry i of version n): k = "Type|param|val" (val "" for dates), ks =
#   "Type|param|sys" when there is a system, lo/hi for dates, txn. Entries only find candidates: each is
#   re-checked in Python against the ix of its current document, so entries of older versions are harmless
#   (and swept by later writes).

def _key(type_: str, id_: str) -> str:
    return f"{type_}/{id_}"


def _version_id(key: str, vn: int) -> str:
    return f"{key}/_history/{vn}"


def _entry_ids(key: str, vn: int, count: int) -> list[str]:
    return [f"{key}#{vn}#{i}" for i in range(count)]


def _key_of_entry(entry_id: str) -> str:
    return entry_id.rsplit("#", 2)[0]  # FHIR ids and type names never contain '#'


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _is_live(doc: Doc | None) -> bool:
    return doc is not None and not doc.get("del")


def _version_doc(w: Write, vn: int, now: datetime, method: Method, txn: str | None) -> Doc:
    key = _key(w.type, w.id)
    body = stamp(w.resource, w.id, vn, now) if w.resource is not None else None
    entries = [[e.param, e.sys, e.val, e.lo, e.hi] for e in w.index] if body is not None else []
    # nx-27017: it walks every nested value of every document it returns (in Python); the entries as one
    # JSON string (read only by this module) make a fetched document several times cheaper.
    doc: Doc = {"_id": _version_id(key, vn), "hk": key, "ht": w.type, "id": w.id, "vn": vn,
                "lu": now.timestamp(), "m": method, "res": body, "ix": orjson.dumps(entries).decode(),
                "ne": len(entries)}
    if txn is not None:
        doc["txn"] = txn
    return doc


def _entry_docs(ver: Doc) -> list[Doc]:
    """One document per index entry, keyed for single-field index lookups."""
    # nx-27017: it has no multikey indexes (an array is searched with json_each over every document), and
    # an equality is only index-backed when some index name ends in that field's name; so each entry is
    # its own document whose one composite string (``k``, or ``ks``) has its own single-field index.
    type_, ids = ver["ht"], _entry_ids(ver["hk"], ver["vn"], ver["ne"])
    out: list[Doc] = []
    for eid, (param, sys_, val, lo, hi) in zip(ids, orjson.loads(ver["ix"]), strict=True):
        doc: Doc = {"_id": eid, "k": f"{type_}|{param}|{'' if val is None else val}"}
        if sys_ is not None:
            doc["ks"] = f"{type_}|{param}|{sys_}"
        if lo is not None:
            doc["lo"] = lo
        if hi is not None:
            doc["hi"] = hi
        if "txn" in ver:
            doc["txn"] = ver["txn"]
        out.append(doc)
    return out


def _current_doc(ver: Doc, prev: Doc | None) -> Doc:
    """The current document for version ``ver`` replacing ``prev``: a pure function of the two, so whoever
    rolls a version forward writes exactly what its writer would have."""
    doc: Doc = {"_id": ver["hk"], "t": ver["ht"], "id": ver["id"], "vn": ver["vn"], "lu": ver["lu"],
                "lh": ver["lu"] + 0.001, "m": ver["m"], "res": ver["res"], "ix": ver["ix"], "ne": ver["ne"],
                "gc": [prev["vn"], prev["ne"]] if prev is not None else []}
    if ver["m"] == "delete":
        doc["del"] = True
    else:
        doc["lt"] = ver["ht"]
    if "txn" in ver:
        doc["txn"] = ver["txn"]
    return doc


def _obsolete_entries(prev: Doc | None) -> list[str]:
    """Entry documents that stop mattering once ``prev`` is replaced (its own, and those it failed to
    sweep)."""
    if prev is None:
        return []
    ids = _entry_ids(prev["_id"], prev["vn"], prev["ne"])
    if gc := prev.get("gc"):
        ids += _entry_ids(prev["_id"], gc[0], gc[1])
    return ids


def _stored(doc: Doc) -> StoredResource:
    """A StoredResource from a current or a version document."""
    type_ = doc.get("t") or doc["ht"]
    method = doc["m"]
    return StoredResource(type_, doc["id"], doc["vn"], _dt(doc["lu"]), method == "delete", doc["res"], method)


def _strip_txn(doc: Doc) -> Doc:
    return {k: v for k, v in doc.items() if k != "txn"}


def _prior(key: str, doc: Doc | None) -> Doc:
    """What a journal keeps of a current document to restore it: its version (0: absent) and sweep note;
    the rest is rebuilt from that version's document, so a journal stays small however big the commit."""
    return {"key": key, "vn": doc["vn"] if doc is not None else 0, "gc": doc.get("gc", []) if doc else []}


def _chunks(items: Sequence[str], size: int = CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class _Txn:
    """A multi-write commit in progress: its journal and what it has done so far."""

    id: str
    journal: Doc
    state: dict[str, Doc | None]  # key -> current document as this commit sees it
    beat: float = field(default_factory=time.monotonic)  # when the journal was last known fresh
    obsolete: list[str] = field(default_factory=list)


class MongoStore:
    """The MongoDB store. ``journal_timeout``: seconds without a heartbeat after which an unfinished
    multi-write commit counts as abandoned by a dead process and is rolled back by whoever meets it (a
    live committer refreshes its journal every ``heartbeat`` seconds, and gives up once it missed half the
    timeout)."""

    journal_timeout: float = 10.0
    heartbeat: float = 1.0

    def __init__(self, url: str, *, base_url: str | None = None) -> None:
        self.url = url
        self.base_url = base_url
        self.database = database_name(url)
        self._client: AsyncMongoClient[Doc] | None = None
        self._res: AsyncCollection[Doc] | None = None
        self._commits: AsyncCollection[Doc] | None = None
        self._recs: AsyncCollection[Doc] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        options: dict[str, Any] = {}
        if "serverselectiontimeoutms" not in self.url.lower():
            options["serverSelectionTimeoutMS"] = 5000  # a down server fails fast with StoreUnavailable
        with _translate():
            self._client = AsyncMongoClient(self.url, **options)
            db = self._client[self.database]
            self._res, self._commits, self._recs = db["resources"], db["commits"], db["records"]
            try:
                # Single-field sparse indexes (nx-27017: only a field that some index name ends with gets
                # an index-backed equality, so each queried field has its own index). [lt, lu] and
                # [ht, lu] serve the newest-first listings.
                for spec in (["k"], ["ks"], ["lt"], ["hk"], ["ht"], ["txn"], ["lt", "lu"], ["ht", "lu"]):
                    await self._res.create_index([(f, 1) for f in spec], sparse=True)
                for spec in (["kind"], ["ks"], ["ks", "due"], ["kind", "created"], ["group"]):
                    await self._recs.create_index([(f, 1) for f in spec])
                await self._recover()
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = self._res = self._commits = self._recs = None

    async def ping(self) -> None:
        with _translate():
            await self._db_client().admin.command("ping")

    def _db_client(self) -> AsyncMongoClient[Doc]:
        if self._client is None:
            raise StoreUnavailable("store is not open")
        return self._client

    @property
    def _docs(self) -> AsyncCollection[Doc]:
        if self._res is None:
            raise StoreUnavailable("store is not open")
        return self._res

    @property
    def _journals(self) -> AsyncCollection[Doc]:
        if self._commits is None:
            raise StoreUnavailable("store is not open")
        return self._commits

    @property
    def _records(self) -> AsyncCollection[Doc]:
        if self._recs is None:
            raise StoreUnavailable("store is not open")
        return self._recs

    # --- writes -----------------------------------------------------------------------------------

    async def commit(self, writes: Sequence[Write], *, now: datetime | None = None) -> list[CommitResult]:
        moment = now or utcnow()
        prepared = [prepare(w, self.base_url) for w in writes]
        with _translate():
            if len(prepared) == 1:
                return [await self._commit_one(prepared[0], moment)]
            if not prepared:
                return []
            return await self._commit_many(prepared, moment)

    async def _conditional(self, w: Write, query: Query) -> CommitResult | None:
        """If-None-Exist: the existing match (nothing to write), or None to go on with the create."""
        found = check_planned_condition(w, (await self._search(query, limit=2)).resources)
        return CommitResult(found, created=False, existed=True) if found is not None else None

    @staticmethod
    def _check(w: Write, cur: Doc | None, now: datetime) -> CommitResult | None:
        """Apply ``expect``; returns the no-op result of deleting something absent, else None."""
        live = _is_live(cur)
        current = cur["vn"] if cur is not None else 0
        if w.expect == MUST_NOT_EXIST and live:
            raise Conflict(f"{w.type}/{w.id} already exists")
        if w.expect is not None and w.expect > 0 and (not live or current != w.expect):
            have = f"version {current}" if live else "no live version"
            raise PreconditionFailed(
                f"{w.type}/{w.id}: If-Match expects version {w.expect}, the server has {have}")
        if w.resource is None and not live:
            return CommitResult(StoredResource(w.type, w.id, current, now, True, None, "delete"),
                                created=False, noop=True)
        return None

    async def _commit_one(self, w: Write, now: datetime) -> CommitResult:
        if w.if_none_exist is not None and (hit := await self._conditional(w, w.if_none_exist)) is not None:
            return hit
        if w.resource is not None and w.expect in (None, MUST_NOT_EXIST):
            fresh = await self._create_fresh(w, now)
            if fresh is not None:
                return fresh
        key = _key(w.type, w.id)
        for _ in range(MAX_ATTEMPTS):
            cur = await self._current(key)
            if (noop := self._check(w, cur, now)) is not None:
                return noop
            live = _is_live(cur)
            method: Method = "delete" if w.resource is None else "update" if live else "create"
            ver = _version_doc(w, (cur["vn"] if cur is not None else 0) + 1, now, method, None)
            try:
                # The version document first: inserting it is the commit point.
                await self._docs.insert_many([ver, *_entry_docs(ver)], ordered=True)
            except BulkWriteError as exc:
                index, code = _first_error(exc)
                if code != DUPLICATE_KEY:
                    raise
                if index == 0:  # someone else took this version number: help it along, then look again
                    await self._resolve_taken(key, ver["vn"])
                    continue
                # A roll-forward already wrote some of our entries: ours is committed all the same.
                await self._insert_missing(_entry_docs(ver))
            await self._advance(cur, ver)
            return CommitResult(_stored(ver), created=not live and w.resource is not None)
        raise Conflict(f"{w.type}/{w.id} is being changed too often concurrently; retry")

    async def _create_fresh(self, w: Write, now: datetime) -> CommitResult | None:
        """Create in one round trip when the id has never been used (version 1, entries, current, in that
        order); None when version 1 already exists and the general path must decide."""
        ver = _version_doc(w, 1, now, "create", None)
        try:
            await self._docs.insert_many([ver, *_entry_docs(ver), _current_doc(ver, None)], ordered=True)
        except BulkWriteError as exc:
            index, code = _first_error(exc)
            if code != DUPLICATE_KEY:
                raise
            if index == 0:
                return None
            await self._insert_missing(_entry_docs(ver))  # committed; someone rolled part of it forward
            await self._advance(None, ver)
        return CommitResult(_stored(ver), created=True)

    async def _current(self, key: str) -> Doc | None:
        """The current document, after settling a multi-write commit that is still marked on it."""
        for _ in range(MAX_ATTEMPTS):
            doc = await self._docs.find_one({"_id": key})
            if doc is None or "txn" not in doc or not await self._settle(doc["txn"]):
                return doc
        raise Conflict(f"{key} is being changed by other commits; retry")

    async def _settle(self, txn: str) -> bool:
        """Deal with a multi-write commit met on a document. False: it is finished (committed, or rolled back
        and gone). True: it was abandoned and has just been rolled back (look again). Raises Conflict while
        it is in progress."""
        journal = await self._journals.find_one({"_id": txn})
        if journal is None:
            return False
        if time.time() - journal["at"] > self.journal_timeout:
            await self._rollback(journal)
            return True
        raise CommitInProgress("the resource is part of a commit in progress; retry")

    async def _resolve_taken(self, key: str, vn: int) -> None:
        """Version ``vn`` of ``key`` exists although the current document is older: either its writer is
        between the two steps, or died there. Roll it forward (any process may), unless it belongs to an
        unfinished multi-write commit."""
        ver = await self._docs.find_one({"_id": _version_id(key, vn)})
        if ver is None:
            return  # rolled back meanwhile
        if "txn" in ver:
            await self._settle(ver["txn"])
            return
        cur = await self._docs.find_one({"_id": key})
        if (cur["vn"] if cur is not None else 0) == vn - 1:
            await self._insert_missing(_entry_docs(ver))
            await self._advance(cur, ver)

    async def _insert_missing(self, docs: list[Doc]) -> None:
        """Insert documents that others may already have inserted (identical by construction)."""
        if not docs:
            return
        try:
            await self._docs.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            if any(e.get("code") != DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
                raise

    async def _advance(self, prev: Doc | None, ver: Doc) -> None:
        """Make ``ver`` the current version in place of ``prev`` (compare-and-set on the version number).
        Losing the race to someone who already advanced it as far is success."""
        new = _current_doc(ver, prev)
        if prev is None:
            try:
                await self._docs.insert_one(new)
                done = True
            except DuplicateKeyError:
                done = False
        else:
            result = await self._docs.replace_one({"_id": new["_id"], "vn": prev["vn"]}, new)
            done = result.matched_count == 1
        if not done:
            now = await self._docs.find_one({"_id": new["_id"]}, {"vn": 1})
            if now is None or now["vn"] < ver["vn"]:
                raise Conflict(f"{new['_id']} was changed concurrently; retry")
        if obsolete := _obsolete_entries(prev):
            await self._delete_ids(obsolete)

    async def _delete_ids(self, ids: Sequence[str]) -> None:
        # nx-27017: a range on _id falls back to a Python scan, but ``_id: {$in: [...]}`` is index-backed,
        # so obsolete entries are removed by their exact ids (a resource's version and entry count say
        # which), not by a prefix range.
        for part in _chunks(ids):
            await self._docs.delete_many({"_id": {"$in": list(part)}})

    # --- multi-write commits ----------------------------------------------------------------------

    async def _commit_many(self, writes: list[Write], now: datetime) -> list[CommitResult]:
        await self._recover()
        for _ in range(MAX_ATTEMPTS):
            txn = await self._begin(writes)
            try:
                results = []
                for w in writes:
                    results.append(await self._apply(txn, w, now))
                    await self._beat(txn)
                await self._finish(txn)
            except _Retry as retry:
                await self._rollback(txn.journal)
                if retry.taken is not None:
                    await self._resolve_taken(*retry.taken)
                continue
            except BaseException:
                # Undo now; should that fail too, the journal stays and the recovery undoes it later.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._rollback(txn.journal))
                raise
            await self._after_commit(txn)
            return results
        raise Conflict("the commit kept colliding with concurrent writes; retry")

    async def _begin(self, writes: Sequence[Write]) -> _Txn:
        """Read the current documents and record them in a journal before anything is changed."""
        keys = list(dict.fromkeys(_key(w.type, w.id) for w in writes))
        state: dict[str, Doc | None] = dict.fromkeys(keys)
        for _ in range(MAX_ATTEMPTS):
            pending: list[str] = []
            for part in _chunks(keys):
                async for doc in self._docs.find({"_id": {"$in": list(part)}}):
                    state[doc["_id"]] = doc
                    if "txn" in doc:
                        pending.append(doc["txn"])
            settled = [await self._settle(t) for t in dict.fromkeys(pending)]
            if not any(settled):
                break
        txn_id = uuid.uuid4().hex
        journal = {"_id": txn_id, "at": time.time(),
                   "prior": [_prior(k, state[k]) for k in keys]}
        await self._journals.insert_one(journal)
        return _Txn(txn_id, journal, {k: None if d is None else _strip_txn(d) for k, d in state.items()})

    async def _apply(self, txn: _Txn, w: Write, now: datetime) -> CommitResult:
        """One write of a multi-write commit, marked with the commit id (its outcome is not final yet)."""
        if w.if_none_exist is not None and (hit := await self._conditional(w, w.if_none_exist)) is not None:
            return hit
        key = _key(w.type, w.id)
        cur = txn.state[key]
        if (noop := self._check(w, cur, now)) is not None:
            return noop
        live = _is_live(cur)
        method: Method = "delete" if w.resource is None else "update" if live else "create"
        ver = _version_doc(w, (cur["vn"] if cur is not None else 0) + 1, now, method, txn.id)
        new = _current_doc(ver, cur)
        # A resource never seen before is created in one round trip, as in ``_create_fresh``.
        batch = [ver, *_entry_docs(ver), *([new] if cur is None else [])]
        try:
            await self._docs.insert_many(batch, ordered=True)
        except BulkWriteError as exc:
            index, code = _first_error(exc)
            if code != DUPLICATE_KEY:
                raise
            raise _Retry((key, ver["vn"]) if index == 0 else None) from exc
        if cur is not None:
            result = await self._docs.replace_one({"_id": key, "vn": cur["vn"]}, new)
            if result.matched_count != 1:
                raise _Retry(None)
        txn.obsolete += _obsolete_entries(cur)
        txn.state[key] = new
        return CommitResult(_stored(ver), created=not live and w.resource is not None)

    async def _beat(self, txn: _Txn) -> None:
        """Keep a long commit's journal fresh; fails if someone already judged it abandoned."""
        if time.monotonic() - txn.beat < self.heartbeat:
            return
        self._check_fresh(txn)
        beat = time.monotonic()
        result = await self._journals.update_one({"_id": txn.id}, {"$set": {"at": time.time()}})
        if result.matched_count != 1:
            raise StoreUnavailable("the commit took too long and was rolled back; retry")
        txn.beat = beat

    def _check_fresh(self, txn: _Txn) -> None:
        # Give up well before anyone may judge this commit abandoned, so as never to race its rollback.
        if time.monotonic() - txn.beat > self.journal_timeout / 2:
            raise StoreUnavailable("the commit took too long and was rolled back; retry")

    async def _finish(self, txn: _Txn) -> None:
        """The commit point: deleting the journal (unless the commit has gone stale: see ``_check_fresh``)."""
        self._check_fresh(txn)
        if (await self._journals.delete_one({"_id": txn.id})).deleted_count != 1:
            raise StoreUnavailable("the commit took too long and was rolled back; retry")

    async def _after_commit(self, txn: _Txn) -> None:
        """Clear the commit's marks and sweep the entries of the versions it replaced. Neither matters for
        correctness (a mark without a journal means committed; stale entries are re-checked away), so a
        failure here must not turn a committed change into an error."""
        with contextlib.suppress(PyMongoError):
            await self._docs.update_many({"txn": txn.id}, {"$unset": {"txn": ""}})
            if txn.obsolete:
                await self._delete_ids(txn.obsolete)

    async def _rollback(self, journal: Doc) -> None:
        """Undo a multi-write commit: restore the prior current documents it replaced, remove everything it
        inserted, then drop the journal (last, so that its absence means the undo is complete)."""
        txn = journal["_id"]
        for prior in journal["prior"]:
            if prior["vn"] == 0:
                continue  # did not exist: the delete_many below removes what the commit created
            ver = await self._docs.find_one({"_id": _version_id(prior["key"], prior["vn"])})
            if ver is not None:
                restored = _current_doc(_strip_txn(ver), None)
                restored["gc"] = prior["gc"]
                await self._docs.replace_one({"_id": prior["key"], "txn": txn}, restored)
        await self._docs.delete_many({"txn": txn})
        await self._journals.delete_one({"_id": txn})

    async def _recover(self) -> None:
        """Roll back multi-write commits abandoned by a dead process (journals older than the timeout)."""
        stale = {"at": {"$lt": time.time() - self.journal_timeout}}
        async for journal in self._journals.find(stale):
            await self._rollback(journal)

    # --- reads ------------------------------------------------------------------------------------

    async def read(self, type_: str, id_: str) -> StoredResource | None:
        with _translate():
            doc = await self._docs.find_one({"_id": _key(type_, id_)}, _STORED)
        return _stored(doc) if doc is not None else None

    async def vread(self, type_: str, id_: str, version: int) -> StoredResource | None:
        with _translate():
            doc = await self._docs.find_one({"_id": _version_id(_key(type_, id_), version)}, _STORED)
        return _stored(doc) if doc is not None else None

    async def history(self, type_: str, id_: str | None, *, since: datetime | None, offset: int,
                      count: int) -> HistoryPage:
        filt: Doc = {"hk": _key(type_, id_)} if id_ is not None else {"ht": type_}
        if since is not None:
            filt["lu"] = {"$gte": since.timestamp()}
        with _translate():
            total = await self._count(filt)
            if count <= 0 or total <= offset:
                return HistoryPage([], total)
            cursor = self._docs.find(filt, _STORED).sort([("lu", -1), ("vn", -1)]).skip(offset).limit(count)
            return HistoryPage([_stored(d) async for d in cursor], total)

    async def read_many(self, refs: Sequence[tuple[str, str]]) -> list[StoredResource]:
        keys = list(dict.fromkeys(_key(t, i) for t, i in refs))
        with _translate():
            found = {d["_id"]: d for d in await self._find_ids(keys, _STORED)}
        return [_stored(found[k]) for k in keys if _is_live(found.get(k))]

    async def _find_ids(self, keys: Sequence[str], projection: Doc) -> list[Doc]:
        async def one(part: Sequence[str]) -> list[Doc]:
            return [d async for d in self._docs.find({"_id": {"$in": list(part)}}, projection)]

        parts = await asyncio.gather(*(one(part) for part in _chunks(keys)))
        return [d for part in parts for d in part]

    async def _count(self, filt: Doc) -> int:
        # nx-27017: count_documents (an aggregation there) runs in Python, and a plain count command scans
        # the whole collection; a count command with a ``skip`` (0: a no-op everywhere) is answered there by
        # an index-backed find. Our filters always have a predicate, so the count is exact on a sharded
        # cluster too.
        reply = await self._docs.database.command("count", self._docs.name, query=filt, skip=0)
        return int(reply["n"])

    # --- search -----------------------------------------------------------------------------------

    async def search(self, query: Query) -> SearchPage:
        with _translate():
            return await self._search(query)

    async def _search(self, query: Query, limit: int | None = None) -> SearchPage:
        count = query.count if limit is None else limit
        if _mongo_sortable(query):
            return await self._search_sorted_by_server(query, count)
        type_ = query.resource_type
        driver = _driver(query.clauses)
        if driver is not None:
            keys = list(await self._driver_keys(type_, driver))
            with_bodies = len(keys) <= SMALL
            # nx-27017: no "lt" in this filter, or SQLite (no statistics) walks the [lt] index over the
            # whole type instead of looking the ids up; liveness is checked here instead.
            found = await self._find_ids(keys, _CANDIDATE_WITH_BODY if with_bodies else _CANDIDATE)
            docs = [d for d in found if d.get("lt") == type_]
        else:
            with_bodies = False
            filt = {"lt": type_, **_pushdown(query.clauses)}
            docs = [d async for d in self._docs.find(filt, _CANDIDATE, batch_size=10_000)]
        entries = {d["_id"]: orjson.loads(d["ix"]) for d in docs}
        matches = [d for d in docs if all(_clause_matches(c, d, entries[d["_id"]]) for c in query.clauses)]
        total = len(matches)
        if query.summary_count or count <= 0 or total == 0:
            return SearchPage([], total)
        page = _sorted(matches, query.sort, entries)[query.offset : query.offset + count]
        if not with_bodies and page:
            bodies = {d["_id"]: d for d in await self._find_ids([d["_id"] for d in page], _STORED)}
            page = [bodies[d["_id"]] for d in page if bodies.get(d["_id"], {}).get("lt") == type_]
        return SearchPage([_stored(d) for d in page], total)

    async def _search_sorted_by_server(self, query: Query, count: int) -> SearchPage:
        """No clause but a single-valued ``_lastUpdated`` and a sort on ``_id``/``_lastUpdated``: the server
        filters (exactly), counts, sorts and pages, using the [lt, lu] index."""
        filt: Doc = {"lt": query.resource_type, **_pushdown(query.clauses)}
        total = await self._count(filt)
        if query.summary_count or count <= 0 or total <= query.offset:
            return SearchPage([], total)
        cursor = self._docs.find(filt, _STORED).sort(_server_sort(query.sort)).skip(query.offset).limit(count)
        return SearchPage([_stored(d) async for d in cursor], total)

    async def _driver_keys(self, type_: str, clause: Clause) -> set[str]:
        """Keys of resources with an entry matching any predicate of ``clause`` (a superset: re-checked)."""
        if clause.param == "_id":
            return {_key(type_, p.val or "") for p in clause.preds}
        # nx-27017: $or and $in on ordinary fields are evaluated by scanning (or in Python), so each
        # predicate is its own index-backed query and the union is taken here.
        filters = [_entry_filter(type_, clause.param, p) for p in clause.preds]
        found = await asyncio.gather(*(self._ids(f) for f in filters))
        return {_key_of_entry(eid) for ids in found for eid in ids}

    async def _ids(self, filt: Doc) -> list[str]:
        return [d["_id"] async for d in self._docs.find(filt, {"_id": 1})]

    # --- records ----------------------------------------------------------------------------------
    # One document per record, ``_id`` "kind|key"; ``data`` is kept as JSON text (exactly what the SQLite
    # backend keeps, whatever it holds), ``ks`` = "kind|state" drives claiming and ``gs`` = group and state
    # the operator counts. Every change is a compare-and-set on ``rev``.

    async def add_record(self, record: Record, *, now: float | None = None) -> bool:
        moment = float(time.time() if now is None else now)
        doc = _record_doc(record, created=moment, updated=moment, rev=1)
        with _translate():
            try:
                await self._records.insert_one(doc)
            except DuplicateKeyError:
                return False
        record.created = record.updated = moment
        record.rev = 1
        return True

    async def get_record(self, kind: str, key: str) -> Record | None:
        with _translate():
            doc = await self._records.find_one({"_id": _record_id(kind, key)})
        return _record(doc) if doc is not None else None

    async def save_record(self, record: Record, *, now: float | None = None) -> bool:
        moment = float(time.time() if now is None else now)
        fields = _record_doc(record, created=record.created, updated=moment, rev=record.rev + 1)
        changed = {k: fields[k] for k in ("state", "group", "due", "attempts", "lease_owner", "lease_until",
                                          "updated", "data", "ks", "gs")}
        with _translate():
            result = await self._records.update_one({"_id": fields["_id"], "rev": record.rev},
                                                    {"$set": changed, "$inc": {"rev": 1}})
        if result.matched_count != 1:
            return False
        record.rev += 1
        record.updated = moment
        return True

    async def claim_records(self, kind: str, *, owner: str, now: float, lease_seconds: float, limit: int,
                            states: Sequence[str] = ("pending",)) -> list[Record]:
        """Oldest due first; each candidate is leased with a compare-and-set on its ``rev``, and candidates
        another claimer took meanwhile are replaced by the next ones until ``limit`` or none are left."""
        claimed: list[Record] = []
        with _translate():
            while len(claimed) < limit:
                candidates = await self._claimable(kind, states, now, limit - len(claimed))
                if not candidates:
                    break
                for doc in candidates:
                    lease = {"lease_owner": owner, "lease_until": now + lease_seconds, "updated": now}
                    result = await self._records.update_one(
                        {"_id": doc["_id"], "rev": doc["rev"]}, {"$set": lease, "$inc": {"rev": 1}})
                    if result.matched_count == 1:
                        claimed.append(_record({**doc, **lease, "rev": doc["rev"] + 1}))
        return claimed

    async def _claimable(self, kind: str, states: Sequence[str], now: float, limit: int) -> list[Doc]:
        # nx-27017: ``$in`` on an ordinary field is a scan there, so one index-backed query per state.
        order = [("due", 1), ("created", 1), ("key", 1)]
        found: list[Doc] = []
        for state in dict.fromkeys(states):
            filt = {"ks": f"{kind}|{state}", "due": {"$lte": now}, "lease_until": {"$lte": now}}
            found += [d async for d in self._records.find(filt).sort(order).limit(limit)]
        found.sort(key=lambda d: (d["due"], d["created"], d["key"]))
        return found[:limit]

    async def list_records(self, kind: str, *, state: str | None = None, group: str | None = None,
                           limit: int = 50, offset: int = 0) -> list[Record]:
        filt: Doc = {"kind": kind} if state is None else {"ks": f"{kind}|{state}"}
        if group is not None:
            filt["group"] = group
        if limit <= 0:
            return []
        with _translate():
            cursor = self._records.find(filt).sort([("created", -1), ("key", 1)]).skip(offset).limit(limit)
            return [_record(d) async for d in cursor]

    async def count_records(self, kind: str) -> dict[tuple[str, str], int]:
        # nx-27017: $group on a compound key ({g: "$group", s: "$state"}) returns the literal field paths
        # there; grouping on the one composite field ``gs`` works everywhere.
        pipeline: list[Doc] = [{"$match": {"kind": kind}}, {"$group": {"_id": "$gs", "n": {"$sum": 1}}}]
        with _translate():
            rows = [d async for d in await self._records.aggregate(pipeline)]
        out: dict[tuple[str, str], int] = {}
        for row in rows:
            group, state = row["_id"].rsplit(_SEP, 1)
            out[(group, state)] = int(row["n"])
        return out


class _Retry(Exception):
    """A multi-write commit met a concurrent writer: roll back, help the other commit along (``taken``: the
    key and version it holds) and start again from fresh reads."""

    def __init__(self, taken: tuple[str, int] | None) -> None:
        super().__init__("concurrent write")
        self.taken = taken


# --- search translation -------------------------------------------------------------------------------

def _driver(clauses: Iterable[Clause]) -> Clause | None:
    drivers = [c for c in clauses if not c.negate and c.param != "_lastUpdated" and c.preds
               and all(p.op in _DRIVER_RANK and not p.date_negate for p in c.preds)]
    return min(drivers, key=lambda c: max(_DRIVER_RANK[p.op] for p in c.preds)) if drivers else None


def _entry_filter(type_: str, param: str, p: Pred) -> Doc:
    """The index-backed query for entries that may match ``p`` (exactness comes from the re-check)."""
    base = f"{type_}|{param}|"
    if (p.op == "token" and p.val is None) or p.op in ("ref_id", "str_exact"):
        return {"ks": base + (p.sys or "")}
    if p.op == "str_prefix":
        return {"k": {"$gte": base + (p.val or ""), "$lt": base + (p.val or "") + PREFIX_END}}
    if p.op == "date":
        filt: Doc = {"k": base}
        for name, op, value in p.date:
            filt.setdefault(name, {})[_MONGO_OPS[op]] = value
        return filt
    return {"k": base + (p.val or "")}


_MONGO_OPS = {">": "$gt", ">=": "$gte", "<": "$lt", "<=": "$lte"}


def _mongo_sortable(query: Query) -> bool:
    """At most one single-valued ``_lastUpdated`` clause and a sort on ``_id``/``_lastUpdated`` only."""
    return (len(query.clauses) <= 1 and all(_pushable(c) for c in query.clauses)
            and all(name in ("_id", "_lastUpdated") for name, _ in query.sort))


def _server_sort(sort: Sequence[tuple[str, bool]]) -> list[tuple[str, int]]:
    if not sort:
        return [("lu", -1), ("id", 1)]
    out: list[tuple[str, int]] = []
    for name, desc in sort:
        fld = "id" if name == "_id" else "lu"
        if all(f != fld for f, _ in out):
            out.append((fld, -1 if desc else 1))
    if all(f != "id" for f, _ in out):
        out.append(("id", 1))
    return out


def _pushable(clause: Clause) -> bool:
    return clause.param == "_lastUpdated" and len(clause.preds) == 1 and not clause.preds[0].date_negate


def _pushdown(clauses: Sequence[Clause]) -> Doc:
    """The first single-valued ``_lastUpdated`` clause as a server-side range on ``lu``/``lh`` (the others,
    and the re-check, happen in memory)."""
    for clause in clauses:
        if _pushable(clause):
            filt: Doc = {}
            for name, op, value in clause.preds[0].date:
                filt.setdefault("lu" if name == "lo" else "lh", {})[_MONGO_OPS[op]] = value
            return filt
    return {}


def _cmp(left: float | None, op: str, right: float) -> bool:
    if left is None:
        return False
    if op == ">":
        return left > right
    if op == ">=":
        return left >= right
    if op == "<":
        return left < right
    return left <= right


def _date_holds(p: Pred, lo: float | None, hi: float | None) -> bool:
    return all(_cmp(lo if name == "lo" else hi, op, value) for name, op, value in p.date)


def _pred_matches(p: Pred, entry: Sequence[Any]) -> bool:
    """One predicate on one entry ``[param, sys, val, lo, hi]``, with the SQLite backend's semantics."""
    _, sys_, val, lo, hi = entry
    op = p.op
    if op == "token":
        if p.val is None:
            return sys_ is not None and sys_ == p.sys
        if val != p.val:
            return False
        if p.sys is None:
            return True
        return sys_ is None if p.sys == "" else sys_ == p.sys
    if op in ("ref", "uri"):
        return val is not None and val == p.val
    if op in ("ref_id", "str_exact"):
        return sys_ is not None and sys_ == p.sys
    if op == "str_prefix":
        prefix = p.val or ""
        return val is not None and prefix <= val < prefix + PREFIX_END
    if op == "str_contains":
        return val is not None and (p.val or "") in val
    if op == "date":
        return _date_holds(p, lo, hi)
    raise ValueError(f"unexpected predicate {op}")


def _clause_matches(c: Clause, doc: Doc, ix: list[list[Any]]) -> bool:
    if c.param == "_id":
        return any(doc["id"] == p.val for p in c.preds)
    if c.param == "_lastUpdated":
        lo = doc["lu"]
        hi = lo + 0.001
        return any(_date_holds(p, lo, hi) != p.date_negate for p in c.preds)
    entries = [e for e in ix if e[0] == c.param]
    if len(c.preds) == 1 and c.preds[0].op == "missing":
        return not entries if c.preds[0].missing else bool(entries)
    positive = [p for p in c.preds if not p.date_negate]
    negative = [p for p in c.preds if p.date_negate]
    if positive:
        found = any(_pred_matches(p, e) for e in entries for p in positive)
        if found != c.negate:
            return True
    return any(not any(_pred_matches(p, e) for e in entries) for p in negative)


def _sort_value(ix: list[list[Any]], param: str, desc: bool) -> tuple[int, Any] | None:
    """MIN (ascending) or MAX (descending) of the param's values (val, or lo for dates); numbers sort before
    text as in SQLite."""
    values = [(1, e[2]) if e[2] is not None else (0, e[3]) for e in ix
              if e[0] == param and (e[2] is not None or e[3] is not None)]
    if not values:
        return None
    return max(values) if desc else min(values)


def _sorted(docs: list[Doc], sort: Sequence[tuple[str, bool]],
            entries: dict[str, list[list[Any]]]) -> list[Doc]:
    """The SQLite backend's order: each sort term in turn (resources without a value last, whatever the
    direction), then id; without ``_sort``, newest first then id."""
    out = sorted(docs, key=lambda d: d["id"])
    terms = list(sort) if sort else [("_lastUpdated", True)]
    for name, desc in reversed(terms):
        if name == "_id":
            out.sort(key=lambda d: d["id"], reverse=desc)
        elif name == "_lastUpdated":
            out.sort(key=lambda d: d["lu"], reverse=desc)
        else:
            keyed = [(_sort_value(entries[d["_id"]], name, desc), d) for d in out]
            present = [(v, d) for v, d in keyed if v is not None]
            present.sort(key=lambda vd: vd[0], reverse=desc)
            out = [d for _, d in present] + [d for v, d in keyed if v is None]
    return out


# --- records ------------------------------------------------------------------------------------------

_SEP = "\x1f"  # between group and state in ``gs`` (neither holds control characters)


def _record_id(kind: str, key: str) -> str:
    return f"{kind}|{key}"  # kinds are code constants without "|"


def _record_doc(record: Record, *, created: float, updated: float, rev: int) -> Doc:
    return {"_id": _record_id(record.kind, record.key), "kind": record.kind, "key": record.key,
            "state": record.state, "group": record.group, "due": float(record.due),
            "attempts": record.attempts, "lease_owner": record.lease_owner,
            "lease_until": float(record.lease_until), "created": created, "updated": updated, "rev": rev,
            "data": orjson.dumps(record.data).decode(), "ks": f"{record.kind}|{record.state}",
            "gs": f"{record.group}{_SEP}{record.state}"}


def _record(doc: Doc) -> Record:
    return Record(doc["kind"], doc["key"], doc["state"], orjson.loads(doc["data"]), doc["group"], doc["due"],
                  doc["attempts"], doc["lease_owner"], doc["lease_until"], doc["created"], doc["updated"],
                  doc["rev"])
