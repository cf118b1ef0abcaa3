"""Every error the FHIR API can answer: the HTTP status, an OperationOutcome with the right issue code and a
precise diagnostics/expression, and proof that the store did not change (its full history is compared)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import BASE, TOKEN, app_client, task

FHIR = {"Content-Type": "application/fhir+json"}
HISTORY_TYPES = ("Task", "PlanDefinition", "Patient")


# --- helpers ---------------------------------------------------------------------------------------

async def snapshot(c: httpx.AsyncClient) -> dict[str, list[tuple[str, str, str]]]:
    """Every version of every resource of the types the tests touch: any write shows up here."""
    out = {}
    for rtype in HISTORY_TYPES:
        resp = await c.get(f"{BASE}/{rtype}/_history", params={"_count": "1000"},
                           headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status_code == 200, resp.text
        out[rtype] = [(e["request"]["method"], e["fullUrl"], e["response"]["etag"])
                      for e in resp.json().get("entry", [])]
    return out


def outcome(resp: httpx.Response, status: int, code: str, diagnostics: str | None = None, *,
            expression: list[str] | None = None, startswith: str | None = None) -> dict[str, Any]:
    """Assert ``resp`` is ``status`` with an OperationOutcome whose first issue matches; return that issue."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/fhir+json"), resp.headers
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome", body
    issue = body["issue"][0]
    assert issue["severity"] == "error", issue
    assert issue["code"] == code, issue
    if diagnostics is not None:
        assert issue["diagnostics"] == diagnostics, issue
    if startswith is not None:
        assert issue["diagnostics"].startswith(startswith), issue
    if expression is not None:
        assert issue.get("expression") == expression, issue
    return issue


