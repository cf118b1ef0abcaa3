"""The FHIRPath module: syntax checking, compile cache, variables, boolean semantics, errors."""

from __future__ import annotations

import pytest

from fhir_outreach.fhir.fhirpath import (
    FhirPathError,
    check_syntax,
    compile_expression,
    evaluate,
    evaluate_boolean,
)

DISCHARGED = "(%previous.empty() or %previous.status != 'finished') and %current.status = 'finished'"


@pytest.mark.parametrize(("expression", "where"), [
    ("Patient.name.(", "column 14"),
    ("Patient..name", "column 9"),
    ("1 +", "column 4"),
    ("Observation.where(", "column 19"),
    ("Patient.name )", "unexpected ')'"),
    ("   ", "empty expression"),
])
def test_syntax_errors_name_the_place(expression: str, where: str) -> None:
    with pytest.raises(FhirPathError, match="FHIRPath") as err:
        check_syntax(expression)
    assert where in err.value.reason
    assert err.value.expression == [expression]


def test_transition_with_current_and_previous() -> None:
    enc = {"resourceType": "Encounter"}
    assert evaluate_boolean(DISCHARGED, enc, {"current": {**enc, "status": "finished"}, "previous": None}) is True
    assert evaluate_boolean(DISCHARGED, enc, {"current": {**enc, "status": "finished"},
                                              "previous": {**enc, "status": "in-progress"}}) is True
    assert evaluate_boolean(DISCHARGED, enc, {"current": {**enc, "status": "finished"},
                                              "previous": {**enc, "status": "finished"}}) is False


def test_clinical_condition_over_codes() -> None:
    high_risk = ("Condition.code.coding.where(system = 'http://snomed.info/sct' and "
                 "(code = '84114007' or code = '13645005')).exists()")
    chf = {"resourceType": "Condition", "code": {"coding": [{"system": "http://snomed.info/sct", "code": "84114007"}]}}
    cold = {"resourceType": "Condition", "code": {"coding": [{"system": "http://snomed.info/sct", "code": "82272006"}]}}
    assert evaluate_boolean(high_risk, chf) is True
    assert evaluate_boolean(high_risk, cold) is False


def test_boolean_semantics_and_evaluation_errors() -> None:
    assert evaluate_boolean("Patient.active", {"resourceType": "Patient"}) is None  # empty: unknown
    with pytest.raises(FhirPathError, match="expected a single boolean"):
        evaluate_boolean("Patient.name.given", {"resourceType": "Patient", "name": [{"given": ["A", "B"]}]})
    with pytest.raises(FhirPathError, match="Not implemented: nosuchfunction"):
        evaluate("Patient.nosuchfunction()", {"resourceType": "Patient"})
    assert evaluate("Patient.name.given", {"resourceType": "Patient", "name": [{"given": ["A", "B"]}]}) == ["A", "B"]


def test_compiled_once() -> None:
    compile_expression.cache_clear()
    first = compile_expression("Patient.gender = 'female'")
    assert compile_expression("Patient.gender = 'female'") is first
    assert compile_expression.cache_info().hits == 1
