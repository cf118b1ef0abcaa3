"""The seven other sample journeys end to end through real HTTP on both stores (the discharge journey has
its own module): each loaded from profiles/journeys/*.yaml through the admin API, fed through the FHIR API,
run on a manual clock, and checked by the Communications and Tasks it writes and by ``why``."""

from __future__ import annotations

from typing import Any

from tests.journeys.conftest import Live

SCT = "http://snomed.info/sct"
CHANNEL = "http://fhir-outreach.org/CodeSystem/channel"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"


def person(pid: str, *telecom: dict[str, Any], gp: str = "Practitioner/gp-1") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "name": [{"given": [pid.title()], "family": "Doe"}],
            "telecom": list(telecom), "generalPractitioner": [{"reference": gp}]}


MOBILE = {"system": "phone", "use": "mobile", "value": "+1-555-0100", "rank": 1}
EMAIL = {"system": "email", "value": "x@example.org", "rank": 1}


async def outputs(live: Live, type_: str, pid: str) -> list[dict[str, Any]]:
    found = await live.search(type_, patient=pid, _sort="_lastUpdated")
    return [r for r in found if any(i.get("system") == "http://fhir-outreach.org/identifier/outreach"
                                    for i in r.get("identifier") or [])]


def medium(comm: dict[str, Any]) -> str:
    return str(comm["medium"][0]["coding"][0]["code"])


def text(comm: dict[str, Any]) -> str:
    return str(comm["payload"][0]["contentString"])


async def setup(live: Live, journey: str, *patients: dict[str, Any]) -> None:
    await live.load(journey)
    await live.put({"resourceType": "Practitioner", "id": "gp-1", "name": [{"family": "Grey"}]})
    await live.put({"resourceType": "Practitioner", "id": "doc-1", "name": [{"family": "House"}]})
    for p in patients:
        await live.put(p)
    await live.drain()


def appointment(aid: str, pid: str, status: str, code: str, start: str) -> dict[str, Any]:
    return {"resourceType": "Appointment", "id": aid, "status": status, "start": start,
            "end": start.replace(":00:00Z", ":30:00Z"),
            "serviceType": [{"coding": [{"system": SCT, "code": code}]}],
            "participant": [{"actor": {"reference": f"Patient/{pid}"}, "status": "accepted"}]}


def condition(cid: str, pid: str, code: str, status: str = "active") -> dict[str, Any]:
    return {"resourceType": "Condition", "id": cid, "subject": {"reference": f"Patient/{pid}"},
            "clinicalStatus": {"coding": [{"system": CLINICAL, "code": status}]},
            "code": {"coding": [{"system": SCT, "code": code}]}}


async def test_patient_arrived_tells_the_care_provider(live: Live) -> None:
    await setup(live, "patient-arrived", person("ann"), person("bob"))
    enc = {"resourceType": "Encounter", "id": "visit-ann", "status": "planned",
           "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
           "subject": {"reference": "Patient/ann"}, "participant": [{"individual": {"reference": "Practitioner/doc-1"}}],
           "location": [{"location": {"display": "Room 3"}}]}
    await live.put(enc)
    await live.drain()
    assert await outputs(live, "Communication", "ann") == []  # planned is not arrived
    await live.put({**enc, "status": "arrived"})
    await live.drain()
    await live.put({**enc, "status": "arrived", "serviceType": {"text": "follow-up"}})  # arrived → arrived
    await live.put({"resourceType": "Encounter", "id": "visit-bob", "status": "arrived",
                    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                    "subject": {"reference": "Patient/bob"}})
    await live.drain()
    [ann] = await outputs(live, "Communication", "ann")
    assert medium(ann) == "teams" and ann["recipient"] == [{"reference": "Practitioner/doc-1"}]
    assert text(ann) == "Ann Doe has arrived and is ready in Room 3."
    assert ann["about"] == [{"reference": "Encounter/visit-ann"}]
    # no Teams webhook is known for the practitioner here: the send is refused with that reason
    assert ann["status"] == "not-done" and ann["statusReason"]["coding"][0]["code"] == "no-address"
    [bob] = await outputs(live, "Communication", "bob")
    assert bob["recipient"] == [{"reference": "Practitioner/gp-1"}]  # no practitioner on the Encounter
    assert text(bob) == "Bob Doe has arrived and is ready."


