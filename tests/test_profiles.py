"""The conformance resources in ``profiles/`` match ``docs/journeys.md`` and each other.

Every JSON file parses as its resource type with the R4B models (our R4 model); its name, id and canonical
URL agree; every URL the spec names and every canonical a file refers to has a file here; the extensions
have the context, value type and cardinality the spec gives them; the code lists are the spec's; and the
FHIRPath invariants hold on a conforming example and fail on examples broken in one way each.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhir_outreach.fhir.fhirpath import compile_expression

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "profiles"
DOC = (ROOT / "docs" / "journeys.md").read_text()
README = (PROFILES / "README.md").read_text()
FILES = sorted(PROFILES.glob("*.json"))
BASE = "http://fhir-outreach.org/"
SD = BASE + "StructureDefinition/"
STEP = BASE + "CodeSystem/journey-step"
ARM = BASE + "CodeSystem/journey-arm"
DISCLAIMER = "Not a medical device"
OUR_CANONICAL = re.compile(r"http://fhir-outreach\.org/(StructureDefinition|CodeSystem|ValueSet)/([A-Za-z0-9][A-Za-z0-9-]*)")

# The extensions of docs/journeys.md: context, value type (None: complex) and sub-extensions
# (name -> type, min, max) for the complex ones.
EXTENSIONS: dict[str, tuple[str, str | None, dict[str, tuple[str, int, str]]]] = {
    "journey-reentry": ("PlanDefinition", None, {"policy": ("code", 1, "1"), "interval": ("Duration", 0, "1")}),
    "journey-binding": ("PlanDefinition", "Expression", {}),
    "journey-exit": ("PlanDefinition", "Expression", {}),
    "journey-goal-criteria": ("PlanDefinition.goal", "Expression", {}),
    "trigger-search": ("PlanDefinition.action.trigger", "string", {}),
    "wait-until": ("PlanDefinition.action", "Expression", {}),
    "wait-for": ("PlanDefinition.action", None, {"event": ("code", 1, "1"), "step": ("string", 0, "1"),
                                                  "criteria": ("Expression", 0, "1"), "timeout": ("Duration", 1, "1")}),
    "update-target": ("PlanDefinition.action", "Expression", {}),
    "contact-preference": ("Patient", "code", {}),
    "engagement": ("Communication", "code", {}),
    "message-action": ("Communication", "string", {}),
    "message-text": ("ActivityDefinition", None, {"language": ("code", 1, "1"), "text": ("string", 1, "1")}),
}


@cache
def load(name: str) -> dict[str, Any]:
    return json.loads((PROFILES / name).read_text())


def by_url(url: str) -> dict[str, Any]:
    kind, rest = url.removeprefix(BASE).split("/", 1)
    return load(f"{kind}-{rest.split('|')[0]}.json")


def structure_definitions() -> list[dict[str, Any]]:
    return [load(f.name) for f in FILES if f.name.startswith("StructureDefinition-")]


def element(sd: dict[str, Any], element_id: str) -> dict[str, Any]:
    return next(e for e in sd["differential"]["element"] if e["id"] == element_id)


def value_set_codes(url: str) -> set[str]:
    codes: set[str] = set()
    for include in by_url(url)["compose"]["include"]:
        concepts = include.get("concept") or by_url(include["system"])["concept"]
        codes |= {c["code"] for c in concepts}
    return codes


def doc_codes(anchor: str) -> set[str]:
    """The `a` \\| `b` \\| `c` list that follows ``anchor`` in docs/journeys.md."""
    start = DOC.index(anchor) + len(anchor)
    found = re.compile(r"`[\w-]+`(?:\s*\\\|\s*`[\w-]+`)+").search(DOC, start)
    assert found, f"no code list after {anchor!r} in docs/journeys.md"
    return set(re.findall(r"`([\w-]+)`", found.group(0)))


def doc_bullet_names(prefix: str) -> set[str]:
    """The backticked names of a '- prefix:' bullet, ignoring what is in parentheses."""
    found = re.search(rf"^- {prefix}:(.*?)(?=^- |^\n|^#)", DOC, re.M | re.S)
    assert found, f"no '- {prefix}:' bullet in docs/journeys.md"
    return set(re.findall(r"`([\w.%|-]+)`", re.sub(r"\([^)]*\)", "", found.group(1))))


# --- every file parses, and is named after what it is -------------------------------------------------

def test_there_are_profiles() -> None:
    kinds = {f.name.split("-", 1)[0] for f in FILES}
    assert {"StructureDefinition", "CodeSystem", "ValueSet"} <= kinds


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_parses_and_validates_as_its_resource_type(path: Path) -> None:
    data = json.loads(path.read_text())
    kind, stem = path.stem.split("-", 1)
    assert data["resourceType"] == kind
    get_fhir_model_class(kind).model_validate(data)  # raises on anything R4(B) does not allow
    assert data["id"] == stem
    assert data["url"] == f"{BASE}{kind}/{stem}"
    assert data["url"].endswith("/" + stem)
    assert re.fullmatch(r"[A-Z][A-Za-z0-9_]{0,254}", data["name"]), "name should be computer-friendly"
    assert data["status"] in ("draft", "active")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_file_is_in_the_readme_table(path: Path) -> None:
    assert f"| `{path.name}` |" in README


def test_disclaimer_on_every_structure_definition_and_the_readme() -> None:
    for sd in structure_definitions():
        assert DISCLAIMER in sd["purpose"], sd["url"]
    journey = load("StructureDefinition-OutreachJourney.json")
    assert DISCLAIMER in journey["description"]
    assert DISCLAIMER in README
    for word in ("SNOMED CT", "LOINC", "licence"):
        assert word in README


# --- the spec's URLs and the files' references resolve ------------------------------------------------

def test_every_url_in_the_spec_has_a_file() -> None:
    named = {(kind, name) for kind, name in OUR_CANONICAL.findall(DOC)}
    named |= {("StructureDefinition", n) for n in re.findall(r"extension `([a-z][a-z0-9-]*)`", DOC)}
    named |= {("StructureDefinition", n) for n in re.findall(r"\*\*(Outreach[A-Za-z]+)\*\*", DOC)}
    assert len(named) >= 10  # the patterns above still find the spec's names
    missing = sorted(f"{kind}-{name}.json" for kind, name in named if not (PROFILES / f"{kind}-{name}.json").exists())
    assert not missing, f"named in docs/journeys.md but not in profiles/: {missing}"


def test_every_canonical_a_file_mentions_has_a_file() -> None:
    for path in FILES:
        for kind, name in OUR_CANONICAL.findall(path.read_text()):
            assert (PROFILES / f"{kind}-{name}.json").exists(), f"{path.name} refers to {kind}/{name}"


def test_code_systems_and_value_sets_point_at_each_other() -> None:
    for path in FILES:
        data = load(path.name)
        if data["resourceType"] == "CodeSystem":
            assert data["count"] == len(data["concept"])
            assert value_set_codes(data["valueSet"]) == {c["code"] for c in data["concept"]}
        if data["resourceType"] == "ValueSet":
            for include in data["compose"]["include"]:
                defined = {c["code"] for c in by_url(include["system"])["concept"]}
                assert {c["code"] for c in include.get("concept", [])} <= defined, path.name


# --- the extensions -----------------------------------------------------------------------------------

def test_the_extension_files_are_the_specs_extensions() -> None:
    found = {sd["id"] for sd in structure_definitions() if sd["type"] == "Extension"}
    assert found == set(EXTENSIONS)


@pytest.mark.parametrize("name", sorted(EXTENSIONS))
def test_extension_context_value_and_cardinality(name: str) -> None:
    sd = load(f"StructureDefinition-{name}.json")
    context, value_type, parts = EXTENSIONS[name]
    assert (sd["kind"], sd["derivation"], sd["abstract"]) == ("complex-type", "constraint", False)
    assert sd["baseDefinition"] == "http://hl7.org/fhir/StructureDefinition/Extension"
    assert sd["fhirVersion"] == "4.0.1"
    assert sd["context"] == [{"type": "element", "expression": context}]
    assert element(sd, "Extension.url")["fixedUri"] == sd["url"]
    assert element(sd, "Extension")["max"] == ("*" if name in ("engagement", "message-action", "message-text")
                                                else "1")
    value = element(sd, "Extension.value[x]")
    if value_type:
        assert element(sd, "Extension.extension")["max"] == "0"
        assert value["min"] == 1
        assert [t["code"] for t in value["type"]] == [value_type]
        return
    assert value["max"] == "0"
    slicing = element(sd, "Extension.extension")["slicing"]
    assert slicing["discriminator"] == [{"type": "value", "path": "url"}]
    slices = {e["sliceName"]: e for e in sd["differential"]["element"] if e.get("sliceName")}
    assert set(slices) == set(parts)
    for part, (part_type, low, high) in parts.items():
        assert (slices[part]["min"], slices[part]["max"]) == (low, high), part
        assert element(sd, f"Extension.extension:{part}.url")["fixedUri"] == part
        assert element(sd, f"Extension.extension:{part}.extension")["max"] == "0"
        part_value = element(sd, f"Extension.extension:{part}.value[x]")
        assert part_value["min"] == 1
        assert [t["code"] for t in part_value["type"]] == [part_type], part


def test_profile_slices_use_extensions_where_their_context_allows() -> None:
    used = set()
    for sd in structure_definitions():
        for el in sd["differential"]["element"]:
            for profile in (p for t in el.get("type", []) if t["code"] == "Extension" for p in t.get("profile", [])):
                ext = by_url(profile)
                host = el["path"].removesuffix(".extension")
                assert [c["expression"] for c in ext["context"]] == [host], f"{el['id']} uses {profile}"
                used.add(ext["id"])
    on_journeys = {n for n, (ctx, _, _) in EXTENSIONS.items() if ctx.startswith("PlanDefinition")}
    assert used == on_journeys  # the journey profile declares each of its extensions


# --- the profiles' fixed values and code lists are the spec's -------------------------------------------

def test_journey_profile_requirements() -> None:
    sd = load("StructureDefinition-OutreachJourney.json")
    assert (sd["type"], sd["kind"], sd["derivation"]) == ("PlanDefinition", "resource", "constraint")
    assert sd["baseDefinition"] == "http://hl7.org/fhir/StructureDefinition/PlanDefinition"
    for path in ("url", "version", "name", "usage", "action", "meta.profile", "type"):
        assert element(sd, f"PlanDefinition.{path}")["min"] == 1, path
    assert element(sd, "PlanDefinition.type")["patternCodeableConcept"]["coding"] == [
        {"system": "http://terminology.hl7.org/CodeSystem/plan-definition-type", "code": "workflow-definition"}]
    binding = element(sd, "PlanDefinition.action.code")["binding"]
    assert binding["strength"] == "required"
    assert value_set_codes(binding["valueSet"]) == {c["code"] for c in load("CodeSystem-journey-step.json")["concept"]}
    targets = element(sd, "PlanDefinition.action.definition[x]")["type"][0]["targetProfile"]
    assert sorted(targets) == [SD + "OutreachMessage", SD + "OutreachTask"]


def test_step_kinds_are_the_specs() -> None:
    steps = DOC[DOC.index("### Steps"):DOC.index("### Templates")]
    kinds = set(re.findall(r"^\| `(\w+)` \|", steps, re.M))
    assert {c["code"] for c in load("CodeSystem-journey-step.json")["concept"]} == kinds | {"start"}


def test_arm_labels() -> None:
    labels = {c["code"] for c in load("CodeSystem-journey-arm.json")["concept"]}
    assert labels == {"event", "timeout", "error", "sms", "email", "portal", "none", "else"}


@pytest.mark.parametrize(("anchor", "codes"), [
    ("channel code:", lambda: {c["code"] for c in load("CodeSystem-channel.json")["concept"]}),
    ("`event` valueCode", lambda: value_set_codes(BASE + "ValueSet/engagement")),
    ("`policy` (valueCode", lambda: value_set_codes(BASE + "ValueSet/reentry-policy")),
    ("StructureDefinition/contact-preference`", lambda: value_set_codes(BASE + "ValueSet/contact-preference")),
])
def test_code_lists_are_the_specs(anchor: str, codes: Callable[[], set[str]]) -> None:
    assert codes() == doc_codes(anchor)


@pytest.mark.parametrize(("name", "kind", "bullet"), [
    ("OutreachMessage", "CommunicationRequest", "message"),
    ("OutreachTask", "Task", "task"),
])
def test_template_profiles(name: str, kind: str, bullet: str) -> None:
    sd = load(f"StructureDefinition-{name}.json")
    assert (sd["type"], sd["derivation"]) == ("ActivityDefinition", "constraint")
    assert element(sd, "ActivityDefinition.kind")["fixedCode"] == kind
    for path in ("url", "version", "name", "kind"):
        assert element(sd, f"ActivityDefinition.{path}")["min"] == 1, path
    (rule,) = element(sd, "ActivityDefinition.dynamicValue")["constraint"]
    assert set(re.findall(r"'(\w+)'", rule["expression"])) == doc_bullet_names(bullet)


# --- the invariants hold on a conforming example and catch broken ones ----------------------------------

def fp(text: str) -> dict[str, str]:
    return {"language": "text/fhirpath", "expression": text}


def coded(system: str, code: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": system, "code": code}]}]


def nxt(target: str) -> list[dict[str, str]]:
    return [{"actionId": target, "relationship": "before-start"}]


def arm(step: str, label: str, target: str, when: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": f"{step}-{label}", "code": coded(ARM, label), "relatedAction": nxt(target)}
    if when:
        out["condition"] = [{"kind": "applicability", "expression": fp(when)}]
    return out


def days(n: int) -> dict[str, Any]:
    return {"value": n, "unit": "days", "system": "http://unitsofmeasure.org", "code": "d"}


JOURNEY: dict[str, Any] = {
    "resourceType": "PlanDefinition",
    "meta": {"profile": [SD + "OutreachJourney"]},
    "extension": [
        {"url": SD + "journey-reentry", "extension": [{"url": "policy", "valueCode": "after"},
                                                      {"url": "interval", "valueDuration": days(30)}]},
        {"url": SD + "journey-binding", "valueExpression": fp("%current.id")},
        {"url": SD + "journey-exit", "valueExpression": fp("%current.status = 'cancelled'")},
    ],
    "url": BASE + "journeys/example", "version": "1.0.0", "name": "Example", "status": "active",
    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/plan-definition-type",
                         "code": "workflow-definition"}]},
    "usage": "Template for illustration only. Not a medical device and not clinical decision support.",
    "goal": [{"extension": [{"url": SD + "journey-goal-criteria", "valueExpression": fp("%run.outputs.exists()")}],
              "description": {"text": "The patient reads the message"}}],
    "action": [
        {"id": "start", "code": coded(STEP, "start"), "relatedAction": nxt("risk"),
         "trigger": [{"type": "named-event", "name": "encounter-discharged", "condition": fp("%current.id.exists()")},
                     {"type": "periodic", "extension": [{"url": SD + "trigger-search",
                                                         "valueString": "Goal?lifecycle-status=active"}],
                      "timingTiming": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}}],
         "input": [{"id": "conditions", "type": "Condition"}]},
        {"id": "risk", "code": coded(STEP, "branch"),
         "action": [arm("risk", "high-risk", "call", "%conditions.exists()"), arm("risk", "else", "portal")]},
        {"id": "call", "code": coded(STEP, "task"), "definitionCanonical": BASE + "templates/call|1.0.0"},
        {"id": "portal", "code": coded(STEP, "message"), "definitionCanonical": BASE + "templates/portal|1.0.0",
         "relatedAction": nxt("read")},
        {"id": "read", "code": coded(STEP, "await"),
         "extension": [{"url": SD + "wait-for", "extension": [
             {"url": "event", "valueCode": "read"}, {"url": "step", "valueString": "portal"},
             {"url": "criteria", "valueExpression": fp("%event.status = 'completed'")},
             {"url": "timeout", "valueDuration": days(3)}]}],
         "action": [arm("read", "event", "end"), arm("read", "timeout", "prefs")]},
        {"id": "prefs", "code": coded(STEP, "preference"),
         "action": [arm("prefs", "sms", "pause"), arm("prefs", "email", "end"), arm("prefs", "portal", "end"),
                    arm("prefs", "none", "end"), arm("prefs", "error", "end")]},
        {"id": "pause", "code": coded(STEP, "wait"), "timingDuration": days(1), "relatedAction": nxt("later")},
        {"id": "later", "code": coded(STEP, "wait"), "relatedAction": nxt("bump"),
         "extension": [{"url": SD + "wait-until", "valueExpression": fp("%now + 1 day")}]},
        {"id": "bump", "code": coded(STEP, "update"), "relatedAction": nxt("end"),
         "extension": [{"url": SD + "update-target", "valueExpression": fp("%current")}],
         "dynamicValue": [{"path": "status", "expression": fp("'finished'")}]},
        {"id": "end", "code": coded(STEP, "end")},
    ],
}
MESSAGE: dict[str, Any] = {
    "resourceType": "ActivityDefinition", "meta": {"profile": [SD + "OutreachMessage"]},
    "url": BASE + "templates/portal", "version": "1.0.0", "name": "Portal", "status": "active",
    "kind": "CommunicationRequest",
    "dynamicValue": [{"path": "medium", "expression": fp("'portal'")}, {"path": "payload", "expression": fp("'Hi'")},
                     {"path": "recipient", "expression": fp("%patient")}]}
TASK: dict[str, Any] = {
    "resourceType": "ActivityDefinition", "meta": {"profile": [SD + "OutreachTask"]},
    "url": BASE + "templates/call", "version": "1.0.0", "name": "Call", "status": "active", "kind": "Task",
    "dynamicValue": [{"path": "description", "expression": fp("'Call the patient'")},
                     {"path": "due", "expression": fp("'P1D'")}]}
PATIENT: dict[str, Any] = {"resourceType": "Patient",
                           "extension": [{"url": SD + "contact-preference", "valueCode": "sms"}]}
COMMUNICATION: dict[str, Any] = {"resourceType": "Communication", "status": "completed",
                                 "extension": [{"url": SD + "engagement", "valueCode": "opened"},
                                               {"url": SD + "message-action", "valueString": "Add a task=TASK"}]}
EXAMPLES = {"OutreachJourney": JOURNEY, "OutreachMessage": MESSAGE, "OutreachTask": TASK,
            "Patient": PATIENT, "Communication": COMMUNICATION}


def _nav(element_id: str) -> str:
    """An element id below its root as a FHIRPath navigation: Extension.extension:step.value[x] -> extension('step').value."""
    steps = []
    for part in element_id.split(".")[1:]:
        name, _, slice_name = part.partition(":")
        name = name.removesuffix("[x]")
        steps.append(f"{name}('{slice_name}')" if slice_name else name)
    return ".".join(steps)


def rules(sd: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, navigation from the host resource, expression) for each invariant, incl. context invariants."""
    if sd["type"] == "Extension":
        context = sd["context"][0]["expression"]
        host = _nav(context)
        at = f"{host}.extension('{sd['url']}')" if host else f"extension('{sd['url']}')"
        out = [(f"{sd['id']}:context{i}", f"{host}.where(extension('{sd['url']}').exists())" if host
                else f"where(extension('{sd['url']}').exists())", inv)
               for i, inv in enumerate(sd.get("contextInvariant", []))]
    else:
        at, out = "", []
    for el in sd["differential"]["element"]:
        nav = ".".join(p for p in (at, _nav(el["id"])) if p)
        out += [(c["key"], nav, c["expression"]) for c in el.get("constraint", [])]
    return out


