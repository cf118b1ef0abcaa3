"""Governance before every send: the consent matrix (data in ``data/consent-matrix.yaml``), purposes,
quiet hours across midnight and DST changes, patient time zones, addresses, frequency caps and ``decide``
on both stores with a fixed clock."""

from __future__ import annotations

import copy
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml  # type: ignore[import-untyped]

from fhir_outreach.channels import governance as gov
from fhir_outreach.channels.optout import ACT_REASON, opt_out_consent, record_opt_out
from fhir_outreach.journeys.definition import CHANNEL_SYSTEM
from fhir_outreach.journeys.steps import CATEGORY_SYSTEM
from fhir_outreach.store import Store, Write
from fhir_outreach.store.base import prepare
from fhir_outreach.work.clock import fhir_instant, to_datetime
from tests.conftest import BASE

DATA = Path(__file__).parent / "data"
MATRIX = yaml.safe_load((DATA / "consent-matrix.yaml").read_text())
MODES = ("restrictive", "non-restrictive", "disabled")
NY = ZoneInfo("America/New_York")
HOUR, DAY = 3600.0, 86400.0
NOON_NY = datetime(2026, 3, 2, 12, 0, tzinfo=NY).timestamp()  # a Monday, 17:00Z


# --- the consent matrix ------------------------------------------------------------------------------

def _coding(value: Any, system: str) -> Any:
    return {"system": system, "code": value} if isinstance(value, str) else value


def _provision(p: dict[str, Any]) -> dict[str, Any]:
    out = dict(p)
    if "purpose" in out:
        out["purpose"] = [_coding(x, ACT_REASON) for x in out["purpose"]]
    if "code" in out:
        out["code"] = [{"coding": [_coding(x, CHANNEL_SYSTEM)]} if isinstance(x, str) else x for x in out["code"]]
    if "provision" in out:
        out["provision"] = [_provision(x) for x in out["provision"]]
    return out


