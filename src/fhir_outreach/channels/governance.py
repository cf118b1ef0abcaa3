"""Governance: may this message go to this person on this channel *now*? Asked right before every send.

Place in the data flow: a journey's message step writes a ``Communication`` (status ``preparation``) and a
delivery record; the delivery pipeline (``delivery.py``) claims the record and, immediately before handing
the message to a channel adapter, calls ``decide``. Nothing is decided at enrolment: a STOP received an hour
ago, a Consent withdrawn yesterday, a cap filled this morning or the patient's night all count at the moment
of sending. ``decide`` answers ``send``, ``hold`` (due again at ``until``: quiet hours, frequency cap) or
``block`` with a reason code from ``engagement.REASONS`` that the pipeline records as ``not-done`` +
``statusReason`` (visible in ``journey why``).

The checks, in this order (the first that stops the message wins):

1. **expiry** — ``created`` + ``message_expiry_hours`` has passed: block ``expired``.
2. **consent** (patient-facing messages only) — the patient's active ``Consent`` resources are evaluated
   (``consent_verdict``) for this channel, purpose and recipient, and the verdict is enforced in the mode
   configured for the purpose (``consent_outreach`` / ``consent_transactional``, see ``enforce``). A refusal
   blocks ``opted-out`` when a denying Consent has policyRule ``OPTOUT`` (STOP replies and unsubscribe
   links record those, ``optout.py``), else ``consent``.
3. **frequency caps** (outreach only, as ``cap_per_day`` / ``cap_per_week`` say) — when the patient has
   already been sent the cap on this channel within the rolling day or week: hold until the oldest counted
   message leaves the window; block ``cap`` when that is not before expiry.
4. **quiet hours** (patient-facing messages) — ``quiet_hours`` in the patient's time zone
   (``patient_timezone``): hold until they end; block ``expired`` when they end at or after expiry.

Purposes (``purpose_of``): *transactional* messages concern the patient's own care (category
``notification``, ``reminder``, ``alert``); everything else sent to a patient is *outreach*; messages to
clinicians (a Practitioner, PractitionerRole, Organization, CareTeam or Device recipient, or the Teams
channel) are *clinical*: no patient consent, quiet hours or caps apply to them, only expiry.

``address_for`` picks the patient's current email address or SMS-capable number (telecom ``rank``,
``period``, ``use``); ``sms.normalize_number`` then turns the number into E.164.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..fhir.paths import date_range
from ..fhir.search import parse_query
from ..journeys.definition import CHANNEL_SYSTEM
from ..journeys.steps import CATEGORY_SYSTEM
from ..store import Store
from ..work.clock import fhir_instant
from .base import CHANNELS
from .engagement import REASONS
from .optout import ACT_REASON, OUTREACH, TRANSACTIONAL

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger(__name__)

Purpose = Literal["outreach", "transactional", "clinical"]
Verdict = Literal["permit", "deny", "none"]
Mode = Literal["restrictive", "non-restrictive", "disabled"]

TRANSACTIONAL_CATEGORIES = frozenset({"notification", "reminder", "alert"})
CLINICIAN_TYPES = frozenset({"Practitioner", "PractitionerRole", "Organization", "CareTeam", "Device"})
PURPOSE_CODES = {"outreach": OUTREACH, "transactional": TRANSACTIONAL}
SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
SCOPES = frozenset({"patient-privacy", "treatment"})
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
POLICY_BASE: dict[str, Literal["permit", "deny"]] = {
    "OPTIN": "permit", "OPTINR": "permit", "OPTOUT": "deny", "OPTOUTE": "deny"}
# IANA zone of a patient: the core extension (FHIR extensions pack / R5) and its R4 name.
TIMEZONE_URLS = ("http://hl7.org/fhir/StructureDefinition/timezone",
                 "http://hl7.org/fhir/StructureDefinition/tz-code")
DAY, WEEK = 86_400.0, 7 * 86_400.0


# --- purpose ---------------------------------------------------------------------------------------

def _ref_type(ref: Any) -> str | None:
    text = ref.get("reference") if isinstance(ref, Mapping) else None
    if not isinstance(text, str) or "/" not in text:
        return None
    return text.rstrip("/").split("/")[-2]


def _medium(communication: Mapping[str, Any]) -> str | None:
    for cc in communication.get("medium") or []:
        for c in cc.get("coding") or []:
            if c.get("system") == CHANNEL_SYSTEM:
                return str(c.get("code"))
    return None


def purpose_of(communication: Mapping[str, Any]) -> Purpose:
    """``clinical`` when the message goes to a clinician (recipient type in ``CLINICIAN_TYPES``, or the
    Teams channel); otherwise ``transactional`` when a category coding (our message-category system, or no
    system) is ``notification``, ``reminder`` or ``alert``; otherwise ``outreach`` (education, campaigns,
    no category at all). A RelatedPerson recipient (a caregiver) is patient-facing: the patient's Consent
    governs it."""
    recipients = communication.get("recipient") or []
    if any(_ref_type(r) in CLINICIAN_TYPES for r in recipients) or _medium(communication) == "teams":
        return "clinical"
    for cc in communication.get("category") or []:
        for c in cc.get("coding") or []:
            if c.get("system") in (CATEGORY_SYSTEM, None) and c.get("code") in TRANSACTIONAL_CATEGORIES:
                return "transactional"
    return "outreach"


# --- consent -----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Request:
    channel: str
    purpose: str | None  # v3-ActReason code
    actor: str | None  # "Type/id"
    at: float


def _local_ref(text: str | None) -> str | None:
    """``Type/id`` of a reference, dropping a base URL and a version (``…/_history/n``)."""
    if not text or "/" not in text:
        return None
    parts = text.split("/_history/")[0].rstrip("/").split("/")
    return "/".join(parts[-2:])


def _covers(period: Mapping[str, Any] | None, at: float) -> bool:
    """``at`` within ``period`` (start and end inclusive at their own precision; open ends allowed).
    A period that cannot be read covers nothing."""
    if not period:
        return True
    try:
        if period.get("start") and at < date_range(str(period["start"]))[0]:
            return False
        if period.get("end") and at >= date_range(str(period["end"]))[1]:
            return False
    except ValueError:
        return False
    return True


def _channel_codes(provision: Mapping[str, Any]) -> set[str] | None:
    """Channel codes in ``provision.code``: None when there is no ``code`` (every channel)."""
    concepts = provision.get("code")
    if not concepts:
        return None
    codes = set()
    for cc in concepts:
        for c in cc.get("coding") or []:
            if c.get("system") == CHANNEL_SYSTEM or (c.get("system") is None and c.get("code") in CHANNELS):
                codes.add(str(c.get("code")))
    return codes


def _matches(provision: Mapping[str, Any], req: _Request) -> bool:
    """Every criterion the provision states must hold; an absent criterion holds for everything."""
    if not _covers(provision.get("period"), req.at):
        return False
    purposes = provision.get("purpose")
    if purposes and not any(p.get("code") == req.purpose and p.get("system") in (ACT_REASON, None)
                            for p in purposes):
        return False
    actors = provision.get("actor")
    if actors and not any(req.actor is not None
                          and _local_ref((a.get("reference") or {}).get("reference")) == req.actor
                          for a in actors):
        return False
    codes = _channel_codes(provision)
    return codes is None or req.channel in codes


def _resolve(provision: Mapping[str, Any], req: _Request, inherited: str | None) -> str | None:
    """The type that decides for a provision that matched: the one of its most specific matching nested
    provision (recursively), else its own ``type``, else the ``inherited`` one. Matching siblings that
    disagree: deny wins."""
    own = provision.get("type") if provision.get("type") in ("permit", "deny") else inherited
    found = {r for child in provision.get("provision") or [] if _matches(child, req)
             if (r := _resolve(child, req, own)) is not None}
    if not found:
        return own
    return "deny" if "deny" in found else "permit"


def _applicable(consent: Mapping[str, Any]) -> bool:
    if consent.get("status") != "active":
        return False
    codings = (consent.get("scope") or {}).get("coding") or []
    return any(c.get("code") in SCOPES and c.get("system") in (SCOPE_SYSTEM, None) for c in codings)


def _base(consent: Mapping[str, Any]) -> str | None:
    """The Consent's default when its root provision has no ``type``: R5 ``decision``, else the
    ``policyRule`` (v3-ActCode OPTIN/OPTINR permit, OPTOUT/OPTOUTE deny), else nothing."""
    if consent.get("decision") in ("permit", "deny"):
        return str(consent["decision"])
    for c in (consent.get("policyRule") or {}).get("coding") or []:
        if c.get("system") in (ACT_CODE, None) and c.get("code") in POLICY_BASE:
            return POLICY_BASE[str(c["code"])]
    return None


def is_opt_out(consent: Mapping[str, Any]) -> bool:
    """A Consent whose policyRule is v3-ActCode ``OPTOUT`` (what STOP and unsubscribe record)."""
    return any(c.get("code") == "OPTOUT" and c.get("system") in (ACT_CODE, None)
               for c in (consent.get("policyRule") or {}).get("coding") or [])


def evaluate(consents: Iterable[Mapping[str, Any]], *, channel: str, purpose: str, recipient_actor: str | None,
             at: datetime | float) -> tuple[Verdict, list[Mapping[str, Any]]]:
    """``consent_verdict`` plus the Consents that produced it (the denying ones for ``deny``)."""
    moment = at.timestamp() if isinstance(at, datetime) else float(at)
    req = _Request(channel, PURPOSE_CODES.get(purpose), _local_ref(recipient_actor), moment)
    denies: list[Mapping[str, Any]] = []
    permits: list[Mapping[str, Any]] = []
    for consent in consents:
        if not _applicable(consent):
            continue
        root = consent.get("provision") or {}
        if not _matches(root, req):
            continue
        result = _resolve(root, req, _base(consent))
        if result == "deny":
            denies.append(consent)
        elif result == "permit":
            permits.append(consent)
    if denies:
        return "deny", denies
    if permits:
        return "permit", permits
    return "none", []


def consent_verdict(consents: Sequence[Mapping[str, Any]], *, channel: str, purpose: str,
                    recipient_actor: str | None, at: datetime | float) -> Verdict:
    """What the patient's Consents say about sending a ``purpose`` message on ``channel`` to
    ``recipient_actor`` (``Patient/x``, or a caregiver's ``RelatedPerson/y``) at ``at``.

    A Consent counts only when ``status`` is ``active`` and its ``scope`` is ``patient-privacy`` or
    ``treatment`` (consentscope); ``category``, ``dateTime``, ``performer`` and ``organization`` are not
    evaluated. Its ``provision`` (absent: a root that matches everything) is a tree:

    * A provision *matches* when every criterion it states holds — ``period`` covers ``at`` (bounds
      inclusive at their precision; unreadable = no match); ``purpose`` has the v3-ActReason code of the
      message (``HMARKT`` outreach, ``TREAT`` transactional; exact code, no subsumption); ``actor`` has a
      ``reference`` equal to ``recipient_actor`` (compared as ``Type/id``; no recipient = no match);
      ``code`` has one of our channel codings (``http://fhir-outreach.org/CodeSystem/channel``) equal to
      ``channel`` — no ``code`` means every channel, and a ``code`` with only other codings (data content,
      e.g. LOINC) never matches a message. ``action``, ``securityLabel``, ``class``, ``data`` and
      ``dataPeriod`` describe data access, not messaging, and are not evaluated.
    * If the root does not match, the Consent says nothing about this message.
    * Nested provisions (R4 "Nested Exception Rules") are exceptions inside their parent: they are only
      looked at when the parent matches, and the most specific matching one decides; matching siblings
      that disagree give ``deny``. A provision without ``type`` takes its parent's; the root's default is
      its ``type`` (R4 examples put it there, e.g. consent-example-notOrg) else R5 ``decision`` else the
      ``policyRule`` (OPTIN/OPTINR permit, OPTOUT/OPTOUTE deny), else none.

    Across Consents: any ``deny`` wins, then any ``permit``, else ``none`` (nothing applies)."""
    return evaluate(consents, channel=channel, purpose=purpose, recipient_actor=recipient_actor, at=at)[0]


def enforce(verdict: str, mode: str) -> bool:
    """Whether a verdict lets the message go: ``restrictive`` needs a ``permit`` (no consent, no message);
    ``non-restrictive`` sends unless a Consent denies; ``disabled`` always sends (and logs what it
    overrides)."""
    if mode == "restrictive":
        return verdict == "permit"
    if mode == "non-restrictive":
        return verdict != "deny"
    if mode == "disabled":
        if verdict == "deny":
            log.warning("consent enforcement is disabled: sending although a Consent denies it")
        return True
    raise ValueError(f"unknown consent enforcement mode {mode!r}")


# --- time zones and quiet hours --------------------------------------------------------------------

# Main US states (and DC, PR); states split across zones take their most populous zone.
US_STATE_ZONES = {
    **dict.fromkeys(("CT", "DC", "DE", "FL", "GA", "MA", "MD", "ME", "NC", "NH", "NJ", "NY", "OH", "PA", "RI",
                     "SC", "VA", "VT", "WV"), "America/New_York"),
    "MI": "America/Detroit", "IN": "America/Indiana/Indianapolis", "KY": "America/New_York",
    **dict.fromkeys(("AL", "AR", "IA", "IL", "KS", "LA", "MN", "MO", "MS", "ND", "NE", "OK", "SD", "TN", "TX",
                     "WI"), "America/Chicago"),
    **dict.fromkeys(("CO", "MT", "NM", "UT", "WY"), "America/Denver"), "ID": "America/Boise",
    "AZ": "America/Phoenix", "CA": "America/Los_Angeles", "NV": "America/Los_Angeles",
    "OR": "America/Los_Angeles", "WA": "America/Los_Angeles", "AK": "America/Anchorage",
    "HI": "Pacific/Honolulu", "PR": "America/Puerto_Rico",
}
CA_PROVINCE_ZONES = {
    "ON": "America/Toronto", "QC": "America/Toronto", "BC": "America/Vancouver", "AB": "America/Edmonton",
    "MB": "America/Winnipeg", "SK": "America/Regina", "NS": "America/Halifax", "NB": "America/Moncton",
    "NL": "America/St_Johns", "PE": "America/Halifax",
}
AU_STATE_ZONES = {
    "NSW": "Australia/Sydney", "ACT": "Australia/Sydney", "VIC": "Australia/Melbourne",
    "QLD": "Australia/Brisbane", "SA": "Australia/Adelaide", "WA": "Australia/Perth",
    "TAS": "Australia/Hobart", "NT": "Australia/Darwin",
}
COUNTRY_ZONES = {
    "GB": "Europe/London", "IE": "Europe/Dublin", "FR": "Europe/Paris", "DE": "Europe/Berlin",
    "NL": "Europe/Amsterdam", "BE": "Europe/Brussels", "ES": "Europe/Madrid", "IT": "Europe/Rome",
    "PT": "Europe/Lisbon", "CH": "Europe/Zurich", "AT": "Europe/Vienna", "SE": "Europe/Stockholm",
    "NO": "Europe/Oslo", "DK": "Europe/Copenhagen", "FI": "Europe/Helsinki", "PL": "Europe/Warsaw",
    "IN": "Asia/Kolkata", "JP": "Asia/Tokyo", "SG": "Asia/Singapore", "NZ": "Pacific/Auckland",
    "ZA": "Africa/Johannesburg", "IL": "Asia/Jerusalem",
}
COUNTRY_ALIASES = {
    "USA": "US", "UNITED STATES": "US", "UNITED STATES OF AMERICA": "US", "UK": "GB", "GBR": "GB",
    "UNITED KINGDOM": "GB", "CAN": "CA", "CANADA": "CA", "AUS": "AU", "AUSTRALIA": "AU", "IRL": "IE",
    "FRA": "FR", "FRANCE": "FR", "DEU": "DE", "GERMANY": "DE", "NLD": "NL", "NETHERLANDS": "NL",
    "ESP": "ES", "SPAIN": "ES", "ITA": "IT", "ITALY": "IT", "IND": "IN", "INDIA": "IN", "JPN": "JP",
    "JAPAN": "JP", "NZL": "NZ", "NEW ZEALAND": "NZ",
}


def _zone(name: Any) -> ZoneInfo | None:
    if not isinstance(name, str) or not name or name.startswith(("/", ".")):
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _zone_extension(element: Mapping[str, Any]) -> ZoneInfo | None:
    for e in element.get("extension") or []:
        if e.get("url") in TIMEZONE_URLS and (zone := _zone(e.get("valueCode"))) is not None:
            return zone
    return None


def _address_zone(address: Mapping[str, Any]) -> ZoneInfo | None:
    country = str(address.get("country") or "").strip().upper()
    country = COUNTRY_ALIASES.get(country, country)
    state = str(address.get("state") or "").strip().upper()
    if country in ("", "US") and state in US_STATE_ZONES:
        return ZoneInfo(US_STATE_ZONES[state])
    if country == "CA" and state in CA_PROVINCE_ZONES:
        return ZoneInfo(CA_PROVINCE_ZONES[state])
    if country == "AU" and state in AU_STATE_ZONES:
        return ZoneInfo(AU_STATE_ZONES[state])
    return ZoneInfo(COUNTRY_ZONES[country]) if country in COUNTRY_ZONES else None


def patient_timezone(patient: Mapping[str, Any] | None, default: ZoneInfo | str) -> ZoneInfo:
    """The patient's time zone: the ``timezone`` extension (``valueCode``, an IANA zone; R4's ``tz-code``
    name accepted too) on the Patient or on one of its addresses; else derived from the first current
    address (``use`` not ``old``, no ``period.end``; ``home`` first) by US state, Canadian province,
    Australian state or country (tables above); else ``default``."""
    fallback = default if isinstance(default, ZoneInfo) else ZoneInfo(default)
    if not patient:
        return fallback
    if (zone := _zone_extension(patient)) is not None:
        return zone
    addresses = [a for a in patient.get("address") or []
                 if a.get("use") != "old" and not (a.get("period") or {}).get("end")]
    addresses.sort(key=lambda a: a.get("use") != "home")
    for address in addresses:
        if (zone := _zone_extension(address) or _address_zone(address)) is not None:
            return zone
    return fallback


def parse_quiet_hours(quiet: str) -> tuple[dtime, dtime]:
    """``"HH:MM-HH:MM"`` → (start, end) local times; ValueError naming the problem otherwise."""
    try:
        start_text, end_text = (part.strip() for part in quiet.split("-"))
        start, end = (dtime.fromisoformat(t) for t in (start_text, end_text))
        if len(start_text) != 5 or len(end_text) != 5:
            raise ValueError
    except ValueError:
        raise ValueError(f"quiet hours must look like HH:MM-HH:MM, got {quiet!r}") from None
    return start, end


def _wall(day: date, at: dtime, tz: ZoneInfo, after: datetime) -> datetime:
    """The first instant later than ``after`` that shows wall time ``day at`` in ``tz``: the earlier of two
    when the clock falls back (the later one if the earlier has passed); when the clock jumps forward over
    that time, the moment of the jump (e.g. 02:30 on a spring-forward day → 03:00)."""
    first = datetime.combine(day, at, tzinfo=tz)
    if first.astimezone(UTC).astimezone(tz).replace(tzinfo=None) != first.replace(tzinfo=None):
        # inside a gap: fold=1 reads it with the offset after the jump (earlier in UTC), fold=0 with the one
        # before; the jump lies between, where the offset changes
        lo = int(first.replace(fold=1).timestamp())
        hi = int(first.timestamp())
        target = first.replace(fold=1).utcoffset()
        while lo < hi:
            mid = (lo + hi) // 2
            if datetime.fromtimestamp(mid, tz).utcoffset() == target:
                hi = mid
            else:
                lo = mid + 1
        return datetime.fromtimestamp(lo, tz)
    # (compared in UTC: aware datetimes sharing a tzinfo compare by wall time, ignoring fold)
    if first.astimezone(UTC) <= after.astimezone(UTC):  # a repeated hour: the second occurrence
        second = first.replace(fold=1)
        if second.astimezone(UTC) > after.astimezone(UTC):
            return second
    return first


def quiet_until(now: datetime, tz: ZoneInfo, quiet: str | None) -> datetime | None:
    """When ``now`` falls in the quiet hours (local wall-clock times in ``tz``, start inclusive, end
    exclusive; a range whose start is after its end crosses midnight, e.g. ``21:00-08:00``; equal ends =
    no quiet hours), the end of those quiet hours as an aware datetime in ``tz``; else None. Daylight
    saving changes are honoured: the end is a wall-clock time, so the night before a spring-forward is an
    hour shorter in real time."""
    if not quiet:
        return None
    start, end = parse_quiet_hours(quiet)
    if start == end:
        return None
    local = now.astimezone(tz)
    t, today = local.time().replace(tzinfo=None), local.date()
    if start < end:
        inside, end_day = start <= t < end, today
    elif t >= start:
        inside, end_day = True, today + timedelta(days=1)
    else:
        inside, end_day = t < end, today
    if not inside:
        return None
    return _wall(end_day, end, tz, local)


# --- frequency caps ----------------------------------------------------------------------------------

async def _sent_times(store: Store, patient_ref: str, channel: str, since: float) -> list[float]:
    """Sent times (ascending) of this patient's outreach messages on ``channel`` sent after ``since``."""
    query = parse_query("Communication", [
        ("patient", patient_ref), ("medium", f"{CHANNEL_SYSTEM}|{channel}"),
        ("status", "in-progress,completed"), ("sent", f"ge{fhir_instant(since - 1)}")], max_count=10_000)
    query.count = 10_000
    times: list[float] = []
    for stored in (await store.search(query)).resources:
        comm = stored.resource
        if not comm or not comm.get("sent") or purpose_of(comm) != "outreach":
            continue
        try:
            sent = date_range(str(comm["sent"]))[0]
        except ValueError:
            continue
        if sent > since:
            times.append(sent)
    return sorted(times)


async def cap_release(store: Store, patient_ref: str, channel: str, now: float, per_day: int,
                      per_week: int) -> float | None:
    """None while another outreach message may go to ``patient_ref`` on ``channel`` (fewer than ``per_day``
    sent in the rolling day and fewer than ``per_week`` in the rolling week; 0 = no cap); otherwise the
    time at which enough counted messages have left their window for one more. Counted: Communications
    of that patient and medium, status ``in-progress`` or ``completed``, outreach (``purpose_of``), whose
    ``sent`` lies within the window (``now - window < sent``)."""
    windows = [(cap, span) for cap, span in ((per_day, DAY), (per_week, WEEK)) if cap > 0]
    if not windows:
        return None
    times = await _sent_times(store, patient_ref, channel, now - max(span for _, span in windows))
    release: float | None = None
    for cap, span in windows:
        inside = [t for t in times if t > now - span]
        if len(inside) >= cap:
            frees = inside[len(inside) - cap] + span  # once this one leaves, cap - 1 remain
            release = frees if release is None else max(release, frees)
    return release


async def cap_reached(store: Store, patient_ref: str, channel: str, now: float, per_day: int,
                      per_week: int) -> bool:
    """Whether the rolling day or week cap stops another outreach message now (see ``cap_release``)."""
    return await cap_release(store, patient_ref, channel, now, per_day, per_week) is not None


# --- the decision ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["send", "hold", "block"]
    reason: str | None = None  # block: a code of engagement.REASONS
    until: float | None = None  # hold: when to ask again (epoch seconds)
    detail: str = ""


def _block(reason: str, detail: str) -> Decision:
    return Decision("block", reason, None, detail or REASONS[reason])


async def _created(store: Store, communication: Mapping[str, Any]) -> float | None:
    """When the message was written: ``meta.lastUpdated`` of its first version."""
    meta = communication.get("meta") or {}
    if str(meta.get("versionId")) == "1" and meta.get("lastUpdated"):
        return date_range(str(meta["lastUpdated"]))[0]
    if communication.get("id"):
        first = await store.vread("Communication", str(communication["id"]), 1)
        if first is not None:
            return first.last_updated.timestamp()
    return None


async def _consents(store: Store, patient_ref: str) -> list[dict[str, Any]]:
    query = parse_query("Consent", [("patient", patient_ref), ("status", "active")], max_count=10_000)
    query.count = 10_000
    return [s.resource for s in (await store.search(query)).resources if s.resource]


def _at(epoch: float, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(epoch, tz).isoformat(timespec="minutes")


async def decide(store: Store, communication: Mapping[str, Any], *, patient: Mapping[str, Any] | None,
                 channel: str, now: float, settings: Settings, created: float | None = None) -> Decision:
    """Send, hold or block ``communication`` on ``channel`` at ``now`` (epoch seconds); see the module
    docstring for the order of the checks. ``created`` is when the message was made (the delivery record's
    creation time); without it, the ``meta.lastUpdated`` of the Communication's first version."""
    if created is None:
        created = await _created(store, communication)
    expires = (created if created is not None else now) + settings.message_expiry_hours * 3600.0
    if now >= expires:
        return _block("expired", f"the message expired at {fhir_instant(expires)} "
                                 f"({settings.message_expiry_hours:g} h after it was created)")
    purpose = purpose_of(communication)
    if purpose == "clinical":
        return Decision("send", detail="clinical message: no patient consent, caps or quiet hours")
    patient_ref = _local_ref((communication.get("subject") or {}).get("reference"))
    if patient_ref is None and patient and patient.get("id"):
        patient_ref = f"Patient/{patient['id']}"
    recipient = _local_ref(((communication.get("recipient") or [{}])[0] or {}).get("reference")) or patient_ref

    mode: Mode = settings.consent_outreach if purpose == "outreach" else settings.consent_transactional
    consents = await _consents(store, patient_ref) if patient_ref else []
    verdict, deciding = evaluate(consents, channel=channel, purpose=purpose, recipient_actor=recipient,
                                 at=now)
    if not enforce(verdict, mode):
        if verdict == "deny":
            opt_outs = [c for c in deciding if is_opt_out(c)]
            ids = ", ".join(f"Consent/{c.get('id')}" for c in (opt_outs or deciding))
            if opt_outs:
                return _block("opted-out", f"the patient opted out of {channel} ({ids})")
            return _block("consent", f"{ids} denies {purpose} messages by {channel}")
        return _block("consent", f"no active Consent permits {purpose} messages by {channel} "
                                 f"({mode} enforcement)")
    tz = patient_timezone(patient, settings.default_timezone)

    if purpose == "outreach" and patient_ref:
        release = await cap_release(store, patient_ref, channel, now, settings.cap_per_day, settings.cap_per_week)
        if release is not None:
            if release >= expires:
                return _block("cap", f"the {channel} frequency cap (per day {settings.cap_per_day}, per week "
                                     f"{settings.cap_per_week}) frees a slot only at {_at(release, tz)}, "
                                     f"after the message expires")
            return Decision("hold", None, release, f"{channel} frequency cap reached; held until {_at(release, tz)}")

    end = quiet_until(datetime.fromtimestamp(now, UTC), tz, settings.quiet_hours)
    if end is not None:
        until = end.timestamp()
        if until >= expires:
            return _block("expired", f"quiet hours ({settings.quiet_hours} {tz.key}) end at {_at(until, tz)}, "
                                     f"after the message expires")
        return Decision("hold", None, until, f"quiet hours ({settings.quiet_hours} {tz.key}) until {_at(until, tz)}")
    return Decision("send", detail=f"consent {verdict} ({mode}), outside quiet hours")


# --- addresses ---------------------------------------------------------------------------------------

def address_for(patient: Mapping[str, Any] | None, channel: str, default_region: str = "US", *,
                at: float | None = None) -> str | None:
    """The best current address of ``patient`` (or any resource with ``telecom``) for ``channel``: for
    ``email`` a telecom with system ``email``; for ``sms`` one with system ``sms`` or a ``phone`` whose
    ``use`` is ``mobile`` (returned as written: ``sms.normalize_number`` makes it E.164 with
    ``default_region``). Skipped: empty values, ``use`` ``old``, a ``period`` not covering ``at`` (default:
    the current time). Best = lowest ``rank`` (1 = most preferred; unranked after ranked), then the order
    written. None for other channels or when nothing fits."""
    if not patient or channel not in ("email", "sms"):
        return None
    moment = time.time() if at is None else at
    ranked: list[tuple[int, int, str]] = []
    for i, t in enumerate(patient.get("telecom") or []):
        value = str(t.get("value") or "").strip()
        if not value or t.get("use") == "old" or not _covers(t.get("period"), moment):
            continue
        system = t.get("system")
        fits = system == "email" if channel == "email" else \
            system == "sms" or (system == "phone" and t.get("use") == "mobile")
        if fits:
            rank = t.get("rank")
            ranked.append((int(rank) if isinstance(rank, int) and rank > 0 else 1 << 30, i, value))
    return min(ranked)[2] if ranked else None