def host_of(sd: dict[str, Any]) -> dict[str, Any]:
    if sd["type"] != "Extension":
        return EXAMPLES[sd["id"]]
    context = sd["context"][0]["expression"].split(".")[0]
    return EXAMPLES["OutreachJourney" if context == "PlanDefinition" else context]


def holds(resource: dict[str, Any], nav: str, expression: str) -> bool:
    where = compile_expression(nav)(resource, None) if nav else [resource]
    assert where, f"the example has nothing at {nav!r} to check {expression!r} on"
    result = compile_expression(f"{nav}.all({expression})" if nav else expression)(resource, None)
    assert result in ([True], [False]), (expression, result)
    return result == [True]


def all_rules() -> list[tuple[dict[str, Any], str, str, str]]:
    return [(sd, key, nav, expr) for sd in structure_definitions() for key, nav, expr in rules(sd)]


@pytest.mark.parametrize("example", list(EXAMPLES.values()), ids=list(EXAMPLES))
def test_examples_are_valid_fhir(example: dict[str, Any]) -> None:
    get_fhir_model_class(example["resourceType"]).model_validate(example)


@pytest.mark.parametrize(("sd", "key", "nav", "expression"), all_rules(), ids=[r[1] for r in all_rules()])
def test_invariant_holds_on_the_conforming_example(sd: dict[str, Any], key: str, nav: str, expression: str) -> None:
    assert holds(host_of(sd), nav, expression), f"{key} fails on the conforming example"


