"""Integration with a real FHIR server: sekmet-fhir as the source, fhir-outreach as a real process.

Provisioning creates the Subscription on sekmet (topic-based, since sekmet declares backport topics; and
classic criteria when forced), sekmet delivers real notifications to our hook over HTTP, and the
in-process worker turns them into normalised events. Health checks bring an ``error`` Subscription back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import Outreach, Sekmet, wait_for

pytestmark = pytest.mark.slow
TOKEN = "integration-token-0123456789"
JOURNEY = {"resourceType": "PlanDefinition", "status": "active", "url": "http://example.org/journey/discharge",
           "version": "1", "name": "Discharge", "type": {"coding": [{"code": "workflow-definition"}]},
           "action": [{"title": "start", "trigger": [{"type": "named-event", "name": "encounter-discharged"}]}]}


@pytest.fixture(scope="module")
def sekmet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sekmet]:
    server = Sekmet(tmp_path_factory.mktemp("sekmet"))
    yield server
    server.stop()


def outreach(tmp: Path, sekmet: Sekmet, mode: str) -> Outreach:
    sources = [{"name": "sekmet", "base_url": sekmet.base, "kind": "sekmet", "subscription_mode": mode}]
    return Outreach(tmp, TOKEN, FHIR_OUTREACH_SOURCES=json.dumps(sources),
                    FHIR_OUTREACH_HEALTH_INTERVAL_SECONDS="1", FHIR_OUTREACH_HOOK_MASTER_KEY="k" * 40)


def sekmet_client(sekmet: Sekmet) -> httpx.Client:
    return httpx.Client(base_url=sekmet.base, timeout=30, headers={"Content-Type": "application/fhir+json"})


def events(o: Outreach) -> list[dict[str, Any]]:
    resp = o.http.get("/admin/events", params={"source": "sekmet", "limit": "200"})
    assert resp.status_code == 200, resp.text
    return resp.json()["events"]  # type: ignore[no-any-return]


def discharge_cycle(src: httpx.Client) -> tuple[str, str]:
    patient = src.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "Tui"}]}).json()
    enc = src.post("/Encounter", json={"resourceType": "Encounter", "status": "in-progress",
                                       "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                                 "code": "IMP"},
                                       "subject": {"reference": f"Patient/{patient['id']}"}}).json()
    done = src.put(f"/Encounter/{enc['id']}", json={**enc, "status": "finished"})
    assert done.status_code == 200, done.text
    return patient["id"], enc["id"]


@pytest.mark.parametrize("mode", ["topic", "classic"])
def test_provisioning_and_real_notifications(tmp_path: Path, sekmet: Sekmet, mode: str) -> None:
    o = outreach(tmp_path, sekmet, mode)
    try:
        assert o.http.post("/fhir/PlanDefinition", json=JOURNEY).status_code == 201
        sync = o.cli("subscriptions", "sync")
        assert sync.returncode == 0, sync.stdout + sync.stderr
        assert "encounter-discharged" in sync.stdout and "created" in sync.stdout and mode in sync.stdout
        [hook] = o.http.get("/admin/hooks").json()["hooks"]
        assert hook["mode"] == mode and hook["remote_id"]
        with sekmet_client(sekmet) as src:
            subs = src.get("/Subscription", params={"url": hook["endpoint"]}).json()
            assert subs["total"] == 1
            wait_for(lambda: src.get(f"/Subscription/{hook['remote_id']}").json()["status"] == "active")

            patient_id, enc_id = discharge_cycle(src)
            got = wait_for(lambda: [e for e in events(o) if e["focus"] == f"Encounter/{enc_id}"], timeout=30)
            assert len(got) == 1, got
            event = got[0]
            assert event["interaction"] in ("update", "create") and event["patient"] == f"Patient/{patient_id}"
            assert event["shape"] == ("r4-backport" if mode == "topic" else "r4-classic")
            full = o.http.get(f"/admin/events/{event['key']}").json()
            assert full["resource"]["status"] == "finished"

            again = o.cli("subscriptions", "sync")  # idempotent: found by endpoint, kept
            assert again.returncode == 0 and "kept" in again.stdout, again.stdout
            assert src.get("/Subscription", params={"url": hook["endpoint"]}).json()["total"] == 1

            # The source turns the Subscription off: the health check puts it back to requested.
            sub = src.get(f"/Subscription/{hook['remote_id']}").json()
            sub = {k: v for k, v in sub.items() if k != "meta"}
            assert src.put(f"/Subscription/{hook['remote_id']}", json={**sub, "status": "error",
                                                                       "error": "test outage"}).status_code == 200
            wait_for(lambda: any(a["action"] == "reactivated" for a in o.http.get("/admin/audit").json()["audit"]))
            wait_for(lambda: src.get(f"/Subscription/{hook['remote_id']}").json()["status"] == "active")
        counts = o.http.get("/admin/counts").json()
        assert any(c["state"] == "done" and c["count"] >= 1 for c in counts["inbox"])
        ls = o.cli("inbox", "ls")
        assert ls.returncode == 0 and "sekmet" in ls.stdout
    finally:
        o.stop()
