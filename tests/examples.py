"""Synthetic FHIR R4 example resources: at least one per type the server supports.

Written by hand from the R4 (4.0.1) specification for ``tests/api/test_capability.py``. Together they give a
value to every search parameter in ``fhir_outreach.fhir.searchparams.PARAMS``: references point at each
other through fixed ``ex-*`` ids (the test loads them with ``PUT Type/id`` in one transaction), choice
elements use more than one of their types across examples, and the few targets that are not supported by
the server (Organization, CareTeam, ServiceRequest, Medication) are plain references the server stores as-is.

All values are invented: no real people, organisations or identifiers. Codes are real SNOMED CT / LOINC /
HL7 terminology codes so that the resources look like what an EHR would send.
"""

from __future__ import annotations

import copy
from typing import Any

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ID_SYS = "urn:oid:2.16.840.1.113883.3.9999.1"  # a synthetic identifier namespace
ORG = "Organization/ex-org"  # not a supported type: stays a plain reference
BASE_URL = "http://example.org/fhir"
PLAN_URL = f"{BASE_URL}/PlanDefinition/diabetes-outreach"
ACTIVITY_URL = f"{BASE_URL}/ActivityDefinition/hba1c-reminder"

PATIENT = {"reference": "Patient/ex-patient", "display": "Alex Example"}
PRACTITIONER = {"reference": "Practitioner/ex-practitioner", "display": "Dr. Robin Sample"}
ROLE = {"reference": "PractitionerRole/ex-role"}
CLINIC = {"reference": "Location/ex-clinic", "display": "Riverside Diabetes Clinic"}
ENCOUNTER = {"reference": "Encounter/ex-encounter"}


def _cc(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _ident(value: str) -> list[dict[str, Any]]:
    return [{"use": "official", "system": ID_SYS, "value": value}]


GENERAL_PRACTICE = _cc(SNOMED, "394814009", "General practice")
ENDOCRINOLOGY = _cc(SNOMED, "394583002", "Endocrinology")
DIABETIC_REVIEW = _cc(SNOMED, "170744004", "Diabetic follow-up")
DIABETES = _cc(SNOMED, "44054006", "Diabetes mellitus type 2")
FOLLOW_UP = _cc("http://terminology.hl7.org/CodeSystem/v2-0276", "FOLLOWUP", "A follow up visit from a previous appointment")
SMS = _cc("http://terminology.hl7.org/CodeSystem/v3-ParticipationMode", "SMSWRIT", "SMS written")
REMINDER = _cc("http://terminology.hl7.org/CodeSystem/communication-category", "reminder", "Reminder")


PATIENT_EX: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "ex-patient",
    "identifier": [{"use": "usual", "type": _cc("http://terminology.hl7.org/CodeSystem/v2-0203", "MR", "Medical record number"),
                    "system": ID_SYS, "value": "MRN-000417"}],
    "active": True,
    "name": [{"use": "official", "family": "Example", "given": ["Alex", "Jordan"]}],
    "telecom": [
        {"system": "phone", "value": "+1-555-010-4477", "use": "mobile", "rank": 1},
        {"system": "email", "value": "alex.example@example.org", "use": "home"},
    ],
    "gender": "female",
    "birthDate": "1968-04-12",
    "address": [{"use": "home", "line": ["42 Harbour Lane"], "city": "Springfield", "state": "OR",
                 "postalCode": "97477", "country": "US"}],
    "communication": [{"language": _cc("urn:ietf:bcp:47", "en-US", "English (United States)"), "preferred": True}],
    "generalPractitioner": [PRACTITIONER],
    "managingOrganization": {"reference": ORG, "display": "Riverside Health"},
}

PRACTITIONER_EX: dict[str, Any] = {
    "resourceType": "Practitioner",
    "id": "ex-practitioner",
    "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "9990000417"}],
    "active": True,
    "name": [{"family": "Sample", "given": ["Robin"], "prefix": ["Dr."]}],
    "telecom": [
        {"system": "phone", "value": "+1-555-010-9000", "use": "work"},
        {"system": "email", "value": "robin.sample@riverside.example.org", "use": "work"},
    ],
    "gender": "male",
}

