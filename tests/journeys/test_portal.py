"""The patient-portal channel on its own: the inbox is a FHIR search (unread = no ``received``), and
``$mark-read`` marks a message read, which a waiting journey run takes as the engagement it awaits."""

from __future__ import annotations

from tests.journeys.conftest import Live

PORTAL = "http://fhir-outreach.org/CodeSystem/channel|portal"


async def test_inbox_search_and_mark_read_resume_the_journey(live: Live) -> None:
    await live.load("patient-discharge")
    await live.put({"resourceType": "Patient", "id": "p1"})
    enc = {"resourceType": "Encounter", "id": "e1", "status": "in-progress", "class": {"code": "IMP"},
           "subject": {"reference": "Patient/p1"}}
    await live.put(enc)
    await live.put({**enc, "status": "finished"})
    await live.drain()
    unread = await live.search("Communication", recipient="Patient/p1", medium=PORTAL, **{"received:missing": "true"})
    assert len(unread) == 1 and unread[0]["status"] == "in-progress"
    msg = unread[0]
    r = await live.http.post(f"/fhir/Communication/{msg['id']}/$mark-read")
    assert r.status_code == 200, r.text
    read = r.json()
    assert read["status"] == "completed" and read["received"] and read["meta"]["versionId"] == "2"
    again = await live.http.post(f"/fhir/Communication/{msg['id']}/$mark-read")
    assert again.json()["meta"]["versionId"] == "2"  # nothing changes the second time
    assert await live.search("Communication", recipient="Patient/p1", medium=PORTAL,
                             **{"received:missing": "true"}) == []
    await live.drain()
    [run] = await live.runs()
    assert run["state"] == "done" and run["status"] == "completed"
    why = await live.why(run["run"])
    assert [s["step"] for s in why["steps"]] == ["risk", "portal", "portal-read", "portal-read", "end"]
    assert why["steps"][3]["arm"] == "event"
    bad = await live.http.post("/fhir/Task/x/$mark-read")
    assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"
    missing = await live.http.post("/fhir/Communication/nope/$mark-read")
    assert missing.status_code == 404
