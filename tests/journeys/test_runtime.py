"""Runtime behaviour through real HTTP on both stores: versions (a run stays on its version, new runs take
the new one), pause / resume / stop, expression errors taking the declared error path without stopping other
runs, re-entry and binding keys, and the local change feed."""

from __future__ import annotations

from typing import Any

import yaml

from tests.journeys.conftest import JOURNEYS, Live

ENC_CLASS = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}


def arrived_journey(version: str, payload: str, **extra: Any) -> str:
    doc: dict[str, Any] = {
        "journey": "arrival-test", "version": version, "status": "active", "trigger": {"topic": "patient-arrived"},
        "binding": "%current.id", "reentry": "never",
        "templates": {"hello": {"kind": "message", "medium": "portal", "payload": f"'{payload}'"}},
        "steps": [{"id": "hello", "message": "hello", "next": "later"},
                  {"id": "later", "wait": "P1D", "next": "again"},
                  {"id": "again", "message": "hello"}]}
    doc.update(extra)
    return str(yaml.safe_dump(doc))


async def load_text(live: Live, text: str, status: int = 201) -> dict[str, Any]:
    r = await live.http.post("/admin/journeys", content=text, headers={"Content-Type": "application/yaml"})
    assert r.status_code == status, r.text
    return dict(r.json())


async def arrive(live: Live, eid: str, pid: str) -> None:
    await live.put({"resourceType": "Patient", "id": pid})
    enc = {"resourceType": "Encounter", "id": eid, "status": "planned", "class": ENC_CLASS,
           "subject": {"reference": f"Patient/{pid}"}}
    await live.put(enc)
    await live.put({**enc, "status": "arrived"})
    await live.drain()


async def payloads(live: Live, pid: str) -> list[str]:
    found = await live.search("Communication", patient=pid, _sort="_lastUpdated")
    return [c["payload"][0]["contentString"] for c in found]


async def test_runs_stay_on_their_version_and_new_runs_take_the_new_one(live: Live) -> None:
    await load_text(live, arrived_journey("1.0.0", "v1"))
    await arrive(live, "e1", "p1")
    loaded = await load_text(live, arrived_journey("2.0.0", "v2"))
    assert any("1.0.0) retired" in line for line in loaded["written"]), loaded
    await arrive(live, "e2", "p2")
    await live.advance(days=1, seconds=1)
    assert await payloads(live, "p1") == ["v1", "v1"]  # started on 1.0.0, finished on it after 2.0.0 came
    assert await payloads(live, "p2") == ["v2", "v2"]
    journeys = (await live.http.get("/admin/journeys")).json()["journeys"]
    assert {(j["version"], j["status"]) for j in journeys} == {("1.0.0", "retired"), ("2.0.0", "active")}
    # the same version with other content is refused: versions are immutable
    refused = await load_text(live, arrived_journey("2.0.0", "changed"), status=422)
    assert "already exists with other content" in refused["issue"][0]["diagnostics"]


async def test_pause_holds_runs_and_starts_none_resume_goes_on_stop_ends_them(live: Live) -> None:
    await load_text(live, arrived_journey("1.0.0", "hi"))
    await arrive(live, "e1", "p1")
    assert await payloads(live, "p1") == ["hi"]
    r = await live.http.post("/admin/journeys/arrival-test/pause")
    assert r.status_code == 200 and r.json()["control"] == "paused"
    await arrive(live, "e2", "p2")
    await live.advance(days=2)
    assert await payloads(live, "p1") == ["hi"]  # held at its wait
    assert await payloads(live, "p2") == []  # not started while paused
    events = (await live.http.get("/admin/events", params={"limit": "100"})).json()["events"]
    notes = [e["journeys"]["not_matched"] for e in events if e.get("focus") == "Encounter/e2" and e.get("journeys")]
    assert any("journey paused" in n.values() for n in notes), notes
    runs = {r["patient"]: r for r in await live.runs()}
    assert runs["Patient/p1"]["state"] == "held"
    assert (await live.http.post("/admin/journeys/arrival-test/resume")).json()["control"] == "running"
    await live.advance(seconds=1)
    assert await payloads(live, "p1") == ["hi", "hi"]

    await arrive(live, "e3", "p3")
    assert (await live.http.post("/admin/journeys/arrival-test/stop")).json()["control"] == "stopped"
    await live.drain()
    runs = {r["patient"]: r for r in await live.runs()}
    assert runs["Patient/p3"]["status"] == "stopped" and runs["Patient/p3"]["state"] == "done"
    group = (await live.http.get(f"/fhir/RequestGroup/{runs['Patient/p3']['run']}")).json()
    assert group["status"] == "revoked"
    await live.advance(days=2)
    assert await payloads(live, "p3") == ["hi"]
    bad = await live.http.post("/admin/journeys/arrival-test/explode")
    assert bad.status_code == 404 and bad.json()["resourceType"] == "OperationOutcome"


