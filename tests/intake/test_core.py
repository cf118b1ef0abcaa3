"""Core intake behaviour through real HTTP: store first, authenticate, dedup, order, read back."""

from __future__ import annotations

from typing import Any

import pytest

from tests.intake.conftest import Env

# Every core behaviour on both stores (MongoDB over the real wire protocol).
pytestmark = pytest.mark.parametrize("env", ["sqlite", "mongo"], indirect=True)


def enc(id_: str, status: str = "finished", version: str = "1", patient: str = "p1") -> dict[str, Any]:
    return {"resourceType": "Encounter", "id": id_, "status": status,
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
            "subject": {"reference": f"Patient/{patient}"}, "meta": {"versionId": version,
                                                                     "lastUpdated": f"2026-01-01T00:00:0{version}Z"}}


async def test_classic_put_delivered_19_times_is_one_event(env: Env) -> None:
    hook = await env.hook(mode="classic", criteria="Encounter?status=finished")
    headers = {"Authorization": f"Bearer {hook['secret']}", "Content-Type": "application/fhir+json"}
    for _ in range(19):
        resp = await env.hooks.put(f"/hooks/{hook['key']}/Encounter/e1", json=enc("e1"), headers=headers)
        assert resp.status_code == 200, resp.text
    assert len(await env.inbox("pending")) == 19  # every delivery stored before the answer
    await env.drain()
    events = await env.events()
    assert len(events) == 1
    ev = events[0].data
    assert (ev["interaction"], ev["focus"], ev["version"], ev["patient"]) == ("create", "Encounter/e1", "1",
                                                                                "Patient/p1")
    assert ev["resource"]["status"] == "finished" and ev["previous"] is None
    assert all(r.state == "done" for r in await env.inbox())


async def test_wrong_or_missing_credentials_store_nothing(env: Env) -> None:
    hook = await env.hook(mode="classic")
    url = f"/hooks/{hook['key']}/Encounter/e1"
    missing = await env.hooks.put(url, json=enc("e1"), headers={"Authorization": ""})
    assert missing.status_code == 401 and missing.json()["issue"][0]["code"] == "login"
    wrong = await env.hooks.put(url, json=enc("e1"), headers={"Authorization": "Bearer not-the-secret"})
    assert wrong.status_code == 403 and wrong.json()["issue"][0]["code"] == "forbidden"
    unknown = await env.hooks.put("/hooks/nope/Encounter/e1", json=enc("e1"),
                                   headers={"Authorization": f"Bearer {hook['secret']}"})
    assert unknown.status_code == 404
    assert await env.inbox() == []


async def test_out_of_order_versions_do_not_roll_back(env: Env) -> None:
    hook = await env.hook(mode="classic")
    headers = {"Authorization": f"Bearer {hook['secret']}"}
    for version, status in (("1", "in-progress"), ("3", "finished"), ("2", "onleave")):
        resp = await env.hooks.put(f"/hooks/{hook['key']}/Encounter/e1", json=enc("e1", status, version),
                                    headers=headers)
        assert resp.status_code == 200
        await env.drain()  # arrival order: v1, v3, v2
    by_version = {e.data["version"]: e for e in await env.events()}
    assert by_version["1"].state == "pending" and by_version["3"].state == "pending"
    assert by_version["2"].state == "superseded"  # older than v3: kept as evidence, not acted on
    assert by_version["3"].data["previous"]["status"] == "in-progress"  # %previous is the last seen version
    seen = await env.store.get_record("lastseen", "src|Encounter/e1")
    assert seen is not None and seen.data["version"] == "3"


async def test_malformed_notification_is_400_and_kept_as_rejected_evidence(env: Env) -> None:
    hook = await env.hook()
    headers = {"Authorization": f"Bearer {hook['secret']}", "Content-Type": "application/json"}
    bad_json = await env.hooks.post(f"/hooks/{hook['key']}", content=b'{"resourceType": "Bundle",', headers=headers)
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["issue"][0]["diagnostics"]
    not_notification = await env.hooks.post(f"/hooks/{hook['key']}", json={"resourceType": "Bundle",
                                                                            "type": "searchset"}, headers=headers)
    assert not_notification.status_code == 400
    assert not_notification.json()["issue"][0]["expression"] == ["Bundle.entry[0]"]
    rejected = await env.inbox("rejected")
    assert len(rejected) == 2 and all(r.data["reason"] for r in rejected)
    assert rejected[1].data["body"] == '{"resourceType": "Bundle",'
    await env.drain()
    assert await env.events() == []
    counts = (await env.client.get("/admin/counts")).json()
    assert {"source": "src", "state": "rejected", "count": 2} in counts["inbox"]


