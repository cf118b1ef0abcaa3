"""Every delivery shape real sources send, through real HTTP, down to the normalised event records.

Payloads are written from the specs and the code readings in ``shared/reference/subscriptions.md``: R4
classic rest-hook (HAPI PUT / DELETE / empty POST), topic-based notification Bundles (R4 backport
``Parameters``, R4B ``SubscriptionStatus``, R5 ``subscription-notification``; every notification type and
payload level; HAPI's quirks), Medplum (``X-Medplum-*``, ``X-Signature``), Azure Event Grid (Event Grid and
CloudEvents schemas, both handshakes), lenient Content-Types, gap detection and recovery, and reordering
across shapes. Each test checks the HTTP answer, the events stored, and that duplicates are one event.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Any

import pytest

from fhir_outreach.intake.recovery import recover
from fhir_outreach.store.base import Record
from tests.intake.conftest import SOURCE_BASE, Env

SRC = SOURCE_BASE  # http://source.test/fhir
TOPIC = "http://fhir-outreach.org/SubscriptionTopic/encounter-created-or-updated"
SUB_ID = "sub-enc"
SUB_URL = f"{SRC}/Subscription/{SUB_ID}"  # how the source names it in notifications
SUB = f"Subscription/{SUB_ID}"  # how every event names it, whatever the shape
BACKPORT_STATUS_PROFILE = ("http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
                           "backport-subscription-status-r4")
EG_TOPIC = ("/subscriptions/6f5f3b6e-1d8a-4c50-9bd3-0c5c1d1f6a11/resourceGroups/rg-outreach/providers/"
            "Microsoft.HealthcareApis/workspaces/wsoutreach")
EG_ACCOUNT = "wsoutreach-fhir.fhir.azurehealthcareapis.com"
FORMS = ("r4-backport", "r4b", "r5")


# --- payload builders -------------------------------------------------------------------------------

def enc(id_: str, status: str = "finished", version: str = "1", patient: str = "p1") -> dict[str, Any]:
    return {"resourceType": "Encounter", "id": id_, "status": status,
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
            "subject": {"reference": f"Patient/{patient}"},
            "meta": {"versionId": version, "lastUpdated": f"2026-02-0{version}T10:00:00.000Z"}}


def new_enc(status: str = "finished", patient: str = "p1") -> dict[str, Any]:
    """An Encounter to create on the source (the source assigns id, version and lastUpdated)."""
    return {"resourceType": "Encounter", "status": status,
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": f"Patient/{patient}"}}


def ev(number: int | None, focus: str | None = None, *, timestamp: str = "2026-03-02T09:15:27.118+01:00",
       date_only: bool = False, context: tuple[str, ...] = ()) -> dict[str, Any]:
    """One notification event (converted to each FHIR version's form by ``status_resource``)."""
    return {"number": number, "focus": focus, "timestamp": timestamp, "date_only": date_only,
            "context": list(context)}


def status_resource(form: str, ntype: str, events: list[dict[str, Any]], *, since: int | None,
                    status: str = "active", sub: str = SUB_URL, topic: str = TOPIC) -> dict[str, Any]:
    if form == "r4-backport":
        params: list[dict[str, Any]] = [
            {"name": "subscription", "valueReference": {"reference": sub}},
            {"name": "topic", "valueCanonical": topic},
            {"name": "status", "valueCode": status},
            {"name": "type", "valueCode": ntype}]
        if since is not None:
            params.append({"name": "events-since-subscription-start", "valueString": str(since)})
        for e in events:
            parts: list[dict[str, Any]] = []
            if e["number"] is not None:
                parts.append({"name": "event-number", "valueString": str(e["number"])})
            # HAPI's R4NotificationStatusBuilder writes the timestamp as a date, not an instant
            parts.append({"name": "timestamp", ("valueDate" if e["date_only"] else "valueInstant"): e["timestamp"]})
            if e["focus"]:
                parts.append({"name": "focus", "valueReference": {"reference": e["focus"]}})
            parts += [{"name": "additional-context", "valueReference": {"reference": c}} for c in e["context"]]
            params.append({"name": "notification-event", "part": parts})
        return {"resourceType": "Parameters", "id": uuid.uuid4().hex,
                "meta": {"profile": [BACKPORT_STATUS_PROFILE]}, "parameter": params}
    res: dict[str, Any] = {"resourceType": "SubscriptionStatus", "id": uuid.uuid4().hex, "status": status,
                           "type": ntype, "subscription": {"reference": sub}, "topic": topic}
    if since is not None:
        res["eventsSinceSubscriptionStart"] = str(since)  # R4B string, R5 integer64: both are JSON strings
    notification_events = []
    for e in events:
        item: dict[str, Any] = {"timestamp": e["timestamp"]}
        if e["number"] is not None:
            item["eventNumber"] = str(e["number"])
        if e["focus"]:
            item["focus"] = {"reference": e["focus"]}
        if e["context"]:
            item["additionalContext"] = [{"reference": c} for c in e["context"]]
        notification_events.append(item)
    if notification_events:
        res["notificationEvent"] = notification_events
    return res


def notification(form: str, ntype: str, events: list[dict[str, Any]] | None = None,
                 entries: list[dict[str, Any]] | None = None, *, since: int | None = None,
                 status: str = "active", sub: str = SUB_URL, bundle_type: str | None = None) -> dict[str, Any]:
    """A notification Bundle: R4 backport and R4B are ``history`` Bundles, R5 ``subscription-notification``."""
    events = events or []
    if since is None:
        numbers = [e["number"] for e in events if e["number"] is not None]
        since = max(numbers) if numbers else 0
    status_res = status_resource(form, ntype, events, since=since, status=status, sub=sub)
    sub_id = sub.rsplit("/", 1)[-1]
    first = {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": status_res,
             "request": {"method": "GET", "url": f"{SRC}/Subscription/{sub_id}/$status"},
             "response": {"status": "200"}}
    btype = bundle_type or ("subscription-notification" if form == "r5" else "history")
    return {"resourceType": "Bundle", "id": uuid.uuid4().hex, "type": btype,
            "timestamp": "2026-03-02T09:15:27.5+01:00", "entry": [first, *(entries or [])]}


def full_entry(resource: dict[str, Any], method: str) -> dict[str, Any]:
    """A full-resource payload entry (history-style request/response)."""
    rtype, rid = resource["resourceType"], resource["id"]
    return {"fullUrl": f"{SRC}/{rtype}/{rid}", "resource": resource,
            "request": {"method": method, "url": rtype if method == "POST" else f"{rtype}/{rid}"},
            "response": {"status": "201 Created" if method == "POST" else "200 OK"}}


def id_only_entry(ref: str, method: str) -> dict[str, Any]:
    """An id-only payload entry: the reference and the interaction, no resource."""
    rtype = ref.split("/")[0]
    return {"fullUrl": f"{SRC}/{ref}",
            "request": {"method": method, "url": rtype if method == "POST" else ref},
            "response": {"status": "201 Created" if method == "POST" else "200 OK"}}


def deleted_entry(ref: str) -> dict[str, Any]:
    return {"fullUrl": f"{SRC}/{ref}", "request": {"method": "DELETE", "url": ref},
            "response": {"status": "204 No Content"}}


def eg_event(kind: str, rtype: str, rid: str, version: int, *, event_id: str | None = None) -> dict[str, Any]:
    """An Azure Health Data Services event in the Event Grid schema (ids and version only)."""
    return {"id": event_id or str(uuid.uuid4()), "topic": EG_TOPIC,
            "subject": f"{EG_ACCOUNT}/{rtype}/{rid}",
            "eventType": f"Microsoft.HealthcareApis.FhirResource{kind}", "eventTime": "2026-03-02T08:15:27.5613214Z",
            "data": {"resourceType": rtype, "resourceFhirAccount": EG_ACCOUNT, "resourceFhirId": rid,
                     "resourceVersionId": version},
            "dataVersion": "1", "metadataVersion": "1"}


def cloud_event(kind: str, rtype: str, rid: str, version: int, *, event_id: str | None = None) -> dict[str, Any]:
    """The same event in the CloudEvents 1.0 schema."""
    return {"specversion": "1.0", "id": event_id or str(uuid.uuid4()),
            "type": f"Microsoft.HealthcareApis.FhirResource{kind}", "source": EG_TOPIC,
            "subject": f"{EG_ACCOUNT}/{rtype}/{rid}", "time": "2026-03-02T08:15:27.5613214Z",
            "datacontenttype": "application/json",
            "data": {"resourceType": rtype, "resourceFhirAccount": EG_ACCOUNT, "resourceFhirId": rid,
                     "resourceVersionId": version}}


# --- helpers --------------------------------------------------------------------------------------

def bearer(hook: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {hook['secret']}"}


def fhir_json(hook: dict[str, Any]) -> dict[str, str]:
    return {**bearer(hook), "Content-Type": "application/fhir+json"}


def raw(body: Any) -> bytes:
    return json.dumps(body).encode()


def accepted(resp: Any) -> None:
    assert resp.status_code == 200, resp.text
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "information"


def sub_id(event: dict[str, Any]) -> str | None:
    """The Subscription id an event names; events always use the ``Subscription/{id}`` form."""
    sub = event["subscription"]
    assert sub is None or (sub.startswith("Subscription/") and sub.count("/") == 1), sub
    return sub.rsplit("/", 1)[-1] if sub else None


async def events_by(env: Env, *keys: str) -> dict[Any, Record]:
    out: dict[Any, Record] = {}
    for rec in await env.events():
        k = tuple(rec.data[key] for key in keys)
        out[k[0] if len(k) == 1 else k] = rec
    return out


async def admin_hook(env: Env, key: str) -> dict[str, Any]:
    resp = await env.client.get("/admin/hooks")
    assert resp.status_code == 200, resp.text
    [found] = [h for h in resp.json()["hooks"] if h["key"] == key]
    return found  # type: ignore[no-any-return]


async def topic_hook(env: Env, **fields: Any) -> dict[str, Any]:
    return await env.hook(**{"mode": "topic", "topic": TOPIC, "resource_type": "Encounter", "remote_id": SUB_ID,
                             "payload": "full-resource", **fields})


async def post(env: Env, hook: dict[str, Any], body: Any, headers: dict[str, str] | None = None) -> Any:
    return await env.hooks.post(f"/hooks/{hook['key']}", content=raw(body), headers=headers or fhir_json(hook))


# --- 1. R4 classic rest-hook ----------------------------------------------------------------------

async def test_classic_put_create_update_and_delete(env: Env) -> None:
    hook = await env.hook(mode="classic", criteria="Encounter?status=finished", remote_id="sub-classic")
    url = f"/hooks/{hook['key']}/Encounter/e1"
    # HAPI: client.update().resource(r) → PUT {endpoint}/Encounter/e1, body keeps meta.versionId
    for _ in range(2):  # at-least-once: the same version twice
        accepted(await env.hooks.put(url, content=raw(enc("e1", "in-progress", "1")), headers=fhir_json(hook)))
    await env.drain()
    accepted(await env.hooks.put(url, content=raw(enc("e1", "finished", "2")), headers=fhir_json(hook)))
    await env.drain()
    # subscription-send-delete-messages: DELETE {endpoint}/Encounter/e1, no body
    accepted(await env.hooks.delete(url, headers=bearer(hook)))
    await env.drain()
    assert all(r.state == "done" for r in await env.inbox())
    events = await env.events()
    assert [e.data["interaction"] for e in events] == ["create", "update", "delete"]
    create, update, delete = (e.data for e in events)
    for e in (create, update, delete):
        assert e["focus"] == "Encounter/e1" and e["shape"] == "r4-classic" and e["hook"] == hook["key"]
        assert e["subscription"] == "Subscription/sub-classic" and e["topic"] is None and e["event_number"] is None
        assert e["patient"] == ("Patient/p1" if e is not delete else None)
    assert (create["version"], create["resource"]["status"], create["previous"]) == ("1", "in-progress", None)
    assert (update["version"], update["resource"]["status"]) == ("2", "finished")
    assert update["previous"]["status"] == "in-progress"
    assert delete["resource"] is None and delete["previous"]["status"] == "finished"
    assert all(e.state == "pending" for e in events)


async def test_classic_delete_delivered_twice_is_one_event(env: Env) -> None:
    """HAPI retries a DELETE it thinks failed; the second copy must not become a second delete event."""
    hook = await env.hook(mode="classic", criteria="Encounter?status=finished")
    url = f"/hooks/{hook['key']}/Encounter/e2"
    accepted(await env.hooks.put(url, content=raw(enc("e2", "finished", "1")), headers=fhir_json(hook)))
    await env.drain()
    for _ in range(2):
        accepted(await env.hooks.delete(url, headers=bearer(hook)))
        await env.drain()
    interactions = [e.data["interaction"] for e in await env.events()]
    assert interactions == ["create", "delete"]


async def test_classic_empty_post_searches_the_source_with_the_criteria(env: Env) -> None:
    matching = [await env.on_source(new_enc("finished", "p1")), await env.on_source(new_enc("finished", "p2"))]
    other = await env.on_source(new_enc("in-progress", "p3"))
    hook = await env.hook(mode="classic", criteria="Encounter?status=finished")

    async def ping() -> None:
        # HAPI without channel.payload: POST {endpoint}, no body, no Content-Type, only the channel.header
        resp = await env.hooks.post(f"/hooks/{hook['key']}", headers=bearer(hook))
        accepted(resp)
        assert "content-type" not in resp.request.headers and resp.request.content == b""

    await ping()
    await env.drain()
    events = await events_by(env, "focus")
    assert set(events) == {f"Encounter/{m['id']}" for m in matching}
    for m, patient in zip(matching, ("Patient/p1", "Patient/p2"), strict=True):
        e = events[f"Encounter/{m['id']}"].data
        assert (e["interaction"], e["version"], e["patient"], e["shape"]) == ("create", "1", patient,
                                                                              "r4-classic-empty")
        assert e["resource"]["id"] == m["id"] and e["resource"]["status"] == "finished"
    checkpoint = (await admin_hook(env, hook["key"]))["checkpoint"]
    assert checkpoint == max(m["meta"]["lastUpdated"] for m in matching)

    await ping()  # nothing changed since the checkpoint
    await env.drain()
    assert len(await env.events()) == 2

    changed = await env.on_source({**other, "status": "finished"})  # now it matches
    await ping()
    await ping()  # and the ping is delivered twice
    await env.drain()
    events = await events_by(env, "focus")
    assert len(events) == 3
    e = events[f"Encounter/{other['id']}"].data
    assert (e["interaction"], e["version"], e["patient"]) == ("update", changed["meta"]["versionId"], "Patient/p3")
    assert e["resource"]["status"] == "finished"
    assert all(r.state == "done" for r in await env.inbox())


# --- 2. topic-based notification Bundles --------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
async def test_topic_handshake_heartbeat_and_query_status_only_update_liveness(env: Env, form: str) -> None:
    hook = await topic_hook(env)
    before = await admin_hook(env, hook["key"])
    assert before["status"] is None
    resp = await post(env, hook, notification(form, "handshake", since=0, status="requested"))
    accepted(resp)
    await env.drain()
    after = await admin_hook(env, hook["key"])
    assert after["status"] == "requested" and after["last_seen"] > before["last_seen"]
    assert await env.events() == [] and await env.store.list_records("recovery") == []

    resp = await post(env, hook, notification(form, "heartbeat", since=0, status="active"))
    accepted(resp)
    await env.drain()
    beat = await admin_hook(env, hook["key"])
    assert beat["status"] == "active" and beat["last_seen"] > after["last_seen"]

    resp = await post(env, hook, notification(form, "query-status", since=0, status="error"))
    accepted(resp)
    await env.drain()
    queried = await admin_hook(env, hook["key"])
    assert queried["status"] == "error" and queried["last_seen"] > beat["last_seen"]
    assert queried["last_event_number"] == 0
    assert await env.events() == [] and await env.store.list_records("recovery") == []
    assert all(r.state == "done" for r in await env.inbox())


@pytest.mark.parametrize("form", FORMS)
async def test_topic_full_resource_post_put_delete(env: Env, form: str) -> None:
    hook = await topic_hook(env)
    v1, v2 = enc("e1", "in-progress", "1", "p7"), enc("e1", "finished", "2", "p7")
    created = notification(form, "event-notification",
                           [ev(1, f"{SRC}/Encounter/e1", context=("Patient/p7",))], [full_entry(v1, "POST")])
    updated = notification(form, "event-notification",
                           [ev(2, "Encounter/e1", context=("Patient/p7",))], [full_entry(v2, "PUT")])
    deleted = notification(form, "event-notification",
                           [ev(3, "Encounter/e1", context=("Patient/p7",))], [deleted_entry("Encounter/e1")])
    for bundle in (created, created, updated, deleted, deleted):  # every one may arrive twice
        accepted(await post(env, hook, bundle))
        await env.drain()
    events = await env.events()
    assert [e.data["interaction"] for e in events] == ["create", "update", "delete"]
    c, u, d = (e.data for e in events)
    for e, number in ((c, 1), (u, 2), (d, 3)):
        assert (e["focus"], e["event_number"], e["topic"], e["shape"]) == ("Encounter/e1", number, TOPIC, form)
        assert e["subscription"] == SUB and e["patient"] == "Patient/p7" and e["context"] == ["Patient/p7"]
        assert e["timestamp"] == "2026-03-02T09:15:27.118+01:00"
    assert (c["version"], c["resource"]["status"]) == ("1", "in-progress")
    assert (u["version"], u["resource"]["status"], u["previous"]["status"]) == ("2", "finished", "in-progress")
    assert d["resource"] is None and d["version"] is None
    h = await admin_hook(env, hook["key"])
    assert h["last_event_number"] == 3
    assert await env.store.list_records("recovery") == []


@pytest.mark.parametrize("form", FORMS)
async def test_topic_id_only_is_read_back_from_the_source(env: Env, form: str) -> None:
    stored = await env.on_source(new_enc("in-progress", "p8"))
    ref = f"Encounter/{stored['id']}"
    hook = await topic_hook(env, payload="id-only")
    bundle = notification(form, "event-notification", [ev(1, f"{SRC}/{ref}")], [id_only_entry(ref, "POST")])
    for _ in range(2):
        accepted(await post(env, hook, bundle))
    await env.drain()
    [event] = await env.events()
    e = event.data
    assert (e["interaction"], e["focus"], e["version"], e["event_number"]) == ("create", ref, "1", 1)
    assert (e["topic"], e["subscription"], e["patient"]) == (TOPIC, SUB, "Patient/p8")
    assert e["resource"]["id"] == stored["id"] and e["resource"]["status"] == "in-progress"

    changed = await env.on_source({**stored, "status": "finished"})
    bundle = notification(form, "event-notification", [ev(2, ref)], [id_only_entry(ref, "PUT")])
    for _ in range(2):
        accepted(await post(env, hook, bundle))
    await env.drain()
    by_number = await events_by(env, "event_number")
    assert set(by_number) == {1, 2}
    e = by_number[2].data
    assert (e["interaction"], e["version"], e["resource"]["status"]) == ("update", changed["meta"]["versionId"],
                                                                          "finished")
    assert e["previous"]["status"] == "in-progress" and e["patient"] == "Patient/p8"


async def test_topic_id_only_without_payload_entries_takes_the_interaction_from_the_read_back(env: Env) -> None:
    """id-only: the focus is required, the extra entries only "may exist" (IG payloads.md); without them the
    interaction is not stated, so the version read back decides it, as for every other shape."""
    stored = await env.on_source(new_enc("planned", "p6"))
    ref = f"Encounter/{stored['id']}"
    hook = await topic_hook(env, payload="id-only")
    accepted(await post(env, hook, notification("r4-backport", "event-notification", [ev(1, ref)])))
    await env.drain()
    [event] = await env.events()
    e = event.data
    assert (e["focus"], e["version"], e["event_number"], e["patient"]) == (ref, "1", 1, "Patient/p6")
    assert e["resource"]["status"] == "planned"
    assert e["interaction"] == "create"  # version 1, read back: a create, not an update


@pytest.mark.parametrize("form", FORMS)
async def test_topic_empty_payload_polls_the_hook_resource_type(env: Env, form: str) -> None:
    found = [await env.on_source(new_enc("finished", "p1")), await env.on_source(new_enc("planned", "p2"))]
    hook = await topic_hook(env, payload="empty")
    bundle = notification(form, "event-notification", [ev(1)])  # empty: event number, no focus, no entries
    for _ in range(2):
        accepted(await post(env, hook, bundle))
    await env.drain()
    events = await events_by(env, "focus")
    assert set(events) == {f"Encounter/{f['id']}" for f in found}
    for f, patient in zip(found, ("Patient/p1", "Patient/p2"), strict=True):
        e = events[f"Encounter/{f['id']}"].data
        assert (e["interaction"], e["version"], e["topic"], e["patient"]) == ("create", "1", TOPIC, patient)
        assert e["resource"]["status"] == f["status"] and sub_id(e) == SUB_ID
    assert (await admin_hook(env, hook["key"]))["last_event_number"] == 1

    # R5 servers may leave notificationEvent out altogether for empty content
    later = await env.on_source(new_enc("arrived", "p3"))
    accepted(await post(env, hook, notification(form, "event-notification", [], since=2)))
    await env.drain()
    events = await events_by(env, "focus")
    assert len(events) == 3 and events[f"Encounter/{later['id']}"].data["patient"] == "Patient/p3"


@pytest.mark.parametrize("form", FORMS)
async def test_topic_query_event_carries_several_events(env: Env, form: str) -> None:
    """What ``$events`` returns: a ``query-event`` notification with several events."""
    hook = await topic_hook(env)
    a, b = enc("qa", "finished", "1", "p1"), enc("qb", "finished", "2", "p2")
    bundle = notification(form, "query-event",
                          [ev(4, "Encounter/qa", context=("Patient/p1",)), ev(5, "Encounter/qb")],
                          [full_entry(a, "POST"), full_entry(b, "PUT")])
    for _ in range(2):
        accepted(await post(env, hook, bundle))
    await env.drain()
    events = await events_by(env, "focus")
    assert set(events) == {"Encounter/qa", "Encounter/qb"}
    qa, qb = events["Encounter/qa"].data, events["Encounter/qb"].data
    assert (qa["interaction"], qa["version"], qa["event_number"], qa["patient"]) == ("create", "1", 4, "Patient/p1")
    assert (qb["interaction"], qb["version"], qb["event_number"], qb["patient"]) == ("update", "2", 5, "Patient/p2")
    assert qa["topic"] == qb["topic"] == TOPIC and qa["subscription"] == qb["subscription"] == SUB
    assert qb["resource"]["id"] == "qb"
    assert (await admin_hook(env, hook["key"]))["last_event_number"] == 5


async def test_hapi_r4_quirks_date_timestamp_and_doubled_focus(env: Env) -> None:
    """HAPI's R4 status: always active/event-notification, timestamp as valueDate, doubled type prefix."""
    hook = await topic_hook(env)
    focuses = {"h1": "Encounter/Encounter/h1", "h2": f"{SRC}/Encounter/Encounter/h2",
               "h3": "http://x/fhir/Encounter/Encounter/h3"}
    for n, (rid, focus) in enumerate(focuses.items(), start=1):
        bundle = notification("r4-backport", "event-notification",
                              [ev(n, focus, timestamp=f"2026-03-0{n}", date_only=True)],
                              [full_entry(enc(rid, "finished", "1", f"p{n}"), "POST")])
        for _ in range(2):
            accepted(await post(env, hook, bundle))
    await env.drain()
    events = await events_by(env, "focus")
    assert set(events) == {"Encounter/h1", "Encounter/h2", "Encounter/h3"}
    for n, rid in enumerate(focuses, start=1):
        e = events[f"Encounter/{rid}"].data
        assert (e["interaction"], e["version"], e["event_number"], e["timestamp"]) == ("create", "1", n,
                                                                                      f"2026-03-0{n}")
        assert (e["topic"], e["subscription"], e["patient"]) == (TOPIC, SUB, f"Patient/p{n}")
        assert e["resource"]["id"] == rid and e["resource"]["status"] == "finished"
    assert await env.store.list_records("recovery") == []


async def test_hapi_r5_transaction_typed_notification(env: Env) -> None:
    """HAPI R5 sent notifications as ``transaction`` Bundles (hapi-fhir #5208), one event many times."""
    stored = await env.on_source(new_enc("arrived", "p5"))
    ref = f"Encounter/{stored['id']}"
    hook = await topic_hook(env, payload="id-only")
    bundle = notification("r5", "event-notification", [ev(1, f"Encounter/{ref}")], [id_only_entry(ref, "POST")],
                          bundle_type="transaction")
    for _ in range(19):
        accepted(await post(env, hook, bundle))
    full = notification("r5", "event-notification", [ev(2, f"{SRC}/Encounter/{ref}")],
                        [full_entry({**stored, "status": "finished", "meta": {"versionId": "2"}}, "PUT")],
                        bundle_type="transaction")
    accepted(await post(env, hook, full))
    await env.drain()
    events = await events_by(env, "event_number")
    assert set(events) == {1, 2}
    one, two = events[1].data, events[2].data
    assert (one["interaction"], one["focus"], one["version"], one["patient"]) == ("create", ref, "1", "Patient/p5")
    assert one["resource"]["status"] == "arrived" and one["shape"] == "r5"
    assert (two["interaction"], two["focus"], two["version"]) == ("update", ref, "2")
    assert two["resource"]["status"] == "finished" and two["topic"] == TOPIC and two["subscription"] == SUB


# --- 3. Medplum -------------------------------------------------------------------------------------

def medplum_headers(interaction: str, *, deleted: str | None = None) -> dict[str, str]:
    headers = {"Content-Type": "application/fhir+json", "X-Medplum-Subscription": "0f6a2d4e-sub",
               "X-Medplum-Interaction": interaction, "x-trace-id": str(uuid.uuid4())}
    if deleted:
        headers["X-Medplum-Deleted-Resource"] = deleted
    return headers


def sign(hook: dict[str, Any], body: bytes) -> str:
    return hmac.new(hook["secret"].encode(), body, hashlib.sha256).hexdigest()


def patient(version: str, family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": "123", "name": [{"family": family, "given": ["Ada"]}],
            "meta": {"versionId": version, "lastUpdated": f"2026-03-0{version}T12:00:00.000Z",
                     "project": "b4f7c9d2", "author": {"reference": "Practitioner/9"}}}


async def test_medplum_signed_create_update_and_delete(env: Env) -> None:
    hook = await env.hook(mode="medplum")
    url = f"/hooks/{hook['key']}"
    for interaction, resource in (("create", patient("1", "Lovelace")), ("update", patient("2", "King")),
                                  ("update", patient("2", "King"))):  # the last one: a BullMQ retry
        body = raw(resource)
        # X-Signature proves the secret: no Authorization header needed
        resp = await env.hooks.post(url, content=body, headers={**medplum_headers(interaction),
                                                                "X-Signature": sign(hook, body)})
        accepted(resp)
        await env.drain()
    # Medplum signs stringify(resource) for deletes but sends {}: rely on the channel.header instead
    resp = await env.hooks.post(url, content=b"{}", headers={**medplum_headers("delete", deleted="Patient/123"),
                                                              **bearer(hook)})
    accepted(resp)
    await env.drain()
    assert all(r.state == "done" for r in await env.inbox())
    events = await env.events()
    assert [e.data["interaction"] for e in events] == ["create", "update", "delete"]
    c, u, d = (e.data for e in events)
    for e in (c, u, d):
        assert (e["focus"], e["patient"], e["shape"], e["topic"], e["event_number"]) == (
            "Patient/123", "Patient/123", "medplum", None, None)
        assert sub_id(e) == "0f6a2d4e-sub"  # from X-Medplum-Subscription
    assert (c["version"], c["resource"]["name"][0]["family"]) == ("1", "Lovelace")
    assert (u["version"], u["resource"]["name"][0]["family"], u["previous"]["name"][0]["family"]) == (
        "2", "King", "Lovelace")
    assert d["resource"] is None


async def test_medplum_delete_retried_is_one_event(env: Env) -> None:
    """A Medplum delete retried by BullMQ (no version in a delete) must stay one delete event."""
    hook = await env.hook(mode="medplum")
    url = f"/hooks/{hook['key']}"
    body = raw(patient("1", "Lovelace"))
    accepted(await env.hooks.post(url, content=body, headers={**medplum_headers("create"),
                                                              "X-Signature": sign(hook, body)}))
    await env.drain()
    for _ in range(2):
        accepted(await env.hooks.post(url, content=b"{}", headers={
            **medplum_headers("delete", deleted="Patient/123"), "X-Signature": sign(hook, b"{}")}))
        await env.drain()
    events = await env.events()
    assert [(e.data["interaction"], e.data["focus"]) for e in events] == [("create", "Patient/123"),
                                                                          ("delete", "Patient/123")]


async def test_medplum_wrong_signature_is_403_and_stores_nothing(env: Env) -> None:
    hook = await env.hook(mode="medplum")
    body = raw(patient("1", "Lovelace"))
    forged = hmac.new(b"not-the-secret", body, hashlib.sha256).hexdigest()
    resp = await env.hooks.post(f"/hooks/{hook['key']}", content=body,
                                headers={**medplum_headers("create"), "X-Signature": forged})
    assert resp.status_code == 403 and resp.json()["issue"][0]["code"] == "forbidden"
    # a signature of another body (tampered in transit) is just as wrong, even with the right bearer
    resp = await env.hooks.post(f"/hooks/{hook['key']}", content=body,
                                headers={**medplum_headers("create"), **bearer(hook),
                                         "X-Signature": sign(hook, body + b" ")})
    assert resp.status_code == 403
    assert await env.inbox() == []
    await env.drain()
    assert await env.events() == []


async def test_medplum_hook_requiring_a_signature_refuses_unsigned_deliveries(env: Env) -> None:
    hook = await env.hook(mode="medplum", require_signature=True)
    body = raw(patient("1", "Lovelace"))
    for headers in (medplum_headers("create"), {**medplum_headers("create"), **bearer(hook)}):
        resp = await env.hooks.post(f"/hooks/{hook['key']}", content=body, headers=headers)
        assert resp.status_code == 401 and resp.json()["issue"][0]["code"] == "login"
    assert await env.inbox() == []
    resp = await env.hooks.post(f"/hooks/{hook['key']}", content=body,
                                headers={**medplum_headers("create"), "X-Signature": sign(hook, body).upper()})
    accepted(resp)
    await env.drain()
    [event] = await env.events()
    assert (event.data["interaction"], event.data["focus"], event.data["version"]) == ("create", "Patient/123", "1")


# --- 4. Azure Event Grid ----------------------------------------------------------------------------

async def test_eventgrid_array_reads_back_each_version(env: Env) -> None:
    v1 = await env.on_source(new_enc("arrived", "p6"))
    rid = v1["id"]
    v2 = await env.on_source({**v1, "status": "finished"})
    gone = await env.on_source(new_enc("cancelled", "p9"))
    assert (await env.source.delete(f"/fhir/Encounter/{gone['id']}")).status_code in (200, 204)
    assert v2["meta"]["versionId"] == "2"
    hook = await env.hook(mode="eventgrid", remote_id="outreach-eg-sub")
    created = eg_event("Created", "Encounter", rid, 1)
    batch = [eg_event("Updated", "Encounter", rid, 2), created,  # not in order, as Event Grid warns
             eg_event("Deleted", "Encounter", gone["id"], 2)]
    resp = await env.hooks.post(f"/hooks/{hook['key']}", params={"secret": hook["secret"]}, content=raw(batch),
                                headers={"Content-Type": "application/json", "aeg-event-type": "Notification",
                                         "aeg-subscription-name": "OUTREACH-EG-SUB", "aeg-delivery-count": "0"})
    accepted(resp)
    # the same Event Grid event again (at-least-once), this time authenticated with a bearer token
    resp = await env.hooks.post(f"/hooks/{hook['key']}", content=raw([created]),
                                headers={**bearer(hook), "Content-Type": "application/json",
                                         "aeg-event-type": "Notification", "aeg-delivery-count": "1"})
    accepted(resp)
    await env.drain()
    events = await events_by(env, "focus", "version")
    assert set(events) == {(f"Encounter/{rid}", "1"), (f"Encounter/{rid}", "2"), (f"Encounter/{gone['id']}", "2")}
    c = events[(f"Encounter/{rid}", "1")]
    u = events[(f"Encounter/{rid}", "2")]
    d = events[(f"Encounter/{gone['id']}", "2")].data
    assert c.data["interaction"] == "create" and c.data["resource"]["status"] == "arrived"  # vread of v1
    assert u.data["interaction"] == "update" and u.data["resource"]["status"] == "finished"
    assert c.data["patient"] == u.data["patient"] == "Patient/p6"
    assert c.state == "superseded" and u.state == "pending"  # v2 was processed before v1 arrived
    assert (d["interaction"], d["resource"]) == ("delete", None)
    for e in (c.data, u.data, d):
        assert e["shape"] == "eventgrid" and e["event_number"] is None and e["topic"] is None
        assert e["subscription"] == "Subscription/outreach-eg-sub" and e["timestamp"] == "2026-03-02T08:15:27.5613214Z"


async def test_eventgrid_subscription_validation_handshake(env: Env) -> None:
    hook = await env.hook(mode="eventgrid")
    code = "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"
    body = [{"id": "2d1781af-3a4c-4d7c-bd0c-e34b19da4e66", "topic": EG_TOPIC, "subject": "",
             "data": {"validationCode": code,
                      "validationUrl": "https://rp-eastus2.eventgrid.azure.net:553/eventsubscriptions/"
                                       "outreach/validate?id=512d38b6&t=2026-03-02T08:15:27Z&apiVersion=2018-05-01"},
             "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
             "eventTime": "2026-03-02T08:15:27.1234Z", "metadataVersion": "1", "dataVersion": "1"}]
    resp = await env.hooks.post(f"/hooks/{hook['key']}", params={"secret": hook["secret"]}, content=raw(body),
                                headers={"Content-Type": "application/json", "aeg-event-type": "SubscriptionValidation"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"validationResponse": code}
    assert resp.headers["content-type"].startswith("application/json")
    await env.drain()
    assert await env.events() == []
    assert [r.state for r in await env.inbox()] == ["done"]


async def test_cloudevents_single_and_batch(env: Env) -> None:
    a = await env.on_source(new_enc("arrived", "p1"))
    b = await env.on_source(new_enc("planned", "p2"))
    hook = await env.hook(mode="eventgrid")
    single = cloud_event("Created", "Encounter", a["id"], 1)
    for _ in range(2):  # the same CloudEvent id twice
        resp = await env.hooks.post(f"/hooks/{hook['key']}", params={"secret": hook["secret"]}, content=raw(single),
                                    headers={"Content-Type": "application/cloudevents+json; charset=utf-8"})
        accepted(resp)
    batch = [cloud_event("Created", "Encounter", b["id"], 1), single]
    resp = await env.hooks.post(f"/hooks/{hook['key']}", params={"secret": hook["secret"]}, content=raw(batch),
                                headers={"Content-Type": "application/cloudevents-batch+json; charset=utf-8"})
    accepted(resp)
    await env.drain()
    events = await events_by(env, "focus")
    assert set(events) == {f"Encounter/{a['id']}", f"Encounter/{b['id']}"}
    for res, pat in ((a, "Patient/p1"), (b, "Patient/p2")):
        e = events[f"Encounter/{res['id']}"].data
        assert (e["interaction"], e["version"], e["patient"], e["shape"]) == ("create", "1", pat, "cloudevents")
        assert e["resource"]["status"] == res["status"] and e["event_number"] is None and e["topic"] is None
        assert e["timestamp"] == "2026-03-02T08:15:27.5613214Z"


async def test_cloudevents_options_handshake(env: Env) -> None:
    hook = await env.hook(mode="eventgrid")
    resp = await env.hooks.options(f"/hooks/{hook['key']}", params={"secret": hook["secret"]},
                                   headers={"WebHook-Request-Origin": "eventgrid.azure.net",
                                            "WebHook-Request-Rate": "120"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
    assert "POST" in resp.headers["Allow"]
    wrong = await env.hooks.options(f"/hooks/{hook['key']}", params={"secret": "guess"},
                                    headers={"WebHook-Request-Origin": "eventgrid.azure.net"})
    assert wrong.status_code == 403 and "WebHook-Allowed-Origin" not in wrong.headers
    assert await env.inbox() == []


# --- 5. Content-Type sniffing -------------------------------------------------------------------------

async def test_content_type_is_sniffed_not_trusted(env: Env) -> None:
    hook = await topic_hook(env, mode="any")
    expected: dict[str, int | None] = {}
    for i, content_type in enumerate(["application/fhir+json", "application/json; charset=utf-8",
                                      "application/cloudevents+json", None], start=1):
        stored = await env.on_source(new_enc("arrived", f"p{i}"))
        headers = {**bearer(hook), **({"Content-Type": content_type} if content_type else {})}
        bodies = [
            notification("r4-backport", "event-notification", [ev(i, f"Encounter/c{i}")],
                         [full_entry(enc(f"c{i}", "finished", "1", f"p{i}"), "POST")]),
            cloud_event("Created", "Encounter", stored["id"], 1),
            {**patient("1", "Lovelace"), "id": f"pt{i}"},  # a bare resource (Medplum without its headers)
        ]
        for body in bodies:
            resp = await env.hooks.post(f"/hooks/{hook['key']}", content=raw(body), headers=headers)
            accepted(resp)
            assert resp.request.headers.get("content-type") == content_type
        resp = await env.hooks.put(f"/hooks/{hook['key']}/Encounter/d{i}",
                                   content=raw(enc(f"d{i}", "finished", "1", f"p{i}")), headers=headers)
        accepted(resp)
        expected.update({f"Encounter/c{i}": i, f"Encounter/{stored['id']}": None, f"Patient/pt{i}": None,
                         f"Encounter/d{i}": None})
    await env.drain()
    events = await events_by(env, "focus")
    assert {focus: e.data["event_number"] for focus, e in events.items()} == expected
    for focus, e in events.items():
        assert (e.data["interaction"], e.data["version"], e.data["resource"]["id"]) == ("create", "1",
                                                                                      focus.split("/")[1])
        assert e.data["patient"] is not None and e.data["patient"].startswith("Patient/p")


# --- 6. gaps and recovery -----------------------------------------------------------------------------

async def test_gap_in_event_numbers_is_recovered_by_a_lastupdated_search(env: Env) -> None:
    stored = {n: await env.on_source(new_enc("finished", f"g{n}")) for n in (1, 2, 3, 4, 5)}
    hook = await topic_hook(env)
    for n in (1, 2, 5):  # 3 and 4 never arrive
        ref = f"Encounter/{stored[n]['id']}"
        accepted(await post(env, hook, notification("r4-backport", "event-notification", [ev(n, ref)],
                                                    [full_entry(stored[n], "POST")])))
        await env.drain()
    assert len(await env.events()) == 3
    resp = await env.client.get("/admin/recoveries")
    assert resp.status_code == 200, resp.text
    [gap] = resp.json()["recoveries"]
    assert (gap["key"], gap["state"], gap["first"], gap["last"]) == (f"{hook['key']}|3-4", "pending", 3, 4)
    assert gap["hook"] == hook["key"] and "5" in gap["reason"]
    assert (await admin_hook(env, hook["key"]))["last_event_number"] == 5

    rec = await env.store.get_record("recovery", gap["key"])
    assert rec is not None
    rec.due = 0.0
    assert await env.store.save_record(rec)
    # the source (our own FHIR API) has no $events: the fallback _lastUpdated search runs
    assert await recover(env.intake.processor) == 1
    done = await env.store.get_record("recovery", gap["key"])
    assert done is not None and done.state == "done"
    assert "_lastUpdated search" in done.data["how"]
    events = await events_by(env, "focus")
    assert set(events) == {f"Encounter/{s['id']}" for s in stored.values()}  # 1, 2, 5 not duplicated
    for n in (3, 4):
        e = events[f"Encounter/{stored[n]['id']}"].data
        assert (e["interaction"], e["version"], e["patient"], e["shape"]) == ("create", "1", f"Patient/g{n}",
                                                                              "recovery-search")
        assert e["resource"]["id"] == stored[n]["id"] and e["topic"] == TOPIC and sub_id(e) == SUB_ID
    audit = await env.store.list_records("audit")
    assert any(a.state == "recovered" and "3-4" in a.data["detail"] for a in audit)


@pytest.mark.parametrize("form", FORMS)
async def test_heartbeat_reporting_more_events_schedules_a_recovery(env: Env, form: str) -> None:
    hook = await topic_hook(env)
    for n in (1, 2):
        accepted(await post(env, hook, notification(form, "event-notification", [ev(n, "Encounter/hb")],
                                                    [full_entry(enc("hb", "finished", str(n)), "PUT")])))
        await env.drain()
    accepted(await post(env, hook, notification(form, "heartbeat", since=2)))  # in step: nothing to do
    await env.drain()
    assert await env.store.list_records("recovery") == []
    accepted(await post(env, hook, notification(form, "heartbeat", since=4)))  # 3 and 4 were lost
    await env.drain()
    [gap] = (await env.client.get("/admin/recoveries")).json()["recoveries"]
    assert (gap["key"], gap["first"], gap["last"], gap["state"]) == (f"{hook['key']}|3-4", 3, 4, "pending")
    assert "heartbeat" in gap["reason"]
    assert len(await env.events()) == 2


# --- 7. reordering across shapes ----------------------------------------------------------------------

async def test_newer_version_from_one_shape_supersedes_older_from_another(env: Env) -> None:
    hook = await topic_hook(env, mode="any")
    v1, v2 = enc("r1", "in-progress", "1", "p1"), enc("r1", "finished", "2", "p1")
    accepted(await post(env, hook, notification("r5", "event-notification", [ev(7, "Encounter/r1")],
                                                [full_entry(v2, "PUT")])))
    await env.drain()
    accepted(await env.hooks.put(f"/hooks/{hook['key']}/Encounter/r1", content=raw(v1), headers=fhir_json(hook)))
    await env.drain()
    events = await events_by(env, "version")
    assert set(events) == {"1", "2"}
    assert events["2"].state == "pending" and events["2"].data["shape"] == "r5"
    assert events["1"].state == "superseded" and events["1"].data["shape"] == "r4-classic"
    assert events["1"].data["interaction"] == "create" and events["1"].data["previous"] is None
    seen = await env.store.get_record("lastseen", "src|Encounter/r1")
    assert seen is not None and seen.data["version"] == "2" and seen.data["resource"]["status"] == "finished"
