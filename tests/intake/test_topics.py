"""The shipped SubscriptionTopics: every file loads, both FHIR forms validate and agree with the summary,
the in-package copy matches ``subscriptions/topics/``, and the FHIRPath criteria fire on the transitions
they are named for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.basic import Basic
from fhir.resources.R4B.subscriptiontopic import SubscriptionTopic
from fhirpathpy import evaluate

from fhir_outreach.fhir.searchparams import params_for
from fhir_outreach.intake.topics import Topic, default_topic_dir, load_topics

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIR = REPO / "subscriptions" / "topics"
PACKAGE_DIR = REPO / "src" / "fhir_outreach" / "intake" / "topic_data"
ST = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic"
CANONICAL_BASE = "http://fhir-outreach.org/SubscriptionTopic/"

GENERIC_TYPES = (
    "Encounter",
    "Observation",
    "Condition",
    "Procedure",
    "AllergyIntolerance",
    "EpisodeOfCare",
    "MedicationRequest",
    "Appointment",
    "CarePlan",
    "Goal",
)
EXPECTED = {
    "encounter-discharged",
    "patient-arrived",
    "appointment-arrived",
    "appointment-booked",
    "appointment-changed",
    "appointment-cancelled",
    "appointment-fulfilled",
    "careplan-goal-overdue",
    "observation-created-or-updated",
    "condition-recorded",
    *(f"{t.lower()}-created-or-updated" for t in GENERIC_TYPES),
}

TOPICS = load_topics()


@pytest.fixture(params=sorted(TOPICS), ids=str)
def topic(request: pytest.FixtureRequest) -> Topic:
    return TOPICS[request.param]


def test_the_listed_triggers_are_shipped() -> None:
    assert set(TOPICS) == EXPECTED


def test_package_copy_is_identical_to_the_source() -> None:
    source = {p.name: p.read_bytes() for p in SOURCE_DIR.glob("*.json")}
    shipped = {p.name: p.read_bytes() for p in PACKAGE_DIR.glob("*.json")}
    assert source, "no topic files in subscriptions/topics"
    assert shipped == source, "run scripts/sync-topics"


def test_default_reads_the_package_copy() -> None:
    assert default_topic_dir().name == "topic_data"
    assert load_topics(SOURCE_DIR) == TOPICS


def test_topic_validates_as_r4b_subscriptiontopic(topic: Topic) -> None:
    model = SubscriptionTopic.model_validate(topic.topic)
    assert model.url == topic.canonical == CANONICAL_BASE + topic.name
    assert model.version == "0.1.0"
    assert model.status == "active"
    assert model.id == f"fhir-outreach-{topic.name}" and len(model.id) <= 64
    assert model.resourceTrigger is not None and len(model.resourceTrigger) == 1


def test_basic_validates_as_r4b_basic(topic: Topic) -> None:
    model = Basic.model_validate(topic.basic)
    assert model.id == topic.topic["id"]
    codings = [(c.system, c.code) for c in model.code.coding or []]
    assert codings == [("http://hl7.org/fhir/fhir-types", "SubscriptionTopic")]


def test_summary_matches_the_r4b_topic(topic: Topic) -> None:
    trigger = topic.topic["resourceTrigger"][0]
    assert trigger["resource"] == f"http://hl7.org/fhir/StructureDefinition/{topic.resource}"
    assert tuple(trigger["supportedInteraction"]) == topic.interactions
    assert trigger.get("fhirPathCriteria") == topic.fhirpath
    assert trigger.get("queryCriteria", {}).get("current") == topic.query_current
    assert tuple(f["filterParameter"] for f in topic.topic["canFilterBy"]) == topic.can_filter_by
    assert {f["resource"] for f in topic.topic["canFilterBy"]} == {topic.resource}


def test_basic_round_trips_the_key_facts(topic: Topic) -> None:
    facts = _facts_from_basic(topic.basic)
    trigger = topic.topic["resourceTrigger"][0]
    assert facts == {
        "url": topic.canonical,
        "version": topic.topic["version"],
        "title": topic.title,
        "description": topic.topic["description"],
        "status": "active",
        "resource": trigger["resource"],
        "interactions": list(topic.interactions),
        "fhirpath": topic.fhirpath,
        "query": trigger.get("queryCriteria"),
        "can_filter_by": [(f["resource"], f["filterParameter"]) for f in topic.topic["canFilterBy"]],
    }


def test_criteria_and_filters_are_sound(topic: Topic) -> None:
    assert set(topic.interactions) <= {"create", "update", "delete"}
    assert topic.interactions
    known = params_for(topic.resource)
    assert "patient" in topic.can_filter_by
    assert [p for p in topic.can_filter_by if p not in known] == []
    if topic.query_current:
        param = topic.query_current.split("=", 1)[0].split(":", 1)[0]
        assert param in known
    if topic.fhirpath:
        evaluate(
            {"resourceType": topic.resource},
            topic.fhirpath,
            {"current": {"resourceType": topic.resource}, "previous": []},
        )


def test_only_the_overdue_goal_topic_is_periodic() -> None:
    assert [t.name for t in TOPICS.values() if t.periodic] == ["careplan-goal-overdue"]
    overdue = TOPICS["careplan-goal-overdue"]
    assert overdue.resource == "Goal"
    assert overdue.interactions == ("create", "update")
    assert "periodic scan" in overdue.topic["description"]


def _fires(name: str, previous: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """A trigger's FHIRPath on one change, with ``%previous`` empty on a create (as servers evaluate it)."""
    topic = TOPICS[name]
    if ("update" if previous else "create") not in topic.interactions:
        return False
    if topic.fhirpath is None:
        return True
    result = evaluate(current, topic.fhirpath, {"current": current, "previous": previous or []})
    return result == [True]