def goal(gid: str, pid: str, due: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Goal", "id": gid, "lifecycleStatus": "active", "subject": {"reference": f"Patient/{pid}"},
            "description": {"text": f"Walk 30 minutes a day ({gid})"}, "target": [{"dueDate": due}], **extra}


async def test_careplan_goal_overdue_tells_the_patient_at_most_weekly(live: Live) -> None:
    await setup(live, "careplan-goal-overdue", person("ann"), person("bob"), person("cy"))
    await live.put(goal("g-ann", "ann", "2026-02-20"))
    await live.put(goal("g-bob", "bob", "2026-06-01"))  # not due yet
    await live.put(goal("g-cy", "cy", "2026-02-01", achievementStatus={"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/goal-achievement", "code": "achieved"}]}))
    await live.advance(days=1)  # the first scan ran at load time, before the goals; the next is a day later
    [first] = await outputs(live, "Communication", "ann")
    assert medium(first) == "portal" and first["status"] == "in-progress"
    assert text(first) == ('Your care-plan goal "Walk 30 minutes a day (g-ann)" was due on 2026-02-20. '
                           "Your care team is here to help you get back on track.")
    assert first["about"] == [{"reference": "Goal/g-ann"}]
    assert await outputs(live, "Communication", "bob") == [] and await outputs(live, "Communication", "cy") == []
    await live.advance(days=3)  # daily scans: still overdue, but re-entry only after 7 days
    assert len(await outputs(live, "Communication", "ann")) == 1
    await live.advance(days=5)
    assert len(await outputs(live, "Communication", "ann")) == 2
    runs = await live.runs("careplan-goal-overdue")
    assert {r["patient"] for r in runs} == {"Patient/ann"} and all(r["status"] == "completed" for r in runs)


async def reply(live: Live, to: dict[str, Any], pid: str, words: str) -> None:
    r = await live.http.post("/fhir/Communication", json={
        "resourceType": "Communication", "status": "completed", "subject": {"reference": f"Patient/{pid}"},
        "inResponseTo": [{"reference": f"Communication/{to['id']}"}], "payload": [{"contentString": words}]})
    assert r.status_code == 201, r.text
    await live.drain()


async def test_overdue_goal_care_manager_updates_the_goal_or_adds_a_task(live: Live) -> None:
    await setup(live, "overdue-goal-care-manager", person("ann"), person("bob"), person("cy"))
    for pid in ("ann", "bob", "cy"):
        await live.put(goal(f"g-{pid}", pid, "2026-02-15"))
    await live.advance(days=1)
    msgs = {pid: (await outputs(live, "Communication", pid))[0] for pid in ("ann", "bob", "cy")}
    for pid, msg in msgs.items():
        assert medium(msg) == "teams" and msg["recipient"] == [{"reference": "Practitioner/gp-1"}]
        assert "Reply UPDATE" in text(msg) and f"(g-{pid})" in text(msg)
    await reply(live, msgs["ann"], "ann", "update")
    await reply(live, msgs["bob"], "bob", "Task please")
    goal_ann = (await live.http.get("/fhir/Goal/g-ann")).json()
    assert goal_ann["target"][0]["dueDate"] == "2026-04-01"  # 30 days from 2026-03-02
    assert goal_ann["meta"]["versionId"] == "2"
    assert await outputs(live, "Task", "ann") == []
    [task_bob] = await outputs(live, "Task", "bob")
    assert task_bob["description"] == "Follow up with Bob Doe about the overdue goal: Walk 30 minutes a day (g-bob)"
    assert task_bob["owner"] == {"reference": "Practitioner/gp-1"}
    assert await outputs(live, "Task", "cy") == []
    await live.advance(days=3)  # cy's manager never answered
    [task_cy] = await outputs(live, "Task", "cy")
    assert task_cy["restriction"]["period"]["end"] == "2026-03-08T08:00:00Z"
    why = await live.why(next(r["run"] for r in await live.runs() if r["patient"] == "Patient/ann"))
    assert [s["step"] for s in why["steps"]] == ["notify", "answer", "answer", "choice", "move-date"]
    assert why["steps"][3]["values"][0] == {"arm": "update", "value": True, "expression":
                                            "%event.payload.contentString.first().trim().upper().startsWith('UPDATE')"}