ROLE_EX: dict[str, Any] = {
    "resourceType": "PractitionerRole",
    "id": "ex-role",
    "identifier": _ident("ROLE-0042"),
    "active": True,
    "period": {"start": "2020-01-01"},
    "practitioner": PRACTITIONER,
    "organization": {"reference": ORG},
    "code": [_cc("http://terminology.hl7.org/CodeSystem/practitioner-role", "doctor", "Doctor")],
    "specialty": [ENDOCRINOLOGY],
    "location": [CLINIC],
    "telecom": [{"system": "email", "value": "endocrinology@riverside.example.org", "use": "work"}],
}

BUILDING_EX: dict[str, Any] = {
    "resourceType": "Location",
    "id": "ex-building",
    "status": "active",
    "name": "Riverside Medical Center",
    "mode": "instance",
    "physicalType": _cc("http://terminology.hl7.org/CodeSystem/location-physical-type", "bu", "Building"),
    "address": {"line": ["100 River Road"], "city": "Springfield", "state": "OR", "postalCode": "97477"},
}

CLINIC_EX: dict[str, Any] = {
    "resourceType": "Location",
    "id": "ex-clinic",
    "identifier": _ident("LOC-DIAB-2"),
    "status": "active",
    "name": "Riverside Diabetes Clinic",
    "alias": ["Diabetes Centre"],
    "mode": "instance",
    "type": [_cc("http://terminology.hl7.org/CodeSystem/v3-RoleCode", "ENDOS", "Endocrinology clinic")],
    "telecom": [{"system": "phone", "value": "+1-555-010-2000"}],
    "address": {"use": "work", "line": ["100 River Road", "Wing B"], "city": "Springfield", "state": "OR",
                "postalCode": "97477", "country": "US"},
    "managingOrganization": {"reference": ORG},
    "partOf": {"reference": "Location/ex-building"},
}

ENCOUNTER_EX: dict[str, Any] = {
    "resourceType": "Encounter",
    "id": "ex-encounter",
    "identifier": _ident("ENC-2024-0815"),
    "status": "finished",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"},
    "type": [DIABETIC_REVIEW],
    "subject": PATIENT,
    "episodeOfCare": [{"reference": "EpisodeOfCare/ex-episode"}],
    "participant": [{"type": [_cc("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "PPRF", "primary performer")],
                     "individual": PRACTITIONER}],
    "appointment": [{"reference": "Appointment/ex-appointment"}],
    "period": {"start": "2024-08-15T09:30:00Z", "end": "2024-08-15T10:05:00Z"},
    "reasonCode": [DIABETES],
    "location": [{"location": CLINIC, "status": "completed"}],
    "serviceProvider": {"reference": ORG},
}

EPISODE_EX: dict[str, Any] = {
    "resourceType": "EpisodeOfCare",
    "id": "ex-episode",
    "identifier": _ident("EOC-0007"),
    "status": "active",
    "type": [_cc("http://terminology.hl7.org/CodeSystem/episodeofcare-type", "hacc", "Home and Community Care")],
    "diagnosis": [{"condition": {"reference": "Condition/ex-diabetes"}, "rank": 1}],
    "patient": PATIENT,
    "managingOrganization": {"reference": ORG},
    "period": {"start": "2023-02-01", "end": "2025-01-31"},
    "careManager": PRACTITIONER,
}

DIABETES_EX: dict[str, Any] = {
    "resourceType": "Condition",
    "id": "ex-diabetes",
    "identifier": _ident("PROB-0001"),
    "clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"),
    "verificationStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "Confirmed"),
    "category": [_cc("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item", "Problem List Item")],
    "severity": _cc(SNOMED, "6736007", "Moderate"),
    "code": DIABETES,
    "subject": PATIENT,
    "encounter": ENCOUNTER,
    "onsetDateTime": "2019-03-20",
    "recordedDate": "2019-04-02T11:15:00Z",
    "recorder": PRACTITIONER,
}

BRONCHITIS_EX: dict[str, Any] = {
    "resourceType": "Condition",
    "id": "ex-bronchitis",
    "clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "resolved", "Resolved"),
    "verificationStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "Confirmed"),
    "category": [_cc("http://terminology.hl7.org/CodeSystem/condition-category", "encounter-diagnosis", "Encounter Diagnosis")],
    "severity": _cc(SNOMED, "255604002", "Mild"),
    "code": _cc(SNOMED, "10509002", "Acute bronchitis"),
    "subject": PATIENT,
    "onsetPeriod": {"start": "2023-11-02", "end": "2023-11-04"},
    "abatementDateTime": "2023-11-20",
    "recordedDate": "2023-11-06",
}

OBSERVATION_EX: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "ex-smoking",
    "identifier": _ident("OBS-7781"),
    "basedOn": [{"reference": "CarePlan/ex-careplan"}],
    "status": "final",
    "category": [_cc("http://terminology.hl7.org/CodeSystem/observation-category", "social-history", "Social History")],
    "code": _cc(LOINC, "72166-2", "Tobacco smoking status"),
    "subject": PATIENT,
    "encounter": ENCOUNTER,
    "effectiveDateTime": "2024-08-15T09:45:00Z",
    "issued": "2024-08-15T09:50:12Z",
    "performer": [PRACTITIONER],
    "valueCodeableConcept": _cc(SNOMED, "8517006", "Ex-smoker"),
}