async def create(c: httpx.AsyncClient, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    resp = await c.post(f"{BASE}/{body['resourceType']}", json=body, headers={**FHIR, **headers})
    assert resp.status_code == 201, resp.text
    return resp.json()


def tx(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post_entry(resource: dict[str, Any], **request: str) -> dict[str, Any]:
    return {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"], **request}}


@pytest.fixture
async def c(sqlite_client: httpx.AsyncClient) -> httpx.AsyncClient:
    return sqlite_client


@pytest.fixture
async def seeded(c: httpx.AsyncClient) -> dict[str, Any]:
    """One existing Task (version 1), so that a stray update or delete would show in the snapshot."""
    return await create(c, task("seed"))


@pytest.fixture
async def small(make_settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(make_settings(max_body_bytes=2048)) as client:
        yield client


# --- 400: malformed JSON and invalid FHIR ----------------------------------------------------------

@pytest.mark.parametrize(("body", "diagnostics"), [
    (b'{"resourceType": "Task", ', "the request body is not valid JSON: "),
    (b"{bad", "the request body is not valid JSON: unexpected character"),
    (b"", "the request body is empty; a FHIR JSON resource is required"),
    (b"[1, 2]", "the body must be a JSON object (a FHIR resource)"),
])
async def test_400_malformed_json(c: httpx.AsyncClient, seeded: dict[str, Any], body: bytes,
                                  diagnostics: str) -> None:
    before = await snapshot(c)
    for resp in (await c.post(f"{BASE}/Task", content=body, headers=FHIR),
                 await c.put(f"{BASE}/Task/{seeded['id']}", content=body, headers=FHIR)):
        outcome(resp, 400, "invalid", startswith=diagnostics)
    assert await snapshot(c) == before


@pytest.mark.parametrize(("body", "expression", "diagnostics"), [
    pytest.param({**task(), "colour": "red"}, "Task.colour", "Task.colour: Extra inputs are not permitted",
                 id="unknown-element"),
    pytest.param({**task(), "for": {"reference": 42}}, "Task.for.reference",
                 "Task.for.reference: Input should be a valid string", id="wrong-datatype"),
    pytest.param({**task(), "input": [{"type": {"text": "x"}, "valueBoolean": "maybe"}]},
                 "Task.input[0].valueBoolean",
                 "Task.input[0].valueBoolean: Input should be a valid boolean, unable to interpret input",
                 id="wrong-datatype-in-list"),
    pytest.param({k: v for k, v in task().items() if k != "intent"}, "Task.intent",
                 "Task.intent: Value for the field 'intent' is required.", id="missing-required"),
    pytest.param(task(status="bogus"), "Task.status",
                 "Task.status: 'bogus' is not in the required value set (draft | requested | received | accepted "
                 "| rejected | ready | cancelled | in-progress | on-hold | failed | completed | entered-in-error)",
                 id="code-not-in-required-value-set"),
    pytest.param({**task(), "resourceType": "Patient"}, "resourceType",
                 "resourceType is 'Patient' but the URL is for Task", id="resourceType-mismatch"),
    pytest.param({k: v for k, v in task().items() if k != "resourceType"}, "resourceType",
                 "the resource has no resourceType", id="no-resourceType"),
])
async def test_400_invalid_resource(c: httpx.AsyncClient, seeded: dict[str, Any], body: dict[str, Any],
                                    expression: str, diagnostics: str) -> None:
    before = await snapshot(c)
    created = await c.post(f"{BASE}/Task", json=body, headers=FHIR)
    outcome(created, 400, "structure", diagnostics, expression=[expression])
    updated = await c.put(f"{BASE}/Task/{seeded['id']}", json={**body, "id": seeded["id"]}, headers=FHIR)
    outcome(updated, 400, "structure", diagnostics, expression=[expression])
    assert await snapshot(c) == before


async def test_400_every_problem_is_listed(c: httpx.AsyncClient) -> None:
    before = await snapshot(c)
    resp = await c.post(f"{BASE}/Task", json={"resourceType": "Task", "for": {"reference": "Patient/1"}},
                        headers=FHIR)
    outcome(resp, 400, "structure", "Task.intent: Value for the field 'intent' is required. (and 1 more)",
            expression=["Task.intent"])
    assert resp.json()["issue"][1] == {
        "severity": "error", "code": "structure", "expression": ["Task.status"],
        "diagnostics": "Task.status: Value for the field 'status' is required."}
    assert await snapshot(c) == before


async def test_400_update_body_id_differs_from_url(c: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    before = await snapshot(c)
    tid = seeded["id"]
    other = await c.put(f"{BASE}/Task/{tid}", json={**seeded, "id": "someone-else"}, headers=FHIR)
    outcome(other, 400, "structure", f"the body's id 'someone-else' does not match the URL id '{tid}'",
            expression=["Task.id"])
    missing = await c.put(f"{BASE}/Task/{tid}", json={k: v for k, v in seeded.items() if k != "id"},
                          headers=FHIR)
    outcome(missing, 400, "structure", f"an update must carry the resource id ({tid}) in the body",
            expression=["Task.id"])
    assert await snapshot(c) == before


@pytest.mark.parametrize("bad_id", ["bad$id", "x" * 65, "a_b"])
async def test_400_invalid_id(c: httpx.AsyncClient, seeded: dict[str, Any], bad_id: str) -> None:
    before = await snapshot(c)
    diagnostics = f"{bad_id!r} is not a valid FHIR id ([A-Za-z0-9-.]{{1,64}})"
    put = await c.put(f"{BASE}/Task/{bad_id}", json={**task(), "id": bad_id}, headers=FHIR)
    outcome(put, 400, "invalid", diagnostics, expression=["id"])
    outcome(await c.get(f"{BASE}/Task/{bad_id}"), 400, "invalid", diagnostics, expression=["id"])
    outcome(await c.delete(f"{BASE}/Task/{bad_id}"), 400, "invalid", diagnostics, expression=["id"])
    assert await snapshot(c) == before


async def test_400_malformed_if_match(c: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    before = await snapshot(c)
    resp = await c.put(f"{BASE}/Task/{seeded['id']}", json=seeded, headers={**FHIR, "If-Match": "version one"})
    outcome(resp, 400, "invalid", "If-Match must be an ETag like W/\"3\", got 'version one'",
            expression=["If-Match"])
    assert await snapshot(c) == before


# --- 400: bad search values ------------------------------------------------------------------------

@pytest.mark.parametrize(("params", "expression", "diagnostics"), [
    ({"_lastUpdated": "2020-13-45"}, "_lastUpdated", "search parameter '_lastUpdated': month must be in 1..12"),
    ({"authored-on": "2020-02-30"}, "authored-on", "search parameter 'authored-on': day is out of range for month"),
    ({"_count": "abc"}, "_count", "'_count' must be a non-negative integer, got 'abc'"),
    ({"_count": "-1"}, "_count", "'_count' must be a non-negative integer, got '-1'"),
    ({"status": ""}, "status", "search parameter 'status' has an empty value"),
])
async def test_400_bad_search_value(c: httpx.AsyncClient, seeded: dict[str, Any], params: dict[str, str],
                                    expression: str, diagnostics: str) -> None:
    before = await snapshot(c)
    outcome(await c.get(f"{BASE}/Task", params=params), 400, "invalid", diagnostics, expression=[expression])
    form = await c.post(f"{BASE}/Task/_search", data=params)
    outcome(form, 400, "invalid", diagnostics, expression=[expression])
    assert await snapshot(c) == before


async def test_400_search_date_that_is_not_a_date(c: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    before = await snapshot(c)
    issue = outcome(await c.get(f"{BASE}/Task", params={"authored-on": "notadate"}), 400, "invalid",
                    expression=["authored-on"])
    assert issue["diagnostics"].startswith("search parameter 'authored-on': "), issue
    assert "prefix" not in issue["diagnostics"], issue
    assert await snapshot(c) == before


async def test_400_bad_history_since(c: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    before = await snapshot(c)
    resp = await c.get(f"{BASE}/Task/_history", params={"_since": "2020-13-01"})
    outcome(resp, 400, "invalid", "_since: month must be in 1..12", expression=["_since"])
    assert await snapshot(c) == before


async def test_unknown_search_parameter_strict_is_400_lenient_is_ignored(
        c: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    await create(c, task("p2", status="ready"))
    before = await snapshot(c)
    strict = await c.get(f"{BASE}/Task", params={"colour": "red", "status": "ready"},
                         headers={"Prefer": "handling=strict"})
    outcome(strict, 400, "invalid", "unknown search parameter 'colour' for Task", expression=["colour"])
    # RFC 7240: several preferences in one header are separated by commas.
    for header in ("return=representation, handling=strict", "handling=strict, respond-async"):
        combined = await c.get(f"{BASE}/Task", params={"colour": "red"}, headers={"Prefer": header})
        outcome(combined, 400, "invalid", "unknown search parameter 'colour' for Task", expression=["colour"])
    posted = await c.post(f"{BASE}/Task/_search", data={"colour": "red"}, headers={"Prefer": "handling=strict"})
    outcome(posted, 400, "invalid", "unknown search parameter 'colour' for Task", expression=["colour"])

    lenient = await c.get(f"{BASE}/Task", params={"colour": "red", "status": "ready"})
    assert lenient.status_code == 200, lenient.text
    bundle = lenient.json()
    assert bundle["total"] == 1  # status=ready still applies; colour is ignored, not treated as "no match"
    matches = [e for e in bundle["entry"] if e["search"]["mode"] == "match"]
    assert [e["resource"]["for"]["reference"] for e in matches] == ["Patient/p2"]
    outcomes = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert outcomes == [{"resource": {"resourceType": "OperationOutcome", "issue": [{
        "severity": "warning", "code": "not-supported",
        "diagnostics": "ignored unknown search parameter 'colour' (Prefer: handling=lenient)"}]},
        "search": {"mode": "outcome"}}]
    self_link = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    assert self_link == f"{BASE}/Task?status=ready&_count=50"
    assert await snapshot(c) == before


# --- 401 / 403 -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("authorization", "diagnostics"), [
    (None, "missing 'Authorization: Bearer <token>' header"),
    (f"Bearer {TOKEN}-wrong", "invalid bearer token"),
    ("Bearer ", "the Authorization header must use the Bearer scheme"),
    (f"Basic {TOKEN}", "the Authorization header must use the Bearer scheme"),
    (TOKEN, "the Authorization header must use the Bearer scheme"),
])
async def test_401(make_settings: Any, authorization: str | None, diagnostics: str) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with app_client(make_settings(), token=None) as anon:
        before = await snapshot(anon)
        for resp in (await anon.post(f"{BASE}/Task", json=task(), headers={**FHIR, **headers}),
                     await anon.get(f"{BASE}/Task", headers=headers),
                     await anon.post(BASE, json=tx(post_entry(task())), headers={**FHIR, **headers})):
            outcome(resp, 401, "login", diagnostics)
            assert resp.headers["www-authenticate"] == 'Bearer realm="fhir-outreach"'
        assert await snapshot(anon) == before


async def test_healthz_and_metadata_are_open(make_settings: Any) -> None:
    async with app_client(make_settings(), token=None) as anon:
        health = await anon.get("http://testserver/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok", "version": "0.1.0"}
        meta = await anon.get(f"{BASE}/metadata")
        assert meta.status_code == 200, meta.text
        assert meta.json()["resourceType"] == "CapabilityStatement"
        assert meta.json()["fhirVersion"] == "4.0.1"
        outcome(await anon.get(f"{BASE}/Task"), 401, "login")  # ... and nothing else is


# --- 404 / 405 / 406 -------------------------------------------------------------------------------

async def test_404_unknown_type(c: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    before = await snapshot(c)
    diagnostics = ("resource type 'Nope' is not supported by this server "
                   "(see GET /fhir/metadata for the supported types)")
    outcome(await c.get(f"{BASE}/Nope"), 404, "not-found", diagnostics)
    outcome(await c.get(f"{BASE}/Nope/1"), 404, "not-found", diagnostics)
    outcome(await c.post(f"{BASE}/Nope", json={"resourceType": "Nope"}, headers=FHIR), 404, "not-found",
            diagnostics)
    assert await snapshot(c) == before


async def test_404_unknown_id_and_version(c: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    before = await snapshot(c)
    outcome(await c.get(f"{BASE}/Task/no-such-task"), 404, "not-found", "Task/no-such-task is not known")
    outcome(await c.get(f"{BASE}/Task/no-such-task/_history"), 404, "not-found", "Task/no-such-task is not known")
    outcome(await c.get(f"{BASE}/Task/no-such-task/_history/1"), 404, "not-found",
            "Task/no-such-task is not known")
    outcome(await c.get(f"{BASE}/Task/{seeded['id']}/_history/7"), 404, "not-found",
            f"Task/{seeded['id']} has no version 7")
    assert await snapshot(c) == before


@pytest.mark.parametrize(("method", "url", "path"), [
    ("GET", f"{BASE}/Task/x/_history/1/more", "/fhir/Task/x/_history/1/more"),
    ("GET", "http://testserver/nothing-here", "/nothing-here"),
    ("POST", "http://testserver/fhirx/Task", "/fhirx/Task"),
])
async def test_404_unknown_route(c: httpx.AsyncClient, seeded: dict[str, Any], method: str, url: str,
                                 path: str) -> None:
    before = await snapshot(c)
    resp = await c.request(method, url, json=task() if method == "POST" else None)
    outcome(resp, 404, "not-found", f"no FHIR endpoint at {method} {path}")
    assert await snapshot(c) == before


@pytest.mark.parametrize(("method", "path"), [
    ("PATCH", "/fhir/Task/x"),
    ("PUT", "/fhir/Task"),
    ("DELETE", "/fhir/Task"),
    ("DELETE", "/fhir/Task/x/_history/1"),
    ("PUT", "/fhir/metadata"),
])
async def test_405(c: httpx.AsyncClient, seeded: dict[str, Any], method: str, path: str) -> None:
    before = await snapshot(c)
    resp = await c.request(method, f"http://testserver{path}", json={**task(), "id": "x"}, headers=FHIR)
    issue = outcome(resp, 405, "not-supported")
    assert issue["diagnostics"].startswith(f"{method} is not allowed on {path} (allowed: "), issue
    assert method not in issue["diagnostics"].split("allowed: ")[1]
    assert await snapshot(c) == before


async def test_405_names_the_allowed_methods(c: httpx.AsyncClient) -> None:
    resp = await c.patch(f"{BASE}/Task/x", json={}, headers=FHIR)
    assert resp.status_code == 405
    allowed = {m.strip() for m in resp.headers["allow"].split(",")}
    assert allowed >= {"GET", "PUT", "DELETE"} and "PATCH" not in allowed, allowed
    resp = await c.put(f"{BASE}/Task", json=task(), headers=FHIR)
    allowed = {m.strip() for m in resp.headers["allow"].split(",")}
    assert allowed >= {"GET", "POST"} and "PUT" not in allowed, allowed


async def test_406(c: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    before = await snapshot(c)
    outcome(await c.get(f"{BASE}/Task", params={"_format": "xml"}), 406, "not-supported",
            "_format=xml is not supported; this server speaks FHIR JSON only", expression=["_format"])
    outcome(await c.get(f"{BASE}/Task/{seeded['id']}", params={"_format": "application/fhir+xml"}), 406,
            "not-supported", "_format=application/fhir+xml is not supported; this server speaks FHIR JSON only",
            expression=["_format"])
    outcome(await c.get(f"{BASE}/Task/{seeded['id']}", headers={"Accept": "application/fhir+xml"}), 406,
            "not-supported", "cannot produce any of Accept: application/fhir+xml; this server speaks FHIR JSON "
            "(application/fhir+json)")
    # A write that could only be answered in XML is refused before anything is stored.
    outcome(await c.post(f"{BASE}/Task", json=task(), headers={**FHIR, "Accept": "application/fhir+xml"}), 406,
            "not-supported")
    outcome(await c.post(f"{BASE}/Task", params={"_format": "xml"}, json=task(), headers=FHIR), 406,
            "not-supported")
    outcome(await c.delete(f"{BASE}/Task/{seeded['id']}", headers={"Accept": "application/xml"}), 406,
            "not-supported")
    assert await snapshot(c) == before
    # Controls: JSON in either spelling is fine.
    ok = await c.get(f"{BASE}/Task", headers={"Accept": "application/fhir+xml, application/json;q=0.5"})
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("application/json")


# --- 409 -------------------------------------------------------------------------------------------

async def test_409_conditional_create_in_a_transaction_racing_a_concurrent_update(
        make_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The only way to a 409 through the API: a transaction's conditional create resolves to an existing
    resource while planning, another client changes that resource before the commit so the condition no
    longer matches, and the commit then finds the planned id taken. The whole transaction is refused."""
    ac = app_client(make_settings())
    async with ac as c:
        ident = [{"system": "urn:test", "value": "v1"}]
        existing = await create(c, task("x", identifier=ident))
        xid = existing["id"]
        ix = ac.app.state.interactions
        planned = ix.ensure_unique_condition

        async def then_a_concurrent_update(type_: str, query: Any) -> Any:
            found = await planned(type_, query)
            changed = {**existing, "identifier": [{"system": "urn:test", "value": "v2"}]}
            assert (await c.put(f"{BASE}/Task/{xid}", json=changed, headers=FHIR)).status_code == 200
            return found

        monkeypatch.setattr(ix, "ensure_unique_condition", then_a_concurrent_update)
        before = await snapshot(c)
        resp = await c.post(BASE, json=tx(post_entry(task("a")),
                                          post_entry(task("x", identifier=ident), ifNoneExist="identifier=urn:test|v1")),
                            headers=FHIR)
        issue = outcome(resp, 409, "conflict")
        # (Naming the entry, as test_transaction_commit_failure_names_the_entry asks, is welcome.)
        assert issue["diagnostics"] == (
            f"Bundle.entry[1]: Task: the If-None-Exist condition matched Task/{xid} when the transaction was "
            "planned but matches nothing at commit; retry the transaction"), issue
        after = await snapshot(c)
        # Only the concurrent update happened; the transaction's own create of Patient a's Task did not.
        assert after["Task"] == [("PUT", f"{BASE}/Task/{xid}", 'W/"2"'), *before["Task"]]
        assert after["PlanDefinition"] == before["PlanDefinition"]


async def test_batch_create_cannot_choose_its_id(c: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    before = await snapshot(c)
    resp = await c.post(BASE, json=tx({**post_entry(task("a")), "_assigned_id": seeded["id"]},
                                      {**post_entry(task("b")), "_assigned_id": "not a valid id!"}, kind="batch"),
                        headers=FHIR)
    assert resp.status_code == 200, resp.text
    entries = resp.json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["201 Created", "201 Created"]
    assert entries[0]["resource"]["id"] != seeded["id"]
    assert entries[1]["resource"]["id"] != "not a valid id!"
    after = await snapshot(c)
    assert after["Task"][2:] == before["Task"]  # two new creates, the seed untouched


# --- 410 / 412 -------------------------------------------------------------------------------------

async def test_410_read_and_vread_after_delete(c: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    tid = seeded["id"]
    assert (await c.delete(f"{BASE}/Task/{tid}")).status_code == 204
    before = await snapshot(c)
    outcome(await c.get(f"{BASE}/Task/{tid}"), 410, "deleted", f"Task/{tid} was deleted (version 2)")
    outcome(await c.get(f"{BASE}/Task/{tid}/_history/2"), 410, "deleted", f"Task/{tid} version 2 is a deletion")
    v1 = await c.get(f"{BASE}/Task/{tid}/_history/1")
    assert v1.status_code == 200 and v1.json()["for"] == {"reference": "Patient/seed"}
    assert await snapshot(c) == before
    assert before["Task"][0] == ("DELETE", f"{BASE}/Task/{tid}", 'W/"2"')


async def test_412_stale_if_match_on_put_and_delete(c: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    tid = seeded["id"]
    updated = await c.put(f"{BASE}/Task/{tid}", json={**seeded, "status": "ready"}, headers=FHIR)
    assert updated.status_code == 200 and updated.headers["etag"] == 'W/"2"'
    before = await snapshot(c)
    stale = {**FHIR, "If-Match": 'W/"1"'}
    diagnostics = f'Task/{tid}: If-Match expects version 1, the server has version 2'
    outcome(await c.put(f"{BASE}/Task/{tid}", json={**seeded, "status": "cancelled"}, headers=stale), 412,
            "conflict", diagnostics)
    outcome(await c.delete(f"{BASE}/Task/{tid}", headers=stale), 412, "conflict", diagnostics)
    future = await c.put(f"{BASE}/Task/{tid}", json=seeded, headers={**FHIR, "If-Match": 'W/"3"'})
    outcome(future, 412, "conflict", f"Task/{tid}: If-Match expects version 3, the server has version 2")
    assert await snapshot(c) == before
    assert (await c.get(f"{BASE}/Task/{tid}")).json()["status"] == "ready"


async def test_412_if_none_exist_matching_two(c: httpx.AsyncClient) -> None:
    ident = [{"system": "urn:test", "value": "dup"}]
    await create(c, task("a", identifier=ident))
    await create(c, task("b", identifier=ident))
    before = await snapshot(c)
    resp = await c.post(f"{BASE}/Task", json=task("c", identifier=ident),
                        headers={**FHIR, "If-None-Exist": "identifier=urn:test|dup"})
    outcome(resp, 412, "conflict", "If-None-Exist matched 2 Task resources; the condition must match at most one")
    in_tx = await c.post(BASE, json=tx(post_entry(task("d")),
                                       post_entry(task("c", identifier=ident), ifNoneExist="identifier=urn:test|dup")),
                         headers=FHIR)
    outcome(in_tx, 412, "conflict",
            "Bundle.entry[1]: If-None-Exist matched 2 Task resources; the condition must match at most one")
    assert await snapshot(c) == before


# --- 413 / 415 -------------------------------------------------------------------------------------

def sized_task(size: int) -> bytes:
    body = task(description="")
    raw = json.dumps(body, separators=(",", ":")).encode()
    body["description"] = "x" * (size - len(raw))
    raw = json.dumps(body, separators=(",", ":")).encode()
    assert len(raw) == size
    return raw


async def test_413_with_content_length(small: httpx.AsyncClient) -> None:
    before = await snapshot(small)
    resp = await small.post(f"{BASE}/Task", content=sized_task(2049), headers=FHIR)
    assert resp.request.headers["content-length"] == "2049"
    outcome(resp, 413, "too-costly", "request body of 2049 bytes exceeds the limit of 2048 bytes "
                                     "(FHIR_OUTREACH_MAX_BODY_BYTES)")
    assert await snapshot(small) == before
    at_limit = await small.post(f"{BASE}/Task", content=sized_task(2048), headers=FHIR)
    assert at_limit.status_code == 201, at_limit.text


async def test_413_chunked_without_content_length(small: httpx.AsyncClient) -> None:
    before = await snapshot(small)

    def stream(raw: bytes) -> Any:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(raw), 500):
                yield raw[i : i + 500]
        return chunks()

    for send in (lambda raw: small.post(f"{BASE}/Task", content=stream(raw), headers=FHIR),
                 lambda raw: small.post(BASE, content=stream(raw), headers=FHIR)):
        resp = await send(sized_task(2049))
        assert "content-length" not in resp.request.headers
        assert resp.request.headers["transfer-encoding"] == "chunked"
        outcome(resp, 413, "too-costly",
                "request body exceeds the limit of 2048 bytes (FHIR_OUTREACH_MAX_BODY_BYTES)")
    assert await snapshot(small) == before
    at_limit = await small.post(f"{BASE}/Task", content=stream(sized_task(2048)), headers=FHIR)
    assert at_limit.status_code == 201, at_limit.text


@pytest.mark.parametrize("ctype", ["text/plain", "application/xml", "application/fhir+xml; charset=utf-8"])
async def test_415(c: httpx.AsyncClient, seeded: dict[str, Any], ctype: str) -> None:
    before = await snapshot(c)
    body = json.dumps(task()).encode()
    diagnostics = f"Content-Type {ctype!r} is not supported; send application/fhir+json"
    for resp in (await c.post(f"{BASE}/Task", content=body, headers={"Content-Type": ctype}),
                 await c.put(f"{BASE}/Task/{seeded['id']}", content=json.dumps(seeded).encode(),
                             headers={"Content-Type": ctype}),
                 await c.post(BASE, content=json.dumps(tx(post_entry(task()))).encode(),
                              headers={"Content-Type": ctype})):
        outcome(resp, 415, "not-supported", diagnostics)
    assert await snapshot(c) == before


# --- 422 -------------------------------------------------------------------------------------------

def plan(version: str | None = "1", url: str = "http://example.org/journeys/welcome") -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "PlanDefinition", "status": "active", "url": url}
    if version is not None:
        body["version"] = version
    return body


async def test_422_second_plandefinition_with_same_url_and_version(c: httpx.AsyncClient) -> None:
    first = await create(c, plan("1"))
    unversioned = await create(c, plan(None))
    second = await create(c, plan("2"))
    before = await snapshot(c)
    url = "http://example.org/journeys/welcome"
    outcome(await c.post(f"{BASE}/PlanDefinition", json=plan("1"), headers=FHIR), 422, "business-rule",
            f"PlanDefinition {url}|1 already exists as PlanDefinition/{first['id']}; give the new one another version",
            expression=["PlanDefinition.version"])
    outcome(await c.post(f"{BASE}/PlanDefinition", json=plan(None), headers=FHIR), 422, "business-rule",
            f"PlanDefinition {url} already exists as PlanDefinition/{unversioned['id']}; "
            "give the new one another version", expression=["PlanDefinition.version"])
    # Changing another PlanDefinition into a duplicate is refused too.
    outcome(await c.put(f"{BASE}/PlanDefinition/{second['id']}", json={**second, "version": "1"}, headers=FHIR),
            422, "business-rule", expression=["PlanDefinition.version"])
    in_tx = await c.post(BASE, json=tx(post_entry(task("a")), post_entry(plan("1"))), headers=FHIR)
    outcome(in_tx, 422, "business-rule", startswith=f"Bundle.entry[1]: PlanDefinition {url}|1 already exists")
    assert await snapshot(c) == before
    # Re-saving a PlanDefinition under its own url|version is of course fine.
    resave = await c.put(f"{BASE}/PlanDefinition/{first['id']}", json={**first, "title": "Welcome"}, headers=FHIR)
    assert resave.status_code == 200, resave.text


async def test_422_duplicate_plandefinitions_within_one_transaction(c: httpx.AsyncClient) -> None:
    before = await snapshot(c)
    resp = await c.post(BASE, json=tx(post_entry(plan("1")), post_entry(plan("1"))), headers=FHIR)
    outcome(resp, 422, "business-rule", startswith="Bundle.entry[1]")
    assert await snapshot(c) == before


# --- transactions: all or nothing, malformed Bundles -----------------------------------------------

@pytest.mark.parametrize(("third", "status", "code", "expression", "diagnostics"), [
    pytest.param(post_entry(task("c", status="bogus")), 400, "structure", "Bundle.entry[2].resource.status",
                 "Bundle.entry[2].resource.status: 'bogus' is not in the required value set", id="bad-code"),
    pytest.param(post_entry({**task("c"), "for": {"reference": 3}}), 400, "structure",
                 "Bundle.entry[2].resource.for.reference",
                 "Bundle.entry[2].resource.for.reference: Input should be a valid string", id="wrong-datatype"),
    pytest.param({"resource": {**task("c"), "id": "x"}, "request": {"method": "PUT", "url": "Task/y"}}, 400,
                 "structure", "Bundle.entry[2].resource.id",
                 "Bundle.entry[2]: the body's id 'x' does not match the URL id 'y'", id="put-id-mismatch"),
    pytest.param({"resource": task("c"), "request": {"method": "POST", "url": "Nope"}}, 404, "not-found", None,
                 "Bundle.entry[2]: resource type 'Nope' is not supported", id="unknown-type"),
    pytest.param({"resource": task("c")}, 400, "invalid", "Bundle.entry[2].request",
                 "Bundle.entry[2].request is required", id="no-request"),
])
async def test_transaction_is_all_or_nothing(c: httpx.AsyncClient, seeded: dict[str, Any], third: dict[str, Any],
                                             status: int, code: str, expression: str | None,
                                             diagnostics: str) -> None:
    before = await snapshot(c)
    bundle = tx({"fullUrl": "urn:uuid:0b3f7c9e-1111-4d2a-9c1e-000000000001", **post_entry(task("a"))},
                post_entry(task("b", focus={"reference": "urn:uuid:0b3f7c9e-1111-4d2a-9c1e-000000000001"})),
                third)
    resp = await c.post(BASE, json=bundle, headers=FHIR)
    outcome(resp, status, code, startswith=diagnostics,
            expression=[expression] if expression else None)
    assert "Bundle.entry[2]" in resp.json()["issue"][0]["diagnostics"]
    assert await snapshot(c) == before
    # The same Bundle with a good third entry commits all three.
    bundle["entry"][2] = post_entry(task("c"))
    ok = await c.post(BASE, json=bundle, headers=FHIR)
    assert ok.status_code == 200, ok.text
    assert [e["response"]["status"] for e in ok.json()["entry"]] == ["201 Created"] * 3
    assert len((await snapshot(c))["Task"]) == len(before["Task"]) + 3


async def test_transaction_failing_at_commit_is_all_or_nothing(c: httpx.AsyncClient,
                                                               seeded: dict[str, Any]) -> None:
    tid = seeded["id"]
    before = await snapshot(c)
    stale = {"resource": {**seeded, "status": "ready"}, "request": {"method": "PUT", "url": f"Task/{tid}",
                                                                    "ifMatch": 'W/"9"'}}
    resp = await c.post(BASE, json=tx(post_entry(task("a")), post_entry(task("b")), stale), headers=FHIR)
    issue = outcome(resp, 412, "conflict")
    assert re.fullmatch(rf"(Bundle\.entry\[2\]: )?Task/{tid}: If-Match expects version 9, the server has version 1",
                        issue["diagnostics"]), issue
    assert await snapshot(c) == before


async def test_transaction_commit_failure_names_the_entry(c: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    stale = {"resource": seeded, "request": {"method": "PUT", "url": f"Task/{seeded['id']}", "ifMatch": 'W/"9"'}}
    resp = await c.post(BASE, json=tx(post_entry(task("a")), post_entry(task("b")), stale), headers=FHIR)
    issue = outcome(resp, 412, "conflict")
    assert "Bundle.entry[2]" in issue["diagnostics"] or issue.get("expression") == ["Bundle.entry[2]"], issue


async def test_transaction_changing_one_resource_twice_is_400(c: httpx.AsyncClient,
                                                             seeded: dict[str, Any]) -> None:
    tid = seeded["id"]
    before = await snapshot(c)
    put = {"resource": seeded, "request": {"method": "PUT", "url": f"Task/{tid}"}}
    delete = {"request": {"method": "DELETE", "url": f"Task/{tid}"}}
    resp = await c.post(BASE, json=tx(put, delete), headers=FHIR)
    outcome(resp, 400, "invalid", f"Bundle.entry[0] and Bundle.entry[1] both change Task/{tid}; "
                                  "a transaction may change a resource only once", expression=["Bundle.entry[0]"])
    assert await snapshot(c) == before


@pytest.mark.parametrize(("body", "diagnostics", "expression"), [
    pytest.param(task(), "POST /fhir expects a Bundle of type batch or transaction", None, id="not-a-bundle"),
    pytest.param([tx()], "POST /fhir expects a Bundle of type batch or transaction", None, id="array"),
    pytest.param({**tx(post_entry(task())), "type": "searchset"},
                 "Bundle.type must be batch or transaction, got 'searchset'", ["Bundle.type"], id="searchset"),
    pytest.param({"resourceType": "Bundle", "entry": []}, "Bundle.type must be batch or transaction, got None",
                 ["Bundle.type"], id="no-type"),
    pytest.param({"resourceType": "Bundle", "type": "batch", "entry": {"request": {}}},
                 "Bundle.entry must be an array", ["Bundle.entry"], id="entry-not-array"),
])
async def test_400_malformed_bundle(c: httpx.AsyncClient, seeded: dict[str, Any], body: Any, diagnostics: str,
                                    expression: list[str] | None) -> None:
    before = await snapshot(c)
    outcome(await c.post(BASE, json=body, headers=FHIR), 400, "invalid", diagnostics, expression=expression)
    outcome(await c.post(BASE, content=b'{"resourceType": "Bundle", "type": ', headers=FHIR), 400, "invalid",
            startswith="the request body is not valid JSON: ")
    assert await snapshot(c) == before
