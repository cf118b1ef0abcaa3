"""``steps``: the contact preference a preference step reads, the element paths an update step sets, and the
dateTimes a wait-until accepts. Tables in ``data/``."""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from fhir_outreach.journeys.steps import _set_path, contact_preference, parse_when

DATA = Path(__file__).parent / "data"


def table(name: str) -> list[Any]:
    rows = yaml.safe_load((DATA / name).read_text())
    return [pytest.param(row, id=str(row.get("name") or row["value"]),
                         marks=[pytest.mark.xfail(strict=True, reason=row["xfail"])] if row.get("xfail") else [])
            for row in rows]


@pytest.mark.parametrize("case", table("contact-preference.yaml"))
def test_contact_preference(case: dict[str, Any]) -> None:
    patient = copy.deepcopy(case["patient"])
    assert contact_preference(patient) == case["expect"]
    assert patient == case["patient"]  # read only


@pytest.mark.parametrize("case", table("set-path.yaml"))
def test_set_path(case: dict[str, Any]) -> None:
    resource = copy.deepcopy(case["resource"])
    assert _set_path(resource, case["path"], copy.deepcopy(case["value"])) is case["changed"]
    assert resource == case["after"]


@pytest.mark.parametrize("case", table("parse-when.yaml"))
def test_parse_when(case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(ValueError, match=case["error"]):
            parse_when(case["value"])
    else:
        assert parse_when(case["value"]) == datetime.fromisoformat(case["expect"]).timestamp()
