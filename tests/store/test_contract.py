"""The Store contract: one suite, run unchanged against SQLite and MongoDB (real wire server)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from fhir_outreach.errors import Conflict, PreconditionFailed
from fhir_outreach.fhir.search import parse_query
from fhir_outreach.store import Store
from fhir_outreach.store.base import MUST_NOT_EXIST, Write
from tests.conftest import BASE, task

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def q(type_: str, *pairs: tuple[str, str]):
    return parse_query(type_, list(pairs), base_url=BASE)


async def ids(store: Store, type_: str, *pairs: tuple[str, str]) -> list[str]:
    page = await store.search(q(type_, *pairs))
    return [r.id for r in page.resources]


async def test_create_read_versions(store: Store) -> None:
    [res] = await store.commit([Write("Task", "a", task(), expect=MUST_NOT_EXIST)], now=T0)
    assert res.created and res.stored.version == 1 and res.stored.method == "create"
    body = res.stored.resource
    assert body is not None
    assert body["id"] == "a" and body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"] == "2026-01-01T00:00:00.000Z"
    got = await store.read("Task", "a")
    assert got is not None and got.version == 1 and got.resource == body and not got.deleted
    assert await store.read("Task", "nope") is None


async def test_update_history_and_vread(store: Store) -> None:
    await store.commit([Write("Task", "a", task())], now=T0)
    [r2] = await store.commit([Write("Task", "a", task(status="in-progress"), expect=1)], now=T0 + timedelta(seconds=1))
    assert r2.stored.version == 2 and not r2.created and r2.stored.method == "update"
    v1 = await store.vread("Task", "a", 1)
    assert v1 is not None and v1.resource is not None and v1.resource["status"] == "requested"
    assert await store.vread("Task", "a", 3) is None
    page = await store.history("Task", "a", since=None, offset=0, count=10)
    assert page.total == 2
    assert [h.version for h in page.entries] == [2, 1]


async def test_stale_expect_is_precondition_failed_and_changes_nothing(store: Store) -> None:
    await store.commit([Write("Task", "a", task())], now=T0)
    await store.commit([Write("Task", "a", task(status="ready"))], now=T0)
    with pytest.raises(PreconditionFailed):
        await store.commit([Write("Task", "a", task(status="failed"), expect=1)])
    cur = await store.read("Task", "a")
    assert cur is not None and cur.version == 2 and cur.resource is not None and cur.resource["status"] == "ready"


async def test_must_not_exist_conflicts_with_live_resource(store: Store) -> None:
    await store.commit([Write("Task", "a", task())])
    with pytest.raises(Conflict):
        await store.commit([Write("Task", "a", task(), expect=MUST_NOT_EXIST)])


async def test_delete_then_recreate_continues_version_numbers(store: Store) -> None:
    await store.commit([Write("Task", "a", task())], now=T0)
    [d] = await store.commit([Write("Task", "a", None)], now=T0 + timedelta(seconds=1))
    assert d.stored.deleted and d.stored.version == 2 and not d.noop
    cur = await store.read("Task", "a")
    assert cur is not None and cur.deleted and cur.resource is None
    assert await ids(store, "Task", ("patient", "p1")) == []
    [again] = await store.commit([Write("Task", "a", None)])
    assert again.noop
    [r] = await store.commit([Write("Task", "a", task(), expect=MUST_NOT_EXIST)], now=T0 + timedelta(seconds=2))
    assert r.created and r.stored.version == 3 and r.stored.method == "create"
    hist = await store.history("Task", "a", since=None, offset=0, count=10)
    assert [(h.version, h.method, h.deleted) for h in hist.entries] == [
        (3, "create", False), (2, "delete", True), (1, "create", False)]


async def test_delete_of_unknown_is_noop(store: Store) -> None:
    [d] = await store.commit([Write("Task", "zz", None)])
    assert d.noop
    assert await store.read("Task", "zz") is None


async def test_multi_write_commit_is_all_or_nothing(store: Store) -> None:
    await store.commit([Write("Task", "c", task())])
    writes = [Write("Task", "a", task()), Write("Task", "b", task()),
              Write("Task", "c", task(status="failed"), expect=7)]
    with pytest.raises(PreconditionFailed):
        await store.commit(writes)
    assert await store.read("Task", "a") is None
    assert await store.read("Task", "b") is None
    c = await store.read("Task", "c")
    assert c is not None and c.version == 1
    results = await store.commit([Write("Task", "a", task()), Write("Task", "b", task(patient="p2"))])
    assert [r.stored.version for r in results] == [1, 1]


async def test_conditional_create(store: Store) -> None:
    ident = {"identifier": [{"system": "urn:k", "value": "1"}]}
    cond = q("Task", ("identifier", "urn:k|1"))
    [first] = await store.commit([Write("Task", "a", task(**ident), expect=MUST_NOT_EXIST, if_none_exist=cond)])
    assert first.created
    [second] = await store.commit([Write("Task", "b", task(**ident), expect=MUST_NOT_EXIST, if_none_exist=cond)])
    assert second.existed and second.stored.id == "a"
    assert await store.read("Task", "b") is None
    await store.commit([Write("Task", "c", task(**ident))])
    with pytest.raises(PreconditionFailed):
        await store.commit([Write("Task", "d", task(**ident), if_none_exist=cond)])


async def test_concurrent_writers_one_wins(store: Store) -> None:
    await store.commit([Write("Task", "a", task())])
    outcomes = await asyncio.gather(
        *(store.commit([Write("Task", "a", task(status="ready"), expect=1)]) for _ in range(5)),
        return_exceptions=True)
    wins = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(wins) == 1
    assert all(isinstance(o, PreconditionFailed) for o in outcomes if isinstance(o, BaseException))
    cur = await store.read("Task", "a")
    assert cur is not None and cur.version == 2


async def _seed(store: Store) -> None:
    rows = [
        ("t1", task("p1", "requested", code={"coding": [{"system": "http://snomed.info/sct", "code": "111"}]},
                    authoredOn="2024-01-10T10:00:00Z", owner={"reference": "Practitioner/dr1"},
                    identifier=[{"system": "urn:ids", "value": "A-1"}], businessStatus={"text": "x"})),
        ("t2", task("p1", "completed", code={"coding": [{"system": "http://loinc.org", "code": "111"}]},
                    authoredOn="2024-02-10", owner={"reference": f"{BASE}/Practitioner/dr2"})),
        ("t3", task("p2", "requested", code={"coding": [{"code": "222"}]}, authoredOn="2024-03",
                    executionPeriod={"start": "2024-03-01", "end": "2024-03-31"})),
        ("t4", task("p3", "cancelled", authoredOn="2023", **{"for": {"reference": "Group/g1"}})),
    ]
    for i, (rid, body) in enumerate(rows):
        await store.commit([Write("Task", rid, body)], now=T0 + timedelta(minutes=i))


async def test_search_tokens(store: Store) -> None:
    await _seed(store)
    assert sorted(await ids(store, "Task", ("status", "requested"))) == ["t1", "t3"]
    assert sorted(await ids(store, "Task", ("status", "requested,completed"))) == ["t1", "t2", "t3"]
    assert sorted(await ids(store, "Task", ("code", "111"))) == ["t1", "t2"]
    assert await ids(store, "Task", ("code", "http://snomed.info/sct|111")) == ["t1"]
    assert await ids(store, "Task", ("code", "|222")) == ["t3"]
    assert sorted(await ids(store, "Task", ("code", "http://loinc.org|"))) == ["t2"]
    assert sorted(await ids(store, "Task", ("status:not", "requested"))) == ["t2", "t4"]
    assert await ids(store, "Task", ("identifier", "urn:ids|A-1")) == ["t1"]
    assert sorted(await ids(store, "Task", ("code:missing", "true"))) == ["t4"]
    assert sorted(await ids(store, "Task", ("code:missing", "false"))) == ["t1", "t2", "t3"]


async def test_search_references(store: Store) -> None:
    await _seed(store)
    assert sorted(await ids(store, "Task", ("patient", "p1"))) == ["t1", "t2"]
    assert sorted(await ids(store, "Task", ("patient", "Patient/p1"))) == ["t1", "t2"]
    assert sorted(await ids(store, "Task", ("subject", "Patient/p2"))) == ["t3"]
    assert sorted(await ids(store, "Task", ("subject:Group", "g1"))) == ["t4"]
    assert await ids(store, "Task", ("patient", "g1")) == []
    assert sorted(await ids(store, "Task", ("owner", "dr2"))) == ["t2"]  # absolute local URL was normalised
    assert await ids(store, "Task", ("owner", f"{BASE}/Practitioner/dr2")) == ["t2"]
    assert sorted(await ids(store, "Task", ("patient", "p1"), ("status", "completed"))) == ["t2"]


async def test_search_dates(store: Store) -> None:
    await _seed(store)
    assert await ids(store, "Task", ("authored-on", "2024-01-10")) == ["t1"]
    assert sorted(await ids(store, "Task", ("authored-on", "2024"))) == ["t1", "t2", "t3"]
    assert sorted(await ids(store, "Task", ("authored-on", "ge2024-02-01"))) == ["t2", "t3"]
    assert sorted(await ids(store, "Task", ("authored-on", "lt2024-02-10"))) == ["t1", "t4"]
    assert sorted(await ids(store, "Task", ("authored-on", "le2024-02-10"))) == ["t1", "t2", "t4"]
    assert sorted(await ids(store, "Task", ("authored-on", "gt2024-02-10"))) == ["t3"]
    assert sorted(await ids(store, "Task", ("authored-on", "ne2024"))) == ["t4"]
    assert sorted(await ids(store, "Task", ("authored-on", "ge2024-01-01"), ("authored-on", "lt2024-03-01"))) == [
        "t1", "t2"]
    assert await ids(store, "Task", ("period", "2024-03-15")) == []  # a day is not contained... (eq)
    assert await ids(store, "Task", ("period", "ge2024-03-15"), ("period", "le2024-03-15")) == ["t3"]
    assert await ids(store, "Task", ("period", "sa2024-02-28")) == ["t3"]
    assert sorted(await ids(store, "Task", ("_lastUpdated", "ge2026-01-01T00:02:00Z"))) == ["t3", "t4"]
    assert sorted(await ids(store, "Task", ("_lastUpdated", "lt2026-01-01T00:01:00Z"))) == ["t1"]


async def test_search_strings_and_uris(store: Store) -> None:
    pd = {"resourceType": "PlanDefinition", "status": "active", "url": "http://ex.org/pd/discharge",
          "version": "1.0.0", "name": "PatientDischarge", "title": "Patient discharge follow-up"}
    await store.commit([Write("PlanDefinition", "pd1", pd)])
    await store.commit([Write("PlanDefinition", "pd2", {**pd, "version": "2.0.0", "title": "Ärztliche Nachsorge"})])
    assert sorted(await ids(store, "PlanDefinition", ("title", "patient"))) == ["pd1"]
    assert sorted(await ids(store, "PlanDefinition", ("title", "arztl"))) == ["pd2"]  # accent- and case-insensitive
    assert sorted(await ids(store, "PlanDefinition", ("title:contains", "follow"))) == ["pd1"]
    assert await ids(store, "PlanDefinition", ("title:exact", "patient discharge follow-up")) == []
    assert await ids(store, "PlanDefinition", ("title:exact", "Patient discharge follow-up")) == ["pd1"]
    assert sorted(await ids(store, "PlanDefinition", ("url", "http://ex.org/pd/discharge"))) == ["pd1", "pd2"]
    assert await ids(store, "PlanDefinition", ("url", "http://ex.org/pd")) == []
    assert await ids(store, "PlanDefinition", ("version", "2.0.0")) == ["pd2"]
    rg = {"resourceType": "RequestGroup", "status": "active", "intent": "plan",
          "instantiatesCanonical": ["http://ex.org/pd/discharge|1.0.0"], "subject": {"reference": "Patient/p1"}}
    await store.commit([Write("RequestGroup", "rg1", rg)])
    assert await ids(store, "RequestGroup", ("instantiates-canonical", "http://ex.org/pd/discharge|1.0.0")) == ["rg1"]
    assert await ids(store, "RequestGroup", ("instantiates-canonical", "http://ex.org/pd/discharge")) == ["rg1"]


async def test_search_id_sort_paging_total(store: Store) -> None:
    await _seed(store)
    assert sorted(await ids(store, "Task", ("_id", "t1,t3"))) == ["t1", "t3"]
    assert await ids(store, "Task", ("_sort", "authored-on")) == ["t4", "t1", "t2", "t3"]
    assert await ids(store, "Task", ("_sort", "-authored-on")) == ["t3", "t2", "t1", "t4"]
    assert await ids(store, "Task", ("_sort", "_id")) == ["t1", "t2", "t3", "t4"]
    assert await ids(store, "Task", ("_sort", "-_lastUpdated")) == ["t4", "t3", "t2", "t1"]
    assert await ids(store, "Task") == ["t4", "t3", "t2", "t1"]  # default: newest first
    assert await ids(store, "Task", ("_sort", "status,_id")) == ["t4", "t2", "t1", "t3"]
    page = await store.search(q("Task", ("_sort", "_id"), ("_count", "2"), ("_offset", "1")))
    assert page.total == 4 and [r.id for r in page.resources] == ["t2", "t3"]
    counted = await store.search(q("Task", ("status", "requested"), ("_summary", "count")))
    assert counted.total == 2


async def test_history_of_type_since_and_paging(store: Store) -> None:
    await _seed(store)
    await store.commit([Write("Task", "t1", task(status="ready"))], now=T0 + timedelta(hours=1))
    page = await store.history("Task", None, since=None, offset=0, count=3)
    assert page.total == 5 and [(h.id, h.version) for h in page.entries] == [("t1", 2), ("t4", 1), ("t3", 1)]
    nxt = await store.history("Task", None, since=None, offset=3, count=3)
    assert [(h.id, h.version) for h in nxt.entries] == [("t2", 1), ("t1", 1)]
    since = await store.history("Task", None, since=T0 + timedelta(minutes=2), offset=0, count=10)
    assert sorted((h.id, h.version) for h in since.entries) == [("t1", 2), ("t3", 1), ("t4", 1)]


async def test_read_many(store: Store) -> None:
    await _seed(store)
    await store.commit([Write("Task", "t2", None)])
    got = await store.read_many([("Task", "t1"), ("Task", "t2"), ("Task", "nope"), ("Task", "t1")])
    assert [r.id for r in got] == ["t1"]


async def test_deleted_resources_leave_search(store: Store) -> None:
    await _seed(store)
    await store.commit([Write("Task", "t1", None)])
    assert await ids(store, "Task", ("patient", "p1")) == ["t2"]
    assert (await store.search(q("Task"))).total == 3


async def test_update_reindexes(store: Store) -> None:
    await store.commit([Write("Task", "a", task("p1", "requested"))])
    await store.commit([Write("Task", "a", task("p2", "completed"))])
    assert await ids(store, "Task", ("patient", "p1")) == []
    assert await ids(store, "Task", ("status", "requested")) == []
    assert await ids(store, "Task", ("patient", "p2"), ("status", "completed")) == ["a"]


# --- records -------------------------------------------------------------------------------------

async def test_records_add_is_idempotent_and_get_roundtrips(store: Store) -> None:
    from fhir_outreach.store.base import Record

    rec = Record("inbox", "k1", data={"body": "x", "n": [1, 2]}, group="hapi", due=5.0)
    assert await store.add_record(rec, now=100.0)
    assert rec.rev == 1 and rec.created == 100.0
    assert not await store.add_record(Record("inbox", "k1", data={"other": True}), now=101.0)
    got = await store.get_record("inbox", "k1")
    assert got is not None
    assert (got.data, got.group, got.state, got.due, got.rev, got.created) == (
        {"body": "x", "n": [1, 2]}, "hapi", "pending", 5.0, 1, 100.0)
    assert await store.get_record("inbox", "nope") is None
    assert await store.get_record("event", "k1") is None  # kinds are separate namespaces


async def test_records_save_is_compare_and_set(store: Store) -> None:
    from fhir_outreach.store.base import Record

    await store.add_record(Record("event", "e1"), now=1.0)
    a = await store.get_record("event", "e1")
    b = await store.get_record("event", "e1")
    assert a is not None and b is not None
    a.state, a.data = "done", {"by": "a"}
    assert await store.save_record(a, now=2.0)
    assert a.rev == 2
    b.state = "failed"
    assert not await store.save_record(b, now=3.0)  # lost the race
    cur = await store.get_record("event", "e1")
    assert cur is not None and (cur.state, cur.data, cur.rev, cur.updated) == ("done", {"by": "a"}, 2, 2.0)


async def test_records_claim_leases_due_items_once(store: Store) -> None:
    from fhir_outreach.store.base import Record

    for i, due in enumerate([10.0, 5.0, 50.0, 1.0]):
        await store.add_record(Record("timer", f"t{i}", due=due), now=0.0)
    done = Record("timer", "t-done", state="done", due=0.0)
    await store.add_record(done, now=0.0)
    first = await store.claim_records("timer", owner="w1", now=20.0, lease_seconds=30, limit=2)
    assert [r.key for r in first] == ["t3", "t1"]  # oldest due first
    assert all(r.lease_owner == "w1" and r.lease_until == 50.0 for r in first)
    second = await store.claim_records("timer", owner="w2", now=20.0, lease_seconds=30, limit=10)
    assert [r.key for r in second] == ["t0"]  # t2 not due, t3/t1 leased, t-done not pending
    # an expired lease can be claimed by anyone; the record's rev moved on so w1's stale save fails
    third = await store.claim_records("timer", owner="w3", now=60.0, lease_seconds=30, limit=10)
    assert sorted(r.key for r in third) == ["t0", "t1", "t2", "t3"]
    stale = first[0]
    stale.state = "done"
    assert not await store.save_record(stale)


async def test_records_concurrent_claims_never_overlap(store: Store) -> None:
    from fhir_outreach.store.base import Record

    for i in range(30):
        await store.add_record(Record("outbox", f"o{i:02d}"), now=0.0)
    batches = await asyncio.gather(*(store.claim_records("outbox", owner=f"w{i}", now=1.0, lease_seconds=60,
                                                          limit=7) for i in range(6)))
    keys = [r.key for batch in batches for r in batch]
    assert len(keys) == 30 and len(set(keys)) == 30


async def test_records_list_and_count(store: Store) -> None:
    from fhir_outreach.store.base import Record

    await store.add_record(Record("inbox", "a", group="hapi"), now=1.0)
    await store.add_record(Record("inbox", "b", group="hapi", state="rejected"), now=2.0)
    await store.add_record(Record("inbox", "c", group="medplum"), now=3.0)
    assert [r.key for r in await store.list_records("inbox")] == ["c", "b", "a"]
    assert [r.key for r in await store.list_records("inbox", state="pending")] == ["c", "a"]
    assert [r.key for r in await store.list_records("inbox", group="hapi", limit=1, offset=1)] == ["a"]
    assert await store.count_records("inbox") == {("hapi", "pending"): 1, ("hapi", "rejected"): 1,
                                                  ("medplum", "pending"): 1}


async def test_records_concurrent_adds_of_one_key_insert_once(store: Store) -> None:
    from fhir_outreach.store.base import Record

    results = await asyncio.gather(*(store.add_record(Record("event", "same", data={"n": i})) for i in range(12)),
                                   *(store.add_record(Record("event", f"other-{i}")) for i in range(12)))
    assert results[:12].count(True) == 1 and all(results[12:])
    got = await store.get_record("event", "same")
    assert got is not None and got.data == {"n": results[:12].index(True)}
