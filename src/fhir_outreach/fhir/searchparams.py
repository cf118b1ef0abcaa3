"""The search parameters fhir-outreach supports, per resource type.

Names, types and expressions follow the FHIR R4 (4.0.1) search-parameter registry. Each expression is a
FHIRPath path in the small subset that ``fhir.paths`` evaluates at write time to extract index values:
dotted element paths, choice elements (``Observation.effective`` matches ``effectiveDateTime`` and
``effectivePeriod``), ``|`` unions and ``.where(resolve() is Type)`` filters on references. The
CapabilityStatement is generated from this table, so what it lists is exactly what search understands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["token", "reference", "date", "string", "uri"]


@dataclass(frozen=True)
class SearchParam:
    name: str
    kind: Kind
    expression: str
    targets: tuple[str, ...] = ()  # reference params: resource types the reference may point to


def _p(spec: str) -> dict[str, SearchParam]:
    """Parse lines of ``name kind expression [-> Target,Target]``."""
    out: dict[str, SearchParam] = {}
    for raw in spec.strip().splitlines():
        line = raw.strip()
        if not line:
            continue
        targets: tuple[str, ...] = ()
        if " -> " in line:
            line, tgt = line.split(" -> ")
            targets = tuple(t.strip() for t in tgt.split(","))
        name, kind, expr = line.split(None, 2)
        out[name] = SearchParam(name, kind, expr.strip(), targets)  # type: ignore[arg-type]
    return out


ANY = "Patient,Group,Practitioner,PractitionerRole,RelatedPerson,Organization,Device,Location,CareTeam,HealthcareService"

PARAMS: dict[str, dict[str, SearchParam]] = {
    "Task": _p(f"""
        patient reference Task.for.where(resolve() is Patient) -> Patient
        subject reference Task.for -> {ANY}
        owner reference Task.owner -> Practitioner,PractitionerRole,Organization,CareTeam,HealthcareService,Patient,Device,RelatedPerson
        requester reference Task.requester -> Practitioner,PractitionerRole,Organization,Patient,Device,RelatedPerson
        focus reference Task.focus -> Communication,CommunicationRequest,Appointment,Encounter,Goal,CarePlan,Observation,Condition,Procedure,ServiceRequest,Task,RequestGroup
        based-on reference Task.basedOn -> RequestGroup,CarePlan,ServiceRequest,Task,CommunicationRequest
        part-of reference Task.partOf -> Task
        encounter reference Task.encounter -> Encounter
        status token Task.status
        business-status token Task.businessStatus
        code token Task.code
        intent token Task.intent
        priority token Task.priority
        identifier token Task.identifier
        group-identifier token Task.groupIdentifier
        authored-on date Task.authoredOn
        modified date Task.lastModified
        period date Task.executionPeriod
    """),
    "Communication": _p(f"""
        patient reference Communication.subject.where(resolve() is Patient) -> Patient
        subject reference Communication.subject -> Patient,Group
        recipient reference Communication.recipient -> {ANY}
        sender reference Communication.sender -> {ANY}
        based-on reference Communication.basedOn -> RequestGroup,CommunicationRequest,CarePlan,ServiceRequest,Task
        part-of reference Communication.partOf -> Task,Communication
        encounter reference Communication.encounter -> Encounter
        status token Communication.status
        category token Communication.category
        medium token Communication.medium
        identifier token Communication.identifier
        instantiates-canonical reference Communication.instantiatesCanonical
        sent date Communication.sent
        received date Communication.received
    """),
    "CommunicationRequest": _p(f"""
        patient reference CommunicationRequest.subject.where(resolve() is Patient) -> Patient
        subject reference CommunicationRequest.subject -> Patient,Group
        recipient reference CommunicationRequest.recipient -> {ANY}
        sender reference CommunicationRequest.sender -> {ANY}
        requester reference CommunicationRequest.requester -> Practitioner,PractitionerRole,Organization,Patient,Device,RelatedPerson
        based-on reference CommunicationRequest.basedOn -> RequestGroup,CarePlan,ServiceRequest,Task
        encounter reference CommunicationRequest.encounter -> Encounter
        status token CommunicationRequest.status
        category token CommunicationRequest.category
        medium token CommunicationRequest.medium
        priority token CommunicationRequest.priority
        identifier token CommunicationRequest.identifier
        authored date CommunicationRequest.authoredOn
        occurrence date CommunicationRequest.occurrence
    """),
    "PlanDefinition": _p("""
        url uri PlanDefinition.url
        version token PlanDefinition.version
        status token PlanDefinition.status
        name string PlanDefinition.name
        title string PlanDefinition.title
        identifier token PlanDefinition.identifier
        type token PlanDefinition.type
        topic token PlanDefinition.topic
        publisher string PlanDefinition.publisher
        description string PlanDefinition.description
        date date PlanDefinition.date
        definition reference PlanDefinition.action.definition
    """),
    "ActivityDefinition": _p("""
        url uri ActivityDefinition.url
        version token ActivityDefinition.version
        status token ActivityDefinition.status
        name string ActivityDefinition.name
        title string ActivityDefinition.title
        identifier token ActivityDefinition.identifier
        topic token ActivityDefinition.topic
        publisher string ActivityDefinition.publisher
        description string ActivityDefinition.description
        date date ActivityDefinition.date
    """),
    "RequestGroup": _p(f"""
        subject reference RequestGroup.subject -> Patient,Group
        patient reference RequestGroup.subject.where(resolve() is Patient) -> Patient
        instantiates-canonical reference RequestGroup.instantiatesCanonical
        status token RequestGroup.status
        intent token RequestGroup.intent
        priority token RequestGroup.priority
        code token RequestGroup.code
        identifier token RequestGroup.identifier
        group-identifier token RequestGroup.groupIdentifier
        author reference RequestGroup.author -> Device,Practitioner,PractitionerRole
        encounter reference RequestGroup.encounter -> Encounter
        authored date RequestGroup.authoredOn
        participant reference RequestGroup.action.participant -> {ANY}
    """),
    "Group": _p("""
        member reference Group.member.entity -> Patient,Practitioner,PractitionerRole,Device,Medication,Substance,Group
        type token Group.type
        code token Group.code
        actual token Group.actual
        identifier token Group.identifier
        managing-entity reference Group.managingEntity -> Organization,RelatedPerson,Practitioner,PractitionerRole
    """),
    "Provenance": _p(f"""
        target reference Provenance.target
        patient reference Provenance.target.where(resolve() is Patient) -> Patient
        agent reference Provenance.agent.who -> {ANY}
        entity reference Provenance.entity.what
        recorded date Provenance.recorded
        when date Provenance.occurred
        location reference Provenance.location -> Location
    """),
    "Subscription": _p("""
        status token Subscription.status
        criteria string Subscription.criteria
        url uri Subscription.channel.endpoint
        type token Subscription.channel.type
        payload token Subscription.channel.payload
        contact token Subscription.contact
    """),
    "Patient": _p("""
        identifier token Patient.identifier
        name string Patient.name
        family string Patient.name.family
        given string Patient.name.given
        birthdate date Patient.birthDate
        gender token Patient.gender
        active token Patient.active
        telecom token Patient.telecom
        email token Patient.telecom.where(system='email')
        phone token Patient.telecom.where(system='phone')
        address string Patient.address
        address-postalcode string Patient.address.postalCode
        language token Patient.communication.language
        general-practitioner reference Patient.generalPractitioner -> Organization,Practitioner,PractitionerRole
        organization reference Patient.managingOrganization -> Organization
    """),
    "Practitioner": _p("""
        identifier token Practitioner.identifier
        name string Practitioner.name
        family string Practitioner.name.family
        given string Practitioner.name.given
        active token Practitioner.active
        telecom token Practitioner.telecom
        email token Practitioner.telecom.where(system='email')
        phone token Practitioner.telecom.where(system='phone')
    """),
    "PractitionerRole": _p("""
        identifier token PractitionerRole.identifier
        practitioner reference PractitionerRole.practitioner -> Practitioner
        organization reference PractitionerRole.organization -> Organization
        location reference PractitionerRole.location -> Location
        role token PractitionerRole.code
        specialty token PractitionerRole.specialty
        active token PractitionerRole.active
        telecom token PractitionerRole.telecom
        email token PractitionerRole.telecom.where(system='email')
    """),
    "Consent": _p(f"""
        patient reference Consent.patient -> Patient
        status token Consent.status
        scope token Consent.scope
        category token Consent.category
        identifier token Consent.identifier
        date date Consent.dateTime
        period date Consent.provision.period
        actor reference Consent.provision.actor.reference -> {ANY}
        action token Consent.provision.action
        purpose token Consent.provision.purpose
    """),
    "Encounter": _p("""
        patient reference Encounter.subject.where(resolve() is Patient) -> Patient
        subject reference Encounter.subject -> Patient,Group
        status token Encounter.status
        class token Encounter.class
        type token Encounter.type
        identifier token Encounter.identifier
        date date Encounter.period
        participant reference Encounter.participant.individual -> Practitioner,PractitionerRole,RelatedPerson
        location reference Encounter.location.location -> Location
        episode-of-care reference Encounter.episodeOfCare -> EpisodeOfCare
        service-provider reference Encounter.serviceProvider -> Organization
        reason-code token Encounter.reasonCode
        appointment reference Encounter.appointment -> Appointment
    """),
    "Observation": _p("""
        patient reference Observation.subject.where(resolve() is Patient) -> Patient
        subject reference Observation.subject -> Patient,Group,Device,Location
        code token Observation.code
        category token Observation.category
        status token Observation.status
        identifier token Observation.identifier
        date date Observation.effective
        encounter reference Observation.encounter -> Encounter
        value-concept token Observation.valueCodeableConcept
        based-on reference Observation.basedOn -> CarePlan,ServiceRequest,MedicationRequest
    """),
    "Condition": _p("""
        patient reference Condition.subject.where(resolve() is Patient) -> Patient
        subject reference Condition.subject -> Patient,Group
        code token Condition.code
        clinical-status token Condition.clinicalStatus
        verification-status token Condition.verificationStatus
        category token Condition.category
        severity token Condition.severity
        identifier token Condition.identifier
        encounter reference Condition.encounter -> Encounter
        onset-date date Condition.onset
        recorded-date date Condition.recordedDate
        abatement-date date Condition.abatement
    """),
    "Procedure": _p("""
        patient reference Procedure.subject.where(resolve() is Patient) -> Patient
        subject reference Procedure.subject -> Patient,Group
        code token Procedure.code
        status token Procedure.status
        category token Procedure.category
        identifier token Procedure.identifier
        date date Procedure.performed
        encounter reference Procedure.encounter -> Encounter
    """),
    "AllergyIntolerance": _p("""
        patient reference AllergyIntolerance.patient -> Patient
        code token AllergyIntolerance.code
        clinical-status token AllergyIntolerance.clinicalStatus
        verification-status token AllergyIntolerance.verificationStatus
        category token AllergyIntolerance.category
        criticality token AllergyIntolerance.criticality
        type token AllergyIntolerance.type
        identifier token AllergyIntolerance.identifier
        date date AllergyIntolerance.recordedDate
    """),
    "EpisodeOfCare": _p("""
        patient reference EpisodeOfCare.patient -> Patient
        status token EpisodeOfCare.status
        type token EpisodeOfCare.type
        identifier token EpisodeOfCare.identifier
        date date EpisodeOfCare.period
        organization reference EpisodeOfCare.managingOrganization -> Organization
        care-manager reference EpisodeOfCare.careManager -> Practitioner
        condition reference EpisodeOfCare.diagnosis.condition -> Condition
    """),
    "MedicationRequest": _p("""
        patient reference MedicationRequest.subject.where(resolve() is Patient) -> Patient
        subject reference MedicationRequest.subject -> Patient,Group
        code token MedicationRequest.medicationCodeableConcept
        medication reference MedicationRequest.medicationReference -> Medication
        status token MedicationRequest.status
        intent token MedicationRequest.intent
        identifier token MedicationRequest.identifier
        authoredon date MedicationRequest.authoredOn
        encounter reference MedicationRequest.encounter -> Encounter
        requester reference MedicationRequest.requester -> Practitioner,PractitionerRole,Organization,Patient,RelatedPerson,Device
    """),
    "Appointment": _p(f"""
        patient reference Appointment.participant.actor.where(resolve() is Patient) -> Patient
        practitioner reference Appointment.participant.actor.where(resolve() is Practitioner) -> Practitioner
        location reference Appointment.participant.actor.where(resolve() is Location) -> Location
        actor reference Appointment.participant.actor -> {ANY}
        status token Appointment.status
        identifier token Appointment.identifier
        date date Appointment.start
        service-type token Appointment.serviceType
        specialty token Appointment.specialty
        appointment-type token Appointment.appointmentType
        reason-code token Appointment.reasonCode
        slot reference Appointment.slot -> Slot
        based-on reference Appointment.basedOn -> ServiceRequest
    """),
    "CarePlan": _p("""
        patient reference CarePlan.subject.where(resolve() is Patient) -> Patient
        subject reference CarePlan.subject -> Patient,Group
        status token CarePlan.status
        intent token CarePlan.intent
        category token CarePlan.category
        identifier token CarePlan.identifier
        date date CarePlan.period
        goal reference CarePlan.goal -> Goal
        encounter reference CarePlan.encounter -> Encounter
        care-team reference CarePlan.careTeam -> CareTeam
        activity-code token CarePlan.activity.detail.code
    """),
    "Goal": _p("""
        patient reference Goal.subject.where(resolve() is Patient) -> Patient
        subject reference Goal.subject -> Patient,Group,Organization
        lifecycle-status token Goal.lifecycleStatus
        achievement-status token Goal.achievementStatus
        category token Goal.category
        identifier token Goal.identifier
        target-date date Goal.target.due
        start-date date Goal.start
    """),
    "Slot": _p("""
        schedule reference Slot.schedule -> Schedule
        status token Slot.status
        start date Slot.start
        identifier token Slot.identifier
        service-type token Slot.serviceType
        specialty token Slot.specialty
        appointment-type token Slot.appointmentType
    """),
    "Schedule": _p(f"""
        actor reference Schedule.actor -> {ANY}
        active token Schedule.active
        date date Schedule.planningHorizon
        identifier token Schedule.identifier
        service-type token Schedule.serviceType
        specialty token Schedule.specialty
    """),
    "Location": _p("""
        name string Location.name | Location.alias
        address string Location.address
        address-postalcode string Location.address.postalCode
        address-city string Location.address.city
        identifier token Location.identifier
        status token Location.status
        type token Location.type
        organization reference Location.managingOrganization -> Organization
        partof reference Location.partOf -> Location
    """),
}

# Common parameters every type supports; handled by the store against its own columns.
COMMON = ("_id", "_lastUpdated")
# Result parameters understood by the search API.
RESULT_PARAMS = ("_count", "_offset", "_sort", "_include", "_revinclude", "_summary", "_total", "_format")

RESOURCE_TYPES: tuple[str, ...] = tuple(PARAMS)


def params_for(resource_type: str) -> dict[str, SearchParam]:
    return PARAMS.get(resource_type, {})
