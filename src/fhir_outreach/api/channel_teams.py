"""Callbacks of the Teams channel: the signed action buttons of an Adaptive Card.

``GET /channels/teams/action/{token}`` is what an ``Action.OpenUrl`` button opens in the clinician's browser:
it records the action as a reply to the card's Communication (``inResponseTo``, the reply text as payload —
the waiting journey branches on it) and answers a small HTML page. ``POST`` does the same for programmatic
callers and answers JSON. No bearer token: the signed token is the credential. A token that does not verify
(tampered, expired, another deployment's key) is refused with 400 and records nothing; the same action
clicked again records nothing new.
"""

from __future__ import annotations

import html
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, Response

from ..channels import signing
from ..channels.engagement import record_reply
from ..channels.teams import action_key
from ..errors import InvalidRequest, NotFound
from .http import fhir_response

router = APIRouter(prefix="/channels/teams")


def _now(request: Request) -> float:
    """The journey engine's clock when there is one (a virtual clock in tests), else the system time."""
    engine = getattr(getattr(request.app.state, "journeys", None), "engine", None)
    clock = getattr(engine, "clock", None)
    return float(clock.now()) if clock is not None else time.time()


async def _act(request: Request, token: str) -> dict[str, Any]:
    try:
        payload = signing.verify(request.app.state.channel_key, token)
    except signing.BadToken as exc:
        raise InvalidRequest(f"invalid or expired action link ({exc})") from exc
    cid, reply = payload.get("c"), payload.get("r")
    if not isinstance(cid, str) or not cid or not isinstance(reply, str):
        raise InvalidRequest("invalid action link")
    store = request.app.state.store
    rid = await record_reply(store, cid, reply, at=_now(request), key=action_key(payload),
                             base_url=request.app.state.settings.fhir_base)
    if rid is None:
        raise NotFound(f"Communication/{cid} no longer exists")
    journeys = getattr(request.app.state, "journeys", None)
    if journeys is not None:
        journeys.wake()
    label = payload.get("l") if isinstance(payload.get("l"), str) else reply
    return {"communication": f"Communication/{cid}", "reply": f"Communication/{rid}", "text": reply, "label": label}


@router.get("/action/{token}")
async def action_page(request: Request, token: str) -> Response:
    done = await _act(request, token)
    label = html.escape(str(done["label"]))
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>Done: {label}</title></head>"
            f"<body><p>Done: {label}</p></body></html>")
    return HTMLResponse(page, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


@router.post("/action/{token}")
async def action_json(request: Request, token: str) -> Response:
    return fhir_response(await _act(request, token), media_type="application/json")