async def test_huge_body_is_413_and_stores_nothing(env: Env) -> None:
    env.app.state.settings.max_body_bytes = 4096
    hook = await env.hook()
    resp = await env.hooks.post(f"/hooks/{hook['key']}", content=b"{" + b" " * 5000 + b"}",
                                 headers={"Authorization": f"Bearer {hook['secret']}"})
    assert resp.status_code == 413
    assert await env.inbox() == []


async def test_id_only_is_read_back_from_the_source(env: Env) -> None:
    stored = await env.on_source({"resourceType": "Encounter", "status": "arrived", "class": {"code": "AMB"},
                                  "subject": {"reference": "Patient/p9"}})
    hook = await env.hook(mode="medplum")
    resp = await env.hooks.post(f"/hooks/{hook['key']}", json=[{
        "id": "evt-1", "eventType": "Microsoft.HealthcareApis.FhirResourceCreated",
        "subject": f"source.test/Encounter/{stored['id']}", "eventTime": "2026-01-01T00:00:00Z",
        "data": {"resourceType": "Encounter", "resourceFhirAccount": "source.test",
                 "resourceFhirId": stored["id"], "resourceVersionId": 1}, "dataVersion": "1"}],
        params={"secret": hook["secret"]})
    assert resp.status_code == 200, resp.text
    await env.drain()
    [event] = await env.events()
    assert event.data["resource"]["id"] == stored["id"] and event.data["resource"]["status"] == "arrived"
    assert event.data["patient"] == "Patient/p9"


async def test_unreachable_source_delays_and_never_loses(env: Env, monkeypatch: Any) -> None:
    hook = await env.hook()
    client = env.intake.sources.get("src")
    real = client.http
    dead = __import__("httpx").AsyncClient(base_url="http://127.0.0.1:9", timeout=0.5)
    client.http = dead  # a source that refuses connections
    body = [{"id": "evt-2", "eventType": "Microsoft.HealthcareApis.FhirResourceUpdated", "subject": "x",
             "data": {"resourceType": "Patient", "resourceFhirId": "px", "resourceVersionId": 1}}]
    assert (await env.hooks.post(f"/hooks/{hook['key']}", json=body, params={"secret": hook["secret"]})).status_code == 200
    await env.drain()
    [item] = await env.inbox()
    assert item.state == "pending" and item.attempts == 1 and item.due > item.updated
    assert "127.0.0.1:9" in item.data["error"] or "ConnectError" in item.data["error"]
    assert await env.events() == []
    client.http = real
    await dead.aclose()
    await env.on_source({"resourceType": "Patient", "id": "px"})
    item.due = 0.0
    assert await env.store.save_record(item)  # the backoff has passed
    await env.drain()
    [event] = await env.events()
    assert event.data["focus"] == "Patient/px" and event.data["resource"]["id"] == "px"


async def test_classic_hook_applies_the_topic_transition(env: Env) -> None:
    """Classic criteria (status=finished) re-send every update of a finished Encounter; the hook's topic
    (encounter-discharged: *became* finished) keeps only the transition as a pending event."""
    hook = await env.hook(mode="classic", criteria="Encounter?status=finished", trigger="encounter-discharged")
    headers = {"Authorization": f"Bearer {hook['secret']}"}
    for version, status in (("1", "in-progress"), ("2", "finished"), ("3", "finished")):
        resp = await env.hooks.put(f"/hooks/{hook['key']}/Encounter/e7", json=enc("e7", status, version),
                                   headers=headers)
        assert resp.status_code == 200
        await env.drain()
    states = {e.data["version"]: (e.state, e.data["topic_matched"]) for e in await env.events()}
    assert states == {"1": ("filtered", False), "2": ("pending", True), "3": ("filtered", False)}
    [pending] = await env.events("pending")
    assert pending.data["previous"]["status"] == "in-progress"
