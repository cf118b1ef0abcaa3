"""``definition.parse_journey``: every rule rejects with ``InvalidJourney`` naming where (the step) and why.

The cases are data: ``data/invalid/*.yaml`` are YAML-form journeys that compile but break a journey rule (each
``# expect: <where> | <why>`` line is one problem that must be reported); ``data/invalid-fhir/*.yaml`` edit the
compiled FHIR encoding of ``data/valid/minimal.yaml`` for the rules the YAML form cannot express;
``data/valid/*.yaml`` must be accepted (``cycle-*`` contain a cycle that passes a wait, an await or a delay).
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from fhir_outreach.errors import InvalidJourney
from fhir_outreach.journeys.catalog import topic_names
from fhir_outreach.journeys.compiler import compile_journey
from fhir_outreach.journeys.definition import Journey, parse_journey

DATA = Path(__file__).parent / "data"


def directives(path: Path) -> tuple[list[tuple[str, str]], str | None]:
    """The ``# expect: where | why`` lines and the ``# xfail: reason`` line of a case file."""
    expect: list[tuple[str, str]] = []
    xfail = None
    for line in path.read_text().splitlines():
        if line.startswith("# expect:"):
            where, _, why = line.removeprefix("# expect:").partition("|")
            expect.append((where.strip(), why.strip()))
        elif line.startswith("# xfail:"):
            xfail = line.removeprefix("# xfail:").strip()
    return expect, xfail


def cases(folder: str) -> list[Any]:
    out = []
    for path in sorted((DATA / folder).glob("*.yaml")):
        _, xfail = directives(path)
        marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
        out.append(pytest.param(path, id=path.stem, marks=marks))
    return out