HBA1C_EX: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "ex-hba1c",
    "status": "final",
    "category": [_cc("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory", "Laboratory")],
    "code": _cc(LOINC, "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood"),
    "subject": PATIENT,
    "effectivePeriod": {"start": "2024-08-14T07:40:00Z", "end": "2024-08-14T07:45:00Z"},
    "valueQuantity": {"value": 7.4, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
}

PROCEDURE_EX: dict[str, Any] = {
    "resourceType": "Procedure",
    "id": "ex-procedure",
    "identifier": _ident("PROC-3301"),
    "status": "completed",
    "category": _cc(SNOMED, "103693007", "Diagnostic procedure"),
    "code": _cc(SNOMED, "314971001", "Diabetic retinopathy screening"),
    "subject": PATIENT,
    "encounter": ENCOUNTER,
    "performedPeriod": {"start": "2024-08-15T09:50:00Z", "end": "2024-08-15T10:00:00Z"},
    "performer": [{"actor": PRACTITIONER}],
}

ALLERGY_EX: dict[str, Any] = {
    "resourceType": "AllergyIntolerance",
    "id": "ex-allergy",
    "identifier": _ident("ALG-0099"),
    "clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "active", "Active"),
    "verificationStatus": _cc("http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                              "confirmed", "Confirmed"),
    "type": "allergy",
    "category": ["medication"],
    "criticality": "high",
    "code": _cc(SNOMED, "764146007", "Penicillin"),
    "patient": PATIENT,
    "recordedDate": "2015-06-30T14:00:00Z",
    "reaction": [{"manifestation": [_cc(SNOMED, "271807003", "Eruption of skin")], "severity": "moderate"}],
}

METFORMIN_RX_EX: dict[str, Any] = {
    "resourceType": "MedicationRequest",
    "id": "ex-metformin",
    "identifier": _ident("RX-551200"),
    "status": "active",
    "intent": "order",
    "medicationCodeableConcept": _cc("http://www.nlm.nih.gov/research/umls/rxnorm", "861007",
                                     "metformin hydrochloride 500 MG Oral Tablet"),
    "subject": PATIENT,
    "encounter": ENCOUNTER,
    "authoredOn": "2024-08-15T10:02:00Z",
    "requester": PRACTITIONER,
    "dosageInstruction": [{"text": "1 tablet twice daily with meals"}],
}

INSULIN_RX_EX: dict[str, Any] = {
    "resourceType": "MedicationRequest",
    "id": "ex-insulin",
    "status": "on-hold",
    "intent": "plan",
    "medicationReference": {"reference": "Medication/ex-insulin-glargine", "display": "insulin glargine"},
    "subject": PATIENT,
    "authoredOn": "2024-08-15",
    "requester": ROLE,
}

APPOINTMENT_EX: dict[str, Any] = {
    "resourceType": "Appointment",
    "id": "ex-appointment",
    "identifier": _ident("APPT-2024-0815"),
    "status": "booked",
    "serviceType": [_cc(SNOMED, "704192004", "Diabetes mellitus education")],
    "specialty": [ENDOCRINOLOGY],
    "appointmentType": FOLLOW_UP,
    "reasonCode": [DIABETES],
    "basedOn": [{"reference": "ServiceRequest/ex-referral"}],
    "description": "Three-monthly diabetes review",
    "start": "2024-08-15T09:30:00Z",
    "end": "2024-08-15T10:00:00Z",
    "slot": [{"reference": "Slot/ex-slot"}],
    "participant": [
        {"actor": PATIENT, "required": "required", "status": "accepted"},
        {"actor": PRACTITIONER, "required": "required", "status": "accepted"},
        {"actor": CLINIC, "required": "required", "status": "accepted"},
    ],
}

SCHEDULE_EX: dict[str, Any] = {
    "resourceType": "Schedule",
    "id": "ex-schedule",
    "identifier": _ident("SCHED-ENDO-2024"),
    "active": True,
    "serviceType": [_cc(SNOMED, "704192004", "Diabetes mellitus education")],
    "specialty": [ENDOCRINOLOGY],
    "actor": [PRACTITIONER, CLINIC],
    "planningHorizon": {"start": "2024-07-01T00:00:00Z", "end": "2024-09-30T23:59:59Z"},
}

SLOT_EX: dict[str, Any] = {
    "resourceType": "Slot",
    "id": "ex-slot",
    "identifier": _ident("SLOT-20240815-0930"),
    "serviceType": [_cc(SNOMED, "704192004", "Diabetes mellitus education")],
    "specialty": [ENDOCRINOLOGY],
    "appointmentType": FOLLOW_UP,
    "schedule": {"reference": "Schedule/ex-schedule"},
    "status": "busy",
    "start": "2024-08-15T09:30:00Z",
    "end": "2024-08-15T10:00:00Z",
}

GOAL_EX: dict[str, Any] = {
    "resourceType": "Goal",
    "id": "ex-goal",
    "identifier": _ident("GOAL-HBA1C"),
    "lifecycleStatus": "active",
    "achievementStatus": _cc("http://terminology.hl7.org/CodeSystem/goal-achievement", "improving", "Improving"),
    "category": [_cc("http://terminology.hl7.org/CodeSystem/goal-category", "physiotherapy", "Physiotherapy")],
    "description": {"text": "HbA1c below 7.0 %"},
    "subject": PATIENT,
    "startDate": "2024-08-15",
    "target": [{"measure": _cc(LOINC, "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood"),
                "detailQuantity": {"value": 7.0, "comparator": "<", "unit": "%",
                                   "system": "http://unitsofmeasure.org", "code": "%"},
                "dueDate": "2025-02-15"}],
    "expressedBy": PRACTITIONER,
}

CAREPLAN_EX: dict[str, Any] = {
    "resourceType": "CarePlan",
    "id": "ex-careplan",
    "identifier": _ident("CP-0815"),
    "status": "active",
    "intent": "plan",
    "category": [_cc(SNOMED, "698360004", "Diabetes self management plan")],
    "title": "Diabetes outreach plan",
    "subject": PATIENT,
    "encounter": ENCOUNTER,
    "period": {"start": "2024-08-15", "end": "2025-08-14"},
    "careTeam": [{"reference": "CareTeam/ex-careteam"}],
    "goal": [{"reference": "Goal/ex-goal"}],
    "activity": [{"detail": {"kind": "Appointment", "code": DIABETIC_REVIEW, "status": "scheduled",
                             "scheduledString": "every three months"}}],
}

PARENT_TASK_EX: dict[str, Any] = {
    "resourceType": "Task",
    "id": "ex-task-parent",
    "status": "in-progress",
    "intent": "plan",
    "description": "Diabetes outreach journey",
    "for": PATIENT,
}

TASK_EX: dict[str, Any] = {
    "resourceType": "Task",
    "id": "ex-task",
    "identifier": _ident("TASK-0815-2"),
    "basedOn": [{"reference": "CarePlan/ex-careplan"}],
    "groupIdentifier": {"system": ID_SYS, "value": "JOURNEY-0815"},
    "partOf": [{"reference": "Task/ex-task-parent"}],
    "status": "in-progress",
    "businessStatus": {"coding": [{"system": "http://example.org/fhir/CodeSystem/outreach-step", "code": "awaiting-reply"}],
                       "text": "Waiting for the patient's reply"},
    "intent": "order",
    "priority": "routine",
    "code": _cc("http://hl7.org/fhir/CodeSystem/task-code", "fulfill", "Fulfill the focal request"),
    "focus": {"reference": "CommunicationRequest/ex-commreq"},
    "for": PATIENT,
    "encounter": ENCOUNTER,
    "executionPeriod": {"start": "2024-08-16T08:00:00Z", "end": "2024-08-30T17:00:00Z"},
    "authoredOn": "2024-08-15T10:10:00Z",
    "lastModified": "2024-08-16T08:00:05Z",
    "requester": PRACTITIONER,
    "owner": ROLE,
}

COMMREQ_EX: dict[str, Any] = {
    "resourceType": "CommunicationRequest",
    "id": "ex-commreq",
    "identifier": _ident("CR-0815-1"),
    "basedOn": [{"reference": "CarePlan/ex-careplan"}],
    "status": "active",
    "category": [REMINDER],
    "priority": "routine",
    "medium": [SMS],
    "subject": PATIENT,
    "encounter": ENCOUNTER,
    "payload": [{"contentString": "Your HbA1c check is due. Reply YES to book."}],
    "occurrenceDateTime": "2024-08-16T09:00:00Z",
    "authoredOn": "2024-08-15T10:10:00Z",
    "requester": ROLE,
    "recipient": [PATIENT],
    "sender": PRACTITIONER,
}

COMMREQ_PERIOD_EX: dict[str, Any] = {
    "resourceType": "CommunicationRequest",
    "id": "ex-commreq-window",
    "status": "draft",
    "subject": PATIENT,
    "payload": [{"contentString": "Second reminder"}],
    "occurrencePeriod": {"start": "2024-08-23T09:00:00Z", "end": "2024-08-23T17:00:00Z"},
}

COMMUNICATION_EX: dict[str, Any] = {
    "resourceType": "Communication",
    "id": "ex-communication",
    "identifier": _ident("COMM-0815-1"),
    "instantiatesCanonical": [f"{ACTIVITY_URL}|1.0.0"],
    "basedOn": [{"reference": "CommunicationRequest/ex-commreq"}],
    "partOf": [{"reference": "Task/ex-task"}],
    "status": "completed",
    "category": [REMINDER],
    "medium": [SMS],
    "subject": PATIENT,
    "encounter": ENCOUNTER,
    "sent": "2024-08-16T09:00:03Z",
    "received": "2024-08-16T09:00:09Z",
    "recipient": [PATIENT],
    "sender": PRACTITIONER,
    "payload": [{"contentString": "Your HbA1c check is due. Reply YES to book."}],
}

PLAN_EX: dict[str, Any] = {
    "resourceType": "PlanDefinition",
    "id": "ex-plan",
    "url": PLAN_URL,
    "identifier": _ident("PD-DIAB-OUTREACH"),
    "version": "1.0.0",
    "name": "DiabetesOutreach",
    "title": "Diabetes outreach journey",
    "type": _cc("http://terminology.hl7.org/CodeSystem/plan-definition-type", "workflow-definition", "Workflow Definition"),
    "status": "active",
    "date": "2024-06-01",
    "publisher": "Riverside Health Outreach Team",
    "description": "Reminds patients with type 2 diabetes whose HbA1c check is overdue.",
    "topic": [_cc("http://terminology.hl7.org/CodeSystem/definition-topic", "treatment", "Treatment")],
    "action": [{"title": "Send HbA1c reminder", "definitionCanonical": f"{ACTIVITY_URL}|1.0.0"}],
}

ACTIVITY_EX: dict[str, Any] = {
    "resourceType": "ActivityDefinition",
    "id": "ex-activity",
    "url": ACTIVITY_URL,
    "identifier": _ident("AD-HBA1C-REMINDER"),
    "version": "1.0.0",
    "name": "HbA1cReminder",
    "title": "HbA1c reminder message",
    "status": "active",
    "date": "2024-06-01T12:00:00Z",
    "publisher": "Riverside Health Outreach Team",
    "description": "An SMS asking the patient to book an HbA1c check.",
    "topic": [_cc("http://terminology.hl7.org/CodeSystem/definition-topic", "education", "Education")],
    "kind": "CommunicationRequest",
    "intent": "proposal",
}

REQUESTGROUP_EX: dict[str, Any] = {
    "resourceType": "RequestGroup",
    "id": "ex-requestgroup",
    "identifier": _ident("RG-0815"),
    "instantiatesCanonical": [f"{PLAN_URL}|1.0.0"],
    "groupIdentifier": {"system": ID_SYS, "value": "JOURNEY-0815"},
    "status": "active",
    "intent": "plan",
    "priority": "routine",
    "code": _cc(SNOMED, "170744004", "Diabetic follow-up"),
    "subject": PATIENT,
    "encounter": ENCOUNTER,
    "authoredOn": "2024-08-15T10:09:00Z",
    "author": PRACTITIONER,
    "action": [{"title": "Send HbA1c reminder", "participant": [ROLE],
                "resource": {"reference": "CommunicationRequest/ex-commreq"}}],
}

GROUP_EX: dict[str, Any] = {
    "resourceType": "Group",
    "id": "ex-group",
    "identifier": _ident("COHORT-T2D-OVERDUE"),
    "active": True,
    "type": "person",
    "actual": True,
    "code": DIABETES,
    "name": "Type 2 diabetes, HbA1c overdue",
    "managingEntity": PRACTITIONER,
    "member": [{"entity": PATIENT, "period": {"start": "2024-08-01"}}],
}

PROVENANCE_EX: dict[str, Any] = {
    "resourceType": "Provenance",
    "id": "ex-provenance",
    "target": [PATIENT, {"reference": "Task/ex-task"}],
    "occurredDateTime": "2024-08-16T08:00:00Z",
    "recorded": "2024-08-16T08:00:06Z",
    "location": CLINIC,
    "activity": _cc("http://terminology.hl7.org/CodeSystem/v3-DataOperation", "UPDATE", "revise"),
    "agent": [{"type": _cc("http://terminology.hl7.org/CodeSystem/provenance-participant-type", "author", "Author"),
               "who": PRACTITIONER}],
    "entity": [{"role": "source", "what": {"reference": "Task/ex-task-parent"}}],
}

SUBSCRIPTION_EX: dict[str, Any] = {
    "resourceType": "Subscription",
    "id": "ex-subscription",
    "status": "active",
    "contact": [{"system": "email", "value": "integration@riverside.example.org"}],
    "end": "2026-12-31T23:59:59Z",
    "reason": "Start outreach journeys for new diabetes diagnoses",
    "criteria": "Condition?code=http://snomed.info/sct|44054006",
    "channel": {"type": "rest-hook", "endpoint": "https://outreach.example.org/notify",
                "payload": "application/fhir+json", "header": ["X-Source: riverside-ehr"]},
}

CONSENT_EX: dict[str, Any] = {
    "resourceType": "Consent",
    "id": "ex-consent",
    "identifier": _ident("CONSENT-SMS-0417"),
    "status": "active",
    "scope": _cc("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy", "Privacy Consent"),
    "category": [_cc(LOINC, "59284-0", "Patient Consent")],
    "patient": PATIENT,
    "dateTime": "2024-08-15T10:05:00Z",
    "organization": [{"reference": ORG}],
    "policyRule": _cc("http://terminology.hl7.org/CodeSystem/v3-ActCode", "OPTIN", "opt-in"),
    "provision": {
        "type": "permit",
        "period": {"start": "2024-08-15", "end": "2025-08-15"},
        "actor": [{"role": _cc("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "PRCP", "primary information recipient"),
                   "reference": PRACTITIONER}],
        "action": [_cc("http://terminology.hl7.org/CodeSystem/consentaction", "use", "Use")],
        "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT", "display": "treatment"}],
    },
}

