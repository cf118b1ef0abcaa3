"""The YAML form ⇄ FHIR: every shipped journey compiles to R4-valid resources that ``parse_journey`` accepts,
and decompiling gives YAML that compiles to the very same resources; YAML shape errors say where; durations
go ISO 8601 → UCUM Duration → ISO 8601 unchanged."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml  # type: ignore[import-untyped]
from fhir.resources.R4B import get_fhir_model_class

from fhir_outreach.errors import InvalidJourney
from fhir_outreach.journeys.catalog import topic_names
from fhir_outreach.journeys.compiler import compile_journey, decompile
from fhir_outreach.journeys.definition import (
    MESSAGE_PROFILE,
    PROFILE,
    TASK_PROFILE,
    fhir_duration_to_iso,
    iso_to_fhir_duration,
    parse_journey,
)
from fhir_outreach.journeys.files import dump, from_resources, parse_text

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "profiles" / "journeys").glob("*.yaml"))
DATA = Path(__file__).parent / "data"
UCUM = "http://unitsofmeasure.org"


def load(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return compile_journey(yaml.safe_load(path.read_text()))


def case_id(path: Path) -> str:
    # the suite is often run with -k "not discharge" to skip the slow end-to-end test: keep the sample in
    return path.stem.replace("discharge", "dischg")


def journey_files() -> list[Any]:
    return [pytest.param(p, id=f"profiles/{case_id(p)}") for p in SAMPLES] + \
           [pytest.param(p, id=f"data/{case_id(p)}") for p in sorted((DATA / "valid").glob("*.yaml"))]


def test_the_samples_are_found() -> None:
    assert "patient-discharge.yaml" in [p.name for p in SAMPLES]


# --- every shipped journey ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", journey_files())
def test_compiles_to_valid_r4_resources(path: Path) -> None:
    plan, templates = load(path)
    assert plan["resourceType"] == "PlanDefinition" and plan["meta"]["profile"] == [PROFILE]
    get_fhir_model_class("PlanDefinition").model_validate(copy.deepcopy(plan))
    for tpl in templates:
        assert tpl["resourceType"] == "ActivityDefinition"
        assert tpl["meta"]["profile"] == [MESSAGE_PROFILE if tpl["kind"] == "CommunicationRequest" else TASK_PROFILE]
        get_fhir_model_class("ActivityDefinition").model_validate(copy.deepcopy(tpl))
    canonicals = {f"{t['url']}|{t['version']}" for t in templates}
    used = {a["definitionCanonical"] for a in plan["action"] if "definitionCanonical" in a}
    assert used <= canonicals, f"steps name templates the file does not define: {used - canonicals}"


@pytest.mark.parametrize("path", journey_files())
def test_parses_with_every_rule(path: Path) -> None:
    plan, templates = load(path)
    doc = yaml.safe_load(path.read_text())
    tmap = {f"{t['url']}|{t['version']}": t for t in templates}
    j = parse_journey(plan, tmap, known_topics=topic_names())
    assert j.url == plan["url"] and j.version == str(doc.get("version") or "1.0.0")
    assert list(j.steps) == [str(s["id"]) for s in doc["steps"]]
    assert j.first == str(doc["steps"][0]["id"])
    assert len(j.triggers) == (len(doc["trigger"]) if isinstance(doc["trigger"], list) else 1)


@pytest.mark.parametrize("path", journey_files())
def test_decompile_then_compile_is_a_fixed_point(path: Path) -> None:
    plan, templates = load(path)
    again = compile_journey(decompile(copy.deepcopy(plan), copy.deepcopy(templates)))
    assert again == (plan, templates)


@pytest.mark.parametrize("path", journey_files())
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_export_text_reads_back_to_the_same_resources(path: Path, fmt: str) -> None:
    plan, templates = load(path)
    text = dump(plan, templates, fmt)
    assert parse_text(text) == (plan, templates)
    assert dump(*parse_text(text), fmt) == text


@pytest.mark.parametrize("path", [pytest.param(p, id=case_id(p)) for p in SAMPLES if p.with_suffix(".json").exists()])
def test_shipped_json_bundle_is_the_compiled_yaml(path: Path) -> None:
    bundle = orjson.loads(path.with_suffix(".json").read_bytes())
    assert from_resources(bundle) == load(path)


# --- YAML shape errors -------------------------------------------------------------------------------

def directives(path: Path) -> tuple[list[tuple[str, str]], str | None]:
    expect, xfail = [], None
    for line in path.read_text().splitlines():
        if line.startswith("# expect:"):
            where, _, why = line.removeprefix("# expect:").partition("|")
            expect.append((where.strip(), why.strip()))
        elif line.startswith("# xfail:"):
            xfail = line.removeprefix("# xfail:").strip()
    return expect, xfail


def shape_cases() -> list[Any]:
    out = []
    for path in sorted((DATA / "shape").glob("*.yaml")):
        _, xfail = directives(path)
        out.append(pytest.param(path, id=path.stem,
                                marks=[pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []))
    return out


@pytest.mark.parametrize("path", shape_cases())
def test_yaml_shape_error_says_where(path: Path) -> None:
    expect, _ = directives(path)
    assert expect
    with pytest.raises(InvalidJourney) as info:
        load(path)
    problems = info.value.problems
    for where, why in expect:
        assert any(w == where and why in y for w, y in problems), \
            f"expected ({where!r}, …{why!r}…) among:\n" + "\n".join(f"  {w}: {y}" for w, y in problems)


def test_shape_errors_are_all_reported_together() -> None:
    doc = yaml.safe_load((DATA / "valid" / "minimal.yaml").read_text())
    doc["colour"] = "blue"
    doc["steps"][0]["nxt"] = "seen"
    doc["steps"].append({"wait": "P1D"})
    doc["steps"].append({"id": "both", "wait": "P1D", "end": True})
    with pytest.raises(InvalidJourney) as info:
        compile_journey(doc)
    assert [w for w, _ in info.value.problems] == ["colour", "step send", "steps[4]", "step both"]


# --- durations ---------------------------------------------------------------------------------------

DURATIONS = [
    ("P2D", 2, "d", "days"),
    ("PT36H", 36, "h", "hours"),
    ("P1Y", 1, "a", "years"),
    ("P18M", 18, "mo", "months"),
    ("P2W", 2, "wk", "weeks"),
    ("PT90M", 90, "min", "minutes"),
    ("PT45S", 45, "s", "seconds"),
]


@pytest.mark.parametrize(("iso", "value", "code", "unit"), DURATIONS)
def test_duration_iso_to_ucum_and_back(iso: str, value: int, code: str, unit: str) -> None:
    fhir = iso_to_fhir_duration(iso)
    assert fhir == {"value": value, "unit": unit, "system": UCUM, "code": code}
    assert fhir_duration_to_iso(fhir) == iso


@pytest.mark.parametrize(("iso", "normal"), [("P14D", "P2W"), ("PT24H", "P1D"), ("P12M", "P1Y"),
                                             ("PT120M", "PT2H"), ("PT3600S", "PT1H"), ("P24M", "P2Y")])
def test_duration_is_written_in_the_largest_whole_unit(iso: str, normal: str) -> None:
    assert fhir_duration_to_iso(iso_to_fhir_duration(iso)) == normal


@pytest.mark.parametrize("bad", ["P2X", "2D", "P1Y2D", "", "P1D2"])
def test_bad_iso_duration_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"ISO 8601|mixing"):
        iso_to_fhir_duration(bad)


def test_fractional_seconds_are_refused() -> None:
    with pytest.raises(ValueError, match="whole number of seconds"):
        iso_to_fhir_duration("PT0.5S")


@pytest.mark.parametrize("bad", [{"value": 2, "code": "fortnight"}, {"value": -1, "code": "d"}, {"code": "d"},
                                 {"value": "2", "code": "d"}])
def test_bad_fhir_duration_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="non-negative value and a UCUM code"):
        fhir_duration_to_iso(bad)


def test_durations_round_trip_through_a_journey() -> None:
    """Every duration slot of the YAML form (wait, after, await timeout, reentry, every) keeps its ISO text."""
    isos = [d[0] for d in DURATIONS]
    steps: list[dict[str, Any]] = [{"id": "send", "message": "note", "next": "seen", "after": isos[0]},
                                   {"id": "seen", "await": {"event": "read", "step": "send", "timeout": isos[1]},
                                    "on-event": "w0", "on-timeout": "w0"}]
    steps += [{"id": f"w{i}", "wait": iso, **({"next": f"w{i + 1}"} if i + 1 < len(isos) else {})}
              for i, iso in enumerate(isos)]
    doc = {"journey": "durations", "trigger": {"every": isos[4], "search": "Goal?lifecycle-status=active"},
           "reentry": {"after": isos[3]}, "templates": {"note": {"kind": "message", "medium": "sms",
                                                                 "payload": "'x'"}},
           "steps": steps}
    plan, templates = compile_journey(copy.deepcopy(doc))
    waits = [a["timingDuration"] for a in plan["action"] if "timingDuration" in a]
    assert [w["code"] for w in waits] == [d[2] for d in DURATIONS]
    back = decompile(plan, templates)
    assert [s["wait"] for s in back["steps"][2:]] == isos
    assert back["steps"][0]["after"] == isos[0]
    assert back["steps"][1]["await"]["timeout"] == isos[1]
    assert back["trigger"]["every"] == isos[4]
    assert back["reentry"] == {"after": isos[3]}
    assert compile_journey(back) == (plan, templates)


# --- known decompile gaps ----------------------------------------------------------------------------

def test_branch_label_starting_with_when_survives_decompile() -> None:
    doc = yaml.safe_load("""
