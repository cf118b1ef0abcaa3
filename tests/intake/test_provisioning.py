"""Provisioning decisions that need no source Subscription API: Azure (Event Grid) sources, periodic
triggers and triggers that match no shipped topic. (Topic and classic provisioning against a real server
are in test_sekmet_integration.)"""

from __future__ import annotations

from fhir_outreach.intake.provisioning import Provisioner, needed_triggers
from fhir_outreach.intake.topics import load_topics
from fhir_outreach.sources import SourceConfig
from tests.intake.conftest import Env


def journey(url: str, *triggers: dict[str, object]) -> dict[str, object]:
    return {"resourceType": "PlanDefinition", "status": "active", "url": url, "version": "1",
            "action": [{"title": "start", "trigger": list(triggers)}]}


async def test_azure_periodic_and_unknown_triggers(env: Env) -> None:
    for body in (journey("http://ex.org/j/discharge", {"type": "named-event", "name": "encounter-discharged"}),
                 journey("http://ex.org/j/goal", {"type": "named-event", "name": "careplan-goal-overdue"}),
                 journey("http://ex.org/j/obs", {"type": "data-modified", "data": [{"type": "Observation"}]}),
                 journey("http://ex.org/j/x", {"type": "named-event", "name": "no-such-topic"})):
        assert (await env.client.post("/fhir/PlanDefinition", json=body)).status_code == 201
    retired = {**journey("http://ex.org/j/old", {"type": "named-event", "name": "patient-arrived"}),
               "status": "retired"}
    assert (await env.client.post("/fhir/PlanDefinition", json=retired)).status_code == 201

    needs, unknown = await needed_triggers(env.store, load_topics())
    assert [n.name for n in needs] == ["careplan-goal-overdue", "encounter-discharged",
                                       "observation-created-or-updated"]  # the retired journey is ignored
    assert unknown == ["http://ex.org/j/x|1: named-event no-such-topic"]

    azure = SourceConfig(name="ahds", base_url="https://ws-fhir.fhir.azurehealthcareapis.com", kind="azure")
    intake = env.intake
    actions = await Provisioner(env.store, intake.hooks, intake.sources).sync([azure])
    by_trigger = {a.trigger: a for a in actions}
    assert by_trigger["careplan-goal-overdue"].action == "periodic"
    discharge = by_trigger["encounter-discharged"]
    assert (discharge.action, discharge.mode) == ("hook-only", "eventgrid")
    assert discharge.endpoint and "Event Grid subscription" in discharge.detail
    hooks = {h.trigger: h for h in await intake.hooks.all()}
    assert hooks["encounter-discharged"].mode == "eventgrid" and hooks["encounter-discharged"].source == "ahds"
    assert hooks["encounter-discharged"].resource_type == "Encounter"
    again = await Provisioner(env.store, intake.hooks, intake.sources).sync([azure])  # idempotent
    assert [a.action for a in again] == [a.action for a in actions]
    assert len(await intake.hooks.all()) == len(hooks)
