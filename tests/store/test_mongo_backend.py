"""The MongoDB backend on a real wire-protocol server (nx-27017): its own semantics, its crash handling, and
search parity with the SQLite backend over a matrix of queries."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fhir_outreach.errors import Conflict, InvalidRequest, PreconditionFailed, StoreUnavailable
from fhir_outreach.fhir.search import Query, parse_query
from fhir_outreach.store import mongo
from fhir_outreach.store.base import MUST_NOT_EXIST, Record, StoredResource, Write, prepare
from fhir_outreach.store.mongo import MongoStore
from fhir_outreach.store.sqlite import SqliteStore
from tests.store.mongo_server import nx27017, start_nx27017, stop_nx27017

BASE = "http://testserver/fhir"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def task(patient: str = "p1", status: str = "requested", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Task", "status": status, "intent": "order",
            "for": {"reference": f"Patient/{patient}"}, **extra}


def q(type_: str, *pairs: tuple[str, str]) -> Query:
    return parse_query(type_, list(pairs), base_url=BASE)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.fixture(scope="module")
def nx_base() -> Iterator[str]:
    with nx27017() as url:
        yield url


async def _open(url: str, **attrs: Any) -> MongoStore:
    store = MongoStore(url, base_url=BASE)
    for name, value in attrs.items():
        setattr(store, name, value)
    await store.open()
    return store


@pytest.fixture
def db_url(nx_base: str) -> str:
    return f"{nx_base}/m{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[MongoStore]:
    s = await _open(db_url)
    try:
        yield s
    finally:
        await s.close()


async def ids(store: Any, type_: str, *pairs: tuple[str, str]) -> list[str]:
    return [r.id for r in (await store.search(q(type_, *pairs))).resources]


async def leftovers(store: MongoStore) -> tuple[int, int]:
    """(journals, documents still marked by a multi-write commit)."""
    journals = [d async for d in store._journals.find({})]
    marked = [d async for d in store._docs.find({"txn": {"$exists": True}})]
    return len(journals), len(marked)


# --- lifecycle and errors -------------------------------------------------------------------------------

def test_database_name_comes_from_the_url() -> None:
    assert mongo.database_name("mongodb://h:1/outreach?replicaSet=rs0") == "outreach"
    assert mongo.database_name("mongodb://h1:1,h2:2/") == "fhir_outreach"
    assert mongo.database_name("mongodb+srv://cluster.example.org/x") == "x"
    with pytest.raises(ValueError, match="mongodb://"):
        mongo.database_name("postgres://h/x")


async def test_open_is_idempotent_and_ping_works(store: MongoStore, db_url: str) -> None:
    await store.ping()
    again = await _open(db_url)
    await again.ping()
    await again.close()


async def test_unreachable_server_is_store_unavailable() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = MongoStore(f"mongodb://127.0.0.1:{port}/x?serverSelectionTimeoutMS=300")
    with pytest.raises(StoreUnavailable) as info:
        await store.open()
    assert info.value.retryable
    with pytest.raises(StoreUnavailable):
        await store.ping()
    await store.close()
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.read("Task", "a")


async def test_server_going_away_is_store_unavailable() -> None:
    url, proc = start_nx27017()
    try:
        store = await _open(f"{url}?serverSelectionTimeoutMS=500")
        await store.commit([Write("Task", "a", task())])
    finally:
        stop_nx27017(proc)
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.read("Task", "a")
    with pytest.raises(StoreUnavailable):
        await store.commit([Write("Task", "b", task())])
    await store.close()


# --- writes and reads -----------------------------------------------------------------------------------

async def test_create_read_vread_update_delete(store: MongoStore) -> None:
    [c] = await store.commit([Write("Task", "a", task(), expect=MUST_NOT_EXIST)], now=T0)
    assert (c.created, c.existed, c.noop) == (True, False, False)
    assert (c.stored.version, c.stored.method, c.stored.deleted) == (1, "create", False)
    assert c.stored.last_updated == T0
    assert c.stored.resource is not None
    assert c.stored.resource["meta"] == {"versionId": "1", "lastUpdated": "2026-01-01T00:00:00.000Z"}
    assert c.stored.resource["id"] == "a"
    got = await store.read("Task", "a")
    assert got == c.stored
    assert await store.read("Task", "other") is None
    assert await store.read("Patient", "a") is None

    [u] = await store.commit([Write("Task", "a", task(status="ready"), expect=1)], now=at(1))
    assert (u.created, u.stored.version, u.stored.method) == (False, 2, "update")
    assert u.stored.resource is not None and u.stored.resource["status"] == "ready"
    assert await store.read("Task", "a") == u.stored
    assert await store.vread("Task", "a", 1) == c.stored
    assert await store.vread("Task", "a", 2) == u.stored
    assert await store.vread("Task", "a", 3) is None

    [d] = await store.commit([Write("Task", "a", None, expect=2)], now=at(2))
    assert (d.created, d.noop) == (False, False)
    assert d.stored == StoredResource("Task", "a", 3, at(2), True, None, "delete")
    assert await store.read("Task", "a") == d.stored
    assert await store.vread("Task", "a", 3) == d.stored
    assert await store.vread("Task", "a", 1) == c.stored  # history survives deletion


async def test_update_without_expect_and_upsert_with_chosen_id(store: MongoStore) -> None:
    [first] = await store.commit([Write("Task", "x", task())])
    [second] = await store.commit([Write("Task", "x", task(status="ready"))])
    assert (first.created, first.stored.version, second.created, second.stored.version) == (True, 1, False, 2)


async def test_versions_continue_after_delete_and_recreate(store: MongoStore) -> None:
    await store.commit([Write("Task", "a", task())], now=T0)
    await store.commit([Write("Task", "a", None)], now=at(1))
    [again] = await store.commit([Write("Task", "a", None)], now=at(2))
    assert again.noop and not again.created
    assert again.stored == StoredResource("Task", "a", 2, at(2), True, None, "delete")
    [r] = await store.commit([Write("Task", "a", task(status="ready"), expect=MUST_NOT_EXIST)], now=at(3))
    assert (r.created, r.stored.version, r.stored.method) == (True, 3, "create")
    [r4] = await store.commit([Write("Task", "a", task(status="failed"))], now=at(4))
    assert (r4.created, r4.stored.version, r4.stored.method) == (False, 4, "update")
    hist = await store.history("Task", "a", since=None, offset=0, count=10)
    assert hist.total == 4
    assert [(h.version, h.method, h.deleted, h.resource is None) for h in hist.entries] == [
        (4, "update", False, False), (3, "create", False, False), (2, "delete", True, True),
        (1, "create", False, False)]
    assert await ids(store, "Task", ("status", "failed")) == ["a"]


async def test_delete_of_unknown_is_noop_and_writes_nothing(store: MongoStore) -> None:
    [d] = await store.commit([Write("Task", "zz", None)], now=T0)
    assert d.noop and not d.created
    assert d.stored == StoredResource("Task", "zz", 0, T0, True, None, "delete")
    assert await store.read("Task", "zz") is None
    assert (await store.history("Task", "zz", since=None, offset=0, count=10)).total == 0


async def test_expect_version_preconditions(store: MongoStore) -> None:
    await store.commit([Write("Task", "a", task())])
    await store.commit([Write("Task", "a", task(status="ready"))])
    with pytest.raises(PreconditionFailed, match="expects version 1"):
        await store.commit([Write("Task", "a", task(status="failed"), expect=1)])
    with pytest.raises(PreconditionFailed):
        await store.commit([Write("Task", "a", None, expect=5)])
    with pytest.raises(PreconditionFailed, match="no live version"):
        await store.commit([Write("Task", "new", task(), expect=1)])
    cur = await store.read("Task", "a")
    assert cur is not None and cur.version == 2 and cur.resource is not None
    assert cur.resource["status"] == "ready"
    await store.commit([Write("Task", "a", None)])
    with pytest.raises(PreconditionFailed):  # deleted: version 3 exists but is not live
        await store.commit([Write("Task", "a", task(), expect=3)])
    assert (await store.history("Task", "a", since=None, offset=0, count=10)).total == 3


async def test_must_not_exist_on_a_live_resource_is_conflict(store: MongoStore) -> None:
    await store.commit([Write("Task", "a", task())])
    with pytest.raises(Conflict, match="already exists"):
        await store.commit([Write("Task", "a", task(status="ready"), expect=MUST_NOT_EXIST)])
    cur = await store.read("Task", "a")
    assert cur is not None and cur.version == 1


async def test_concurrent_writers_one_wins(store: MongoStore) -> None:
    await store.commit([Write("Task", "a", task())])
    outcomes = await asyncio.gather(
        *(store.commit([Write("Task", "a", task(status="ready"), expect=1)]) for _ in range(6)),
        return_exceptions=True)
    wins = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(wins) == 1
    assert all(isinstance(o, PreconditionFailed) for o in outcomes if isinstance(o, BaseException))
    cur = await store.read("Task", "a")
    assert cur is not None and cur.version == 2
    assert (await store.history("Task", "a", since=None, offset=0, count=10)).total == 2


async def test_concurrent_creates_of_one_id(store: MongoStore) -> None:
    outcomes = await asyncio.gather(
        *(store.commit([Write("Task", "a", task(), expect=MUST_NOT_EXIST)]) for _ in range(5)),
        return_exceptions=True)
    assert len([o for o in outcomes if not isinstance(o, BaseException)]) == 1
    assert all(isinstance(o, Conflict) for o in outcomes if isinstance(o, BaseException))
    unconditional = await asyncio.gather(*(store.commit([Write("Task", "b", task())]) for _ in range(5)))
    assert sorted(r.stored.version for [r] in unconditional) == [1, 2, 3, 4, 5]


async def test_read_many(store: MongoStore) -> None:
    for rid in ("t1", "t2", "t3"):
        await store.commit([Write("Task", rid, task())])
    await store.commit([Write("Task", "t2", None)])
    got = await store.read_many([("Task", "t3"), ("Task", "t1"), ("Task", "t2"), ("Task", "nope"),
                                 ("Task", "t1"), ("Patient", "t3")])
    assert [r.id for r in got] == ["t3", "t1"]
    assert all(not r.deleted and r.resource is not None for r in got)
    assert await store.read_many([]) == []


async def test_history_instance_and_type(store: MongoStore) -> None:
    for i, rid in enumerate(("t1", "t2", "t3")):
        await store.commit([Write("Task", rid, task())], now=at(i))
    await store.commit([Write("Task", "t1", task(status="ready"))], now=at(10))
    await store.commit([Write("Task", "t2", None)], now=at(11))
    await store.commit([Write("Patient", "p1", {"resourceType": "Patient"})], now=at(12))
    page = await store.history("Task", None, since=None, offset=0, count=2)
    assert page.total == 5
    assert [(h.id, h.version, h.deleted) for h in page.entries] == [("t2", 2, True), ("t1", 2, False)]
    rest = await store.history("Task", None, since=None, offset=2, count=10)
    assert [(h.id, h.version) for h in rest.entries] == [("t3", 1), ("t2", 1), ("t1", 1)]
    since = await store.history("Task", None, since=at(2), offset=0, count=10)
    assert since.total == 3
    assert [(h.id, h.version) for h in since.entries] == [("t2", 2), ("t1", 2), ("t3", 1)]
    one = await store.history("Task", "t1", since=None, offset=0, count=10)
    assert one.total == 2 and [h.version for h in one.entries] == [2, 1]
    assert [h.method for h in one.entries] == ["update", "create"]
    assert (await store.history("Task", "t1", since=at(5), offset=0, count=10)).total == 1
    empty = await store.history("Task", "t1", since=None, offset=5, count=10)
    assert empty.total == 2 and empty.entries == []
    assert (await store.history("Task", "t1", since=None, offset=0, count=0)).entries == []


async def test_same_timestamp_history_orders_by_version(store: MongoStore) -> None:
    for status in ("requested", "ready", "in-progress"):
        await store.commit([Write("Task", "a", task(status=status))], now=T0)
    page = await store.history("Task", "a", since=None, offset=0, count=10)
    assert [h.version for h in page.entries] == [3, 2, 1]


# --- multi-write commits --------------------------------------------------------------------------------

async def test_multi_write_commit_is_all_or_nothing(store: MongoStore) -> None:
    await store.commit([Write("Task", "b", task("p9", "requested"))], now=T0)
    await store.commit([Write("Task", "c", task())], now=T0)
    await store.commit([Write("Task", "d", task("p8"))], now=T0)
    writes = [Write("Task", "a", task("p7")), Write("Task", "b", task("p7", "ready")),
              Write("Task", "d", None), Write("Task", "c", task(status="failed"), expect=7)]
    with pytest.raises(PreconditionFailed):
        await store.commit(writes, now=at(1))
    assert await store.read("Task", "a") is None
    b = await store.read("Task", "b")
    assert b is not None and b.version == 1 and b.resource is not None
    assert b.resource["status"] == "requested"
    c = await store.read("Task", "c")
    assert c is not None and c.version == 1
    assert await store.vread("Task", "b", 2) is None
    d = await store.read("Task", "d")
    assert d is not None and d.version == 1 and not d.deleted
    assert (await store.history("Task", None, since=None, offset=0, count=10)).total == 3
    assert await ids(store, "Task", ("patient", "p7")) == []
    assert await ids(store, "Task", ("patient", "p9")) == ["b"]  # b's entries were kept for the restore
    assert await ids(store, "Task", ("patient", "p8")) == ["d"]
    assert await leftovers(store) == (0, 0)
    results = await store.commit([Write("Task", "a", task()), Write("Task", "b", task("p2", "ready"))],
                                 now=at(2))
    assert [(r.stored.version, r.created) for r in results] == [(1, True), (2, False)]
    assert await ids(store, "Task", ("patient", "p2")) == ["b"]
    assert await ids(store, "Task", ("patient", "p9")) == []
    assert await leftovers(store) == (0, 0)


async def test_multi_write_conflict_and_conditional_inside(store: MongoStore) -> None:
    await store.commit([Write("Task", "c", task())])
    with pytest.raises(Conflict):
        await store.commit([Write("Task", "a", task()), Write("Task", "c", task(), expect=MUST_NOT_EXIST)])
    assert await store.read("Task", "a") is None
    ident = {"identifier": [{"system": "urn:k", "value": "1"}]}
    cond = q("Task", ("identifier", "urn:k|1"))
    results = await store.commit([
        Write("Task", "x", task(**ident), if_none_exist=cond),
        Write("Task", "y", task(**ident), if_none_exist=cond),  # sees x, written earlier in this commit
        Write("Task", "x", task(status="ready", **ident), expect=1),  # same id twice: versions continue
        Write("Task", "gone", None),
    ])
    assert [(r.created, r.existed, r.noop, r.stored.id, r.stored.version) for r in results] == [
        (True, False, False, "x", 1), (False, True, False, "x", 1), (False, False, False, "x", 2),
        (False, False, True, "gone", 0)]
    assert await store.read("Task", "y") is None
    assert await ids(store, "Task", ("status", "ready")) == ["x"]
    assert await leftovers(store) == (0, 0)


async def test_interrupted_multi_write_commit_is_rolled_back_on_open(store: MongoStore, db_url: str) -> None:
    await store.commit([Write("Task", "b", task("p1", "requested"))], now=T0)
    writes = [prepare(w, BASE) for w in (Write("Task", "a", task("p5")),
                                         Write("Task", "b", task("p5", "ready")),
                                         Write("Task", "c", task("p5")))]
    txn = await store._begin(writes)
    await store._apply(txn, writes[0], at(1))
    await store._apply(txn, writes[1], at(1))
    # The process "dies" here: no finish, no rollback. Until the journal is stale, others keep off.
    with pytest.raises(Conflict, match="in progress"):
        await store.commit([Write("Task", "b", task("p1", "failed"))])
    with pytest.raises(Conflict):
        await store.commit([Write("Task", "a", task(), expect=MUST_NOT_EXIST), Write("Task", "z", task())])
    await store.close()

    fresh = await _open(db_url, journal_timeout=0.0)  # open() rolls back journals older than the timeout
    try:
        assert await fresh.read("Task", "a") is None
        b = await fresh.read("Task", "b")
        assert b is not None and b.version == 1 and b.resource is not None
        assert b.resource["status"] == "requested"
        assert await fresh.vread("Task", "b", 2) is None
        assert await ids(fresh, "Task", ("patient", "p5")) == []
        assert await ids(fresh, "Task", ("patient", "p1")) == ["b"]
        assert (await fresh.history("Task", None, since=None, offset=0, count=10)).total == 1
        assert await leftovers(fresh) == (0, 0)
        [r] = await fresh.commit([Write("Task", "b", task("p1", "ready"), expect=1)])
        assert r.stored.version == 2
    finally:
        await fresh.close()


async def test_stale_commit_met_by_a_writer_is_rolled_back(store: MongoStore, db_url: str) -> None:
    await store.commit([Write("Task", "b", task())], now=T0)
    writes = [prepare(w, BASE) for w in (Write("Task", "a", task()),
                                         Write("Task", "b", task(status="ready")))]
    txn = await store._begin(writes)
    for w in writes:
        await store._apply(txn, w, at(1))
    other = await _open(db_url)  # a live process: the journal is not stale for it at open
    try:
        other.journal_timeout = 0.0  # ...and later it is
        [r] = await other.commit([Write("Task", "b", task(status="failed"), expect=1)], now=at(2))
        assert r.stored.version == 2
        assert await other.read("Task", "a") is None
        assert await leftovers(other) == (0, 0)
    finally:
        await other.close()
    # The original committer wakes up: its commit point fails and it undoes nothing of the new write.
    with pytest.raises(StoreUnavailable, match="rolled back"):
        await store._finish(txn)
    cur = await store.read("Task", "b")
    assert cur is not None and cur.version == 2 and cur.resource is not None
    assert cur.resource["status"] == "failed"


async def test_a_commit_rolled_back_by_someone_else_fails(store: MongoStore,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    store.heartbeat = 0.0  # refresh the journal after every write
    apply = store._apply

    async def apply_then_lose_the_journal(txn: Any, w: Write, now: datetime) -> Any:
        result = await apply(txn, w, now)
        await store._rollback(txn.journal)  # another process judged this commit abandoned
        return result

    monkeypatch.setattr(store, "_apply", apply_then_lose_the_journal)
    with pytest.raises(StoreUnavailable, match="rolled back"):
        await store.commit([Write("Task", "a", task()), Write("Task", "b", task())])
    assert await store.read("Task", "a") is None and await store.read("Task", "b") is None
    assert await leftovers(store) == (0, 0)


async def test_long_commit_keeps_its_journal_fresh(store: MongoStore) -> None:
    store.heartbeat = 0.0
    results = await store.commit([Write("Task", f"t{i}", task()) for i in range(5)])
    assert [r.stored.version for r in results] == [1] * 5
    assert await leftovers(store) == (0, 0)


async def test_crash_between_version_and_current_is_rolled_forward(store: MongoStore) -> None:
    await store.commit([Write("Task", "a", task())], now=T0)
    # A writer inserts version 2 (the commit point) and its entries, then dies before advancing "current".
    w = prepare(Write("Task", "a", task("p3", "ready")), BASE)
    ver = mongo._version_doc(w, 2, at(1), "update", None)
    await store._docs.insert_many([ver, *mongo._entry_docs(ver)])
    cur = await store.read("Task", "a")
    assert cur is not None and cur.version == 1  # not yet visible as current
    with pytest.raises(PreconditionFailed):  # the next writer rolls version 2 forward first
        await store.commit([Write("Task", "a", task(status="failed"), expect=1)])
    cur = await store.read("Task", "a")
    assert cur is not None and cur.version == 2 and cur.resource is not None
    assert cur.resource["status"] == "ready"
    assert await ids(store, "Task", ("patient", "p3")) == ["a"]
    assert await ids(store, "Task", ("patient", "p1")) == []

    # A create that died after its version 1 (before entries and current) counts as committed too.
    w = prepare(Write("Task", "n", task("p4")), BASE)
    await store._docs.insert_one(mongo._version_doc(w, 1, at(2), "create", None))
    with pytest.raises(Conflict, match="already exists"):
        await store.commit([Write("Task", "n", task(), expect=MUST_NOT_EXIST)])
    assert await ids(store, "Task", ("patient", "p4")) == ["n"]


async def test_multi_write_commit_rolls_a_dead_writers_version_forward(store: MongoStore) -> None:
    await store.commit([Write("Task", "b", task())], now=T0)
    w = prepare(Write("Task", "b", task("p3", "ready")), BASE)
    ver = mongo._version_doc(w, 2, at(1), "update", None)
    await store._docs.insert_many([ver, *mongo._entry_docs(ver)])  # committed, "current" not advanced
    with pytest.raises(PreconditionFailed):
        await store.commit([Write("Task", "a", task()), Write("Task", "b", task(), expect=1)], now=at(2))
    assert await store.read("Task", "a") is None
    results = await store.commit([Write("Task", "a", task()), Write("Task", "b", task("p4"))], now=at(2))
    assert [(r.stored.id, r.stored.version) for r in results] == [("a", 1), ("b", 3)]
    page = await store.history("Task", "b", since=None, offset=0, count=10)
    assert [h.version for h in page.entries] == [3, 2, 1]
    assert await ids(store, "Task", ("patient", "p4")) == ["b"]
    assert await leftovers(store) == (0, 0)


async def test_unstorable_resource_is_invalid_request(store: MongoStore) -> None:
    huge = task(extension=[{"url": "urn:x", "valueInteger": 2**70}])
    with pytest.raises(InvalidRequest, match="cannot be stored"):
        await store.commit([Write("Task", "a", huge)])
    with pytest.raises(InvalidRequest):
        await store.commit([Write("Task", "b", task()), Write("Task", "a", huge)])
    assert await store.read("Task", "a") is None
    assert await store.read("Task", "b") is None
    assert await leftovers(store) == (0, 0)


async def test_obsolete_entries_are_swept(store: MongoStore) -> None:
    [r1] = await store.commit([Write("Task", "a", task())])
    await store.commit([Write("Task", "a", task("p2"))])
    await store.commit([Write("Task", "a", None)])
    first = [d async for d in store._docs.find({"_id": {"$in": mongo._entry_ids("Task/a", 1, 10)}})]
    second = [d async for d in store._docs.find({"_id": {"$in": mongo._entry_ids("Task/a", 2, 10)}})]
    assert first == [] and second == []
    assert r1.stored.version == 1


# --- search ---------------------------------------------------------------------------------------------

async def _seed(store: Any) -> None:
    rows = [
        ("t1", task("p1", "requested", code={"coding": [{"system": "http://snomed.info/sct", "code": "111"}]},
                    authoredOn="2024-01-10T10:00:00Z", owner={"reference": "Practitioner/dr1"},
                    identifier=[{"system": "urn:ids", "value": "A-1"}, {"value": "free"}],
                    businessStatus={"text": "x"}, priority="routine")),
        ("t2", task("p1", "completed", code={"coding": [{"system": "http://loinc.org", "code": "111"}]},
                    authoredOn="2024-02-10", owner={"reference": f"{BASE}/Practitioner/dr2"},
                    priority="urgent")),
        ("t3", task("p2", "requested", code={"coding": [{"code": "222"}]}, authoredOn="2024-03",
                    executionPeriod={"start": "2024-03-01", "end": "2024-03-31"},
                    basedOn=[{"reference": "RequestGroup/rg1"}, {"reference": "CarePlan/cp1"}])),
        ("t4", task("p3", "cancelled", authoredOn="2023", **{"for": {"reference": "Group/g1"}},
                    executionPeriod={"start": "2023-06-01"})),
        ("t5", task("p2", "ready", authoredOn="2024-03-15T08:30:00+02:00", priority="routine",
                    owner={"reference": "Organization/o1"}, lastModified="2024-04-01T00:00:00Z")),
    ]
    for i, (rid, body) in enumerate(rows):
        await store.commit([Write("Task", rid, body)], now=at(i))
    await store.commit([Write("Task", "t6", task("p1"))], now=at(9))
    await store.commit([Write("Task", "t6", None)], now=at(10))  # deleted: never in results
    pds = [("pd1", "1.0.0", "Patient discharge follow-up", "PatientDischarge"),
           ("pd2", "2.0.0", "Ärztliche Nachsorge", "Nachsorge"),
           ("pd3", "1.0.0", "Discharge call", "Call")]
    for i, (rid, version, title, name) in enumerate(pds):
        url = "http://ex.org/pd/call" if rid == "pd3" else "http://ex.org/pd/discharge"
        await store.commit([Write("PlanDefinition", rid, {
            "resourceType": "PlanDefinition", "status": "active", "url": url, "version": version,
            "name": name, "title": title})], now=at(20 + i))
    await store.commit([Write("RequestGroup", "rg1", {
        "resourceType": "RequestGroup", "status": "active", "intent": "plan",
        "instantiatesCanonical": ["http://ex.org/pd/discharge|1.0.0"],
        "subject": {"reference": "Patient/p1"}})],
        now=at(30))


SEARCHES: list[tuple[str, list[tuple[str, str]], list[str]]] = [
    ("Task", [("status", "requested")], ["t3", "t1"]),
    ("Task", [("status", "requested,completed")], ["t3", "t2", "t1"]),
    ("Task", [("status:not", "requested")], ["t5", "t4", "t2"]),
    ("Task", [("status:not", "requested,ready")], ["t4", "t2"]),
    ("Task", [("code", "111")], ["t2", "t1"]),
    ("Task", [("code", "http://snomed.info/sct|111")], ["t1"]),
    ("Task", [("code", "|222")], ["t3"]),
    ("Task", [("code", "|111")], []),
    ("Task", [("code", "http://loinc.org|")], ["t2"]),
    ("Task", [("code:missing", "true")], ["t5", "t4"]),
    ("Task", [("code:missing", "false")], ["t3", "t2", "t1"]),
    ("Task", [("identifier", "urn:ids|A-1")], ["t1"]),
    ("Task", [("identifier", "free")], ["t1"]),
    ("Task", [("identifier", "|free")], ["t1"]),
    ("Task", [("patient", "p1")], ["t2", "t1"]),
    ("Task", [("patient", "Patient/p2")], ["t5", "t3"]),
    ("Task", [("subject", "p1")], ["t2", "t1"]),  # ref_id: subject has many target types
    ("Task", [("subject:Group", "g1")], ["t4"]),
    ("Task", [("patient", "g1")], []),
    ("Task", [("owner", "dr2")], ["t2"]),
    ("Task", [("owner", f"{BASE}/Practitioner/dr2")], ["t2"]),
    ("Task", [("owner", "Organization/o1,Practitioner/dr1")], ["t5", "t1"]),
    ("Task", [("based-on", "CarePlan/cp1")], ["t3"]),
    ("Task", [("patient", "p1"), ("status", "completed")], ["t2"]),
    ("Task", [("patient", "p1,p2"), ("status", "requested"), ("priority", "routine")], ["t1"]),
    ("Task", [("patient", "p2"), ("status:not", "ready")], ["t3"]),
    ("Task", [("patient", "p2"), ("code:missing", "true")], ["t5"]),
    ("Task", [("authored-on", "2024-01-10")], ["t1"]),
    ("Task", [("authored-on", "2024")], ["t5", "t3", "t2", "t1"]),
    ("Task", [("authored-on", "ge2024-02-01")], ["t5", "t3", "t2"]),
    ("Task", [("authored-on", "gt2024-02-10")], ["t5", "t3"]),
    ("Task", [("authored-on", "lt2024-02-10")], ["t4", "t1"]),
    ("Task", [("authored-on", "le2024-02-10")], ["t4", "t2", "t1"]),
    ("Task", [("authored-on", "ne2024")], ["t4"]),
    ("Task", [("authored-on", "ne2024,2023")], ["t4"]),
    ("Task", [("authored-on", "sa2024-02-28")], ["t5", "t3"]),
    ("Task", [("authored-on", "eb2024-01-01")], ["t4"]),
    ("Task", [("authored-on", "2024-03-15")], ["t5"]),
    ("Task", [("authored-on", "ge2024-01-01"), ("authored-on", "lt2024-03-01")], ["t2", "t1"]),
    ("Task", [("period", "2024-03-15")], []),
    ("Task", [("period", "ge2024-03-15"), ("period", "le2024-03-15")], ["t4", "t3"]),
    ("Task", [("period", "sa2024-02-28")], ["t3"]),
    ("Task", [("period", "ge2030-01-01")], ["t4"]),  # open-ended period
    ("Task", [("period:missing", "true")], ["t5", "t2", "t1"]),
    ("Task", [("modified", "2024-04")], ["t5"]),
    ("Task", [("_lastUpdated", "ge2026-01-01T00:02:00Z")], ["t5", "t4", "t3"]),
    ("Task", [("_lastUpdated", "lt2026-01-01T00:01:00Z")], ["t1"]),
    ("Task", [("_lastUpdated", "2026-01-01T00:01:00.000Z")], ["t2"]),
    ("Task", [("_lastUpdated", "ne2026-01-01T00:01:00.000Z")], ["t5", "t4", "t3", "t1"]),
    ("Task", [("_lastUpdated", "lt2026-01-01T00:01:00Z,ge2026-01-01T00:04:00Z")], ["t5", "t1"]),
    ("Task", [("_lastUpdated", "ge2026-01-01T00:01:00Z"), ("_lastUpdated", "lt2026-01-01T00:03:00Z")],
     ["t3", "t2"]),
    ("Task", [("_lastUpdated", "gt2026-01-01T00:01:00Z"), ("status", "requested")], ["t3"]),
    ("Task", [("_id", "t1,t3,t6,nope")], ["t3", "t1"]),
    ("Task", [("_id", "t1,t3"), ("status", "requested"), ("_lastUpdated", "ge2026-01-01T00:02:00Z")], ["t3"]),
    ("Task", [("_id", "t2,t5"), ("_lastUpdated", "ge2026-01-01T00:02:00Z")], ["t5"]),
    ("Task", [], ["t5", "t4", "t3", "t2", "t1"]),
    ("PlanDefinition", [("title", "patient")], ["pd1"]),
    ("PlanDefinition", [("title", "arztl")], ["pd2"]),
    ("PlanDefinition", [("title", "DISCH")], ["pd3"]),  # prefix: "Patient discharge" starts with "patient"
    ("PlanDefinition", [("title:contains", "disch")], ["pd3", "pd1"]),
    ("PlanDefinition", [("title:contains", "-up")], ["pd1"]),
    ("PlanDefinition", [("title:exact", "patient discharge follow-up")], []),
    ("PlanDefinition", [("title:exact", "Patient discharge follow-up")], ["pd1"]),
    ("PlanDefinition", [("url", "http://ex.org/pd/discharge")], ["pd2", "pd1"]),
    ("PlanDefinition", [("url", "http://ex.org/pd")], []),
    ("PlanDefinition", [("version", "1.0.0")], ["pd3", "pd1"]),
    ("PlanDefinition", [("url", "http://ex.org/pd/discharge"), ("version", "2.0.0")], ["pd2"]),
    ("RequestGroup", [("instantiates-canonical", "http://ex.org/pd/discharge|1.0.0")], ["rg1"]),
    ("RequestGroup", [("instantiates-canonical", "http://ex.org/pd/discharge")], ["rg1"]),
    ("RequestGroup", [("subject", "Patient/p1")], ["rg1"]),
    ("Patient", [], []),
]

SORTS: list[tuple[list[tuple[str, str]], list[str]]] = [
    ([("_sort", "authored-on")], ["t4", "t1", "t2", "t3", "t5"]),
    ([("_sort", "-authored-on")], ["t5", "t3", "t2", "t1", "t4"]),
    ([("_sort", "_id")], ["t1", "t2", "t3", "t4", "t5"]),
    ([("_sort", "-_id")], ["t5", "t4", "t3", "t2", "t1"]),
    ([("_sort", "_lastUpdated")], ["t1", "t2", "t3", "t4", "t5"]),
    ([("_sort", "-_lastUpdated")], ["t5", "t4", "t3", "t2", "t1"]),
    ([("_sort", "status,_id")], ["t4", "t2", "t5", "t1", "t3"]),
    ([("_sort", "-status,-_id")], ["t3", "t1", "t5", "t2", "t4"]),
    ([("_sort", "priority")], ["t1", "t5", "t2", "t3", "t4"]),  # missing sorts last, then id
    ([("_sort", "-priority")], ["t2", "t1", "t5", "t3", "t4"]),
    ([("_sort", "code,-_lastUpdated")], ["t2", "t1", "t3", "t5", "t4"]),
    ([("_sort", "-period")], ["t3", "t4", "t1", "t2", "t5"]),
    ([("_sort", "owner"), ("status", "requested,ready,completed")], ["t5", "t1", "t2", "t3"]),
    ([("patient", "p1,p2"), ("_sort", "-_lastUpdated")], ["t5", "t3", "t2", "t1"]),
]


async def test_search_predicates(store: MongoStore) -> None:
    await _seed(store)
    for type_, pairs, expected in SEARCHES:
        page = await store.search(q(type_, *pairs))
        assert [r.id for r in page.resources] == expected, (type_, pairs)
        assert page.total == len(expected), (type_, pairs)
        assert all(not r.deleted and r.resource is not None and r.type == type_ for r in page.resources)


async def test_search_sort(store: MongoStore) -> None:
    await _seed(store)
    for pairs, expected in SORTS:
        assert await ids(store, "Task", *pairs) == expected, pairs


async def test_search_paging_total_and_summary(store: MongoStore) -> None:
    await _seed(store)
    page = await store.search(q("Task", ("_sort", "_id"), ("_count", "2"), ("_offset", "1")))
    assert page.total == 5 and [r.id for r in page.resources] == ["t2", "t3"]
    page = await store.search(q("Task", ("status", "requested,ready"), ("_sort", "-_id"), ("_count", "2"),
                                ("_offset", "1")))
    assert page.total == 3 and [r.id for r in page.resources] == ["t3", "t1"]
    page = await store.search(q("Task", ("_count", "2"), ("_offset", "4")))
    assert page.total == 5 and [r.id for r in page.resources] == ["t1"]
    page = await store.search(q("Task", ("_count", "2"), ("_offset", "9")))
    assert page.total == 5 and page.resources == []
    counted = await store.search(q("Task", ("status", "requested"), ("_summary", "count")))
    assert counted.total == 2 and counted.resources == []
    counted = await store.search(q("Task", ("_summary", "count")))
    assert counted.total == 5 and counted.resources == []
    zero = await store.search(q("Task", ("patient", "p1"), ("_count", "0")))
    assert zero.total == 2 and zero.resources == []


async def test_search_many_candidates_and_reindexing(store: MongoStore) -> None:
    n = mongo.SMALL + 50
    await store.commit([Write("Task", f"x{i:03}", task(f"q{i % 3}", "ready" if i % 2 else "requested"))
                        for i in range(n)], now=T0)
    page = await store.search(q("Task", ("status", "ready"), ("_sort", "-_id"), ("_count", "5")))
    assert page.total == n // 2
    assert [r.id for r in page.resources] == [f"x{i:03}" for i in (149, 147, 145, 143, 141)]
    assert all(r.resource is not None for r in page.resources)
    page = await store.search(q("Task", ("patient", "q1"), ("status:not", "ready"), ("_count", "500")))
    assert page.total == len([i for i in range(n) if i % 3 == 1 and i % 2 == 0])
    await store.commit([Write("Task", "x001", task("q9", "completed"))])
    assert await ids(store, "Task", ("patient", "q9"), ("status", "completed")) == ["x001"]
    assert "x001" not in await ids(store, "Task", ("status", "ready"), ("_count", "500"))


async def test_conditional_create(store: MongoStore) -> None:
    ident = {"identifier": [{"system": "urn:k", "value": "1"}]}
    cond = q("Task", ("identifier", "urn:k|1"))
    def create(id_: str) -> Write:
        return Write("Task", id_, task(**ident), expect=MUST_NOT_EXIST, if_none_exist=cond)

    [first] = await store.commit([create("a")])
    assert first.created and not first.existed
    [second] = await store.commit([create("b")])
    assert second.existed and not second.created and second.stored == first.stored
    assert await store.read("Task", "b") is None
    await store.commit([Write("Task", "c", task(**ident))])
    with pytest.raises(PreconditionFailed, match="matched 2"):
        await store.commit([Write("Task", "d", task(**ident), if_none_exist=cond)])
    assert await store.read("Task", "d") is None


# --- records --------------------------------------------------------------------------------------------

async def test_records_add_get_save(store: MongoStore) -> None:
    data = {"body": "x", "n": [1, 2.5, None], "nested": {"$odd.key": "ü"}}
    rec = Record("inbox", "k|1", data=data, group="hapi|eu", due=5)
    assert await store.add_record(rec, now=100)
    assert (rec.rev, rec.created, rec.updated) == (1, 100.0, 100.0)
    assert not await store.add_record(Record("inbox", "k|1", data={"other": True}), now=101.0)
    got = await store.get_record("inbox", "k|1")
    assert got == Record("inbox", "k|1", "pending", data, "hapi|eu", 5.0, 0, None, 0.0, 100.0, 100.0, 1)
    assert await store.get_record("inbox", "k") is None
    assert await store.get_record("event", "k|1") is None
    assert got is not None
    got.state, got.attempts, got.data, got.created = "done", 2, {"ok": True}, 999.0
    assert await store.save_record(got, now=110.0)
    assert (got.rev, got.updated) == (2, 110.0)
    again = await store.get_record("inbox", "k|1")
    assert again is not None
    assert (again.state, again.attempts, again.data, again.rev, again.created, again.updated) == (
        "done", 2, {"ok": True}, 2, 100.0, 110.0)  # created is never rewritten
    assert again.lease_owner is None and again.lease_until == 0.0
    stale = Record("inbox", "k|1", rev=1)
    assert not await store.save_record(stale)
    assert not await store.save_record(Record("inbox", "absent", rev=1))


async def test_records_claim(store: MongoStore) -> None:
    for i, due in enumerate([10.0, 5.0, 50.0, 1.0]):
        await store.add_record(Record("timer", f"t{i}", due=due), now=0.0)
    await store.add_record(Record("timer", "retry", state="retrying", due=2.0), now=0.0)
    await store.add_record(Record("timer", "t-done", state="done", due=0.0), now=0.0)
    await store.add_record(Record("other", "o", due=0.0), now=0.0)
    first = await store.claim_records("timer", owner="w1", now=20.0, lease_seconds=30, limit=2)
    assert [(r.key, r.lease_owner, r.lease_until, r.rev, r.updated) for r in first] == [
        ("t3", "w1", 50.0, 2, 20.0), ("t1", "w1", 50.0, 2, 20.0)]
    assert await store.get_record("timer", "t3") == first[0]
    both = await store.claim_records("timer", owner="w2", now=20.0, lease_seconds=30, limit=10,
                                     states=("pending", "retrying"))
    assert [r.key for r in both] == ["retry", "t0"]
    assert await store.claim_records("timer", owner="w2", now=20.0, lease_seconds=30, limit=10) == []
    assert await store.claim_records("timer", owner="w2", now=20.0, lease_seconds=30, limit=0) == []
    later = await store.claim_records("timer", owner="w3", now=60.0, lease_seconds=30, limit=10)
    assert [r.key for r in later] == ["t3", "t1", "t0", "t2"]
    stale = first[0]
    stale.state = "done"
    assert not await store.save_record(stale)


async def test_records_concurrent_claims_never_overlap(store: MongoStore) -> None:
    for i in range(40):
        await store.add_record(Record("outbox", f"o{i:02d}"), now=0.0)
    batches = await asyncio.gather(*(store.claim_records("outbox", owner=f"w{i}", now=1.0, lease_seconds=60,
                                                          limit=7) for i in range(8)))
    keys = [r.key for batch in batches for r in batch]
    assert len(keys) == 40 and len(set(keys)) == 40
    assert all(len(batch) <= 7 for batch in batches)


async def test_records_list_and_count(store: MongoStore) -> None:
    await store.add_record(Record("inbox", "a", group="hapi"), now=1.0)
    await store.add_record(Record("inbox", "b", group="hapi", state="rejected"), now=2.0)
    await store.add_record(Record("inbox", "c", group="medplum|x"), now=3.0)
    await store.add_record(Record("inbox", "d", group="medplum|x"), now=3.0)
    await store.add_record(Record("event", "e", group="hapi"), now=4.0)
    assert [r.key for r in await store.list_records("inbox")] == ["c", "d", "b", "a"]
    assert [r.key for r in await store.list_records("inbox", state="pending")] == ["c", "d", "a"]
    assert [r.key for r in await store.list_records("inbox", group="hapi", limit=1, offset=1)] == ["a"]
    assert [r.key for r in await store.list_records("inbox", state="pending", group="hapi")] == ["a"]
    assert await store.list_records("inbox", limit=0) == []
    assert await store.count_records("inbox") == {("hapi", "pending"): 1, ("hapi", "rejected"): 1,
                                                  ("medplum|x", "pending"): 2}
    assert await store.count_records("nothing") == {}


async def test_planned_conditions_are_rechecked_at_commit(store: MongoStore) -> None:
    ident = {"identifier": [{"system": "urn:k", "value": "1"}]}
    cond = q("Task", ("identifier", "urn:k|1"))
    planned_nothing = Write("Task", "x", task(**ident), expect=MUST_NOT_EXIST, if_none_exist=cond,
                            condition_planned=True, planned_match=None)
    await store.commit([Write("Task", "a", task(**ident))])
    with pytest.raises(Conflict, match="when the transaction was planned"):
        await store.commit([Write("Task", "other", task()), planned_nothing])
    assert await store.read("Task", "other") is None and await store.read("Task", "x") is None
    planned_a = Write("Task", "x", task(**ident), expect=MUST_NOT_EXIST, if_none_exist=cond,
                      condition_planned=True, planned_match="a")
    [other, hit] = await store.commit([Write("Task", "other", task()), planned_a])
    assert other.created and hit.existed and hit.stored.id == "a"
    assert await leftovers(store) == (0, 0)


# --- parity with the SQLite backend -----------------------------------------------------------------------

async def test_search_and_history_match_sqlite(store: MongoStore, tmp_path: Path) -> None:
    lite = SqliteStore(f"sqlite:///{tmp_path}/parity.db", base_url=BASE)
    await lite.open()
    try:
        for s in (store, lite):
            await _seed(s)
            await s.commit([Write("Task", "t2", task("p1", "ready", authoredOn="2024-05"))], now=at(40))
        cases = [(t, pairs) for t, pairs, _ in SEARCHES] + [("Task", pairs) for pairs, _ in SORTS]
        cases += [("Task", [*pairs, ("_count", "2"), ("_offset", "1")]) for _, pairs in cases if _ == "Task"]
        for type_, pairs in cases:
            mine, theirs = await store.search(q(type_, *pairs)), await lite.search(q(type_, *pairs))
            assert mine.total == theirs.total, (type_, pairs)
            assert [(r.id, r.version, r.resource) for r in mine.resources] == [
                (r.id, r.version, r.resource) for r in theirs.resources], (type_, pairs)
        for type_, id_, since in [("Task", None, None), ("Task", "t2", None), ("Task", None, at(3)),
                                  ("Task", "t6", None), ("PlanDefinition", None, None)]:
            for offset, count in [(0, 50), (1, 2)]:
                mine_h = await store.history(type_, id_, since=since, offset=offset, count=count)
                theirs_h = await lite.history(type_, id_, since=since, offset=offset, count=count)
                assert mine_h == theirs_h, (type_, id_, since, offset)
    finally:
        await lite.close()
