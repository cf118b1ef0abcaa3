"""Journey rules on the HTTP API, both stores: a PlanDefinition with the OutreachJourney profile (or an
OutreachMessage/OutreachTask ActivityDefinition) that breaks a rule is refused with 422 and an
OperationOutcome naming each step and reason, and nothing is stored; ``/admin/journeys`` loads YAML, checks
with ``?validate=true``, refuses changed content under an existing url|version and exports what it stored."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # type: ignore[import-untyped]

from fhir_outreach.journeys.compiler import compile_journey
from fhir_outreach.journeys.files import from_resources

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "profiles" / "journeys" / "patient-discharge.yaml"
DATA = Path(__file__).parent / "data"
FHIR = {"Content-Type": "application/fhir+json"}
YAML = {"Content-Type": "application/yaml"}
SAMPLE_URL = "http://fhir-outreach.org/journeys/patient-discharge"


def compiled(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return compile_journey(yaml.safe_load(path.read_text()))


def expected(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("# expect:"):
            where, _, why = line.removeprefix("# expect:").partition("|")
            out.append((where.strip(), why.strip()))
    return out


async def stored(c: httpx.AsyncClient) -> dict[str, list[str]]:
    """Every version ever written of the definition types: a refused write leaves this unchanged."""
    out = {}
    for rtype in ("PlanDefinition", "ActivityDefinition"):
        r = await c.get(f"/fhir/{rtype}/_history", params={"_count": "1000"})
        assert r.status_code == 200, r.text
        out[rtype] = [e["fullUrl"] + "|" + e["response"]["etag"] for e in r.json().get("entry") or []]
    return out


def outcome_422(r: httpx.Response, code: str = "invariant") -> list[dict[str, Any]]:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert body["issue"][0]["code"] == code, body
    assert all(i["severity"] == "error" for i in body["issue"])
    return list(body["issue"])


def assert_issues_name(issues: list[dict[str, Any]], problems: list[tuple[str, str]]) -> None:
    for where, why in problems:
        assert any(i.get("expression") == [where] and f"{where}: " in i["diagnostics"] and why in i["diagnostics"]
                   for i in issues), f"no issue for ({where!r}, {why!r}) in {issues}"


# --- the FHIR API ------------------------------------------------------------------------------------

async def test_invalid_journey_create_is_refused_naming_each_step(client: httpx.AsyncClient) -> None:
    path = DATA / "invalid" / "many-problems.yaml"
    plan, templates = compiled(path)
    for tpl in templates:  # the templates are fine: only the journey is refused
        assert (await c_post(client, tpl)).status_code == 201
    before = await stored(client)
    r = await client.post("/fhir/PlanDefinition", json=plan, headers=FHIR)
    issues = outcome_422(r)
    assert issues[0]["diagnostics"].startswith(f"PlanDefinition {plan['url']} is invalid: ")
    assert_issues_name(issues, expected(path))
    assert await stored(client) == before


async def test_invalid_journey_update_is_refused(client: httpx.AsyncClient) -> None:
    path = DATA / "invalid" / "cycle-without-wait.yaml"
    plan, templates = compiled(path)
    for tpl in templates:
        assert (await c_post(client, tpl)).status_code == 201
    before = await stored(client)
    r = await client.put(f"/fhir/PlanDefinition/{plan['id']}", json=plan, headers=FHIR)
    assert_issues_name(outcome_422(r), expected(path))
    assert await stored(client) == before


async def test_a_plandefinition_without_the_profile_is_not_a_journey(client: httpx.AsyncClient) -> None:
    plan, _ = compiled(DATA / "invalid" / "cycle-without-wait.yaml")
    plan.pop("meta")
    r = await client.post("/fhir/PlanDefinition", json=plan, headers=FHIR)
    assert r.status_code == 201, r.text


async def test_invalid_template_is_refused(client: httpx.AsyncClient) -> None:
    _, templates = compiled(DATA / "invalid" / "template-unknown-path.yaml")
    before = await stored(client)
    issues = outcome_422(await c_post(client, templates[0]))
    name = templates[0]["name"]
    assert_issues_name(issues, [(f"template {name} dynamicValue colour", "unknown path")])
    bad = copy.deepcopy(templates[0])
    bad["dynamicValue"] = [{"path": "payload", "expression": {"language": "text/fhirpath", "expression": "'Hi"}}]
    assert_issues_name(outcome_422(await c_post(client, bad)), [(f"template {name} dynamicValue payload",
                                                                 "syntax error")])
    assert await stored(client) == before


async def c_post(c: httpx.AsyncClient, resource: dict[str, Any]) -> httpx.Response:
    return await c.post(f"/fhir/{resource['resourceType']}", json=resource, headers=FHIR)


async def test_valid_journey_needs_its_templates_first(client: httpx.AsyncClient) -> None:
    plan, templates = compiled(SAMPLE)
    before = await stored(client)
    issues = outcome_422(await c_post(client, plan))
    steps = [a["id"] for a in plan["action"] if a.get("definitionCanonical")]
    assert_issues_name(issues, [(f"step {s}", "not found (load its ActivityDefinition first") for s in steps])
    assert await stored(client) == before

    for tpl in templates:
        r = await c_post(client, tpl)
        assert r.status_code == 201, r.text
    r = await c_post(client, plan)
    assert r.status_code == 201, r.text
    got = await client.get("/fhir/PlanDefinition", params={"url": plan["url"], "version": plan["version"]})
    [entry] = got.json()["entry"]
    assert entry["resource"]["action"] == plan["action"]


async def test_same_canonical_with_other_content_is_a_business_rule(client: httpx.AsyncClient) -> None:
    plan, templates = compiled(SAMPLE)
    for tpl in templates:
        assert (await c_post(client, tpl)).status_code == 201
    assert (await c_post(client, plan)).status_code == 201
    before = await stored(client)
    changed = {**copy.deepcopy(plan), "title": "Another title"}
    changed.pop("id")
    issues = outcome_422(await c_post(client, changed), code="business-rule")
    assert f"PlanDefinition {SAMPLE_URL}|1.0.0 already exists" in issues[0]["diagnostics"]
    assert await stored(client) == before


# --- /admin/journeys ---------------------------------------------------------------------------------

async def test_admin_loads_yaml(client: httpx.AsyncClient) -> None:
    r = await client.post("/admin/journeys", content=SAMPLE.read_text(), headers=YAML)
    assert r.status_code == 201, r.text
    body = r.json()
    plan, templates = compiled(SAMPLE)
    assert body["journey"] == f"{SAMPLE_URL}|1.0.0"
    assert sorted(body["written"]) == sorted([f"ActivityDefinition/{t['id']} created" for t in templates]
                                             + [f"PlanDefinition/{plan['id']} created"])
    got = await client.get(f"/fhir/PlanDefinition/{plan['id']}")
    assert got.status_code == 200 and got.json()["action"] == plan["action"]


async def test_admin_validate_only_checks(client: httpx.AsyncClient) -> None:
    before = await stored(client)
    r = await client.post("/admin/journeys", content=SAMPLE.read_text(), headers=YAML, params={"validate": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["valid"], body["journey"], body["steps"]) == (
        True, f"{SAMPLE_URL}|1.0.0", len(yaml.safe_load(SAMPLE.read_text())["steps"]))
    path = DATA / "invalid" / "many-problems.yaml"
    r = await client.post("/admin/journeys", content=path.read_text(), headers=YAML, params={"validate": "true"})
    assert_issues_name(outcome_422(r), expected(path))
    assert await stored(client) == before


async def test_admin_refuses_an_invalid_journey_without_storing_anything(client: httpx.AsyncClient) -> None:
    before = await stored(client)
    path = DATA / "invalid" / "template-wrong-kind.yaml"
    r = await client.post("/admin/journeys", content=path.read_text(), headers=YAML)
    assert_issues_name(outcome_422(r), expected(path))
    path = DATA / "shape" / "boolean-arm-label.yaml"
    r = await client.post("/admin/journeys", content=path.read_text(), headers=YAML)
    assert_issues_name(outcome_422(r), expected(path))
    assert await stored(client) == before  # the templates of the refused journey were not written either


async def test_admin_refuses_a_bad_duration_with_422(client: httpx.AsyncClient) -> None:
    r = await client.post("/admin/journeys", content=(DATA / "shape" / "bad-duration-wait.yaml").read_text(),
                          headers=YAML)
    assert r.status_code == 422, r.text


async def test_admin_refuses_changed_content_under_the_same_version(client: httpx.AsyncClient) -> None:
    text = SAMPLE.read_text()
    assert (await client.post("/admin/journeys", content=text, headers=YAML)).status_code == 201
    before = await stored(client)
    again = await client.post("/admin/journeys", content=text, headers=YAML)
    assert again.status_code == 201 and all(w.endswith(" unchanged") for w in again.json()["written"])
    changed = text.replace("title: Patient discharge\n", "title: Patient discharge (edited)\n", 1)
    assert changed != text
    issues = outcome_422(await client.post("/admin/journeys", content=changed, headers=YAML), code="business-rule")
    assert issues[0]["diagnostics"].startswith(f"PlanDefinition {SAMPLE_URL}|1.0.0 already exists with other content")
    assert await stored(client) == before
    template_changed = text.replace("Reply YES or NO.", "Reply Y or N.", 1)
    assert template_changed != text
    issues = outcome_422(await client.post("/admin/journeys", content=template_changed, headers=YAML),
                         code="business-rule")
    assert issues[0]["diagnostics"].startswith(
        "ActivityDefinition http://fhir-outreach.org/templates/discharge-sms|1.0.0 already exists with other content")
    assert await stored(client) == before


@pytest.mark.parametrize("fmt", ["yaml", "json"])
async def test_admin_export_round_trips(client: httpx.AsyncClient, fmt: str) -> None:
    assert (await client.post("/admin/journeys", content=SAMPLE.read_text(), headers=YAML)).status_code == 201
    r = await client.get("/admin/journeys/patient-discharge/export", params={"format": fmt})
    assert r.status_code == 200, r.text
    plan, templates = compiled(SAMPLE)
    if fmt == "yaml":
        assert r.headers["content-type"].startswith("application/yaml")
        plan2, templates2 = compile_journey(yaml.safe_load(r.text))
    else:
        assert r.headers["content-type"].startswith("application/fhir+json")
        plan2, templates2 = from_resources(r.json())
    assert plan2 == plan
    assert {t["url"]: t for t in templates2} == {t["url"]: t for t in templates}
    missing = await client.get("/admin/journeys/no-such-journey/export")
    assert missing.status_code == 404
