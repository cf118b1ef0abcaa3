"""Issue 5 end to end, through real HTTP and real protocol peers: the discharge journey sends its reminders
through a real SMTP server (aiosmtpd) and a Twilio-compatible SMS provider; the patient's YES reply, signed
like Twilio signs it, creates the call Task; an email open (the tracking pixel) ends a run; a Consent that
denies SMS blocks the send with a recorded reason, visible in ``why``; and the care manager's Teams card
button moves an overdue Goal's due date."""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fhir_outreach.channels.optout import opt_out_consent
from tests.channels.sms_peer import SmsPeer
from tests.channels.test_email import Collector, smtp_server
from tests.channels.test_teams import serve
from tests.journeys.conftest import Live, serve_live

SENDER = "+15005550006"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Teams:
    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []

    async def webhook(self, request: Request) -> Response:
        import orjson

        self.posts.append(orjson.loads(await request.body()))
        return Response("1", status_code=200)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/webhook/{name}", self.webhook, methods=["POST"])])


@pytest.fixture(params=["sqlite", "mongo"])
async def world(request: pytest.FixtureRequest, make_settings: Any) -> AsyncIterator[tuple[Live, SmsPeer, Collector,
                                                                                            Teams, str]]:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    collector = Collector()
    teams = Teams()
    with smtp_server(collector) as smtp:
        async with SmsPeer(public_base=public) as peer, serve(teams.app()) as teams_url:
            store = {}
            if request.param == "mongo":
                store = {"store": f"{request.getfixturevalue('mongo_base_url')}/e{uuid.uuid4().hex[:12]}"}
            settings = make_settings(
                base_url=f"{public}/fhir", smtp_host="127.0.0.1", smtp_port=smtp.port, smtp_security="none",
                email_from="care@example.org", sms_provider="twilio", sms_api_url=peer.api_url,
                sms_account_sid=peer.account_sid, sms_auth_token=peer.auth_token, sms_from=SENDER, **store)
            async with serve_live(settings, port=port) as live:
                yield live, peer, collector, teams, teams_url


def patient(pid: str, *telecom: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "name": [{"given": [pid.title()], "family": "Doe"}],
            "telecom": list(telecom), "generalPractitioner": [{"reference": "Practitioner/gp-1"}]}


async def discharge(live: Live, pid: str) -> None:
    enc = {"resourceType": "Encounter", "id": f"enc-{pid}", "status": "in-progress", "class": {"code": "IMP"},
           "subject": {"reference": f"Patient/{pid}"}}
    await live.put(enc)
    await live.put({**enc, "status": "finished"})
    await live.drain()