async def test_a_failing_expression_takes_the_error_path_and_other_runs_go_on(live: Live) -> None:
    doc = {"journey": "error-test", "version": "1.0.0", "status": "active", "trigger": {"topic": "patient-arrived"},
           "binding": "%current.id", "reentry": "never",
           "templates": {"ok": {"kind": "message", "medium": "portal", "payload": "'fine'"},
                         "sorry": {"kind": "message", "medium": "portal", "payload": "'fallback'"}},
           "steps": [{"id": "check", "branch": [{"label": "odd", "when": "%current.id.substring(1).toInteger() mod 2 = 1",
                                                 "goto": "ok"}, {"else": "ok"}], "on-error": "sorry"},
                     {"id": "ok", "message": "ok"}, {"id": "sorry", "message": "sorry"}]}
    await load_text(live, yaml.safe_dump(doc))
    await arrive(live, "e1", "p1")  # "1" → an integer: fine
    await arrive(live, "ex", "p2")  # "x" → toInteger() is empty → `mod` on empty → no value → else
    await arrive(live, "e3", "p3")
    assert await payloads(live, "p1") == ["fine"] and await payloads(live, "p3") == ["fine"]
    doc2 = {**doc, "journey": "error-test-2", "steps": [
        {"id": "check", "branch": [{"label": "boom", "when": "%current.status.foo()", "goto": "ok"}],
         "on-error": "sorry"}, {"id": "ok", "message": "ok"}, {"id": "sorry", "message": "sorry"}]}
    await load_text(live, yaml.safe_dump(doc2))
    await arrive(live, "e4", "p4")
    assert "fallback" in await payloads(live, "p4")
    run = next(r for r in await live.runs("error-test-2"))
    why = await live.why(run["run"])
    assert why["steps"][0]["arm"] == "error" and "foo" in why["steps"][0]["error"]
    doc3 = {**doc2, "journey": "error-test-3", "steps": [
        {"id": "check", "branch": [{"label": "boom", "when": "%current.status.foo()", "goto": "ok"}]},
        {"id": "ok", "message": "ok"}]}
    await load_text(live, yaml.safe_dump(doc3))
    await arrive(live, "e5", "p5")
    run3 = next(r for r in await live.runs("error-test-3"))
    assert run3["status"] == "failed" and run3["state"] == "done"
    assert (await live.why(run3["run"]))["reason"].startswith("FHIRPath")
    # the failure of one run touched no other: every run of the first journey completed
    assert {r["status"] for r in await live.runs("error-test")} == {"completed"}


async def test_binding_key_gives_one_run_per_appointment_and_reentry_never_blocks_repeats(live: Live) -> None:
    await load_text(live, arrived_journey("1.0.0", "hi"))
    await arrive(live, "e1", "p1")
    await arrive(live, "e2", "p1")  # the same patient, another encounter: its own run
    enc = {"resourceType": "Encounter", "id": "e1", "status": "in-progress", "class": ENC_CLASS,
           "subject": {"reference": "Patient/p1"}}
    await live.put(enc)
    await live.put({**enc, "status": "arrived"})  # e1 arrives again: re-entry never
    await live.drain()
    runs = await live.runs()
    assert len(runs) == 2 and {r["patient"] for r in runs} == {"Patient/p1"}


async def test_unrelated_writes_make_no_events(live: Live) -> None:
    await live.load("patient-arrived")
    before = (await live.http.get("/admin/counts")).json()["events"]
    r = await live.http.post("/fhir/Task", json={"resourceType": "Task", "status": "requested", "intent": "order"})
    assert r.status_code == 201
    await live.put({"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}})
    assert (await live.http.get("/admin/counts")).json()["events"] == before
    assert (JOURNEYS / "patient-arrived.json").exists()
