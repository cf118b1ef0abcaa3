"""GET /fhir/metadata is truthful: every type, interaction, search parameter and include it lists works.

The CapabilityStatement drives every check (not ``searchparams``), so a type, interaction or parameter
that is listed but broken fails here. Data: the hand-written examples in ``tests/examples.py`` (which
together give a value to every listed search parameter) plus one US Core patient from ``carebundle``,
loaded through the API as transactions.

The data is loaded once per store, so the main test runs once per store and walks every listed type,
collecting every problem instead of stopping at the first: a failure lists each broken
``[section] Type ...`` check, and a listed search parameter that no example gives a value fails too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import carebundle
import httpx

from fhir_outreach.fhir.paths import OPEN_HI, OPEN_LO, IndexEntry, date_range, extract
from tests import examples
from tests.conftest import BASE

JSON = {"Content-Type": "application/fhir+json"}
STRICT = {"Prefer": "handling=strict"}
INTERACTIONS = ("create", "read", "vread", "update", "delete", "history-instance", "history-type", "search-type")
PAGE = "500"  # _count for searches; far above any result set here
Resource = dict[str, Any]


class Failures(list[str]):
    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.append(message)
        return ok

    def report(self) -> str:
        return f"{len(self)} check(s) of what GET /fhir/metadata lists failed:\n  " + "\n  ".join(self)


# --- data -------------------------------------------------------------------------------------------

async def metadata(client: httpx.AsyncClient) -> Resource:
    resp = await client.get("/fhir/metadata")
    assert resp.status_code == 200, resp.text
    cs = resp.json()
    assert cs["resourceType"] == "CapabilityStatement"
    return cs


def listed_resources(cs: Resource) -> dict[str, Resource]:
    [rest] = cs["rest"]
    return {r["type"]: r for r in rest["resource"]}


def _without_refs(node: Any, dropped: set[str]) -> Any:
    """``node`` without any Reference (or list item holding one) that points at a dropped entry."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if isinstance(value, dict) and value.get("reference") in dropped:
                continue
            if isinstance(value, list):
                value = [v for v in value if not (isinstance(v, dict) and v.get("reference") in dropped)]
                if not value:
                    continue
            out[key] = _without_refs(value, dropped)
        return out
    if isinstance(node, list):
        return [_without_refs(v, dropped) for v in node]
    return node


def us_core_bundle(supported: Iterable[str]) -> tuple[Resource, list[str]]:
    """carebundle's transaction for one patient, restricted to the types this server supports."""
    bundle = json.loads(carebundle.to_json(carebundle.generate_bundle(seed=7)))  # a pydantic model → JSON
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    keep = set(supported)
    dropped = {e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] not in keep}
    entries = [e for e in bundle["entry"] if e["resource"]["resourceType"] in keep]
    assert len(entries) > 20 and dropped, "carebundle's shape changed: expected ~48 entries incl. DiagnosticReport"
    bundle["entry"] = [_without_refs(e, dropped) for e in entries]
    return bundle, [e["resource"]["resourceType"] for e in bundle["entry"]]


async def load(client: httpx.AsyncClient, cs: Resource) -> None:
    """The examples (one transaction of PUT Type/id) and one carebundle patient (POST + urn:uuid refs)."""
    resp = await client.post("/fhir", json=examples.transaction(), headers=JSON)
    assert resp.status_code == 200, f"examples transaction rejected: {resp.text}"
    statuses = [e["response"]["status"] for e in resp.json()["entry"]]
    assert statuses == ["201 Created"] * len(examples.EXAMPLES), statuses

    bundle, types = us_core_bundle(listed_resources(cs))
    resp = await client.post("/fhir", json=bundle, headers=JSON)
    assert resp.status_code == 200, f"US Core transaction rejected: {resp.text}"
    out = resp.json()["entry"]
    assert [e["response"]["status"] for e in out] == ["201 Created"] * len(out)
    [patient] = [e["resource"]["id"] for e, t in zip(out, types, strict=True) if t == "Patient"]
    found = await client.get("/fhir/Observation", params={"patient": f"Patient/{patient}", "_summary": "count"})
    assert found.json()["total"] == types.count("Observation"), "carebundle references were not rewritten/indexed"


