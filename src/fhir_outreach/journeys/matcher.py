"""Matching: which journeys a change starts, and whether a change is the engagement an awaiting run waits
for. Pure functions over ``(event, journeys)`` — no I/O — returning the matches and, for every journey that
did not match, why (kept on the event record and logged at debug level).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..fhir.fhirpath import FhirPathError, evaluate_boolean
from ..intake.topics import Topic
from .definition import EXT, IDENTIFIER_SYSTEM, Journey, Trigger

ENGAGEMENT_URL = EXT + "engagement"


@dataclass(frozen=True, slots=True)
class Match:
    journey: Journey
    trigger: Trigger


def patient_of(resource: Mapping[str, Any] | None, focus: str | None = None) -> str | None:
    """``Patient/{id}`` a resource is about (itself, subject, patient, for, beneficiary), or None."""
    if focus and focus.startswith("Patient/"):
        return focus
    if not resource:
        return None
    if resource.get("resourceType") == "Patient" and resource.get("id"):
        return f"Patient/{resource['id']}"
    for key in ("subject", "patient", "for", "beneficiary"):
        ref = resource.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str) and "Patient/" in ref["reference"]:
            return "Patient/" + ref["reference"].split("Patient/", 1)[1].split("/")[0]
    for p in resource.get("participant") or []:  # Appointment
        ref = (p.get("actor") or {}).get("reference") if isinstance(p, dict) else None
        if isinstance(ref, str) and "Patient/" in ref:
            return "Patient/" + ref.split("Patient/", 1)[1].split("/")[0]
    return None


def trigger_matches(trigger: Trigger, event: Mapping[str, Any], topics: Mapping[str, Topic]) -> tuple[bool, str]:
    resource = event.get("resource")
    interaction = event.get("interaction")
    rtype = str(event.get("focus") or "").split("/")[0]
    if resource is None or interaction not in ("create", "update"):
        return False, f"{interaction or 'unknown'} changes start no journey"
    if trigger.kind == "periodic":
        return False, "periodic trigger (started by its schedule)"
    if trigger.kind == "data":
        if rtype != trigger.type:
            return False, f"{rtype} is not {trigger.type}"
        if interaction not in trigger.interactions:
            return False, f"{interaction} is not {'/'.join(trigger.interactions)}"
    else:
        topic = topics.get(str(trigger.topic))
        if topic is None:
            return False, f"unknown topic {trigger.topic}"
        if rtype != topic.resource:
            return False, f"{rtype} is not the {topic.name} resource ({topic.resource})"
        if interaction not in topic.interactions:
            return False, f"{interaction} is not an interaction of {topic.name}"
        if event.get("topic") == topic.name and event.get("topic_matched") is False:
            return False, f"topic {topic.name} criteria not met at intake"
        if topic.fhirpath and not (event.get("topic") == topic.name and event.get("topic_matched") is True):
            ok = evaluate_boolean(topic.fhirpath, resource, {"current": resource, "previous": event.get("previous")})
            if not ok:
                return False, f"topic {topic.name} criteria not met"
    if trigger.condition:
        ok = evaluate_boolean(trigger.condition, resource, {"current": resource, "previous": event.get("previous")})
        if not ok:
            return False, "trigger condition is not true"
    return True, "matched"


def match(event: Mapping[str, Any], journeys: Sequence[Journey],
          topics: Mapping[str, Topic]) -> tuple[list[Match], dict[str, str]]:
    matches: list[Match] = []
    why: dict[str, str] = {}
    for journey in journeys:
        reasons = []
        for trigger in journey.triggers:
            try:
                ok, reason = trigger_matches(trigger, event, topics)
            except FhirPathError as exc:
                ok, reason = False, f"error: {exc.diagnostics}"
            if ok:
                matches.append(Match(journey, trigger))
                break
            reasons.append(reason)
        else:
            why[journey.canonical] = "; ".join(reasons) or "no trigger"
    return matches, why


def _ours(resource: Mapping[str, Any], target: str) -> bool:
    """Whether ``resource`` is the awaited output (by id, or by our identifier once written back)."""
    return f"{resource.get('resourceType')}/{resource.get('id')}" == target


def engagement_codes(resource: Mapping[str, Any]) -> set[str]:
    return {str(e.get("valueCode")) for e in resource.get("extension") or [] if e.get("url") == ENGAGEMENT_URL}


def engaged(wait: Mapping[str, Any], resource: Mapping[str, Any] | None, *, identifier: str | None = None) -> bool:
    """Whether ``resource`` (a change for the run's patient) is the engagement ``wait`` describes, before
    its criteria. ``identifier`` is our identifier value of the awaited output (matches a written-back copy
    whose id the source server assigned)."""
    if resource is None:
        return False
    event, target = wait.get("event"), str(wait.get("target") or "")
    is_target = _ours(resource, target) or (bool(identifier) and any(
        i.get("system") == IDENTIFIER_SYSTEM and i.get("value") == identifier for i in resource.get("identifier") or []))
    if event == "change":
        return True
    if event == "replied":
        target_id = target.split("/")[-1]
        return resource.get("resourceType") == "Communication" and any(
            str((r or {}).get("reference") or "").split("/")[-1] == target_id for r in resource.get("inResponseTo") or [])
    if not is_target:
        return False
    if event == "read":  # the portal sets received (or completes it); other channels report "read"
        portal = any(c.get("code") == "portal" for m in resource.get("medium") or [] for c in m.get("coding") or [])
        return bool(resource.get("received")) or "read" in engagement_codes(resource) \
            or (portal and resource.get("status") == "completed")
    if event == "opened":
        return bool(engagement_codes(resource) & {"opened", "clicked", "read", "replied"}) \
            or bool(resource.get("received"))
    if event == "clicked":
        return "clicked" in engagement_codes(resource)
    if event == "completed":
        return resource.get("resourceType") == "Task" and resource.get("status") == "completed"
    return False
