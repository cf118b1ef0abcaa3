"""``matcher``: which change starts which journey (and why not), whether a change is the engagement an await
waits for, and which patient a resource is about. The cases are tables in ``data/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from fhir_outreach.fhir.fhirpath import FhirPathError
from fhir_outreach.intake.topics import Topic, load_topics
from fhir_outreach.journeys.compiler import compile_journey
from fhir_outreach.journeys.definition import Journey, parse_journey
from fhir_outreach.journeys.matcher import engaged, match, patient_of, trigger_matches

DATA = Path(__file__).parent / "data"
TOPICS: dict[str, Topic] = load_topics()


def table(name: str, key: str | None = None) -> list[Any]:
    doc = yaml.safe_load((DATA / name).read_text())
    rows = doc[key] if key else doc
    return [pytest.param(row, id=row["name"], marks=[pytest.mark.xfail(strict=True, reason=row["xfail"])]
                         if row.get("xfail") else []) for row in rows]


def journey(trigger: Any, name: str = "matcher-case") -> Journey:
    plan, _ = compile_journey({"journey": name, "trigger": trigger, "steps": [{"id": "done", "end": True}]})
    return parse_journey(plan, {}, known_topics=set(TOPICS))


# --- starting journeys -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", table("triggers.yaml", "cases"))
def test_trigger(case: dict[str, Any]) -> None:
    j = journey(case["trigger"])
    matches, why = match(case["event"], [j], TOPICS)
    if case["matched"]:
        assert [m.journey for m in matches] == [j] and why == {}, why
        assert matches[0].trigger in j.triggers
    else:
        assert matches == []
        assert case["why"] in why[j.canonical], why


def test_match_reports_per_journey() -> None:
    """Of several journeys, the ones that start are returned and every other one says why it did not."""
    enc = {"resourceType": "Encounter", "id": "e1", "status": "finished", "subject": {"reference": "Patient/p1"}}
    event = {"interaction": "update", "focus": "Encounter/e1", "resource": enc,
             "previous": {**enc, "status": "in-progress"}}
    discharge = journey({"topic": "encounter-discharged"}, "discharge")
    arrived = journey({"topic": "patient-arrived"}, "arrived")
    appointment = journey({"type": "Appointment"}, "appointment")
    any_encounter = journey({"type": "Encounter"}, "any-encounter")
    matches, why = match(event, [discharge, arrived, appointment, any_encounter], TOPICS)
    assert [m.journey for m in matches] == [discharge, any_encounter]
    assert set(why) == {arrived.canonical, appointment.canonical}
    assert why[appointment.canonical] == "Encounter is not Appointment"


def test_trigger_condition_sees_current_and_previous_only_as_given() -> None:
    """``%previous`` is the event's previous version; a condition on it is false (empty) without one."""
    j = journey({"topic": "encounter-discharged", "when": "%previous.status = 'in-progress'"})
    enc = {"resourceType": "Encounter", "id": "e1", "status": "finished"}
    with_prev = {"interaction": "update", "focus": "Encounter/e1", "resource": enc,
                 "previous": {**enc, "status": "in-progress"}}
    assert trigger_matches(j.triggers[0], with_prev, TOPICS) == (True, "matched")
    without = {"interaction": "create", "focus": "Encounter/e1", "resource": enc}
    assert trigger_matches(j.triggers[0], without, TOPICS) == (False, "trigger condition is not true")


def test_fhirpath_error_raises_from_trigger_matches_and_is_a_reason_in_match() -> None:
    j = journey({"type": "Appointment", "when": "%current.status"})
    event = {"interaction": "create", "focus": "Appointment/a1",
             "resource": {"resourceType": "Appointment", "id": "a1", "status": "booked"}}
    with pytest.raises(FhirPathError, match="expected a single boolean"):
        trigger_matches(j.triggers[0], event, TOPICS)
    matches, why = match(event, [j], TOPICS)
    assert matches == []
    assert why[j.canonical].startswith("error: FHIRPath '%current.status': expected a single boolean")


# --- engagement --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", table("engagement.yaml"))
def test_engaged(case: dict[str, Any]) -> None:
    result = engaged(case["wait"], case["resource"], identifier=case.get("identifier"))
    assert result is case["engaged"]


# --- the patient a resource is about -----------------------------------------------------------------

@pytest.mark.parametrize("case", table("patient-of.yaml"))
def test_patient_of(case: dict[str, Any]) -> None:
    assert patient_of(case["resource"], case.get("focus")) == case["patient"]
