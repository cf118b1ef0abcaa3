"""The patient-discharge sample journey end to end through real HTTP, every branch, on both stores:
high risk → call task; low risk → portal message; read → end; unread → contact preference; SMS with a
YES / NO reply; email opened; email unopened → SMS when the patient can receive it, else end. Every run is
then explained by ``why`` (the path, each condition's value and the evidence)."""

from __future__ import annotations

from typing import Any

from tests.journeys.conftest import Live

SNOMED = "http://snomed.info/sct"
CHANNEL = "http://fhir-outreach.org/CodeSystem/channel"
ENGAGEMENT = "http://fhir-outreach.org/StructureDefinition/engagement"


def patient(pid: str, *telecom: dict[str, Any], gp: str | None = None) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "Patient", "id": pid, "name": [{"given": [pid.title()], "family": "Test"}],
                           "telecom": list(telecom)}
    if gp:
        res["generalPractitioner"] = [{"reference": gp}]
    return res


MOBILE = {"system": "phone", "use": "mobile", "value": "+1-555-0100", "rank": 1}
EMAIL = {"system": "email", "value": "x@example.org", "rank": 1}
HOME = {"system": "phone", "use": "home", "value": "+1-555-0199", "rank": 2}


async def discharge(live: Live, pid: str) -> None:
    enc = {"resourceType": "Encounter", "id": f"enc-{pid}", "status": "in-progress",
           "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
           "subject": {"reference": f"Patient/{pid}"}, "period": {"start": "2026-02-27T09:00:00Z"}}
    await live.put(enc)
    await live.drain()
    await live.put({**enc, "status": "finished", "period": {"start": "2026-02-27T09:00:00Z",
                                                             "end": "2026-03-01T08:00:00Z"}})
    await live.drain()


async def comms(live: Live, pid: str, medium: str | None = None) -> list[dict[str, Any]]:
    params = {"patient": pid, "_sort": "_lastUpdated"}
    if medium:
        params["medium"] = f"{CHANNEL}|{medium}"
    return [c for c in await live.search("Communication", **params) if c.get("identifier")]


async def tasks(live: Live, pid: str) -> list[dict[str, Any]]:
    return await live.search("Task", patient=pid)


async def reply(live: Live, pid: str, sms: dict[str, Any], text: str) -> None:
    r = await live.http.post("/fhir/Communication", json={
        "resourceType": "Communication", "status": "completed", "subject": {"reference": f"Patient/{pid}"},
        "inResponseTo": [{"reference": f"Communication/{sms['id']}"}], "payload": [{"contentString": text}]})
    assert r.status_code == 201, r.text
    await live.drain()


