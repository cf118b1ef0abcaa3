"""The Teams channel against real peers: a local HTTP receiver playing the Teams webhook (records the posted
cards, answers what the test says) and the whole app served by uvicorn, whose signed action links are opened
over real HTTP like a browser would — each creates the reply Communication (and its journey event) once.
The last test runs the overdue-goal sample journey: the care manager's UPDATE button moves the Goal."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fhir_outreach.api import channel_teams
from fhir_outreach.app import create_app
from fhir_outreach.channels import signing
from fhir_outreach.channels.base import Action, DeliveryFailed, Outbound, Sent
from fhir_outreach.channels.teams import CARD_CONTENT_TYPE, TeamsChannel, action_links, card
from fhir_outreach.intake.processor import EVENT
from fhir_outreach.work.clock import ManualClock
from tests.conftest import TOKEN
from tests.journeys.conftest import JOURNEYS, Live

ACTIONS = {"Update due date": "UPDATE", "Add follow-up task": "TASK"}


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """``app`` on 127.0.0.1 on a free port (uvicorn, lifespan on); yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


class TeamsPeer:
    """Plays a Teams incoming webhook / Workflows URL: records every posted message and answers
    ``self.answer`` (status, body, headers)."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.answer: tuple[int, str, dict[str, str]] = (202, "", {})
        self.url = ""

    async def webhook(self, request: Request) -> Response:
        self.posts.append({"path": request.url.path, "headers": dict(request.headers),
                           "json": orjson.loads(await request.body())})
        status, body, headers = self.answer
        return Response(body, status_code=status, headers=headers, media_type="text/plain")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/webhook/{name}", self.webhook, methods=["POST"])])


@pytest.fixture
async def peer() -> AsyncIterator[TeamsPeer]:
    p = TeamsPeer()
    async with serve(p.app()) as url:
        p.url = url
        yield p


def with_routes(app: Any) -> Any:
    if not any(getattr(r, "path", "").startswith("/channels/teams/") for r in app.routes):
        app.include_router(channel_teams.router)
    return app


@pytest.fixture(params=["sqlite", "mongo"])
async def live(request: pytest.FixtureRequest, make_settings: Any) -> AsyncIterator[Live]:
    """The app on a real socket, journeys on a manual clock drained by the test (as in tests/journeys)."""
    if request.param == "mongo":
        settings = make_settings(store=f"{request.getfixturevalue('mongo_base_url')}/t{uuid.uuid4().hex[:12]}")
    else:
        settings = make_settings()
    clock = ManualClock(1_772_352_000.0)  # 2026-03-01T08:00:00Z
    app = with_routes(create_app(settings, run_background=False, clock=clock))
    async with serve(app) as url, httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http:
        yield Live(app, http, clock)


async def replies_to(live: Live, cid: str) -> list[dict[str, Any]]:
    found = await live.search("Communication", subject="Patient/p1")
    return [c for c in found if c.get("inResponseTo") == [{"reference": f"Communication/{cid}"}]]


async def events_for(live: Live, focus: str) -> list[Any]:
    return [r for r in await live.app.state.store.list_records(EVENT, limit=1000) if r.data.get("focus") == focus]


async def card_comm(live: Live, cid: str = "c1") -> None:
    await live.put({"resourceType": "Patient", "id": "p1", "name": [{"given": ["Ann"], "family": "Doe"}]})
    await live.put({"resourceType": "Practitioner", "id": "gp-1", "name": [{"family": "Grey"}]})
    await live.put({"resourceType": "Communication", "id": cid, "status": "in-progress",
                    "subject": {"reference": "Patient/p1"}, "recipient": [{"reference": "Practitioner/gp-1"}],
                    "medium": [{"coding": [{"system": "http://fhir-outreach.org/CodeSystem/channel",
                                            "code": "teams"}]}],
                    "payload": [{"contentString": "Goal overdue for Ann Doe. Reply UPDATE or TASK."}]})


def outbound(peer: TeamsPeer, actions: tuple[Action, ...] = (), cid: str = "c1", **kw: Any) -> Outbound:
    values: dict[str, Any] = {"communication": f"Communication/{cid}", "channel": "teams",
                              "to": f"{peer.url}/webhook/gp-1", "text": "Goal overdue for Ann Doe: walk daily.",
                              "subject": "Goal overdue", "actions": actions, "idempotency_key": cid}
    values.update(kw)
    return Outbound(**values)


async def test_card_is_posted_and_each_action_replies_exactly_once(live: Live, peer: TeamsPeer) -> None:
    await card_comm(live)
    base = str(live.http.base_url).rstrip("/")
    links = action_links(live.app.state.channel_key, "Communication/c1", base, ACTIONS)
    channel = TeamsChannel()
    try:
        sent = await channel.send(outbound(peer, links))
    finally:
        await channel.aclose()
    assert sent == Sent(provider_id="c1", delivered=True)

    [post] = peer.posts
    assert post["path"] == "/webhook/gp-1"
    assert post["headers"]["content-type"] == "application/json"
    message = post["json"]
    assert message["type"] == "message"
    [attachment] = message["attachments"]
    assert attachment["contentType"] == CARD_CONTENT_TYPE == "application/vnd.microsoft.card.adaptive"
    assert attachment["contentUrl"] is None
    content = attachment["content"]
    assert content["type"] == "AdaptiveCard"
    assert tuple(map(int, content["version"].split("."))) <= (1, 4)
    assert content["body"][0] == {"type": "TextBlock", "text": "Goal overdue", "weight": "Bolder",
                                  "size": "Medium", "wrap": True}
    assert content["body"][1] == {"type": "TextBlock", "text": "Goal overdue for Ann Doe: walk daily.", "wrap": True}
    assert [a["type"] for a in content["actions"]] == ["Action.OpenUrl", "Action.OpenUrl"]
    assert [a["title"] for a in content["actions"]] == list(ACTIONS)
    urls = {a["title"]: a["url"] for a in content["actions"]}
    assert all(u.startswith(f"{base}/channels/teams/action/") for u in urls.values())

    async with httpx.AsyncClient(timeout=30) as browser:  # no bearer token: the link is the credential
        first = await browser.get(urls["Update due date"])
        assert first.status_code == 200, first.text
        assert first.headers["content-type"].startswith("text/html")
        assert "Done: Update due date" in first.text
        [reply] = await replies_to(live, "c1")
        assert reply["status"] == "completed"
        assert reply["payload"] == [{"contentString": "UPDATE"}]
        assert reply["sender"] == {"reference": "Practitioner/gp-1"}
        assert reply["subject"] == {"reference": "Patient/p1"}
        assert len(await events_for(live, f"Communication/{reply['id']}")) == 1

        again = await browser.get(urls["Update due date"])  # a second click changes nothing
        assert again.status_code == 200 and "Done: Update due date" in again.text
        assert [r["id"] for r in await replies_to(live, "c1")] == [reply["id"]]
        assert len(await events_for(live, f"Communication/{reply['id']}")) == 1

        posted = await browser.post(urls["Add follow-up task"])  # programmatic callers POST and get JSON
        assert posted.status_code == 200, posted.text
        body = posted.json()
        assert body["communication"] == "Communication/c1" and body["text"] == "TASK"
        assert body["label"] == "Add follow-up task"
        assert (await browser.post(urls["Add follow-up task"])).json()["reply"] == body["reply"]
    replies = await replies_to(live, "c1")
    assert sorted(r["payload"][0]["contentString"] for r in replies) == ["TASK", "UPDATE"]
    assert len(await events_for(live, body["reply"])) == 1
    original = (await live.http.get("/fhir/Communication/c1")).json()
    assert original["status"] == "completed" and original.get("received")  # a reply shows it was read


def _tampered(token: str) -> str:
    raw, mac = token.split(".", 1)
    payload = orjson.loads(signing._unb64(raw))
    payload["r"] = "TASK"
    return f"{signing._b64(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))}.{mac}"


async def test_tampered_expired_and_foreign_tokens_are_refused_and_record_nothing(live: Live) -> None:
    await card_comm(live)
    key = live.app.state.channel_key
    [good] = action_links(key, "c1", "http://x", {"Update": "UPDATE"})
    token = good.url.rsplit("/", 1)[1]
    bad = {
        "tampered payload": _tampered(token),
        "tampered signature": token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB"),
        "expired": signing.sign(key, {"c": "c1", "r": "UPDATE", "l": "Update"}, ttl_seconds=-60),
        "another key": signing.sign(signing.derive_key(b"another deployment's master key"),
                                    {"c": "c1", "r": "UPDATE", "l": "Update"}, ttl_seconds=3600),
        "garbage": "not-a-token",
    }
    events_before = len(await live.app.state.store.list_records(EVENT, limit=1000))
    async with httpx.AsyncClient(base_url=str(live.http.base_url), timeout=30) as browser:
        for name, t in bad.items():
            for method in ("GET", "POST"):
                r = await browser.request(method, f"/channels/teams/action/{t}")
                assert r.status_code == 400, (name, method, r.text)
                outcome = r.json()
                assert outcome["resourceType"] == "OperationOutcome", name
                assert outcome["issue"][0]["code"] == "invalid"
        assert await replies_to(live, "c1") == []
        assert len(await live.app.state.store.list_records(EVENT, limit=1000)) == events_before
        # the untampered token still works: the refusals were about the tokens, not the route
        assert (await browser.get(f"/channels/teams/action/{token}")).status_code == 200
        [missing] = action_links(key, "Communication/nope", "http://x", {"Update": "UPDATE"})
        r = await browser.get("/channels/teams/action/" + missing.url.rsplit("/", 1)[1])
        assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"
    assert len(await replies_to(live, "c1")) == 1


@pytest.mark.parametrize(("status", "body", "headers", "permanent", "retry_after"), [
    (429, "Too many requests", {"Retry-After": "7"}, False, 7.0),
    (500, "Internal error", {}, False, None),
    (503, "Unavailable", {}, False, None),
    (400, "Bad payload: card is malformed", {}, True, None),
    (404, "Webhook not found", {}, True, None),
    # a legacy connector's throttling answer: 200 with the error in the body
    (200, "Microsoft Teams endpoint returned HTTP error 429 with ContextId ...", {}, False, None),
])
async def test_webhook_answers_map_to_transient_or_permanent(peer: TeamsPeer, status: int, body: str,
                                                             headers: dict[str, str], permanent: bool,
                                                             retry_after: float | None) -> None:
    peer.answer = (status, body, headers)
    channel = TeamsChannel()
    try:
        with pytest.raises(DeliveryFailed) as info:
            await channel.send(outbound(peer))
    finally:
        await channel.aclose()
    assert info.value.permanent is permanent
    assert info.value.retry_after == retry_after
    assert len(peer.posts) == 1


@pytest.mark.parametrize(("status", "body"), [(200, "1"), (202, ""), (200, "")])
async def test_webhook_success_answers(peer: TeamsPeer, status: int, body: str) -> None:
    peer.answer = (status, body, {})
    channel = TeamsChannel()
    try:
        sent = await channel.send(outbound(peer, idempotency_key="key-9"))
    finally:
        await channel.aclose()
    assert sent == Sent(provider_id="key-9", delivered=True)


async def test_unusable_addresses_and_oversized_cards(peer: TeamsPeer) -> None:
    channel = TeamsChannel()
    try:
        with pytest.raises(DeliveryFailed) as info:
            await channel.send(outbound(peer, to="gp@example.org"))
        assert info.value.permanent and info.value.code == "no-address"
        with pytest.raises(DeliveryFailed) as info:
            await channel.send(outbound(peer, text="x" * 40_000))
        assert info.value.permanent and info.value.code == "too-large"
        assert peer.posts == []
        with pytest.raises(DeliveryFailed) as info:  # nothing listens there: worth retrying later
            await channel.send(outbound(peer, to="http://127.0.0.1:9/webhook"))
        assert not info.value.permanent and info.value.code == "network"
    finally:
        await channel.aclose()


def test_card_without_subject_or_actions() -> None:
    content = card(Outbound(communication="Communication/c", channel="teams", to="https://x", text="Hello"))
    assert content["body"] == [{"type": "TextBlock", "text": "Hello", "wrap": True}]
    assert "actions" not in content


async def test_overdue_goal_journey_update_button_moves_the_goal(live: Live, peer: TeamsPeer) -> None:
    """The sample journey end to end: its Teams message goes out as a card; the care manager's UPDATE
    button, opened in a browser, is the reply the waiting run branches on, and the Goal's due date moves."""
    await live.load("overdue-goal-care-manager")
    assert (JOURNEYS / "overdue-goal-care-manager.yaml").exists()
    await live.put({"resourceType": "Practitioner", "id": "gp-1", "name": [{"family": "Grey"}]})
    await live.put({"resourceType": "Patient", "id": "ann", "name": [{"given": ["Ann"], "family": "Doe"}],
                    "generalPractitioner": [{"reference": "Practitioner/gp-1"}]})
    await live.put({"resourceType": "Goal", "id": "g-ann", "lifecycleStatus": "active",
                    "subject": {"reference": "Patient/ann"}, "description": {"text": "Walk 30 minutes a day"},
                    "target": [{"dueDate": "2026-02-15"}]})
    await live.drain()
    await live.advance(days=1)
    [msg] = [c for c in await live.search("Communication", patient="ann") if not c.get("inResponseTo")]
    assert msg["medium"][0]["coding"][0]["code"] == "teams"
    base = str(live.http.base_url).rstrip("/")
    links = action_links(live.app.state.channel_key, msg["id"], base, ACTIONS)
    channel = TeamsChannel()
    try:
        await channel.send(outbound(peer, links, cid=msg["id"], text=msg["payload"][0]["contentString"]))
    finally:
        await channel.aclose()
    [post] = peer.posts
    urls = {a["title"]: a["url"] for a in post["json"]["attachments"][0]["content"]["actions"]}
    async with httpx.AsyncClient(timeout=30) as browser:
        r = await browser.get(urls["Update due date"])
        assert r.status_code == 200, r.text
        await live.drain()
        goal = (await live.http.get("/fhir/Goal/g-ann")).json()
        assert goal["target"][0]["dueDate"] == "2026-04-01"  # 30 days from 2026-03-02
        assert goal["meta"]["versionId"] == "2"
        assert (await browser.get(urls["Update due date"])).status_code == 200  # clicked twice
    await live.drain()
    assert (await live.http.get("/fhir/Goal/g-ann")).json()["meta"]["versionId"] == "2"
    tasks = await live.search("Task", patient="ann")
    assert tasks == []  # the TASK arm did not run
