"""Search parameter parsing and index extraction, without a store."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fhir_outreach.errors import InvalidRequest, NotSupported
from fhir_outreach.fhir.paths import date_range, extract, normalize_string
from fhir_outreach.fhir.search import Pred, parse_query


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("text", "lo", "hi"), [
    ("2024", ts(2024, 1, 1), ts(2025, 1, 1)),
    ("2024-12", ts(2024, 12, 1), ts(2025, 1, 1)),
    ("2024-02-29", ts(2024, 2, 29), ts(2024, 3, 1)),
    ("2024-02-29T10:30Z", ts(2024, 2, 29, 10, 30), ts(2024, 2, 29, 10, 31)),
    ("2024-02-29T10:30:15+02:00", ts(2024, 2, 29, 8, 30, 15), ts(2024, 2, 29, 8, 30, 16)),
])
def test_date_ranges_follow_precision(text: str, lo: float, hi: float) -> None:
    assert date_range(text) == (lo, hi)


def test_fractional_seconds_and_bad_dates() -> None:
    lo, hi = date_range("2024-01-01T00:00:00.250Z")
    assert lo == pytest.approx(ts(2024, 1, 1) + 0.25)
    assert hi == pytest.approx(lo + 0.001)
    for bad in ("yesterday", "2024-1-1", "2024-01-01T10", ""):
        with pytest.raises(ValueError, match="not a FHIR date"):
            date_range(bad)


def test_normalize_string_folds_case_and_accents() -> None:
    assert normalize_string("  Ärztin Ñuñez ") == "arztin nunez"


def test_extract_covers_choice_types_filters_and_canonicals() -> None:
    obs = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org",
           "code": "4548-4"}]}, "subject": {"reference": "http://srv/fhir/Patient/9/_history/2"},
           "effectivePeriod": {"start": "2024-05-01"}, "valueCodeableConcept": {"coding": [{"code": "high"}]}}
    got = {(e.param, e.sys, e.val) for e in extract(obs, base_url="http://srv/fhir") if e.lo is None}
    assert ("patient", "9", "Patient/9") in got
    assert ("subject", "9", "Patient/9") in got
    assert ("code", "http://loinc.org", "4548-4") in got
    assert ("value-concept", None, "high") in got
    dates = [e for e in extract(obs) if e.param == "date"]
    assert len(dates) == 1 and dates[0].lo == ts(2024, 5, 1) and dates[0].hi == 1e15  # open-ended period
    group_subject = {**obs, "subject": {"reference": "Group/g"}}
    assert not [e for e in extract(group_subject) if e.param == "patient"]
    pt = {"resourceType": "Patient", "telecom": [{"system": "email", "value": "a@b.org"},
                                                 {"system": "phone", "value": "+15551234"}]}
    by_param = {(e.param, e.val) for e in extract(pt)}
    assert ("email", "a@b.org") in by_param and ("email", "+15551234") not in by_param
    assert ("phone", "+15551234") in by_param


def test_parse_query_values_modifiers_and_errors() -> None:
    q = parse_query("Task", [("status", "ready,completed"), ("code", "http://snomed.info/sct|123"),
                             ("patient", "abc"), ("subject", "xyz"), ("authored-on", "ge2024-01-01"),
                             ("_count", "10"), ("_sort", "-authored-on,_id")])
    by = {c.param: c for c in q.clauses}
    assert [p.val for p in by["status"].preds] == ["ready", "completed"]
    assert by["code"].preds == (Pred("token", "http://snomed.info/sct", "123"),)
    assert by["patient"].preds == (Pred("ref", val="Patient/abc"),)
    assert by["subject"].preds == (Pred("ref_id", sys="xyz"),)  # several target types: match by id
    assert q.count == 10 and q.sort == [("authored-on", True), ("_id", False)]
    escaped = parse_query("Task", [("identifier", r"urn:x|a\,b")])
    assert escaped.clauses[0].preds == (Pred("token", "urn:x", "a,b"),)
    lenient = parse_query("Task", [("nonsense", "1")])
    assert lenient.ignored == ["nonsense"] and not lenient.clauses
    with pytest.raises(InvalidRequest, match="unknown search parameter 'nonsense'"):
        parse_query("Task", [("nonsense", "1")], strict=True)
    with pytest.raises(InvalidRequest, match="authored-on"):
        parse_query("Task", [("authored-on", "ge2024-13-45x")])
    with pytest.raises(NotSupported, match="prefix 'ap'"):
        parse_query("Task", [("authored-on", "ap2024")])
    with pytest.raises(NotSupported, match="chained"):
        parse_query("Task", [("subject.name", "x")])
    with pytest.raises(NotSupported, match=":exact"):
        parse_query("Task", [("status:exact", "x")])
    with pytest.raises(InvalidRequest, match="_count"):
        parse_query("Task", [("_count", "-1")])
    with pytest.raises(InvalidRequest, match="_include"):
        parse_query("Task", [("_include", "Task:status")])
    assert parse_query("Task", [("_count", "99999")], max_count=1000).count == 1000