async def test_pregnancy_first_appointment_confirms_reminds_and_stops_on_cancel(live: Live) -> None:
    await setup(live, "pregnancy-first-appointment", person("ann", MOBILE), person("bea", EMAIL), person("cat"))
    await live.put(appointment("a-ann", "ann", "booked", "424441002", "2026-03-10T09:00:00Z"))
    await live.put(appointment("a-bea", "bea", "booked", "424441002", "2026-03-12T09:00:00Z"))
    await live.put(appointment("a-cat", "cat", "booked", "185349003", "2026-03-10T09:00:00Z"))  # not prenatal
    await live.drain()
    [confirm] = await outputs(live, "Communication", "ann")
    assert medium(confirm) == "portal" and text(confirm).startswith(
        "Your first pregnancy appointment is booked for 2026-03-10.")
    assert len(await outputs(live, "Communication", "bea")) == 1
    assert await outputs(live, "Communication", "cat") == []
    await live.advance(days=6)  # 2026-03-07: nothing yet
    assert len(await outputs(live, "Communication", "ann")) == 1
    await live.put(appointment("a-bea", "bea", "cancelled", "424441002", "2026-03-12T09:00:00Z"))
    await live.drain()
    await live.advance(days=2)  # 2026-03-09: ann's reminder was due on 03-08 09:00
    reminder = (await outputs(live, "Communication", "ann"))[-1]
    assert medium(reminder) == "sms" and text(reminder) == "Reminder: your first pregnancy appointment is on 2026-03-10."
    await live.advance(days=10)
    assert len(await outputs(live, "Communication", "bea")) == 1  # cancelled: no reminder
    runs = {r["patient"]: r for r in await live.runs()}
    assert runs["Patient/bea"]["status"] == "exited" and runs["Patient/ann"]["status"] == "completed"
    why = await live.why(runs["Patient/ann"]["run"])
    assert why["steps"][1]["note"] == "wait until 2026-03-08T09:00:00Z"
    assert why["steps"][2]["at"] == "2026-03-08T09:00:00Z"  # fired on time on the manual clock