def _step(plan: dict[str, Any], step_id: str) -> dict[str, Any]:
    return next(a for a in plan["action"] if a["id"] == step_id)


def _ext(element_: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in element_["extension"] if e["url"] == SD + name)


BROKEN: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("oj-1", lambda j: j["meta"].update(profile=["http://example.org/StructureDefinition/Other"])),
    ("oj-2", lambda j: j["action"][0].update(id="begin")),
    ("oj-3", lambda j: _step(j, "end").update(trigger=[{"type": "named-event", "name": "x"}])),
    ("oj-4", lambda j: _step(j, "later").update(id="pause")),
    ("oj-5", lambda j: _step(j, "end").pop("code")),
    ("oj-6", lambda j: _step(j, "portal").update(relatedAction=nxt("nowhere"))),
    ("oj-6", lambda j: _step(j, "risk")["action"][1].update(relatedAction=nxt("nowhere"))),
    ("oj-7", lambda j: _step(j, "portal")["relatedAction"].append(nxt("end")[0])),
    ("oj-8", lambda j: _step(j, "prefs")["action"][1].update(code=coded(ARM, "sms"))),
    ("oj-9", lambda j: _step(j, "call").pop("definitionCanonical")),
    ("oj-10", lambda j: _step(j, "later").update(timingDuration=days(1))),
    ("oj-10", lambda j: _step(j, "pause").pop("timingDuration")),
    ("oj-11", lambda j: _step(j, "read").pop("extension")),
    ("oj-12", lambda j: _step(j, "bump").pop("dynamicValue")),
    ("oj-13", lambda j: j.update(usage="Use with care.")),
    ("jr-1", lambda j: _ext(j, "journey-reentry")["extension"].pop()),
    ("jr-1", lambda j: _ext(j, "journey-reentry")["extension"][0].update(valueCode="always")),
    ("jb-1", lambda j: _ext(j, "journey-binding").update(valueExpression={"language": "text/cql", "expression": "x"})),
    ("je-1", lambda j: _ext(j, "journey-exit")["valueExpression"].pop("expression")),
    ("jg-1", lambda j: j["goal"][0]["extension"][0]["valueExpression"].update(language="text/cql")),
    ("wu-1", lambda j: _ext(_step(j, "later"), "wait-until")["valueExpression"].pop("expression")),
    ("ut-1", lambda j: _ext(_step(j, "bump"), "update-target")["valueExpression"].update(language="text/cql")),
    ("ts-1", lambda j: _ext(j["action"][0]["trigger"][1], "trigger-search").update(valueString="goal?status=x")),
    ("trigger-search:context0", lambda j: j["action"][0]["trigger"][1].update(type="data-added")),
    ("wait-until:context0", lambda j: _step(j, "later").update(code=coded(STEP, "task"))),
    ("wait-for:context0", lambda j: _step(j, "read").update(code=coded(STEP, "wait"))),
    ("update-target:context0", lambda j: _step(j, "bump").update(code=coded(STEP, "branch"))),
    ("wf-1", lambda j: _ext(_step(j, "read"), "wait-for")["extension"][2]["valueExpression"].update(language="text/cql")),
    ("om-1", lambda m: m["dynamicValue"].append({"path": "timing", "expression": fp("%patient")})),
    ("om-2", lambda m: m["dynamicValue"].append({"path": "payload", "expression": fp("'again'")})),
    ("ot-1", lambda t: t["dynamicValue"].append({"path": "timing", "expression": fp("%current")})),
    ("ot-2", lambda t: t["dynamicValue"].append({"path": "due", "expression": fp("'P2D'")})),
    ("ma-1", lambda c: c["extension"][1].update(valueString="no label")),
]


def test_every_invariant_has_a_broken_example() -> None:
    assert {key for _, key, _, _ in all_rules()} == {key for key, _ in BROKEN}


@pytest.mark.parametrize(("key", "breaks"), BROKEN, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BROKEN)])
def test_invariant_rejects_a_broken_example(key: str, breaks: Callable[[dict[str, Any]], Any]) -> None:
    sd, _, nav, expression = next(r for r in all_rules() if r[1] == key)
    example = copy.deepcopy(host_of(sd))
    breaks(example)
    assert not holds(example, nav, expression), f"{key} accepts an example broken for it"