EXAMPLES: list[dict[str, Any]] = [
    PATIENT_EX, PRACTITIONER_EX, ROLE_EX, BUILDING_EX, CLINIC_EX, ENCOUNTER_EX, EPISODE_EX, DIABETES_EX,
    BRONCHITIS_EX, OBSERVATION_EX, HBA1C_EX, PROCEDURE_EX, ALLERGY_EX, METFORMIN_RX_EX, INSULIN_RX_EX,
    APPOINTMENT_EX, SCHEDULE_EX, SLOT_EX, GOAL_EX, CAREPLAN_EX, PARENT_TASK_EX, TASK_EX, COMMREQ_EX,
    COMMREQ_PERIOD_EX, COMMUNICATION_EX, PLAN_EX, ACTIVITY_EX, REQUESTGROUP_EX, GROUP_EX, PROVENANCE_EX,
    SUBSCRIPTION_EX, CONSENT_EX,
]


def examples() -> list[dict[str, Any]]:
    """Fresh deep copies, so a test may change them freely."""
    return copy.deepcopy(EXAMPLES)


def by_type() -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for ex in examples():
        out.setdefault(ex["resourceType"], []).append(ex)
    return out


def transaction() -> dict[str, Any]:
    """All examples as one transaction Bundle of ``PUT Type/id`` entries (ids are fixed so they can refer
    to each other)."""
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": ex,
         "request": {"method": "PUT", "url": f"{ex['resourceType']}/{ex['id']}"}} for ex in examples()]}
