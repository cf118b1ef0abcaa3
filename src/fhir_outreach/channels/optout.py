"""Opt-outs as FHIR ``Consent``: a STOP reply or an unsubscribe link records a deny Consent for that patient
and channel, which the consent check (``governance``) honours before every later send.

The coding we document for channels in Consent: ``provision.code`` holds a coding from
``http://fhir-outreach.org/CodeSystem/channel`` (``sms``, ``email``…); no code means every channel. Purposes
are v3 ActReason codes: ``HMARKT`` (outreach: education, campaigns, goal nudges) and ``TREAT``
(transactional: reminders and notices about the patient's own care).
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

from ..errors import Conflict
from ..journeys.definition import CHANNEL_SYSTEM
from ..store import Store, Write
from ..store.base import MUST_NOT_EXIST, prepare
from ..work.clock import fhir_instant, to_datetime

ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
OUTREACH, TRANSACTIONAL = "HMARKT", "TREAT"
NAMESPACE = uuid.UUID("8a0f3c1d-5b7e-4c2a-9f6d-1e3b5a7c9d20")


def opt_out_consent(patient_ref: str, channel: str | None, at: float, how: str) -> dict[str, Any]:
    rid = str(uuid.uuid5(NAMESPACE, f"{patient_ref}|{channel or '*'}|opt-out"))
    provision: dict[str, Any] = {"type": "deny", "period": {"start": fhir_instant(at)}}
    if channel:
        provision["code"] = [{"coding": [{"system": CHANNEL_SYSTEM, "code": channel}]}]
    return {
        "resourceType": "Consent", "id": rid, "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": patient_ref}, "dateTime": fhir_instant(at),
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}],
                       "text": f"Opted out by {how}"},
        "provision": provision,
    }


async def record_opt_out(store: Store, patient_ref: str, channel: str | None, *, at: float, how: str,
                         base_url: str | None = None) -> str:
    """Store the opt-out Consent (idempotent: one per patient and channel). Returns ``Consent/{id}``."""
    consent = opt_out_consent(patient_ref, channel, at, how)
    with contextlib.suppress(Conflict):  # already opted out
        await store.commit([prepare(Write("Consent", consent["id"], consent, expect=MUST_NOT_EXIST), base_url)],
                           now=to_datetime(at))
    return f"Consent/{consent['id']}"