async def test_discharge_through_real_smtp_and_sms_peers(world: tuple[Live, SmsPeer, Collector, Teams, str]) -> None:
    live, peer, mail, _, _ = world
    await live.load("patient-discharge")
    await live.put({"resourceType": "Practitioner", "id": "gp-1", "name": [{"family": "Grey"}]})
    await live.put(patient("sam", {"system": "phone", "use": "mobile", "value": "(617) 555-0100", "rank": 1}))
    await live.put(patient("eve", {"system": "email", "value": "eve@example.org", "rank": 1}))
    await live.put(patient("den", {"system": "phone", "use": "mobile", "value": "(617) 555-0199", "rank": 1}))
    await live.put(opt_out_consent("Patient/den", "sms", live.clock.now() - 60, "test"))
    for pid in ("sam", "eve", "den"):
        await discharge(live, pid)
    assert peer.messages == [] and mail.received == []  # portal messages first: nothing sent elsewhere yet
    await live.advance(days=2, seconds=1)  # unread: the reminders go out on each patient's channel

    [sms] = peer.messages
    assert sms.to == "+16175550100" and sms.sender == SENDER
    assert sms.body.startswith("Hi Sam, you have new discharge information")
    [email] = mail.received
    assert email["rcpt_tos"] == ["eve@example.org"]
    message = email["message"]
    assert message["Subject"] == "Your discharge information"
    html = message.get_body(preferencelist=("html",)).get_content()
    assert "Your discharge information is ready" in message.get_body(preferencelist=("plain",)).get_content()

    comms = {c["id"]: c for c in await live.search("Communication", _count="100") if c.get("identifier")}
    by_medium = {(c["subject"]["reference"], c["medium"][0]["coding"][0]["code"]): c for c in comms.values()}
    sam_sms = by_medium[("Patient/sam", "sms")]
    assert sam_sms["status"] == "in-progress" and sam_sms["sent"]
    den_sms = by_medium[("Patient/den", "sms")]
    assert den_sms["status"] == "not-done"
    assert den_sms["statusReason"]["coding"][0]["code"] == "opted-out"

    # Sam answers YES, signed the way Twilio signs inbound messages: the call Task appears.
    r = await peer.inbound(live.http, "+16175550100", " yes ", url=f"{live.http.base_url}/channels/sms/inbound")
    assert r.status_code == 200, r.text
    await live.drain()
    replies = [c for c in await live.search("Communication", patient="sam") if c.get("inResponseTo")]
    assert len(replies) == 1 and replies[0]["payload"][0]["contentString"] == " yes ", replies
    [task] = await live.search("Task", patient="sam")
    assert task["status"] == "requested" and task["basedOn"][0]["reference"].startswith("RequestGroup/")

    # Eve opens the email (the tracking pixel): her run ends without an SMS.
    pixel = re.search(r'src="(http://[^"]+/channels/email/open/[^"]+\.gif)"', html)
    assert pixel, html
    path = pixel.group(1).split("/channels/", 1)[1]
    r = await live.http.get(f"/channels/{path}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/gif"
    await live.advance(days=3)
    runs = {r["patient"]: r for r in await live.runs()}
    assert runs["Patient/eve"]["status"] == "completed"
    eve = await live.why(runs["Patient/eve"]["run"])
    assert [s["step"] for s in eve["steps"]][-2:] == ["email-opened", "end"]
    assert len(peer.messages) == 1  # Eve got no SMS; Den's SMS was never sent

    # Every email carries a one-click unsubscribe (RFC 8058); using it records an opt-out Consent for email.
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    unsubscribe = message["List-Unsubscribe"].strip("<>").split("/channels/", 1)[1]
    assert (await live.http.post(f"/channels/{unsubscribe}")).status_code == 200
    [consent] = await live.search("Consent", patient="eve")
    assert consent["provision"]["type"] == "deny"
    assert consent["provision"]["code"][0]["coding"][0]["code"] == "email"
    assert (await live.http.get("/channels/email/unsubscribe/forged.token")).status_code == 400

    # The blocked send is explained where the care team looks.
    den = await live.why(runs["Patient/den"]["run"])
    assert den["delivery"][f"Communication/{den_sms['id']}"].startswith("not-done (opted-out")
    text = (await live.http.get(f"/admin/runs/{runs['Patient/den']['run']}", params={"format": "text"})).text
    assert "not-done (opted-out" in text


async def test_teams_card_button_moves_the_overdue_goal(world: tuple[Live, SmsPeer, Collector, Teams, str]) -> None:
    live, _, _, teams, teams_url = world
    await live.load("overdue-goal-care-manager")
    await live.put({"resourceType": "Practitioner", "id": "gp-1", "name": [{"family": "Grey"}],
                    "telecom": [{"system": "url", "value": f"{teams_url}/webhook/gp-1"}]})
    await live.put(patient("ann"))
    await live.put({"resourceType": "Goal", "id": "g1", "lifecycleStatus": "active",
                    "subject": {"reference": "Patient/ann"}, "description": {"text": "Walk daily"},
                    "target": [{"dueDate": "2026-02-15"}]})
    await live.advance(days=1)
    [post] = teams.posts
    card = post["attachments"][0]["content"]
    actions = {a["title"]: a["url"] for a in card["actions"]}
    assert set(actions) == {"Move the due date 30 days out", "Add a follow-up task"}
    [msg] = [c for c in await live.search("Communication", patient="ann") if c.get("identifier")]
    assert msg["status"] == "completed"  # the webhook accepted it: delivered
    url = actions["Move the due date 30 days out"].split("/channels/", 1)[1]
    r = await live.http.get(f"/channels/{url}")
    assert r.status_code == 200
    await live.drain()
    goal = (await live.http.get("/fhir/Goal/g1")).json()
    assert goal["target"][0]["dueDate"] == "2026-04-01"
    again = await live.http.get(f"/channels/{url}")  # a second click changes nothing
    assert again.status_code == 200
    await live.drain()
    assert (await live.http.get("/fhir/Goal/g1")).json()["meta"]["versionId"] == goal["meta"]["versionId"]