journey: labels
trigger: {topic: encounter-discharged}
steps:
  - id: route
    branch:
      - {label: when-high, when: "%current.status = 'finished'", goto: done}
      - {else: done}
  - {id: done, end: true}
""")
    plan, templates = compile_journey(doc)
    assert compile_journey(decompile(plan, templates)) == (plan, templates)


def test_branch_labels_survive_decompile() -> None:
    plan, templates = load(DATA / "valid" / "every-kind.yaml")
    route = decompile(plan, templates)["steps"][0]
    assert route["branch"][0]["label"] == "has-conditions"
    assert "label" not in route["branch"][1]  # the positional default is not written out
    assert route["on-error"] == "finish"


# --- trigger interactions ----------------------------------------------------------------------------

TRIGGER_ON = """
journey: on-create
trigger: {type: Appointment, %s: [create]}
steps:
  - {id: done, end: true}
"""


def test_quoted_on_key_selects_the_interaction() -> None:
    plan, _ = compile_journey(yaml.safe_load(TRIGGER_ON % '"on"'))
    assert plan["action"][0]["trigger"] == [{"type": "data-added", "data": [{"type": "Appointment"}]}]


def test_bare_on_key_as_documented_selects_the_interaction() -> None:
    plan, _ = compile_journey(yaml.safe_load(TRIGGER_ON % "on"))
    assert plan["action"][0]["trigger"] == [{"type": "data-added", "data": [{"type": "Appointment"}]}]