def full_consent(short: dict[str, Any], i: int) -> dict[str, Any]:
    consent: dict[str, Any] = {
        "resourceType": "Consent", "id": f"c{i}", "status": "active",
        "scope": {"coding": [{"system": gov.SCOPE_SYSTEM, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": "Patient/p1"},
    }
    consent.update(copy.deepcopy(short))
    if isinstance(consent.get("policyRule"), str):
        consent["policyRule"] = {"coding": [{"system": gov.ACT_CODE, "code": consent["policyRule"]}]}
    if "provision" in consent:
        consent["provision"] = _provision(consent["provision"])
    return consent


def matrix_cases() -> list[Any]:
    cases = []
    for state in MATRIX["states"]:
        for key, row in state["expect"].items():
            channel, purpose = key.split()
            for mode, outcome in zip(MODES, row[1:], strict=True):
                cases.append(pytest.param(state, channel, purpose, row[0], mode, outcome,
                                          id=f"{state['name']}|{key}|{mode}"))
    return cases


def test_matrix_is_complete() -> None:
    """Every state answers for every channel and purpose, with a verdict and all three modes."""
    required = {f"{c} {p}" for c in ("sms", "email") for p in ("outreach", "transactional")}
    names = [s["name"] for s in MATRIX["states"]]
    assert len(names) == len(set(names))
    for state in MATRIX["states"]:
        assert set(state["expect"]) == required, state["name"]
        for row in state["expect"].values():
            assert row[0] in ("permit", "deny", "none") and len(row) == 4
            assert set(row[1:]) <= {"send", "block"}
    must = ["no consent at all", "permit all", "deny all", "deny sms only (the shape of a STOP opt-out)",
            "permit with a nested deny for HMARKT (no marketing)", "expired period (a permit that ended)",
            "inactive status", "other actor (a deny for a caregiver does not touch messages to the patient)"]
    assert set(must) <= set(names)


@pytest.mark.parametrize(("state", "channel", "purpose", "verdict", "mode", "outcome"), matrix_cases())
def test_consent_matrix(state: dict[str, Any], channel: str, purpose: str, verdict: str, mode: str,
                        outcome: str) -> None:
    consents = [full_consent(c, i) for i, c in enumerate(state["consents"])]
    at = datetime.fromisoformat(MATRIX["at"])
    got = gov.consent_verdict(consents, channel=channel, purpose=purpose, recipient_actor=MATRIX["recipient"], at=at)
    assert got == verdict
    assert gov.enforce(got, mode) is (outcome == "send")


def test_enforcement_modes() -> None:
    assert [gov.enforce(v, "restrictive") for v in ("permit", "none", "deny")] == [True, False, False]
    assert [gov.enforce(v, "non-restrictive") for v in ("permit", "none", "deny")] == [True, True, False]
    assert [gov.enforce(v, "disabled") for v in ("permit", "none", "deny")] == [True, True, True]
    with pytest.raises(ValueError, match="unknown consent enforcement mode"):
        gov.enforce("permit", "lenient")


def test_disabled_mode_logs_what_it_overrides(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fhir_outreach.channels.governance"):
        assert gov.enforce("deny", "disabled")
    assert "enforcement is disabled" in caplog.text


def test_actor_matches_the_recipient() -> None:
    consent = full_consent({"provision": {"type": "permit", "provision": [
        {"type": "deny", "actor": [{"reference": {"reference": "https://ehr.example/fhir/RelatedPerson/rp9"}}]}]}}, 0)
    at = datetime(2026, 3, 1, tzinfo=UTC)
    kw: dict[str, Any] = {"channel": "sms", "purpose": "outreach", "at": at}
    assert gov.consent_verdict([consent], recipient_actor="RelatedPerson/rp9", **kw) == "deny"
    assert gov.consent_verdict([consent], recipient_actor="RelatedPerson/rp9/_history/2", **kw) == "deny"
    assert gov.consent_verdict([consent], recipient_actor="Patient/p1", **kw) == "permit"
    assert gov.consent_verdict([consent], recipient_actor=None, **kw) == "permit"


def test_the_recorded_opt_out_denies_its_channel_from_when_it_was_made() -> None:
    made = datetime(2026, 2, 1, tzinfo=UTC).timestamp()
    stop = opt_out_consent("Patient/p1", "sms", made, "STOP reply")
    kw: dict[str, Any] = {"purpose": "transactional", "recipient_actor": "Patient/p1"}
    assert gov.consent_verdict([stop], channel="sms", at=made + 1, **kw) == "deny"
    assert gov.consent_verdict([stop], channel="email", at=made + 1, **kw) == "none"
    assert gov.consent_verdict([stop], channel="sms", at=made - 1, **kw) == "none"
    everything = opt_out_consent("Patient/p1", None, made, "unsubscribe link")
    assert gov.consent_verdict([everything], channel="email", at=made + 1, **kw) == "deny"
    assert gov.is_opt_out(stop)


# --- purposes ----------------------------------------------------------------------------------------

def _comm(category: str | None = None, *, recipient: str = "Patient/p1", channel: str = "sms",
          system: str | None = CATEGORY_SYSTEM) -> dict[str, Any]:
    comm: dict[str, Any] = {"resourceType": "Communication", "status": "preparation",
                            "subject": {"reference": "Patient/p1"}, "recipient": [{"reference": recipient}],
                            "medium": [{"coding": [{"system": CHANNEL_SYSTEM, "code": channel}]}]}
    if category:
        coding = {"code": category, **({"system": system} if system else {})}
        comm["category"] = [{"coding": [coding]}]
    return comm


@pytest.mark.parametrize(("comm", "purpose"), [
    (_comm("notification"), "transactional"),
    (_comm("reminder"), "transactional"),
    (_comm("alert"), "transactional"),
    (_comm("reminder", system=None), "transactional"),
    (_comm("reminder", system="http://example.org/other"), "outreach"),
    (_comm("education"), "outreach"),
    (_comm("campaign"), "outreach"),
    (_comm(None), "outreach"),
    (_comm("reminder", recipient="RelatedPerson/rp1"), "transactional"),
    (_comm("reminder", recipient="Practitioner/dr1"), "clinical"),
    (_comm(None, recipient="PractitionerRole/r1", channel="email"), "clinical"),
    (_comm(None, recipient="CareTeam/t1"), "clinical"),
    (_comm("education", channel="teams"), "clinical"),
])
def test_purpose_of(comm: dict[str, Any], purpose: str) -> None:
    assert gov.purpose_of(comm) == purpose


# --- quiet hours ---------------------------------------------------------------------------------------

def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize(("now", "quiet", "expected"), [
    # across midnight, evening side and morning side; the end is the next/same local morning
    ("2026-06-02T03:00:00Z", "21:00-08:00", "2026-06-02T08:00:00-04:00"),  # 23:00 EDT
    ("2026-06-02T01:00:00Z", "21:00-08:00", "2026-06-02T08:00:00-04:00"),  # 21:00 EDT: start inclusive
    ("2026-06-02T09:30:00Z", "21:00-08:00", "2026-06-02T08:00:00-04:00"),  # 05:30 EDT
    ("2026-06-02T12:00:00Z", "21:00-08:00", None),  # 08:00 EDT: end exclusive
    ("2026-06-02T16:00:00Z", "21:00-08:00", None),  # noon
    ("2026-06-02T00:59:00Z", "21:00-08:00", None),  # 20:59 EDT
    # not across midnight
    ("2026-06-02T16:30:00Z", "12:00-13:00", "2026-06-02T13:00:00-04:00"),
    ("2026-06-02T17:00:00Z", "12:00-13:00", None),
    ("2026-06-02T15:59:00Z", "12:00-13:00", None),
    # DST starts 2026-03-08 02:00 EST -> 03:00 EDT: the night is an hour shorter in real time
    ("2026-03-08T04:00:00Z", "21:00-08:00", "2026-03-08T08:00:00-04:00"),  # 23:00 EST -> 12:00Z, 8 h later
    ("2026-03-08T06:30:00Z", "22:00-02:30", "2026-03-08T03:00:00-04:00"),  # 02:30 never happens: 03:00 EDT
    # DST ends 2026-11-01 02:00 EDT -> 01:00 EST: the night is an hour longer
    ("2026-11-01T03:00:00Z", "21:00-08:00", "2026-11-01T08:00:00-05:00"),  # 23:00 EDT -> 13:00Z, 10 h later
    ("2026-11-01T05:10:00Z", "22:00-01:30", "2026-11-01T01:30:00-04:00"),  # 01:10 EDT: first 01:30
    ("2026-11-01T06:10:00Z", "22:00-01:30", "2026-11-01T01:30:00-05:00"),  # 01:10 EST: the second 01:30
    # no quiet hours
    ("2026-06-02T03:00:00Z", None, None),
    ("2026-06-02T03:00:00Z", "", None),
    ("2026-06-02T03:00:00Z", "08:00-08:00", None),
])
def test_quiet_until_new_york(now: str, quiet: str | None, expected: str | None) -> None:
    got = gov.quiet_until(_utc(now), NY, quiet)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.tzinfo is not None
        assert got.astimezone(UTC) == _utc(expected).astimezone(UTC)
        assert got.utcoffset() == _utc(expected).utcoffset()  # local time in the patient's zone


def test_quiet_hours_real_length_changes_with_dst() -> None:
    spring = gov.quiet_until(_utc("2026-03-08T02:00:00Z"), NY, "21:00-08:00")  # 21:00 EST on the 7th
    autumn = gov.quiet_until(_utc("2026-11-01T01:00:00Z"), NY, "21:00-08:00")  # 21:00 EDT on Oct 31
    assert spring is not None and autumn is not None
    assert spring.timestamp() - _utc("2026-03-08T02:00:00Z").timestamp() == 10 * HOUR
    assert autumn.timestamp() - _utc("2026-11-01T01:00:00Z").timestamp() == 12 * HOUR


def test_quiet_hours_in_another_zone() -> None:
    london = ZoneInfo("Europe/London")
    # 22:30 in London is 17:30 in New York: quiet there, not here
    assert gov.quiet_until(_utc("2026-06-02T21:30:00Z"), london, "21:00-08:00") is not None
    assert gov.quiet_until(_utc("2026-06-02T21:30:00Z"), NY, "21:00-08:00") is None


@pytest.mark.parametrize("bad", ["21-08", "21:00", "9:00-17:00", "21:00-25:00", "a-b", "21:00-08:00-09:00"])
def test_bad_quiet_hours(bad: str) -> None:
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        gov.quiet_until(_utc("2026-06-02T21:30:00Z"), NY, bad)


# --- time zones ------------------------------------------------------------------------------------------

TZ_EXT = "http://hl7.org/fhir/StructureDefinition/timezone"


@pytest.mark.parametrize(("patient", "zone"), [
    ({"extension": [{"url": TZ_EXT, "valueCode": "America/Chicago"}],
      "address": [{"state": "CA", "country": "US"}]}, "America/Chicago"),  # extension beats the address
    ({"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/tz-code", "valueCode": "Europe/Paris"}]},
     "Europe/Paris"),  # the R4 name
    ({"extension": [{"url": TZ_EXT, "valueCode": "Mars/Olympus"}], "address": [{"state": "WA"}]},
     "America/Los_Angeles"),  # unknown zone ignored
    ({"extension": [{"url": "http://example.org/tz", "valueCode": "Asia/Tokyo"}]}, "UTC"),  # other url
    ({"address": [{"state": "CA", "country": "US"}]}, "America/Los_Angeles"),
    ({"address": [{"state": "ny", "country": "USA"}]}, "America/New_York"),
    ({"address": [{"state": "AZ"}]}, "America/Phoenix"),
    ({"address": [{"state": "ON", "country": "CA"}]}, "America/Toronto"),
    ({"address": [{"state": "VIC", "country": "Australia"}]}, "Australia/Melbourne"),
    ({"address": [{"city": "Leeds", "country": "GB"}]}, "Europe/London"),
    ({"address": [{"city": "Lyon", "country": "France"}]}, "Europe/Paris"),
    ({"address": [{"use": "old", "state": "HI"}, {"state": "TX"}]}, "America/Chicago"),
    ({"address": [{"state": "HI", "period": {"end": "2020-01-01"}}, {"state": "TX"}]}, "America/Chicago"),
    ({"address": [{"use": "work", "state": "CA"}, {"use": "home", "state": "NY"}]}, "America/New_York"),
    ({"address": [{"state": "CA", "extension": [{"url": TZ_EXT, "valueCode": "America/Denver"}]}]},
     "America/Denver"),
    ({"address": [{"city": "Somewhere", "country": "BR"}]}, "UTC"),  # not in the tables: the default
    ({}, "UTC"),
    (None, "UTC"),
])
def test_patient_timezone(patient: dict[str, Any] | None, zone: str) -> None:
    assert gov.patient_timezone(patient, ZoneInfo("UTC")).key == zone


def test_patient_timezone_default_by_name() -> None:
    assert gov.patient_timezone({}, "Europe/Berlin") == ZoneInfo("Europe/Berlin")


# --- addresses -------------------------------------------------------------------------------------------

AT = datetime(2026, 3, 2, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("telecom", "channel", "expected"), [
    ([{"system": "email", "value": "b@x.org", "rank": 2}, {"system": "email", "value": "a@x.org", "rank": 1}],
     "email", "a@x.org"),
    ([{"system": "email", "value": "late@x.org"}, {"system": "email", "value": "ranked@x.org", "rank": 3}],
     "email", "ranked@x.org"),  # unranked after ranked
    ([{"system": "email", "value": "first@x.org"}, {"system": "email", "value": "second@x.org"}],
     "email", "first@x.org"),
    ([{"system": "email", "value": "old@x.org", "period": {"end": "2026-01-01"}},
      {"system": "email", "value": "new@x.org", "rank": 5}], "email", "new@x.org"),
    ([{"system": "email", "value": "soon@x.org", "period": {"start": "2026-04-01"}}], "email", None),
    ([{"system": "email", "value": "until@x.org", "period": {"end": "2026-12-31"}}], "email", "until@x.org"),
    ([{"system": "email", "value": "gone@x.org", "use": "old", "rank": 1}], "email", None),
    ([{"system": "email", "value": "  "}], "email", None),
    ([{"system": "phone", "value": "+1 555 0100", "use": "mobile"}], "sms", "+1 555 0100"),
    ([{"system": "phone", "value": "555-0100", "use": "home"}], "sms", None),
    ([{"system": "sms", "value": "(555) 0101"}], "sms", "(555) 0101"),
    ([{"system": "phone", "value": "m1", "use": "mobile", "rank": 2}, {"system": "sms", "value": "s1", "rank": 1}],
     "sms", "s1"),
    ([{"system": "phone", "value": "m1", "use": "mobile", "period": {"end": "2025-12-31"}},
      {"system": "phone", "value": "m2", "use": "mobile"}], "sms", "m2"),
    ([{"system": "email", "value": "a@x.org"}], "sms", None),
    ([{"system": "phone", "value": "+15550100", "use": "mobile"}], "email", None),
    ([{"system": "email", "value": "a@x.org"}], "push", None),
])
def test_address_for(telecom: list[dict[str, Any]], channel: str, expected: str | None) -> None:
    assert gov.address_for({"resourceType": "Patient", "telecom": telecom}, channel, "US", at=AT) == expected


def test_address_for_without_patient() -> None:
    assert gov.address_for(None, "email", "US") is None
    assert gov.address_for({"telecom": [{"system": "email", "value": "a@x.org"}]}, "email", "US") == "a@x.org"


# --- store helpers -----------------------------------------------------------------------------------------

async def put(store: Store, *resources: dict[str, Any], at: float = NOON_NY - 30 * DAY) -> None:
    await store.commit([prepare(Write(r["resourceType"], r["id"], r), BASE) for r in resources], now=to_datetime(at))


_seq = iter(range(1_000_000))


def sent_comm(sent: float | None, *, patient: str = "p1", channel: str = "sms", status: str = "completed",
              category: str | None = "education", recipient: str | None = None) -> dict[str, Any]:
    comm = _comm(category, recipient=recipient or f"Patient/{patient}", channel=channel)
    comm.update(id=f"m{next(_seq)}", status=status, subject={"reference": f"Patient/{patient}"})
    if sent is not None:
        comm["sent"] = fhir_instant(sent)
    return comm


# --- caps on both stores -----------------------------------------------------------------------------------

async def test_cap_counts_only_this_patients_sent_outreach_on_this_channel(store: Store) -> None:
    now = NOON_NY
    await put(store,
              sent_comm(now - 1 * HOUR), sent_comm(now - 2 * HOUR, status="in-progress"),
              sent_comm(now - 3 * HOUR, status="not-done"),  # blocked: not counted
              sent_comm(None, status="preparation"),  # not sent yet
              sent_comm(now - 3 * HOUR, channel="email"),  # other channel
              sent_comm(now - 3 * HOUR, patient="p2"),  # other patient
              sent_comm(now - 3 * HOUR, category="reminder"),  # transactional
              sent_comm(now - 3 * HOUR, recipient="Practitioner/dr1"),  # clinical
              sent_comm(now - 25 * HOUR))  # outside the day, inside the week
    assert not await gov.cap_reached(store, "Patient/p1", "sms", now, 3, 10)
    assert await gov.cap_reached(store, "Patient/p1", "sms", now, 2, 10)
    assert await gov.cap_reached(store, "Patient/p1", "sms", now, 0, 3)  # 3 in the week
    assert not await gov.cap_reached(store, "Patient/p1", "sms", now, 0, 4)
    assert not await gov.cap_reached(store, "Patient/p1", "sms", now, 0, 0)  # 0 = no cap
    assert await gov.cap_reached(store, "Patient/p1", "email", now, 1, 0)  # one email sent
    assert not await gov.cap_reached(store, "Patient/p2", "sms", now, 2, 0)


async def test_cap_release_is_when_the_oldest_counted_message_leaves(store: Store) -> None:
    now = NOON_NY
    times = [now - 20 * HOUR, now - 5 * HOUR, now - 1 * HOUR]
    await put(store, *(sent_comm(t) for t in times))
    assert await gov.cap_release(store, "Patient/p1", "sms", now, 3, 0) == times[0] + DAY
    assert await gov.cap_release(store, "Patient/p1", "sms", now, 2, 0) == times[1] + DAY  # two must leave
    assert await gov.cap_release(store, "Patient/p1", "sms", now, 4, 0) is None
    # week cap 3: the oldest in the week leaves a week after it was sent; the later of both windows wins
    assert await gov.cap_release(store, "Patient/p1", "sms", now, 3, 3) == times[0] + 7 * DAY
    # the window is rolling: once the oldest has left, one more may go
    assert await gov.cap_release(store, "Patient/p1", "sms", times[0] + DAY, 3, 0) is None
    assert await gov.cap_release(store, "Patient/p1", "sms", times[0] + DAY - 1, 3, 0) == times[0] + DAY


async def test_cap_window_boundary(store: Store) -> None:
    now = NOON_NY
    await put(store, sent_comm(now - DAY), sent_comm(now - DAY + 1))
    assert not await gov.cap_reached(store, "Patient/p1", "sms", now, 2, 0)  # exactly a day ago: gone
    assert await gov.cap_reached(store, "Patient/p1", "sms", now, 1, 0)


# --- decide on both stores ------------------------------------------------------------------------------

PATIENT = {"resourceType": "Patient", "id": "p1", "address": [{"state": "NY", "country": "US"}],
           "telecom": [{"system": "phone", "use": "mobile", "value": "+12125550100"}]}


def message(category: str | None = "education", *, channel: str = "sms", recipient: str = "Patient/p1"
            ) -> dict[str, Any]:
    comm = _comm(category, recipient=recipient, channel=channel)
    comm["id"] = f"out{next(_seq)}"
    return comm


def permit_all() -> dict[str, Any]:
    return full_consent({"provision": {"type": "permit"}}, next(_seq))


@pytest.fixture
def settings(make_settings: Any) -> Any:
    return make_settings(quiet_hours="21:00-08:00", default_timezone="UTC", cap_per_day=3, cap_per_week=10,
                         message_expiry_hours=72, consent_outreach="restrictive",
                         consent_transactional="non-restrictive")


async def test_decide_sends_when_everything_allows(store: Store, settings: Any) -> None:
    await put(store, permit_all())
    d = await gov.decide(store, message(), patient=PATIENT, channel="sms", now=NOON_NY, settings=settings,
                         created=NOON_NY - HOUR)
    assert d.action == "send" and d.reason is None and d.until is None


async def test_decide_expired_comes_first(store: Store, settings: Any) -> None:
    await record_opt_out(store, "Patient/p1", "sms", at=NOON_NY - DAY, how="STOP", base_url=BASE)
    d = await gov.decide(store, message(), patient=PATIENT, channel="sms", now=NOON_NY, settings=settings,
                         created=NOON_NY - 72 * HOUR)
    assert (d.action, d.reason) == ("block", "expired")
    d = await gov.decide(store, message(), patient=PATIENT, channel="sms", now=NOON_NY, settings=settings,
                         created=NOON_NY - 72 * HOUR + 1)
    assert (d.action, d.reason) == ("block", "opted-out")


async def test_decide_opt_out_and_consent_reasons(store: Store, settings: Any) -> None:
    await record_opt_out(store, "Patient/p1", "sms", at=NOON_NY - DAY, how="STOP", base_url=BASE)
    kw: dict[str, Any] = {"patient": PATIENT, "now": NOON_NY, "settings": settings, "created": NOON_NY}
    d = await gov.decide(store, message("reminder"), channel="sms", **kw)  # transactional too: STOP is STOP
    assert (d.action, d.reason) == ("block", "opted-out") and "Consent/" in d.detail
    d = await gov.decide(store, message(channel="email"), channel="email", **kw)  # restrictive: no permit
    assert (d.action, d.reason) == ("block", "consent")
    d = await gov.decide(store, message("reminder", channel="email"), channel="email", **kw)  # non-restrictive
    assert d.action == "send"
    await put(store, permit_all())
    d = await gov.decide(store, message(channel="email"), channel="email", **kw)
    assert d.action == "send"
    d = await gov.decide(store, message(), channel="sms", **kw)  # the opt-out still wins on sms
    assert (d.action, d.reason) == ("block", "opted-out")


async def test_decide_a_deny_that_is_not_an_opt_out(store: Store, settings: Any) -> None:
    await put(store, full_consent({"provision": {"type": "permit", "provision": [
        {"type": "deny", "purpose": [{"system": ACT_REASON, "code": "HMARKT"}]}]}}, 900))
    kw: dict[str, Any] = {"patient": PATIENT, "now": NOON_NY, "settings": settings, "created": NOON_NY}
    d = await gov.decide(store, message(), channel="sms", **kw)
    assert (d.action, d.reason) == ("block", "consent") and "Consent/c900" in d.detail
    assert (await gov.decide(store, message("reminder"), channel="sms", **kw)).action == "send"


async def test_decide_other_patients_consents_do_not_count(store: Store, settings: Any) -> None:
    other = permit_all()
    other["patient"] = {"reference": "Patient/p2"}
    await put(store, other)
    d = await gov.decide(store, message(), patient=PATIENT, channel="sms", now=NOON_NY, settings=settings,
                         created=NOON_NY)
    assert (d.action, d.reason) == ("block", "consent")


async def test_decide_disabled_mode_sends_despite_opt_out(store: Store, make_settings: Any,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(consent_outreach="disabled", consent_transactional="disabled")
    await record_opt_out(store, "Patient/p1", None, at=NOON_NY - DAY, how="unsubscribe", base_url=BASE)
    with caplog.at_level(logging.WARNING, logger="fhir_outreach.channels.governance"):
        d = await gov.decide(store, message(), patient=PATIENT, channel="sms", now=NOON_NY, settings=settings,
                             created=NOON_NY)
    assert d.action == "send"
    assert "disabled" in caplog.text


async def test_decide_clinical_messages_skip_consent_caps_and_quiet_hours(store: Store, settings: Any) -> None:
    night = datetime(2026, 3, 2, 23, 30, tzinfo=NY).timestamp()
    await record_opt_out(store, "Patient/p1", None, at=night - DAY, how="STOP", base_url=BASE)
    await put(store, *(sent_comm(night - i * HOUR, channel="teams") for i in range(1, 5)))
    d = await gov.decide(store, message(channel="teams", recipient="Practitioner/dr1"), patient=PATIENT,
                         channel="teams", now=night, settings=settings, created=night)
    assert d.action == "send"
    d = await gov.decide(store, message(channel="teams", recipient="Practitioner/dr1"), patient=PATIENT,
                         channel="teams", now=night, settings=settings, created=night - 72 * HOUR)
    assert (d.action, d.reason) == ("block", "expired")


async def test_decide_cap_holds_until_a_slot_frees(store: Store, settings: Any) -> None:
    await put(store, permit_all())
    sent = [NOON_NY - 10 * HOUR, NOON_NY - 4 * HOUR, NOON_NY - 2 * HOUR]
    await put(store, *(sent_comm(t) for t in sent))
    d = await gov.decide(store, message(), patient=PATIENT, channel="sms", now=NOON_NY, settings=settings,
                         created=NOON_NY - HOUR)
    assert (d.action, d.until) == ("hold", sent[0] + DAY) and "cap" in d.detail
    # transactional messages are neither capped nor counted
    d = await gov.decide(store, message("reminder"), patient=PATIENT, channel="sms", now=NOON_NY, settings=settings,
                         created=NOON_NY - HOUR)
    assert d.action == "send"
    # another channel has its own cap
    d = await gov.decide(store, message(channel="email"), patient=PATIENT, channel="email", now=NOON_NY,
                         settings=settings, created=NOON_NY - HOUR)
    assert d.action == "send"


async def test_decide_cap_that_frees_only_after_expiry_blocks(store: Store, settings: Any) -> None:
    await put(store, permit_all())
    sent = [NOON_NY - 10 * HOUR, NOON_NY - 4 * HOUR, NOON_NY - 2 * HOUR]
    await put(store, *(sent_comm(t) for t in sent))
    created = sent[0] + DAY - 72 * HOUR  # expires exactly when the slot frees
    d = await gov.decide(store, message(), patient=PATIENT, channel="sms", now=NOON_NY, settings=settings,
                         created=created)
    assert (d.action, d.reason, d.until) == ("block", "cap", None)
    d = await gov.decide(store, message(), patient=PATIENT, channel="sms", now=NOON_NY, settings=settings,
                         created=created + 1)
    assert d.action == "hold"


async def test_decide_weekly_cap(store: Store, make_settings: Any) -> None:
    settings = make_settings(cap_per_day=0, cap_per_week=2, consent_outreach="non-restrictive")
    first = NOON_NY - 6 * DAY
    await put(store, sent_comm(first), sent_comm(NOON_NY - 3 * DAY))
    d = await gov.decide(store, message(), patient=PATIENT, channel="sms", now=NOON_NY, settings=settings,
                         created=NOON_NY)
    assert (d.action, d.until) == ("hold", first + 7 * DAY)


async def test_decide_quiet_hours_in_the_patients_zone(store: Store, settings: Any) -> None:
    await put(store, permit_all())
    night = datetime(2026, 3, 2, 23, 0, tzinfo=NY).timestamp()  # 04:00Z: not quiet in UTC (the default)
    morning = datetime(2026, 3, 3, 8, 0, tzinfo=NY).timestamp()
    d = await gov.decide(store, message(), patient=PATIENT, channel="sms", now=night, settings=settings,
                         created=night)
    assert (d.action, d.until) == ("hold", morning) and "America/New_York" in d.detail
    # transactional messages wait for the morning too
    d = await gov.decide(store, message("reminder"), patient=PATIENT, channel="sms", now=night, settings=settings,
                         created=night)
    assert (d.action, d.until) == ("hold", morning)
    # no patient: the default zone (UTC), where 04:00 is quiet until 08:00Z
    d = await gov.decide(store, message(), patient=None, channel="sms", now=night, settings=settings, created=night)
    assert (d.action, d.until) == ("hold", night + 4 * HOUR)
    # the patient's own zone extension wins over the address
    la = {**PATIENT, "extension": [{"url": TZ_EXT, "valueCode": "America/Los_Angeles"}]}  # 20:00 there
    d = await gov.decide(store, message(), patient=la, channel="sms", now=night, settings=settings, created=night)
    assert d.action == "send"
    # released at the end of quiet hours
    d = await gov.decide(store, message(), patient=PATIENT, channel="sms", now=morning, settings=settings,
                         created=night)
    assert d.action == "send"


async def test_decide_quiet_hours_ending_after_expiry_block(store: Store, settings: Any) -> None:
    await put(store, permit_all())
    night = datetime(2026, 3, 2, 23, 0, tzinfo=NY).timestamp()
    morning = datetime(2026, 3, 3, 8, 0, tzinfo=NY).timestamp()
    d = await gov.decide(store, message(), patient=PATIENT, channel="sms", now=night, settings=settings,
                         created=morning - 72 * HOUR)
    assert (d.action, d.reason) == ("block", "expired") and "quiet hours" in d.detail
    d = await gov.decide(store, message(), patient=PATIENT, channel="sms", now=night, settings=settings,
                         created=morning - 72 * HOUR + 1)
    assert (d.action, d.until) == ("hold", morning)


async def test_decide_cap_is_checked_before_quiet_hours(store: Store, settings: Any) -> None:
    await put(store, permit_all())
    night = datetime(2026, 3, 2, 23, 0, tzinfo=NY).timestamp()
    sent = [night - 3 * HOUR, night - 2 * HOUR, night - 1 * HOUR]
    await put(store, *(sent_comm(t) for t in sent))
    d = await gov.decide(store, message(), patient=PATIENT, channel="sms", now=night, settings=settings,
                         created=night)
    assert (d.action, d.until) == ("hold", sent[0] + DAY) and "cap" in d.detail


async def test_decide_consent_is_checked_before_caps_and_quiet_hours(store: Store, settings: Any) -> None:
    night = datetime(2026, 3, 2, 23, 0, tzinfo=NY).timestamp()
    await put(store, *(sent_comm(night - i * HOUR) for i in range(1, 4)))
    d = await gov.decide(store, message(), patient=PATIENT, channel="sms", now=night, settings=settings,
                         created=night)
    assert (d.action, d.reason) == ("block", "consent")


async def test_decide_without_created_uses_the_first_version(store: Store, settings: Any) -> None:
    await put(store, permit_all())
    comm = message()
    written = NOON_NY - 80 * HOUR
    await put(store, comm, at=written)
    await put(store, {**comm, "note": [{"text": "edited"}]}, at=NOON_NY - HOUR)  # version 2, recent
    stored = await store.read("Communication", comm["id"])
    assert stored is not None and stored.version == 2 and stored.resource is not None
    d = await gov.decide(store, stored.resource, patient=PATIENT, channel="sms", now=NOON_NY, settings=settings)
    assert (d.action, d.reason) == ("block", "expired")
    first = await store.vread("Communication", comm["id"], 1)
    assert first is not None and first.resource is not None
    d = await gov.decide(store, first.resource, patient=PATIENT, channel="sms", now=written + 5 * HOUR,
                         settings=settings)  # 09:00 in New York, 5 h after it was written
    assert d.action == "send"