ENC = {"resourceType": "Encounter", "class": {"code": "IMP"}, "subject": {"reference": "Patient/p1"}}
APPT = {
    "resourceType": "Appointment",
    "status": "booked",
    "start": "2026-03-02T09:00:00Z",
    "end": "2026-03-02T09:30:00Z",
    "participant": [
        {"actor": {"reference": "Patient/p1"}, "status": "accepted"},
        {"actor": {"reference": "Practitioner/d1"}, "status": "accepted"},
    ],
}


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return json.loads(json.dumps(base)) | changes


@pytest.mark.parametrize(
    ("name", "previous", "current", "expected"),
    [
        ("encounter-discharged", _with(ENC, status="in-progress"), _with(ENC, status="finished"), True),
        ("encounter-discharged", None, _with(ENC, status="finished"), True),
        ("encounter-discharged", _with(ENC, status="finished"), _with(ENC, status="finished"), False),
        ("encounter-discharged", _with(ENC, status="planned"), _with(ENC, status="in-progress"), False),
        ("patient-arrived", _with(ENC, status="planned"), _with(ENC, status="arrived"), True),
        ("appointment-arrived", APPT, _with(APPT, status="arrived"), True),
        ("appointment-booked", _with(APPT, status="proposed"), APPT, True),
        ("appointment-booked", None, APPT, True),
        ("appointment-booked", APPT, _with(APPT, start="2026-03-02T10:00:00Z"), False),
        (
            "appointment-changed",
            APPT,
            _with(APPT, start="2026-03-02T10:00:00Z", end="2026-03-02T10:30:00Z"),
            True,
        ),
        ("appointment-changed", APPT, _with(APPT, participant=APPT["participant"][:1]), True),
        (
            "appointment-changed",
            APPT,
            _with(
                APPT,
                participant=[
                    APPT["participant"][0],
                    {"actor": {"reference": "Practitioner/d2"}, "status": "accepted"},
                ],
            ),
            True,
        ),
        ("appointment-changed", APPT, _with(APPT, participant=APPT["participant"][::-1]), False),
        ("appointment-changed", APPT, _with(APPT, comment="bring your glasses"), False),
        ("appointment-changed", _with(APPT, status="proposed"), APPT, False),
        ("appointment-changed", APPT, _with(APPT, status="cancelled"), False),
        ("appointment-changed", None, APPT, False),
        ("appointment-cancelled", APPT, _with(APPT, status="cancelled"), True),
        ("appointment-fulfilled", _with(APPT, status="arrived"), _with(APPT, status="fulfilled"), True),
        ("condition-recorded", None, {"resourceType": "Condition", "code": {"text": "asthma"}}, True),
        (
            "condition-recorded",
            None,
            {"resourceType": "Condition", "verificationStatus": {"coding": [{"code": "entered-in-error"}]}},
            False,
        ),
        ("condition-recorded", {"resourceType": "Condition"}, {"resourceType": "Condition"}, False),
        (
            "observation-created-or-updated",
            {"resourceType": "Observation"},
            {"resourceType": "Observation"},
            True,
        ),
    ],
)
def test_fhirpath_fires_on_the_named_transition(
    name: str, previous: dict[str, Any] | None, current: dict[str, Any], expected: bool
) -> None:
    assert _fires(name, previous, current) is expected


def test_a_file_whose_name_disagrees_is_rejected(tmp_path: Path) -> None:
    doc = json.loads((SOURCE_DIR / "appointment-booked.json").read_text())
    (tmp_path / "appointment-moved.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"appointment-moved\.json"):
        load_topics(tmp_path)


def _facts_from_basic(basic: dict[str, Any]) -> dict[str, Any]:
    """Read a backport ``Basic`` topic the way a server does: by extension URL, nested by element name."""

    def one(node: dict[str, Any], url: str) -> Any:
        values = [_value(e) for e in node.get("extension", []) if e["url"] == url]
        assert len(values) <= 1, url
        return values[0] if values else None

    def all_of(node: dict[str, Any], url: str) -> list[dict[str, Any]]:
        return [e for e in node.get("extension", []) if e["url"] == url]

    (trigger,) = all_of(basic, f"{ST}.resourceTrigger")
    queries = all_of(trigger, "queryCriteria")
    (status,) = [_value(e) for e in basic["modifierExtension"] if e["url"] == f"{ST}.status"]
    return {
        "url": one(basic, f"{ST}.url"),
        "version": one(basic, f"{ST}.version"),
        "title": one(basic, f"{ST}.title"),
        "description": one(basic, f"{ST}.description"),
        "status": status,
        "resource": one(trigger, "resource"),
        "interactions": [_value(e) for e in all_of(trigger, "supportedInteraction")],
        "fhirpath": one(trigger, "fhirPathCriteria"),
        "query": {e["url"]: _value(e) for e in queries[0]["extension"]} if queries else None,
        "can_filter_by": [
            (one(f, "resource"), one(f, "filterParameter")) for f in all_of(basic, f"{ST}.canFilterBy")
        ],
    }


def _value(extension: dict[str, Any]) -> Any:
    (value,) = [v for k, v in extension.items() if k.startswith("value")]
    return value
