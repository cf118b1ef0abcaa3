"""FHIR REST interactions through the ASGI app, on both stores."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import BASE, task

JSON = {"Content-Type": "application/fhir+json"}


async def create(client: httpx.AsyncClient, body: dict[str, Any], **headers: str) -> httpx.Response:
    resp = await client.post(f"/fhir/{body['resourceType']}", json=body, headers={**JSON, **headers})
    assert resp.status_code in (200, 201), resp.text
    return resp


async def test_create_read_update_delete_cycle(client: httpx.AsyncClient) -> None:
    resp = await create(client, task())
    assert resp.status_code == 201
    body = resp.json()
    rid = body["id"]
    assert resp.headers["etag"] == 'W/"1"'
    assert resp.headers["location"] == f"{BASE}/Task/{rid}/_history/1"
    assert "last-modified" in resp.headers
    assert resp.headers["content-type"].startswith("application/fhir+json")

    read = await client.get(f"/fhir/Task/{rid}")
    assert read.status_code == 200 and read.json() == body and read.headers["etag"] == 'W/"1"'

    upd = await client.put(f"/fhir/Task/{rid}", json={**body, "status": "in-progress"}, headers=JSON)
    assert upd.status_code == 200 and upd.json()["meta"]["versionId"] == "2"
    assert "location" not in upd.headers

    v1 = await client.get(f"/fhir/Task/{rid}/_history/1")
    assert v1.status_code == 200 and v1.json()["status"] == "requested"

    gone = await client.delete(f"/fhir/Task/{rid}")
    assert gone.status_code == 204
    after = await client.get(f"/fhir/Task/{rid}")
    assert after.status_code == 410 and after.json()["issue"][0]["code"] == "deleted"

    hist = (await client.get(f"/fhir/Task/{rid}/_history")).json()
    assert hist["type"] == "history" and hist["total"] == 3
    assert [e["request"]["method"] for e in hist["entry"]] == ["DELETE", "PUT", "POST"]
    assert [e["response"]["status"] for e in hist["entry"]] == ["204 No Content", "200 OK", "201 Created"]
    assert "resource" not in hist["entry"][0]


async def test_update_as_create_and_if_match(client: httpx.AsyncClient) -> None:
    body = {**task(), "id": "client-chosen-1"}
    resp = await client.put("/fhir/Task/client-chosen-1", json=body, headers=JSON)
    assert resp.status_code == 201 and resp.headers["location"].endswith("/Task/client-chosen-1/_history/1")
    ok = await client.put("/fhir/Task/client-chosen-1", json={**body, "status": "ready"},
                          headers={**JSON, "If-Match": 'W/"1"'})
    assert ok.status_code == 200 and ok.headers["etag"] == 'W/"2"'
    stale = await client.put("/fhir/Task/client-chosen-1", json={**body, "status": "failed"},
                             headers={**JSON, "If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert (await client.get("/fhir/Task/client-chosen-1")).json()["status"] == "ready"


async def test_prefer_return(client: httpx.AsyncClient) -> None:
    minimal = await client.post("/fhir/Task", json=task(), headers={**JSON, "Prefer": "return=minimal"})
    assert minimal.status_code == 201 and minimal.content == b"" and "location" in minimal.headers
    oo = await client.post("/fhir/Task", json=task(), headers={**JSON, "Prefer": "return=OperationOutcome"})
    assert oo.status_code == 201 and oo.json()["resourceType"] == "OperationOutcome"
    rep = await client.post("/fhir/Task", json=task(), headers={**JSON, "Prefer": "return=representation"})
    assert rep.json()["resourceType"] == "Task"


async def test_conditional_create(client: httpx.AsyncClient) -> None:
    ident = {"identifier": [{"system": "urn:outreach", "value": "run-1/step-2"}]}
    first = await create(client, task(**ident), **{"If-None-Exist": "identifier=urn:outreach|run-1/step-2"})
    second = await create(client, task(**ident), **{"If-None-Exist": "identifier=urn:outreach|run-1/step-2"})
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    found = (await client.get("/fhir/Task", params={"identifier": "urn:outreach|run-1/step-2"})).json()
    assert found["total"] == 1


async def test_conditional_read_not_modified(client: httpx.AsyncClient) -> None:
    rid = (await create(client, task())).json()["id"]
    resp = await client.get(f"/fhir/Task/{rid}", headers={"If-None-Match": 'W/"1"'})
    assert resp.status_code == 304
    assert (await client.get(f"/fhir/Task/{rid}", headers={"If-None-Match": 'W/"0"'})).status_code == 200


async def test_search_paging_links_and_total(client: httpx.AsyncClient) -> None:
    for i in range(7):
        await create(client, task("pp", authoredOn=f"2024-01-0{i + 1}"))
    await create(client, task("other"))
    page = (await client.get("/fhir/Task", params={"patient": "pp", "_count": "3", "_sort": "authored-on"})).json()
    assert page["total"] == 7 and len(page["entry"]) == 3
    assert [e["resource"]["authoredOn"] for e in page["entry"]] == ["2024-01-01", "2024-01-02", "2024-01-03"]
    links = {link["relation"]: link["url"] for link in page["link"]}
    assert links["next"].startswith(f"{BASE}/Task?")
    seen = [e["resource"]["id"] for e in page["entry"]]
    url = links["next"]
    while url:
        nxt = (await client.get(url)).json()
        seen += [e["resource"]["id"] for e in nxt.get("entry", [])]
        url = {link["relation"]: link["url"] for link in nxt["link"]}.get("next")
    assert len(seen) == 7 and len(set(seen)) == 7
    count = (await client.get("/fhir/Task", params={"patient": "pp", "_summary": "count"})).json()
    assert count["total"] == 7 and "entry" not in count


async def test_search_post_form(client: httpx.AsyncClient) -> None:
    await create(client, task("formp", "completed"))
    await create(client, task("formp", "requested"))
    resp = await client.post("/fhir/Task/_search", content="patient=formp&status=completed",
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 200 and resp.json()["total"] == 1


async def test_include_and_revinclude(client: httpx.AsyncClient) -> None:
    patient = {"resourceType": "Patient", "id": "inc-p", "name": [{"family": "Ngata", "given": ["Aroha"]}]}
    assert (await client.put("/fhir/Patient/inc-p", json=patient, headers=JSON)).status_code == 201
    rid = (await create(client, task("inc-p"))).json()["id"]
    bundle = (await client.get("/fhir/Task", params={"_id": rid, "_include": "Task:patient"})).json()
    modes = sorted((e["search"]["mode"], e["resource"]["resourceType"]) for e in bundle["entry"])
    assert modes == [("include", "Patient"), ("match", "Task")]
    rev = (await client.get("/fhir/Patient", params={"_id": "inc-p", "_revinclude": "Task:patient"})).json()
    assert sorted(e["resource"]["resourceType"] for e in rev["entry"]) == ["Patient", "Task"]
    by_name = (await client.get("/fhir/Patient", params={"name": "aro"})).json()
    assert by_name["total"] == 1


async def test_type_history(client: httpx.AsyncClient) -> None:
    a = (await create(client, task())).json()
    await client.put(f"/fhir/Task/{a['id']}", json={**a, "status": "ready"}, headers=JSON)
    hist = (await client.get("/fhir/Task/_history", params={"_count": "1"})).json()
    assert hist["total"] == 2 and len(hist["entry"]) == 1
    assert any(link["relation"] == "next" for link in hist["link"])


async def test_transaction_with_references_and_all_methods(client: httpx.AsyncClient) -> None:
    doomed = (await create(client, task("tx"))).json()["id"]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:7f1c1c52-0000-4000-8000-000000000001",
         "resource": {"resourceType": "Patient", "name": [{"family": "Okafor"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Task", "status": "requested", "intent": "order",
                      "for": {"reference": "urn:uuid:7f1c1c52-0000-4000-8000-000000000001"}},
         "request": {"method": "POST", "url": "Task"}},
        {"request": {"method": "DELETE", "url": f"Task/{doomed}"}},
        {"request": {"method": "GET", "url": "Task?patient=tx"}},
    ]}
    resp = await client.post("/fhir", json=bundle, headers=JSON)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in out["entry"]]
    assert statuses == ["201 Created", "201 Created", "200 OK", "200 OK"]
    pid = out["entry"][0]["resource"]["id"]
    assert out["entry"][1]["resource"]["for"]["reference"] == f"Patient/{pid}"
    assert out["entry"][3]["resource"]["total"] == 0  # GET runs after the DELETE
    assert (await client.get(f"/fhir/Task/{doomed}")).status_code == 410


async def test_batch_entries_are_independent(client: httpx.AsyncClient) -> None:
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": task("batch"), "request": {"method": "POST", "url": "Task"}},
        {"resource": {"resourceType": "Task", "intent": "order"}, "request": {"method": "POST", "url": "Task"}},
        {"request": {"method": "GET", "url": "Task/does-not-exist"}},
    ]}
    out = (await client.post("/fhir", json=bundle, headers=JSON)).json()
    statuses = [e["response"]["status"] for e in out["entry"]]
    assert statuses[0] == "201 Created" and statuses[1].startswith("400") and statuses[2].startswith("404")
    assert out["entry"][1]["response"]["outcome"]["issue"][0]["expression"] == ["Bundle.entry[1].resource.status"]
    assert (await client.get("/fhir/Task", params={"patient": "batch"})).json()["total"] == 1


async def test_json_accept_and_format(client: httpx.AsyncClient) -> None:
    rid = (await create(client, task())).json()["id"]
    as_json = await client.get(f"/fhir/Task/{rid}", headers={"Accept": "application/json"})
    assert as_json.headers["content-type"].startswith("application/json")
    fmt = await client.get(f"/fhir/Task/{rid}", params={"_format": "json"})
    assert fmt.headers["content-type"].startswith("application/fhir+json")
    plain = await client.post("/fhir/Task", content=b'{"resourceType":"Task","status":"draft","intent":"order"}',
                              headers={"Content-Type": "application/json; charset=utf-8"})
    assert plain.status_code == 201