async def search(client: httpx.AsyncClient, rtype: str, params: list[tuple[str, str]]) -> httpx.Response:
    return await client.get(f"/fhir/{rtype}", params=[*params, ("_count", PAGE)], headers=STRICT)


def ids(bundle: Resource, mode: str = "match") -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode}


async def all_of(client: httpx.AsyncClient, rtype: str) -> list[Resource]:
    resp = await search(client, rtype, [])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["total"] <= int(PAGE)
    return [e["resource"] for e in body.get("entry", []) if e["search"]["mode"] == "match"]


def ours(stored: list[Resource]) -> list[Resource]:
    return [r for r in stored if r["id"].startswith("ex-")]


# --- search parameters ------------------------------------------------------------------------------

def _instant(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")


def hit_values(kind: str, e: IndexEntry) -> list[str]:
    """Search values built from one index entry that must find its resource."""
    if kind == "token":
        return [f"{_escape(e.sys)}|{_escape(e.val or '')}" if e.sys else _escape(e.val or "")]
    if kind in ("reference", "uri"):  # reference: Type/id, absolute URL or canonical (url|version)
        return [_escape(e.val or "")]
    if kind == "date":
        assert e.lo is not None and e.hi is not None
        return ([f"ge{_instant(math.floor(e.lo))}"] if e.lo > OPEN_LO else []) + (
            [f"le{_instant(math.ceil(e.hi))}"] if e.hi < OPEN_HI else [])
    if kind == "string":
        return [(e.sys or "")[:4]]  # a prefix of the raw value (at least 3 characters when it has them)
    raise AssertionError(f"unexpected search parameter type {kind!r}")


def miss_value(kind: str, entries: list[IndexEntry]) -> str | None:
    """One search value (alternatives OR-ed with ``,``) that must find none of the entries' resources."""
    if kind == "token":
        return "urn:none|none,no-such-code"
    if kind == "reference":
        typed = [e.val for e in entries if e.val and e.val.count("/") == 1 and ":" not in e.val]
        return f"{typed[0].split('/')[0]}/no-such-id" if typed else "http://example.org/fhir/none"
    if kind == "uri":
        return "urn:none"
    if kind == "string":
        return "zzqxw"
    los = [e.lo for e in entries if e.lo is not None and e.lo > OPEN_LO]
    his = [e.hi for e in entries if e.hi is not None and e.hi < OPEN_HI]
    alts = ([f"lt{_instant(math.floor(min(los)))}"] if len(los) == len(entries) else []) + (
        [f"gt{_instant(math.ceil(max(his)))}"] if len(his) == len(entries) else [])
    return ",".join(alts) or None


async def _query(client: httpx.AsyncClient, failures: Failures, rtype: str, name: str, value: str,
                 want: set[str], found: bool) -> None:
    resp = await search(client, rtype, [(name, value)])
    label = f"[search] {rtype}?{name}={value}"
    if failures.check(resp.status_code == 200, f"{label}: {resp.status_code} {resp.text[:300]}"):
        got = ids(resp.json())
        wrong = sorted(want - got) if found else sorted(want & got)
        failures.check(not wrong, f"{label}: {', '.join(wrong)} {'not found' if found else 'wrongly found'}")


async def check_search_params(client: httpx.AsyncClient, rtype: str, res: Resource, stored: list[Resource],
                              failures: Failures, uncovered: list[str]) -> None:
    """Each listed parameter: a value taken from each example's index entry finds it; a non-matching
    value does not. Parameters no stored resource has a value for are collected in ``uncovered``."""
    for sp in res["searchParam"]:
        name, kind = sp["name"], sp["type"]
        if name == "_id":
            await _query(client, failures, rtype, name, stored[0]["id"], {stored[0]["id"]}, True)
            await _query(client, failures, rtype, name, "no-such-id", {stored[0]["id"]}, False)
            continue
        cands: list[tuple[Resource, IndexEntry]] = []  # the first entry of each example (else any resource)
        every: list[IndexEntry] = []  # all entries of those resources (a miss must miss them all)
        if name == "_lastUpdated":
            lo, hi = date_range(stored[0]["meta"]["lastUpdated"])
            cands = [(stored[0], IndexEntry(name, lo=lo, hi=hi))]
            every = [cands[0][1]]
        else:
            found = [(r, own) for r in stored if (own := [e for e in extract(r, BASE) if e.param == name])]
            found = [(r, own) for r, own in found if r["id"].startswith("ex-")] or found[:1]
            cands = [(r, own[0]) for r, own in found]
            every = [e for _, own in found for e in own]
        if not cands:
            uncovered.append(f"{rtype}.{name}")
            continue
        hits: dict[str, set[str]] = {}
        for resource, entry in cands:
            values = hit_values(kind, entry)
            failures.check(bool(values), f"[search] {rtype}?{name}: no usable value in {resource['id']} ({entry})")
            for value in values:
                hits.setdefault(value, set()).add(resource["id"])
        for value, want in hits.items():
            await _query(client, failures, rtype, name, value, want, True)
        if (miss := miss_value(kind, every)) is not None:
            await _query(client, failures, rtype, name, miss, {r["id"] for r, _ in cands}, False)


# --- includes ---------------------------------------------------------------------------------------

async def check_includes(client: httpx.AsyncClient, rtype: str, res: Resource, stored: list[Resource],
                         known: set[str], failures: Failures) -> None:
    """Every listed ``_include`` / ``_revinclude`` value is accepted in strict mode; includes of the
    examples bring in the stored resources they reference."""
    mine = ours(stored) or stored[:1]
    only = ("_id", ",".join(r["id"] for r in mine))
    for key, listed in (("_include", res.get("searchInclude", [])), ("_revinclude", res.get("searchRevInclude", []))):
        if not listed:
            continue
        resp = await search(client, rtype, [only, *((key, v) for v in listed)])
        if resp.status_code != 200:  # find which values are refused
            for value in listed:
                one = await search(client, rtype, [only, (key, value)])
                failures.check(one.status_code == 200, f"[include] {rtype}?{key}={value}: {one.status_code} {one.text[:300]}")
            continue
        if key == "_revinclude":
            continue
        included = {f"{e['resource']['resourceType']}/{e['resource']['id']}"
                    for e in resp.json().get("entry", []) if e["search"]["mode"] == "include"}
        params = {v.split(":")[1] for v in listed}
        matched = {f"{rtype}/{rid}" for rid in ids(resp.json())}  # a match is not repeated as an include
        for r in mine:
            for e in extract(r, BASE):
                if e.param in params and e.val in known and e.val not in matched:
                    failures.check(e.val in included, f"[include] {rtype}?_id={r['id']}&_include={rtype}:{e.param}: "
                                                      f"{e.val} not included")


# --- interactions -----------------------------------------------------------------------------------

async def check_interactions(client: httpx.AsyncClient, rtype: str, res: Resource, exs: list[Resource],
                             failures: Failures) -> None:
    """POST every example of the type (validation), then run every listed interaction on the first."""
    codes = [i["code"] for i in res["interaction"]]
    failures.check(not set(codes) - set(INTERACTIONS), f"[interaction] {rtype}: unknown {set(codes) - set(INTERACTIONS)}")

    def bad(what: str, resp: httpx.Response, want: int) -> bool:
        return not failures.check(resp.status_code == want, f"[interaction] {rtype} {what}: expected {want}, got "
                                                            f"{resp.status_code} {resp.text[:300]}")

    rids = []
    for ex in exs:
        body = {k: v for k, v in ex.items() if k != "id"}
        if "url" in body:
            body["url"] += "-posted"  # PlanDefinition/ActivityDefinition url|version must stay unique
        resp = await client.post(f"/fhir/{rtype}", json=body, headers=JSON)
        if bad(f"create (POST of example {ex['id']})", resp, 201):
            return
        rids.append(resp.json()["id"])
        failures.check(resp.headers.get("location", "").startswith(f"{BASE}/{rtype}/{rids[-1]}/_history/1"),
                       f"[interaction] {rtype} create: Location header {resp.headers.get('location')!r}")
    rid, body = rids[0], {**{k: v for k, v in exs[0].items() if k != "id"}, "id": rids[0]}
    if "url" in body:
        body["url"] += "-posted"
    if "read" in codes:
        resp = await client.get(f"/fhir/{rtype}/{rid}")
        if not bad("read", resp, 200):
            failures.check(resp.json().get("id") == rid and resp.json()["meta"]["versionId"] == "1",
                           f"[interaction] {rtype} read: wrong body {resp.text[:200]}")
        if res.get("conditionalRead") == "not-match":
            bad("read with a current If-None-Match (conditionalRead)",
                await client.get(f"/fhir/{rtype}/{rid}", headers={"If-None-Match": 'W/"1"'}), 304)
    if res.get("conditionalCreate"):
        resp = await client.post(f"/fhir/{rtype}", json={k: v for k, v in body.items() if k != "id"},
                                 headers={**JSON, "If-None-Exist": f"_id={rid}"})
        if not bad("create with a matching If-None-Exist (conditionalCreate)", resp, 200):
            failures.check(resp.json().get("id") == rid, f"[interaction] {rtype} conditional create made a new resource")
    if "update" in codes:
        changed = {**body, "language": "en-US"}
        resp = await client.put(f"/fhir/{rtype}/{rid}", json=changed, headers={**JSON, "If-Match": 'W/"1"'})
        if not bad("update", resp, 200):
            failures.check(resp.json()["meta"]["versionId"] == "2", f"[interaction] {rtype} update: versionId not 2")
        if res.get("versioning") == "versioned-update":
            bad("update with a stale If-Match (versioned-update)",
                await client.put(f"/fhir/{rtype}/{rid}", json=changed, headers={**JSON, "If-Match": 'W/"1"'}), 412)
    if "vread" in codes:
        resp = await client.get(f"/fhir/{rtype}/{rid}/_history/1")
        if not bad("vread", resp, 200):
            failures.check("language" not in resp.json(), f"[interaction] {rtype} vread 1 returned the updated content")
    if "history-instance" in codes:
        resp = await client.get(f"/fhir/{rtype}/{rid}/_history")
        if not bad("history-instance", resp, 200):
            failures.check(resp.json()["type"] == "history" and resp.json()["total"] == 2,
                           f"[interaction] {rtype} history-instance: {resp.text[:200]}")
    if "history-type" in codes:
        resp = await client.get(f"/fhir/{rtype}/_history", params={"_count": PAGE})
        if not bad("history-type", resp, 200):
            got = {e.get("resource", {}).get("id") for e in resp.json().get("entry", [])}
            failures.check(resp.json()["type"] == "history" and rid in got,
                           f"[interaction] {rtype} history-type misses {rid}")
    if "search-type" in codes:
        resp = await client.get(f"/fhir/{rtype}", params={"_id": rid}, headers=STRICT)
        if not bad("search-type", resp, 200):
            failures.check(ids(resp.json()) == {rid}, f"[interaction] {rtype} search-type _id={rid}: {resp.text[:200]}")
        resp = await client.post(f"/fhir/{rtype}/_search", data={"_id": rid}, headers=STRICT)
        if not bad("search-type (POST _search)", resp, 200):
            failures.check(ids(resp.json()) == {rid}, f"[interaction] {rtype} POST _search _id={rid}: {resp.text[:200]}")
    if "delete" in codes:
        bad("delete", await client.delete(f"/fhir/{rtype}/{rid}"), 204)
        bad("read after delete", await client.get(f"/fhir/{rtype}/{rid}"), 410)
        if "history-instance" in codes:
            resp = await client.get(f"/fhir/{rtype}/{rid}/_history")
            failures.check(resp.status_code == 200 and resp.json()["total"] == 3,
                           f"[interaction] {rtype} history after delete: {resp.status_code} {resp.text[:200]}")


# --- tests ------------------------------------------------------------------------------------------

async def test_metadata_is_truthful(client: httpx.AsyncClient) -> None:
    """Every listed type takes its examples, every listed interaction works, every listed search parameter
    finds the example that has a value for it (and only with a matching value), every include is accepted."""
    cs = await metadata(client)
    listed = listed_resources(cs)
    have = examples.by_type()
    assert set(have) >= set(listed), f"listed types without an example: {sorted(set(listed) - set(have))}"
    await load(client, cs)
    stored = {rtype: await all_of(client, rtype) for rtype in listed}
    known = {f"{t}/{r['id']}" for t, rs in stored.items() for r in rs}
    failures, uncovered = Failures(), list[str]()
    for rtype, res in listed.items():
        if not failures.check(bool(stored[rtype]), f"{rtype}: nothing stored (GET /fhir/{rtype} is empty)"):
            continue
        await check_search_params(client, rtype, res, stored[rtype], failures, uncovered)
        await check_includes(client, rtype, res, stored[rtype], known, failures)
    for rtype, res in listed.items():  # last: these write
        await check_interactions(client, rtype, res, have[rtype], failures)
    if uncovered:
        failures.insert(0, "[coverage] listed search parameters no stored resource has a value for (add an "
                           f"example to tests/examples.py): {', '.join(uncovered)}")
    assert not failures, failures.report()


async def test_metadata_lists_the_supported_types_and_batch(client: httpx.AsyncClient) -> None:
    cs = await metadata(client)
    [rest] = cs["rest"]
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
    assert [p["name"] for p in rest["searchParam"]] == ["_id", "_lastUpdated"]
    assert len(rest["resource"]) == 26
    assert set(examples.by_type()) == {r["type"] for r in rest["resource"]}
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"{r['type']}?_count=1"}} for r in rest["resource"]]}
    resp = await client.post("/fhir", json=batch, headers=JSON)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["type"] == "batch-response"
    assert [e["response"]["status"] for e in out["entry"]] == ["200 OK"] * len(rest["resource"])
    assert all(e["resource"]["type"] == "searchset" for e in out["entry"])
    assert (await client.get("/fhir/DiagnosticReport")).status_code == 404  # not listed, not served


async def test_typed_choice_parameters_match_only_their_type(client: httpx.AsyncClient) -> None:
    """R4 defines ``value-concept`` as ``(Observation.value as CodeableConcept)``: the unit code of a
    valueQuantity is not a concept, so ``value-concept=<ucum>|%`` must not find the HbA1c result."""
    hba1c = examples.HBA1C_EX
    assert (await client.put(f"/fhir/Observation/{hba1c['id']}", json=hba1c, headers=JSON)).status_code == 201
    quantity = hba1c["valueQuantity"]
    resp = await search(client, "Observation", [("value-concept", f"{quantity['system']}|{quantity['code']}")])
    assert resp.status_code == 200, resp.text
    assert hba1c["id"] not in ids(resp.json()), (
        "Observation?value-concept matched a valueQuantity: the index expression must be limited to "
        "valueCodeableConcept (searchparams.PARAMS['Observation']['value-concept'])")
