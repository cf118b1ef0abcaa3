"""Provisioning: create or reconcile, on each source server, the Subscriptions the installed journeys need.

Triggers come from the active journeys (PlanDefinition ``action.trigger``): a ``named-event`` names a
shipped topic (``subscriptions/topics``), a ``data-added``/``data-modified`` trigger on a type maps to that
type's generic created-or-updated topic. Per source we read its CapabilityStatement: a server that
declares the Subscriptions Backport profile or topic canonicals gets topic-based Subscriptions (our
topic is written to it as a ``Basic`` when it does not know it yet); any other server gets classic R4
criteria (``Type?query``) with a payload. Azure sources have no Subscriptions: we create the hook and
say how to point an Event Grid subscription at it.

Every Subscription is created ``requested`` with an ``end``, a fresh secret header and server-specific
extensions (HAPI retry count and delete messages; Medplum secret and interactions), at an endpoint whose
key is derived from (source, trigger), so a second run finds it by ``Subscription?url=`` and keeps it:
sync is idempotent. Periodic triggers (a due date passing) need no Subscription.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ..fhir.client import FhirClient, SourceError
from ..fhir.search import parse_query
from ..sources import SourceConfig
from ..store import Store
from .hooks import Hook, HookRegistry
from .topics import Topic, load_topics

log = logging.getLogger("fhir_outreach.provisioning")

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
TOPIC_CANONICAL_EXT = f"{BACKPORT}/capabilitystatement-subscriptiontopic-canonical"
HAPI = "http://hapifhir.io/fhir/StructureDefinition"
MEDPLUM = "https://medplum.com/fhir/StructureDefinition"
HEARTBEAT_SECONDS = 600


@dataclass
class Need:
    """One trigger the journeys need, resolved to a shipped topic."""

    name: str
    topic: Topic
    journeys: list[str]


@dataclass
class Action:
    source: str
    trigger: str
    action: str  # created | kept | reactivated | updated | hook-only | periodic | failed
    mode: str
    remote_id: str | None = None
    endpoint: str | None = None
    detail: str = ""


def _journey_triggers(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    stack = list(plan.get("action") or [])
    while stack:
        action = stack.pop()
        out += [t for t in action.get("trigger") or [] if isinstance(t, dict)]
        stack += action.get("action") or []
    return out


def resolve_trigger(trigger: dict[str, Any], topics: dict[str, Topic]) -> Topic | None:
    """The shipped topic for a TriggerDefinition, or None when it names nothing we ship."""
    if trigger.get("type") == "named-event":
        name = str(trigger.get("name") or "")
        by_canonical = {t.canonical: t for t in topics.values()}
        return topics.get(name) or by_canonical.get(name.split("|")[0])
    if trigger.get("type") in ("data-added", "data-modified", "data-changed"):
        data = trigger.get("data") or []
        rtype = data[0].get("type") if data and isinstance(data[0], dict) else None
        return topics.get(f"{str(rtype).lower()}-created-or-updated") if rtype else None
    return None


async def needed_triggers(store: Store, topics: dict[str, Topic]) -> tuple[list[Need], list[str]]:
    """Triggers of the active journeys in the local store, and the triggers that match no topic."""
    query = parse_query("PlanDefinition", [("status", "active")], max_count=1000)
    query.count = 1000
    needs: dict[str, Need] = {}
    unknown: list[str] = []
    for stored in (await store.search(query)).resources:
        plan = stored.resource or {}
        label = f"{plan.get('url', 'PlanDefinition/' + stored.id)}|{plan.get('version', '')}"
        for trigger in _journey_triggers(plan):
            topic = resolve_trigger(trigger, topics)
            if topic is None:
                unknown.append(f"{label}: {trigger.get('type')} {trigger.get('name') or ''}".strip())
                continue
            needs.setdefault(topic.name, Need(topic.name, topic, [])).journeys.append(label)
    return sorted(needs.values(), key=lambda n: n.name), unknown


@dataclass
class Capabilities:
    backport: bool
    topics: set[str]


async def discover(client: FhirClient) -> Capabilities:
    cap = await client.get_json("metadata")
    topics: set[str] = set()
    backport = False
    for rest in cap.get("rest") or []:
        for res in rest.get("resource") or []:
            if res.get("type") != "Subscription":
                continue
            profiles = (res.get("supportedProfile") or []) + ([res["profile"]] if res.get("profile") else [])
            backport = backport or any("backport-subscription" in str(p) for p in profiles)
            for ext in res.get("extension") or []:
                if ext.get("url") == TOPIC_CANONICAL_EXT and ext.get("valueCanonical"):
                    topics.add(str(ext["valueCanonical"]).split("|")[0])
    for ext in cap.get("extension") or []:
        if ext.get("url") == TOPIC_CANONICAL_EXT and ext.get("valueCanonical"):
            topics.add(str(ext["valueCanonical"]).split("|")[0])
    backport = backport or bool(topics) or any("subscriptions-backport" in str(i) for i in
                                               (cap.get("instantiates") or []) + (cap.get("implementationGuide") or []))
    return Capabilities(backport, topics)


class Provisioner:
    def __init__(self, store: Store, registry: HookRegistry, clients: Any) -> None:
        self.store = store
        self.registry = registry
        self.clients = clients

    async def sync(self, sources: list[SourceConfig], *, topics: dict[str, Topic] | None = None) -> list[Action]:
        topics = topics or load_topics()
        needs, unknown = await needed_triggers(self.store, topics)
        for text in unknown:
            log.warning("journey trigger matches no shipped topic and is not provisioned: %s", text)
        actions: list[Action] = []
        for cfg in sources:
            caps: Capabilities | None = None
            for need in needs:
                try:
                    if need.topic.periodic:
                        actions.append(Action(cfg.name, need.name, "periodic", "scan",
                                              detail="evaluated by a periodic scan; no Subscription needed"))
                        continue
                    if cfg.kind == "azure":
                        actions.append(await self._azure(cfg, need))
                        continue
                    if caps is None:
                        caps = await discover(self.clients.get(cfg.name))
                        if cfg.subscription_mode != "auto":
                            caps.backport = cfg.subscription_mode == "topic"
                    actions.append(await self._one(cfg, need, caps))
                except SourceError as exc:
                    actions.append(Action(cfg.name, need.name, "failed", "-", detail=exc.diagnostics))
        return actions

    async def _hook(self, cfg: SourceConfig, need: Need, **fields: Any) -> Hook:
        key = self.registry.stable_key(cfg.name, need.name)
        rec = await self.store.get_record("hook", key)
        if rec is None:
            hook, _ = await self.registry.create(Hook(key=key, source=cfg.name, trigger=need.name, **fields))
            return hook

        def change(h: Hook) -> None:
            for name, value in fields.items():
                setattr(h, name, value)
        return await self.registry.update(key, change)

    async def _azure(self, cfg: SourceConfig, need: Need) -> Action:
        hook = await self._hook(cfg, need, mode="eventgrid", resource_type=need.topic.resource)
        endpoint = f"{self.registry.endpoint(hook.key)}?secret=<hook secret>"
        return Action(cfg.name, need.name, "hook-only", "eventgrid", endpoint=self.registry.endpoint(hook.key),
                      detail=f"create an Event Grid subscription (FhirResourceCreated/Updated/Deleted, "
                             f"{need.topic.resource}) with the webhook endpoint {endpoint}")

    def _subscription(self, cfg: SourceConfig, need: Need, key: str, caps: Capabilities) -> dict[str, Any]:
        secret = self.registry.secret_for(key)
        end = (datetime.now(UTC) + timedelta(days=cfg.subscription_days)).isoformat(timespec="seconds")
        channel: dict[str, Any] = {"type": "rest-hook", "endpoint": self.registry.endpoint(key),
                                   "payload": "application/fhir+json", "header": [f"Authorization: Bearer {secret}"]}
        sub: dict[str, Any] = {"resourceType": "Subscription", "status": "requested", "end": end.replace("+00:00", "Z"),
                               "reason": f"fhir-outreach journeys: {need.topic.title}", "channel": channel}
        if caps.backport:
            sub["meta"] = {"profile": [f"{BACKPORT}/backport-subscription"]}
            sub["criteria"] = need.topic.canonical
            channel["extension"] = [{"url": f"{BACKPORT}/backport-heartbeat-period",
                                     "valueUnsignedInt": HEARTBEAT_SECONDS}]
            channel["_payload"] = {"extension": [{"url": f"{BACKPORT}/backport-payload-content",
                                                  "valueCode": "full-resource"}]}
        else:
            query = need.topic.query_current
            sub["criteria"] = f"{need.topic.resource}?{query}" if query else need.topic.resource
        if cfg.kind == "hapi":
            channel.setdefault("extension", []).extend([
                {"url": f"{HAPI}/subscription-delivery-retry-count", "valueInteger": 10},
                {"url": f"{HAPI}/subscription-send-delete-messages", "valueBoolean": True}])
        elif cfg.kind == "medplum":
            sub["extension"] = [{"url": f"{MEDPLUM}/subscription-secret", "valueString": secret},
                                {"url": f"{MEDPLUM}/subscription-max-attempts", "valueInteger": 18}] + [
                {"url": f"{MEDPLUM}/subscription-supported-interaction", "valueCode": i}
                for i in need.topic.interactions]
        return sub

    async def _ensure_topic(self, client: FhirClient, need: Need, caps: Capabilities) -> None:
        if need.topic.canonical in caps.topics:
            return
        basic = dict(need.topic.basic)
        basic.setdefault("id", f"outreach-{need.name}")
        await client.update(basic)
        caps.topics.add(need.topic.canonical)

    async def _one(self, cfg: SourceConfig, need: Need, caps: Capabilities) -> Action:
        client = self.clients.get(cfg.name)
        key = self.registry.stable_key(cfg.name, need.name)
        if caps.backport:
            await self._ensure_topic(client, need, caps)
        wanted = self._subscription(cfg, need, key, caps)
        mode = "topic" if caps.backport else "classic"
        endpoint = wanted["channel"]["endpoint"]
        existing = await client.search("Subscription", [("url", endpoint)], limit=5)
        action = "created"
        if existing:
            sub = existing[0]
            remote_id = str(sub["id"])
            if sub.get("criteria") != wanted["criteria"] or sub.get("status") in ("error", "off"):
                action = "reactivated" if sub.get("criteria") == wanted["criteria"] else "updated"
                await client.update({**wanted, "id": remote_id})
            else:
                action = "kept"
        else:
            created = await client.create(wanted)
            remote_id = str(created.get("id"))
        await self._hook(cfg, need, mode=mode, criteria=None if caps.backport else wanted["criteria"],
                         topic=need.topic.canonical if caps.backport else None, resource_type=need.topic.resource,
                         payload="full-resource", remote_id=remote_id,
                         heartbeat_period=HEARTBEAT_SECONDS if caps.backport else None)
        return Action(cfg.name, need.name, action, mode, remote_id, endpoint)