def permit_outreach(pid: str) -> dict[str, Any]:
    """The patient agreed to outreach (education) messages: education is outreach, and outreach consent is
    restrictive by default (FHIR_OUTREACH_CONSENT_OUTREACH)."""
    return {"resourceType": "Consent", "id": f"permit-{pid}", "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{pid}"}, "policyRule": {"text": "agreed to education messages"},
            "provision": {"type": "permit", "purpose": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HMARKT"}]}}


async def test_pregnancy_education_after_a_fulfilled_prenatal_visit(live: Live) -> None:
    await setup(live, "pregnancy-appointment-education", person("ann"), person("bea"), person("cat"))
    await live.put(condition("preg-ann", "ann", "77386006"))
    await live.put(condition("preg-cat", "cat", "77386006"))
    await live.put(permit_outreach("ann"))  # cat gave no consent to outreach
    for pid in ("ann", "bea", "cat"):
        appt = appointment(f"v-{pid}", pid, "booked", "424619006", "2026-03-01T07:00:00Z")
        await live.put(appt)
        await live.put({**appt, "status": "fulfilled"})
    await live.drain()
    [first] = await outputs(live, "Communication", "ann")
    assert "what to expect" in text(first) and first["status"] == "in-progress"
    [refused] = await outputs(live, "Communication", "cat")  # no outreach consent: not written to the inbox
    assert refused["status"] == "not-done" and refused["statusReason"]["coding"][0]["code"] == "consent"
    await live.advance(days=6)
    assert len(await outputs(live, "Communication", "ann")) == 1
    await live.advance(days=1, seconds=1)
    second = (await outputs(live, "Communication", "ann"))[-1]
    assert "Healthy habits" in text(second) and second["status"] == "in-progress"
    assert await outputs(live, "Communication", "bea") == []  # no pregnancy recorded
    why_bea = await live.why(next(r["run"] for r in await live.runs() if r["patient"] == "Patient/bea"))
    assert why_bea["steps"][0]["values"][0]["value"] is False
    why_ann = await live.why(next(r["run"] for r in await live.runs() if r["patient"] == "Patient/ann"))
    assert why_ann["steps"][0]["evidence"] == ["Condition/preg-ann"]


async def test_diabetes_annual_eye_exam_reminds_until_an_exam_is_recorded(live: Live) -> None:
    await setup(live, "diabetes-annual-eye-exam", person("ann", MOBILE), person("bob", EMAIL))
    await live.put({"resourceType": "Procedure", "id": "exam-bob", "status": "completed",
                    "subject": {"reference": "Patient/bob"}, "performedDateTime": "2025-12-01T10:00:00Z",
                    "code": {"coding": [{"system": SCT, "code": "36228007"}]}})
    await live.put(condition("dm-ann", "ann", "44054006"))
    await live.put(condition("dm-bob", "bob", "44054006"))
    await live.drain()
    [first] = await outputs(live, "Communication", "ann")
    assert medium(first) == "sms" and "eye exam every year" in text(first)
    assert await outputs(live, "Communication", "bob") == []  # examined three months ago
    await live.advance(days=30, seconds=1)
    assert len(await outputs(live, "Communication", "ann")) == 2  # still no exam: reminded again
    await live.put({"resourceType": "Procedure", "id": "exam-ann", "status": "completed",
                    "subject": {"reference": "Patient/ann"}, "performedDateTime": "2026-04-02T10:00:00Z",
                    "code": {"coding": [{"system": SCT, "code": "36228007"}]}})
    await live.advance(days=30)
    assert len(await outputs(live, "Communication", "ann")) == 2
    runs = {r["patient"]: r for r in await live.runs()}
    assert runs["Patient/ann"]["state"] == "waiting" and runs["Patient/ann"]["step"] == "next-year"
    why = await live.why(runs["Patient/ann"]["run"])
    kinds = [(s["step"], s.get("arm")) for s in why["steps"] if s["kind"] == "branch"]
    assert kinds == [("check", "else"), ("check", "else"), ("check", "recent-exam")]


async def test_diabetes_eye_exam_follow_up_tasks_from_the_outcome(live: Live) -> None:
    await setup(live, "diabetes-eye-exam-follow-up", person("ann"), person("bob"))
    await live.put(condition("dr-ann", "ann", "4855003"))
    for pid in ("ann", "bob"):
        appt = appointment(f"eye-{pid}", pid, "booked", "36228007", "2026-03-01T07:00:00Z")
        await live.put(appt)
        await live.put({**appt, "status": "fulfilled"})
    await live.drain()
    [refer] = await outputs(live, "Task", "ann")
    assert refer["priority"] == "urgent" and refer["code"]["coding"][0]["code"] == "183542007"
    assert refer["restriction"]["period"]["end"] == "2026-03-15T08:00:00Z"
    assert refer["description"].startswith("Refer Ann Doe to ophthalmology")
    [schedule] = await outputs(live, "Task", "bob")
    assert schedule["priority"] == "routine" and schedule["restriction"]["period"]["end"] == "2027-02-01T08:00:00Z"
    for pid in ("ann", "bob"):
        [msg] = await outputs(live, "Communication", pid)
        assert medium(msg) == "portal"