async def test_every_branch_of_the_discharge_journey(live: Live) -> None:
    await live.load("patient-discharge")
    await live.put({"resourceType": "Practitioner", "id": "coordinator-1", "name": [{"family": "Care"}]})
    people = {
        "high": patient("high", MOBILE, gp="Practitioner/coordinator-1"),
        "reads": patient("reads", MOBILE),
        "smsyes": patient("smsyes", MOBILE, EMAIL | {"rank": 2}),
        "smsno": patient("smsno", MOBILE),
        "opens": patient("opens", EMAIL),
        "emailsms": patient("emailsms", EMAIL, {**MOBILE, "rank": 2}),
        "emailonly": patient("emailonly", EMAIL, HOME),
    }
    for p in people.values():
        await live.put(p)
    await live.put({"resourceType": "Condition", "id": "hf", "subject": {"reference": "Patient/high"},
                    "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                   "code": "active"}]},
                    "code": {"coding": [{"system": SNOMED, "code": "84114007", "display": "Heart failure"}]}})
    for pid in people:
        await discharge(live, pid)

    # High risk: a call task for the coordinator, no message.
    [call] = await tasks(live, "high")
    assert call["owner"]["reference"] == "Practitioner/coordinator-1"
    assert call["status"] == "requested" and call["priority"] == "urgent"
    assert call["focus"]["reference"] == "Encounter/enc-high"
    assert call["restriction"]["period"]["end"] == "2026-03-02T08:00:00Z"
    assert await comms(live, "high") == []

    # Everyone else: one portal message, in progress until read.
    portal = {pid: await comms(live, pid, "portal") for pid in people if pid != "high"}
    assert all(len(v) == 1 and v[0]["status"] == "in-progress" for v in portal.values()), portal

    # "reads" reads it the next day (the portal sets `received`): the run ends there.
    live.clock.advance(86400)
    msg = portal["reads"][0]
    await live.put({**msg, "received": "2026-03-02T08:00:00Z"})
    await live.drain()

    # Two days pass: everyone else gets the reminder their preference asks for.
    await live.advance(days=2)
    assert len(await comms(live, "reads")) == 1  # no reminder after a read
    for pid in ("smsyes", "smsno"):
        assert len(await comms(live, pid, "sms")) == 1 and await comms(live, pid, "email") == []
    for pid in ("opens", "emailsms", "emailonly"):
        assert len(await comms(live, pid, "email")) == 1 and await comms(live, pid, "sms") == []
    [sms_yes] = await comms(live, "smsyes", "sms")
    # No SMS provider is configured in this test: the channel layer says so instead of pretending to send.
    assert sms_yes["status"] == "not-done"
    assert sms_yes["statusReason"]["coding"][0]["code"] == "channel-unavailable"
    assert "Reply YES or NO" in sms_yes["payload"][0]["contentString"]

    await reply(live, "smsyes", sms_yes, " yes ")
    [sms_no] = await comms(live, "smsno", "sms")
    await reply(live, "smsno", sms_no, "No thanks")
    [email] = await comms(live, "opens", "email")
    await live.put({**email, "extension": [{"url": ENGAGEMENT, "valueCode": "opened"}]})
    await live.drain()

    # Two more days: the unopened emails time out; "emailsms" can receive SMS, "emailonly" cannot.
    await live.advance(days=2)
    assert len(await comms(live, "emailsms", "sms")) == 1
    assert await comms(live, "emailonly", "sms") == []
    [sms2] = await comms(live, "emailsms", "sms")
    await reply(live, "emailsms", sms2, "YES")
    await live.advance(days=3)

    assert len(await tasks(live, "smsyes")) == 1
    assert len(await tasks(live, "emailsms")) == 1
    for pid in ("reads", "smsno", "opens", "emailonly"):
        assert await tasks(live, pid) == [], pid

    # Every run is finished and explained.
    runs = await live.runs("patient-discharge")
    assert len(runs) == len(people)
    paths = {}
    for run in runs:
        assert run["state"] == "done" and run["status"] == "completed", run
        why = await live.why(run["run"])
        paths[why["patient"].split("/")[1]] = [s["step"] for s in why["steps"]]
        risk = why["steps"][0]
        assert risk["step"] == "risk" and risk["values"][0]["expression"] == "%highrisk.exists()"
        assert risk["values"][0]["value"] is (why["patient"] == "Patient/high")
        if why["patient"] == "Patient/high":
            assert risk["evidence"] == ["Condition/hf"]
        for step in why["steps"]:
            if step["kind"] in ("message", "task"):
                assert step["outputs"], step
    assert paths["high"] == ["risk", "call"]
    assert paths["reads"] == ["risk", "portal", "portal-read", "portal-read", "end"]
    assert paths["smsyes"] == ["risk", "portal", "portal-read", "portal-read", "prefs", "sms", "sms-reply",
                               "sms-reply", "reply-yes", "call"]
    assert paths["smsno"][-2:] == ["reply-yes", "end"]
    assert paths["opens"] == ["risk", "portal", "portal-read", "portal-read", "prefs", "email", "email-opened",
                              "email-opened", "end"]
    assert paths["emailsms"][-6:] == ["can-sms", "sms", "sms-reply", "sms-reply", "reply-yes", "call"]
    assert paths["emailonly"][-2:] == ["can-sms", "end"]

    # Outcomes link back: basedOn the run's RequestGroup, a Provenance naming the trigger and journey version.
    high_run = next(r["run"] for r in runs if r["patient"] == "Patient/high")
    group = (await live.http.get(f"/fhir/RequestGroup/{high_run}")).json()
    assert group["instantiatesCanonical"] == ["http://fhir-outreach.org/journeys/patient-discharge|1.0.0"]
    assert group["status"] == "completed" and group["subject"]["reference"] == "Patient/high"
    assert call["basedOn"][0]["reference"] == f"RequestGroup/{group['id']}"
    [prov] = await live.search("Provenance", target=f"Task/{call['id']}")
    whats = {(e["role"], e["what"].get("reference"), e["what"].get("display")) for e in prov["entity"]}
    assert ("source", "Encounter/enc-high", None) in whats
    [(_, plan_ref, canonical)] = [w for w in whats if str(w[1]).startswith("PlanDefinition/")]
    assert canonical == "http://fhir-outreach.org/journeys/patient-discharge|1.0.0"
    assert (await live.http.get(f"/fhir/{plan_ref}")).json()["version"] == "1.0.0"

    # The same explanation as a FHIR operation: a valid Parameters resource with each step and the transcript.
    from fhir.resources.R4B.parameters import Parameters

    r = await live.http.get(f"/fhir/RequestGroup/{high_run}/$why")
    assert r.status_code == 200, r.text
    params = r.json()
    Parameters.model_validate(params)
    steps = [p for p in params["parameter"] if p["name"] == "step"]
    assert [next(x["valueString"] for x in s["part"] if x["name"] == "step") for s in steps] == ["risk", "call"]
    cond = next(x for x in steps[0]["part"] if x["name"] == "condition")
    assert {"name": "value", "valueBoolean": True} in cond["part"]
    assert "risk (branch)" in next(p["valueString"] for p in params["parameter"] if p["name"] == "transcript")
    wrong = await live.http.get(f"/fhir/Task/{call['id']}/$why")
    assert wrong.status_code == 400 and wrong.json()["issue"][0]["code"] == "not-supported"
    missing = await live.http.get("/fhir/RequestGroup/nope/$why")
    assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome"