def templates_map(templates: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{t['url']}|{t['version']}": t for t in templates} | {str(t["url"]): t for t in templates}


def parse(plan: dict[str, Any], templates: list[dict[str, Any]]) -> Journey:
    return parse_journey(plan, templates_map(templates), known_topics=topic_names())


def compiled(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return compile_journey(yaml.safe_load(path.read_text()))


def problems_of(plan: dict[str, Any], templates: list[dict[str, Any]]) -> list[tuple[str, str]]:
    with pytest.raises(InvalidJourney) as info:
        parse(plan, templates)
    return info.value.problems


def template_names(templates: list[dict[str, Any]], expect: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``{template:<key>}`` in an expected ``where`` → the compiled name of the template written as ``<key>``."""
    names = {str(t["url"]).rsplit("/", 1)[-1]: str(t["name"]) for t in templates}
    out = []
    for where, why in expect:
        for key, name in names.items():
            where = where.replace(f"{{template:{key}}}", name)
        out.append((where, why))
    return out


def assert_reported(problems: list[tuple[str, str]], expect: list[tuple[str, str]]) -> None:
    assert expect, "a case must name at least one expected problem"
    for where, why in expect:
        assert any(w == where and why in y for w, y in problems), \
            f"expected ({where!r}, …{why!r}…) among:\n" + "\n".join(f"  {w}: {y}" for w, y in problems)


# --- the YAML-form cases --------------------------------------------------------------------------------

@pytest.mark.parametrize("path", cases("invalid"))
def test_invalid_journey_is_rejected_naming_step_and_reason(path: Path) -> None:
    expect, _ = directives(path)
    plan, templates = compiled(path)  # the YAML shape is fine: the journey rules reject it
    assert_reported(problems_of(plan, templates), template_names(templates, expect))


def test_several_problems_are_all_reported_as_outcome_issues() -> None:
    path = DATA / "invalid" / "many-problems.yaml"
    expect, _ = directives(path)
    plan, templates = compiled(path)
    with pytest.raises(InvalidJourney) as info:
        parse(plan, templates)
    exc = info.value
    assert len(expect) == 5
    assert_reported(exc.problems, expect)
    outcome = exc.to_outcome()
    assert exc.status == 422
    issues = outcome["issue"]
    assert len(issues) == len(exc.problems)
    # the first issue carries the label and the first problem; every issue names where it is
    assert issues[0]["diagnostics"].startswith("PlanDefinition http://fhir-outreach.org/journeys/many-problems is "
                                               f"invalid: {exc.problems[0][0]}: {exc.problems[0][1]}")
    assert [i["expression"] for i in issues] == [[w] for w, _ in exc.problems]
    assert {i["diagnostics"] for i in issues[1:]} == {f"{w}: {y}" for w, y in exc.problems[1:]}


@pytest.mark.parametrize("name", [
    "fhirpath-template.yaml",
    "fhirpath-template-used-twice.yaml",
])
def test_each_problem_is_reported_once(name: str) -> None:
    plan, templates = compiled(DATA / "invalid" / name)
    counts = Counter(problems_of(plan, templates))
    assert [p for p, n in counts.items() if n > 1] == []


def test_unknown_topic_is_only_checked_against_known_topics() -> None:
    plan, templates = compiled(DATA / "invalid" / "unknown-topic.yaml")
    j = parse_journey(plan, templates_map(templates))  # no topic list given: the store-less reader accepts it
    assert j.triggers[0].topic == "encounter-teleported"
    with pytest.raises(InvalidJourney):
        parse(plan, templates)


# --- the FHIR-encoding cases ----------------------------------------------------------------------------

def _key(node: Any, segment: str) -> Any:
    if segment.startswith("step:"):
        sid = segment.removeprefix("step:")
        return next(i for i, a in enumerate(node) if a.get("id") == sid)
    return int(segment) if isinstance(node, list) else segment


def apply_edit(doc: dict[str, Any], edit: dict[str, Any]) -> None:
    segments = str(edit["path"]).split(".")
    if segments[0].startswith("step:"):
        segments = ["action", *segments]
    node: Any = doc
    for segment in segments[:-1]:
        node = node[_key(node, segment)]
    last = _key(node, segments[-1])
    if "set" in edit:
        node[last] = copy.deepcopy(edit["set"])
    elif edit.get("delete"):
        assert (last in node) if isinstance(node, dict) else last < len(node), f"nothing at {edit['path']}"
        del node[last]
    elif "append" in edit:
        node[last].append(copy.deepcopy(edit["append"]))
    else:
        raise AssertionError(f"edit {edit!r} has no set, delete or append")


@pytest.mark.parametrize("path", cases("invalid-fhir"))
def test_invalid_fhir_encoding_is_rejected_naming_step_and_reason(path: Path) -> None:
    case = yaml.safe_load(path.read_text())
    plan, templates = compiled(DATA / "valid" / case["base"])
    parse(plan, templates)  # the base is valid: the edits alone break it
    for edit in case["edits"]:
        apply_edit(plan, edit)
    assert_reported(problems_of(plan, templates), [(str(w), str(y)) for w, y in case["expect"]])


# --- accepted -------------------------------------------------------------------------------------------

def _has_cycle(j: Journey) -> bool:
    edges = {s.id: s.targets() for s in j.steps.values()}
    state: dict[str, int] = {}

    def visit(node: str) -> bool:
        state[node] = 1
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1 or (nxt not in state and visit(nxt)):
                return True
        state[node] = 2
        return False

    return any(visit(n) for n in list(edges) if n not in state)


@pytest.mark.parametrize("path", cases("valid"))
def test_valid_journey_is_accepted(path: Path) -> None:
    plan, templates = compiled(path)
    j = parse(plan, templates)
    assert j.url == str(plan["url"]) and j.version == str(plan["version"])
    assert j.first == plan["action"][1]["id"]
    assert set(j.steps) == {a["id"] for a in plan["action"][1:]}
    if path.stem.startswith("cycle-"):
        assert _has_cycle(j), f"{path.name} is meant to contain a cycle"


@pytest.mark.parametrize(("name", "step", "kind"), [
    ("cycle-through-wait.yaml", "pause", "wait"),
    ("cycle-through-await.yaml", "answered", "await"),
])
def test_the_wait_is_what_makes_the_cycle_legal(name: str, step: str, kind: str) -> None:
    """Turning the wait/await of a legal cycle into an instant step makes the same graph illegal."""
    plan, templates = compiled(DATA / "valid" / name)
    action = next(a for a in plan["action"] if a.get("id") == step)
    assert action["code"][0]["coding"][0]["code"] == kind
    action["code"][0]["coding"][0]["code"] = "branch"
    action.pop("timingDuration", None)
    action.pop("extension", None)
    action["action"] = [arm for arm in action.get("action") or [] if arm.get("relatedAction")] or [
        {"id": f"{step}-else", "relatedAction": action.pop("relatedAction")}]
    problems = problems_of(plan, templates)
    assert any("cycle without a wait" in why for _, why in problems), problems


def test_the_delay_is_what_makes_the_cycle_legal() -> None:
    plan, templates = compiled(DATA / "valid" / "cycle-delayed-edge.yaml")
    send = next(a for a in plan["action"] if a.get("id") == "send")
    assert send["relatedAction"][0].pop("offsetDuration") == {
        "value": 36, "unit": "hours", "system": "http://unitsofmeasure.org", "code": "h"}
    problems = problems_of(plan, templates)
    assert ("step send", "cycle without a wait: send -> retry -> send") in problems, problems
