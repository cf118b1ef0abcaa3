"""Transient faults answer 5xx (with Retry-After), never 4xx: Event Grid drops 4xx deliveries for good."""

from __future__ import annotations

from tests.intake.conftest import Env


async def test_store_outage_answers_503_not_4xx(env: Env) -> None:
    hook = await env.hook(mode="classic")
    await env.hooks.put(f"/hooks/{hook['key']}/Encounter/warm", json={"resourceType": "Encounter", "id": "warm",
                                                                     "status": "planned", "class": {"code": "AMB"}},
                        headers={"Authorization": f"Bearer {hook['secret']}"})  # the hook is cached now
    await env.store.close()  # the store goes away
    try:
        resp = await env.hooks.put(f"/hooks/{hook['key']}/Encounter/e1",
                                   json={"resourceType": "Encounter", "id": "e1", "status": "finished",
                                         "class": {"code": "IMP"}},
                                   headers={"Authorization": f"Bearer {hook['secret']}"})
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"] == "5"
        assert resp.json()["issue"][0]["code"] == "transient"
    finally:
        await env.store.open()  # so that the fixture can close it
