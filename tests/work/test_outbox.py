"""The write-back outbox against a real FHIR server (sekmet-fhir, started here) on both real stores.

Resources are written to the local store first, as the journey engine does, and their stored versions are
enqueued. Every check on the remote side is a search on sekmet: each resource exists there exactly once
with references rewritten to the ids sekmet assigned, whatever crashed, repeated or failed in between.
Time is a manual clock, so backoff and deferral are stepped, not waited for.

sekmet quirk: RequestGroup has no ``identifier`` search parameter there (it is not even listed in the
CapabilityStatement, yet it is stored), and a conditional create on an unknown parameter is a 400. The
outbox reads the CapabilityStatement and keys such creates on its write-back ``_tag`` instead.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from fhir_outreach.fhir.client import SourceClients, SourceError, SourceUnavailable
from fhir_outreach.intake.processor import Backoff
from fhir_outreach.sources import SourceConfig
from fhir_outreach.store import Store, Write
from fhir_outreach.store.base import Record
from fhir_outreach.work.clock import ManualClock
from fhir_outreach.work.outbox import (
    DEFER_SECONDS,
    OUTBOX,
    REMOTE,
    WRITEBACK_TAG,
    Outbox,
    Undeliverable,
    enqueue,
    retryable,
)
from tests.servers import Sekmet, free_port

pytestmark = pytest.mark.slow
IDENT = "http://fhir-outreach.org/identifier/outreach"
SOURCE = "sekmet"


@pytest.fixture(scope="module")
def sekmet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sekmet]:
    server = Sekmet(tmp_path_factory.mktemp("sekmet-outbox"))
    yield server
    server.stop()


def clients(base_url: str) -> SourceClients:
    return SourceClients([SourceConfig(name=SOURCE, base_url=base_url, kind="sekmet", timeout_seconds=5)])


@pytest.fixture
async def sources(sekmet: Sekmet) -> AsyncIterator[SourceClients]:
    s = clients(sekmet.base)
    yield s
    await s.aclose()


@pytest.fixture
async def remote(sekmet: Sekmet) -> AsyncIterator[httpx.AsyncClient]:
    """Our own view of sekmet, for checks."""
    async with httpx.AsyncClient(base_url=sekmet.base, timeout=30) as c:
        yield c


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(time.time())


@pytest.fixture
def outbox(store: Store, sources: SourceClients, clock: ManualClock) -> Outbox:
    return Outbox(store, sources, owner="test-worker", clock=clock)


# --- helpers -----------------------------------------------------------------------------------------


def uid() -> str:
    return uuid.uuid4().hex[:16]


def run_group(run: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "RequestGroup", "id": f"rg-{run}", "identifier": [{"system": IDENT, "value": run}],
            "status": "active", "intent": "plan", "subject": {"reference": "Patient/p1"}, **extra}


def communication(run: str, step: str = "s1", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Communication", "id": f"c-{run}-{step}",
            "identifier": [{"system": IDENT, "value": f"{run}/{step}/0"}], "status": "preparation",
            "basedOn": [{"reference": f"RequestGroup/rg-{run}"}], "subject": {"reference": "Patient/p1"}, **extra}


def provenance(run: str, target: str) -> dict[str, Any]:
    return {"resourceType": "Provenance", "id": f"pv-{run}", "target": [{"reference": target}],
            "recorded": "2026-11-22T00:00:00Z", "agent": [{"who": {"display": "fhir-outreach"}}],
            "entity": [{"role": "source", "what": {"reference": f"RequestGroup/rg-{run}"}}]}


async def stored(store: Store, resource: dict[str, Any], expect: int | None = None) -> dict[str, Any]:
    """Write ``resource`` to the local store (as the engine does) and return the stored version."""
    [result] = await store.commit([Write(resource["resourceType"], resource["id"], resource, expect=expect)])
    assert result.stored.resource is not None
    return result.stored.resource


async def drain(outbox: Outbox, clock: ManualClock, rounds: int = 10) -> None:
    """Run the outbox until no item is pending, stepping the clock past deferrals."""
    for _ in range(rounds):
        await outbox.run_once()
        if not await outbox.store.list_records(OUTBOX, state="pending"):
            return
        clock.advance(DEFER_SECONDS + 1)
    raise AssertionError("the outbox did not settle")


async def item(store: Store, resource: dict[str, Any]) -> Record:
    key = f"{SOURCE}|{resource['resourceType']}/{resource['id']}|v{resource['meta']['versionId']}"
    rec = await store.get_record(OUTBOX, key)
    assert rec is not None, key
    return rec


async def mapped(store: Store, resource: dict[str, Any]) -> str:
    rec = await store.get_record(REMOTE, f"{SOURCE}|{resource['resourceType']}/{resource['id']}")
    assert rec is not None and rec.data["remote"], rec
    return str(rec.data["remote"])


async def search(remote: httpx.AsyncClient, type_: str, **params: str) -> list[dict[str, Any]]:
    resp = await remote.get(f"/{type_}", params=params)
    assert resp.status_code == 200, resp.text
    return [e["resource"] for e in resp.json().get("entry") or [] if e.get("search", {}).get("mode") == "match"]


async def on_sekmet(remote: httpx.AsyncClient, resource: dict[str, Any]) -> list[dict[str, Any]]:
    """Copies of one of our resources on sekmet, found the way a clinical app would."""
    type_ = resource["resourceType"]
    if type_ == "Provenance":
        return await search(remote, type_, _tag=f"{WRITEBACK_TAG}|{type_}/{resource['id']}")
    if type_ == "RequestGroup":  # no identifier search on sekmet: our key tag, then check the identifier
        found = await search(remote, type_, _tag=f"{WRITEBACK_TAG}|{type_}/{resource['id']}")
        assert all(r["identifier"] == resource["identifier"] for r in found)
        return found
    ident = resource["identifier"][0]
    return await search(remote, type_, identifier=f"{ident['system']}|{ident['value']}")


async def one_on_sekmet(remote: httpx.AsyncClient, resource: dict[str, Any]) -> dict[str, Any]:
    found = await on_sekmet(remote, resource)
    assert len(found) == 1, found
    return found[0]


# --- tests -------------------------------------------------------------------------------------------


async def test_sekmet_cannot_search_requestgroup_by_identifier(remote: httpx.AsyncClient) -> None:
    """The quirk the tag fallback exists for; if sekmet gains the parameter, identifier is used instead."""
    resp = await remote.post("/RequestGroup", json=run_group(uid()), headers={
        "If-None-Exist": f"identifier={IDENT}|x", "Content-Type": "application/fhir+json"})
    assert resp.status_code == 400 and "identifier" in resp.text


async def test_run_is_created_once_with_references_to_the_source_ids(
        store: Store, outbox: Outbox, clock: ManualClock, remote: httpx.AsyncClient) -> None:
    run = uid()
    rg = await stored(store, run_group(run))
    comm = await stored(store, communication(run))
    prov = await stored(store, provenance(run, f"Communication/{comm['id']}"))
    assert await enqueue(store, SOURCE, [rg, comm, prov], now=clock.now()) == 3

    assert await outbox.run_once() == 3  # in order: each finds what it references already created
    for resource in (rg, comm, prov):
        rec = await item(store, resource)
        assert (rec.state, rec.attempts, rec.data["remote"]) == ("done", 0, await mapped(store, resource))

    remote_rg, remote_comm = await one_on_sekmet(remote, rg), await one_on_sekmet(remote, comm)
    assert f"RequestGroup/{remote_rg['id']}" == await mapped(store, rg) != f"RequestGroup/{rg['id']}"
    assert remote_comm["basedOn"] == [{"reference": f"RequestGroup/{remote_rg['id']}"}]
    assert remote_comm["subject"] == {"reference": "Patient/p1"}  # not ours: left as the source knows it
    assert remote_comm["id"] != comm["id"] and remote_comm["meta"]["versionId"] == "1"
    [remote_prov] = await search(remote, "Provenance", target=f"Communication/{remote_comm['id']}")
    assert remote_prov["entity"][0]["what"] == {"reference": f"RequestGroup/{remote_rg['id']}"}
    assert await one_on_sekmet(remote, prov) == remote_prov


async def test_items_wait_for_what_they_reference_without_spending_attempts(
        store: Store, outbox: Outbox, clock: ManualClock, remote: httpx.AsyncClient) -> None:
    run = uid()
    rg = await stored(store, run_group(run))
    comm = await stored(store, communication(run))
    prov = await stored(store, provenance(run, f"Communication/{comm['id']}"))
    # The worst order: everything waits for what comes after it.
    await enqueue(store, SOURCE, [prov, comm, rg], now=clock.now())

    assert await outbox.run_once() == 3
    p, c, g = await item(store, prov), await item(store, comm), await item(store, rg)
    assert g.state == "done"
    for rec, waits_for in ((p, f"Communication/{comm['id']}"), (c, f"RequestGroup/{rg['id']}")):
        assert (rec.state, rec.attempts) == ("pending", 0)
        assert rec.due == pytest.approx(clock.now() + DEFER_SECONDS, abs=0.01) and waits_for in rec.data["waiting"]
    assert await outbox.run_once() == 0  # not due yet
    assert await on_sekmet(remote, comm) == []

    await drain(outbox, clock)
    remote_comm = await one_on_sekmet(remote, comm)
    assert remote_comm["basedOn"] == [{"reference": await mapped(store, rg)}]
    assert (await one_on_sekmet(remote, prov))["target"] == [{"reference": await mapped(store, comm)}]
    assert all(r.attempts == 0 and r.state == "done" for r in [await item(store, x) for x in (rg, comm, prov)])


async def test_run_listing_its_communication_is_created_then_completed(
        store: Store, outbox: Outbox, clock: ManualClock, remote: httpx.AsyncClient) -> None:
    """RequestGroup.action.resource → Communication and Communication.basedOn → RequestGroup: a cycle. The
    run is created without the pending action reference, then PUT whole once the Communication exists."""
    run = uid()
    rg = await stored(store, run_group(run, action=[{"title": "remind", "resource": {
        "reference": f"Communication/c-{run}-s1"}}]))
    comm = await stored(store, communication(run))
    await enqueue(store, SOURCE, [rg, comm], now=clock.now())

    await outbox.run_once()
    first = await one_on_sekmet(remote, rg)
    assert first["action"] == [{"title": "remind"}]
    assert (await item(store, rg)).state == "pending" and (await item(store, comm)).state == "done"

    await drain(outbox, clock)
    remote_rg = await one_on_sekmet(remote, rg)
    assert remote_rg["id"] == first["id"] and remote_rg["meta"]["versionId"] == "2"
    assert remote_rg["action"] == [{"title": "remind", "resource": {"reference": await mapped(store, comm)}}]
    assert (await one_on_sekmet(remote, comm))["basedOn"] == [{"reference": f"RequestGroup/{first['id']}"}]
    assert (await item(store, rg)).state == "done"


async def test_duplicate_enqueue_is_one_item_and_one_remote_copy(
        store: Store, outbox: Outbox, clock: ManualClock, remote: httpx.AsyncClient) -> None:
    run = uid()
    rg = await stored(store, run_group(run))
    comm = await stored(store, communication(run))
    assert await enqueue(store, SOURCE, [rg, comm], now=clock.now()) == 2
    assert await enqueue(store, SOURCE, [rg, comm], now=clock.now()) == 0
    await drain(outbox, clock)
    assert await enqueue(store, SOURCE, [comm], now=clock.now()) == 0
    await drain(outbox, clock)
    assert len(await on_sekmet(remote, rg)) == len(await on_sekmet(remote, comm)) == 1
    assert len(await store.list_records(OUTBOX, group=SOURCE, limit=1000)) >= 2


@pytest.mark.parametrize("lost", ["item", "item-and-mapping"])
async def test_crash_after_the_create_makes_no_second_copy(
        store: Store, outbox: Outbox, clock: ManualClock, remote: httpx.AsyncClient, lost: str) -> None:
    """The source created the resources, then we crashed before marking the items done (and, worse, before
    storing the ids it assigned): the lease runs out and the items are sent again."""
    run = uid()
    rg = await stored(store, run_group(run))
    comm = await stored(store, communication(run))
    prov = await stored(store, provenance(run, f"Communication/{comm['id']}"))
    await enqueue(store, SOURCE, [rg, comm, prov], now=clock.now())
    await drain(outbox, clock)
    before = {r["resourceType"]: await mapped(store, r) for r in (rg, comm, prov)}

    for resource in (rg, comm, prov):
        rec = await item(store, resource)
        rec.state, rec.due = "pending", 0.0
        rec.data = {k: v for k, v in rec.data.items() if k not in ("remote", "finished")}
        assert await store.save_record(rec)
        if lost == "item-and-mapping":
            key = f"{SOURCE}|{resource['resourceType']}/{resource['id']}"
            mapping = await store.get_record(REMOTE, key)
            assert mapping is not None
            mapping.state, mapping.data = "pending", {**mapping.data, "remote": None, "version": None}
            assert await store.save_record(mapping)

    await drain(outbox, clock)
    for resource in (rg, comm, prov):
        assert (await item(store, resource)).state == "done"
        found = await one_on_sekmet(remote, resource)
        assert f"{resource['resourceType']}/{found['id']}" == before[resource["resourceType"]]
        assert found["meta"]["versionId"] == "1"
    assert await mapped(store, comm) == before["Communication"]


async def test_unreachable_source_delays_and_then_delivers(
        store: Store, clock: ManualClock, sekmet: Sekmet, remote: httpx.AsyncClient) -> None:
    run = uid()
    comm = await stored(store, communication(run, basedOn=[]))
    await enqueue(store, SOURCE, [comm], now=clock.now())
    dead = clients(f"http://127.0.0.1:{free_port()}/fhir")  # nothing listens there
    try:
        down = Outbox(store, dead, owner="w1", clock=clock, backoff=Backoff(base=2.0, cap=30.0))
        assert await down.run_once() == 1
        rec = await item(store, comm)
        assert (rec.state, rec.attempts, rec.due) == ("pending", 1, pytest.approx(clock.now() + 2.0, abs=0.01))
        assert "ConnectError" in rec.data["error"]["diagnostics"]
        assert rec.lease_owner is None
        assert await down.run_once() == 0  # not due yet
        for attempt, delay in ((2, 4.0), (3, 8.0), (4, 16.0), (5, 30.0), (6, 30.0)):  # exponential, capped
            clock.advance(100)
            assert await down.run_once() == 1
            rec = await item(store, comm)
            assert (rec.state, rec.attempts, rec.due) == ("pending", attempt, pytest.approx(clock.now() + delay, abs=0.01))
    finally:
        await dead.aclose()
    assert await on_sekmet(remote, comm) == []

    live = clients(sekmet.base)  # the source is back
    try:
        clock.advance(100)
        await drain(Outbox(store, live, owner="w2", clock=clock), clock)
    finally:
        await live.aclose()
    rec = await item(store, comm)
    assert (rec.state, rec.attempts) == ("done", 6)
    assert f"Communication/{(await one_on_sekmet(remote, comm))['id']}" == rec.data["remote"]


async def test_source_refusal_fails_with_its_outcome_and_fails_what_depends_on_it(
        store: Store, outbox: Outbox, clock: ManualClock, remote: httpx.AsyncClient) -> None:
    run = uid()
    bad = await stored(store, communication(run, basedOn=[], nonsense=True))  # sekmet: unknown element → 400
    prov = await stored(store, provenance(run, f"Communication/{bad['id']}"))
    prov["entity"] = []
    await enqueue(store, SOURCE, [bad, prov], now=clock.now())
    await drain(outbox, clock)

    rec = await item(store, bad)
    assert (rec.state, rec.attempts) == ("failed", 0)
    error = rec.data["error"]
    assert error["http_status"] == 400 and error["outcome"]["resourceType"] == "OperationOutcome"
    assert "Communication.nonsense" in error["diagnostics"]
    assert rec.key in [r.key for r in await store.list_records(OUTBOX, state="failed", group=SOURCE, limit=1000)]
    dependent = await item(store, prov)
    assert dependent.state == "failed" and "whose write-back to sekmet failed" in dependent.data["error"]["diagnostics"]
    assert await on_sekmet(remote, bad) == []
    assert await search(remote, "Provenance", _tag=f"{WRITEBACK_TAG}|Provenance/{prov['id']}") == []


async def test_later_versions_update_the_remote_resource(
        store: Store, outbox: Outbox, clock: ManualClock, remote: httpx.AsyncClient) -> None:
    run = uid()
    rg = await stored(store, run_group(run))
    v1 = await stored(store, communication(run))
    await enqueue(store, SOURCE, [rg, v1], now=clock.now())
    await drain(outbox, clock)
    rid = await mapped(store, v1)

    v2 = await stored(store, {**communication(run), "status": "in-progress"}, expect=1)
    assert await enqueue(store, SOURCE, [v2], now=clock.now()) == 1
    await drain(outbox, clock)
    found = await one_on_sekmet(remote, v2)
    assert (f"Communication/{found['id']}", found["status"], found["meta"]["versionId"]) == (rid, "in-progress", "2")
    assert found["basedOn"] == [{"reference": await mapped(store, rg)}]
    assert (await item(store, v2)).data["remote"] == rid

    v3 = await stored(store, {**communication(run), "status": "completed", "sent": "2026-11-22T10:00:00Z"}, expect=2)
    v4 = await stored(store, {**communication(run), "status": "completed", "sent": "2026-11-22T10:00:00Z",
                              "received": "2026-11-22T10:05:00Z"}, expect=3)
    await enqueue(store, SOURCE, [v4], now=clock.now())
    await enqueue(store, SOURCE, [v3], now=clock.now() + 1)  # arrives late: must not roll the source back
    await drain(outbox, clock)
    assert ((await item(store, v4)).state, (await item(store, v3)).state) == ("done", "superseded")
    found = await one_on_sekmet(remote, v4)
    assert (found["received"], found["meta"]["versionId"]) == ("2026-11-22T10:05:00Z", "3")


async def test_a_later_version_waits_for_the_version_that_creates(
        store: Store, outbox: Outbox, clock: ManualClock, remote: httpx.AsyncClient) -> None:
    run = uid()
    rg = await stored(store, run_group(run))
    v1 = await stored(store, communication(run))
    v2 = await stored(store, {**communication(run), "status": "completed"}, expect=1)
    await enqueue(store, SOURCE, [v1, v2, rg], now=clock.now())

    await outbox.run_once()
    first, second = await item(store, v1), await item(store, v2)
    assert f"RequestGroup/{rg['id']}" in first.data["waiting"]
    assert f"{SOURCE}|Communication/{v1['id']}|v1" in second.data["waiting"]  # not a second create
    await drain(outbox, clock)
    found = await one_on_sekmet(remote, v2)
    assert (found["status"], found["meta"]["versionId"]) == ("completed", "2")
    assert ((await item(store, v1)).state, (await item(store, v2)).state) == ("done", "done")


async def test_enqueue_refuses_unstored_resources(store: Store) -> None:
    with pytest.raises(ValueError, match=r"meta\.versionId"):
        await enqueue(store, SOURCE, [communication(uid())])


@pytest.mark.parametrize(("exc", "retry"), [
    (SourceUnavailable("GET x: ConnectError"), True),
    (SourceError("answered 408", http_status=408), True),
    (SourceError("answered 429", http_status=429), True),
    (SourceError("answered 500", http_status=500), True),
    (SourceError("answered 503", http_status=503), True),
    (SourceError("no source named 'x' is configured", http_status=0), True),
    (RuntimeError("a fault of ours"), True),
    (SourceError("answered 400", http_status=400), False),
    (SourceError("answered 404", http_status=404), False),
    (SourceError("answered 412", http_status=412), False),
    (SourceError("answered 422", http_status=422), False),
    (Undeliverable("no way to create it once"), False),
])
def test_retry_policy(exc: Exception, retry: bool) -> None:
    assert retryable(exc) is retry


