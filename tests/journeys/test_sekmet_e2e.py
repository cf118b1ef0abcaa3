"""The whole data flow against a real FHIR server, with real processes: sekmet-fhir is the source and the
write-back target; ``fhir-outreach serve`` (with its in-process worker) provisions the Subscription the
discharge journey needs, receives sekmet's notifications on its hook, runs the journey reading the patient
and their Conditions back from sekmet, and writes the RequestGroup, Task/Communication and Provenance to
sekmet through the outbox, with references rewritten to sekmet's ids."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.journeys.conftest import JOURNEYS
from tests.servers import Outreach, Sekmet, wait_for

pytestmark = pytest.mark.slow
TOKEN = "e2e-token-0123456789abcdef"
OURS = "http://fhir-outreach.org/identifier/outreach"


@pytest.fixture(scope="module")
def sekmet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sekmet]:
    server = Sekmet(tmp_path_factory.mktemp("sekmet-e2e"))
    yield server
    server.stop()


def discharge(src: httpx.Client, patient: dict[str, Any]) -> tuple[str, str]:
    pid = src.post("/Patient", json=patient).json()["id"]
    enc = src.post("/Encounter", json={"resourceType": "Encounter", "status": "in-progress",
                                       "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                                 "code": "IMP"},
                                       "subject": {"reference": f"Patient/{pid}"}}).json()
    return pid, enc["id"]


def ours(src: httpx.Client, type_: str, pid: str) -> list[dict[str, Any]]:
    bundle = src.get(f"/{type_}", params={"subject": f"Patient/{pid}"}).json()
    return [e["resource"] for e in bundle.get("entry") or []
            if any(i.get("system") == OURS for i in e["resource"].get("identifier") or [])]


def test_discharge_from_sekmet_notifications_to_write_back(tmp_path: Path, sekmet: Sekmet) -> None:
    sources = [{"name": "sekmet", "base_url": sekmet.base, "kind": "sekmet"}]
    o = Outreach(tmp_path, TOKEN, FHIR_OUTREACH_SOURCES=json.dumps(sources), FHIR_OUTREACH_WRITEBACK_SOURCE="sekmet",
                 FHIR_OUTREACH_HOOK_MASTER_KEY="k" * 40)
    try:
        loaded = o.http.post("/admin/journeys", content=(JOURNEYS / "patient-discharge.yaml").read_text(),
                             params={"activate": "true"}, headers={"Content-Type": "application/yaml"})
        assert loaded.status_code == 201, loaded.text
        sync = o.http.post("/admin/subscriptions/sync")
        assert sync.status_code == 200 and any(a["action"] == "created" for a in sync.json()["actions"]), sync.text
        with httpx.Client(base_url=sekmet.base, timeout=30, headers={"Content-Type": "application/fhir+json"}) as src:
            gp = src.post("/Practitioner", json={"resourceType": "Practitioner", "name": [{"family": "Coord"}]}).json()
            high, enc_high = discharge(src, {"resourceType": "Patient", "name": [{"given": ["Hana"], "family": "Ito"}],
                                             "generalPractitioner": [{"reference": f"Practitioner/{gp['id']}"}]})
            src.post("/Condition", json={
                "resourceType": "Condition", "subject": {"reference": f"Patient/{high}"},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                               "code": "active"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "84114007"}]}})
            low, enc_low = discharge(src, {"resourceType": "Patient", "name": [{"given": ["Leo"], "family": "Ruiz"}]})
            for enc_id in (enc_high, enc_low):
                enc = src.get(f"/Encounter/{enc_id}").json()
                assert src.put(f"/Encounter/{enc_id}", json={**enc, "status": "finished"}).status_code == 200

            [task] = wait_for(lambda: ours(src, "Task", high), timeout=60)
            assert task["owner"]["reference"] == f"Practitioner/{gp['id']}"
            assert task["focus"]["reference"] == f"Encounter/{enc_high}"
            group_ref = task["basedOn"][0]["reference"]
            group = src.get(f"/{group_ref}").json()  # the run, written back; the reference was rewritten
            assert group["resourceType"] == "RequestGroup"
            assert group["instantiatesCanonical"] == ["http://fhir-outreach.org/journeys/patient-discharge|1.0.0"]
            provs = src.get("/Provenance", params={"target": f"Task/{task['id']}"}).json()
            assert provs.get("total", len(provs.get("entry") or [])) == 1

            [msg] = wait_for(lambda: ours(src, "Communication", low), timeout=60)
            assert msg["status"] == "in-progress" and msg["medium"][0]["coding"][0]["code"] == "portal"
            assert ours(src, "Task", low) == [] and ours(src, "Communication", high) == []

        # Locally: the same outcomes, explained; the trigger came from sekmet's notification.
        runs = o.http.get("/admin/runs").json()["runs"]
        assert sorted(r["patient"] for r in runs) == sorted([f"Patient/{high}", f"Patient/{low}"])
        for run in runs:
            why = o.http.get(f"/admin/runs/{run['run']}").json()
            assert why["trigger"]["source"] == "sekmet"
            risk = why["steps"][0]
            assert risk["values"][0]["value"] is (run["patient"] == f"Patient/{high}")
        def written_back() -> list[dict[str, Any]]:
            outbox = o.http.get("/admin/counts").json()["outbox"]
            return outbox if {c["state"] for c in outbox} == {"done"} else []

        outbox = wait_for(written_back, timeout=60)  # some items wait for what they reference, then go
        assert sum(c["count"] for c in outbox) >= 6, outbox
        text = o.http.get(f"/admin/runs/{runs[0]['run']}", params={"format": "text"}).text
        assert "risk (branch)" in text
    finally:
        o.stop()
