"""Microsoft Teams: a message to a clinician or care manager as an Adaptive Card posted to an incoming webhook
or a Workflows ("When a Teams webhook request is received") URL, with action buttons that come back to us.

Wire format (Microsoft Teams docs, "Send Adaptive Cards using an Incoming Webhook", connectors-using.md in
MicrosoftDocs/msteams-docs): the body is ``{"type": "message", "attachments": [{"contentType":
"application/vnd.microsoft.card.adaptive", "contentUrl": null, "content": <AdaptiveCard>}]}``; of the card
actions, incoming webhooks support ``Action.OpenUrl``, ``Action.ShowCard`` and ``Action.ToggleVisibility`` but
not ``Action.Submit`` — so every button here is an ``Action.OpenUrl`` to a signed callback URL
(``api/channel_teams.py``). Workflows accept Adaptive Cards only (no legacy MessageCard) and answer
``202 Accepted``; legacy connectors answer ``200`` with the body ``1``, and when throttled (4 requests per
second per webhook) may answer ``200`` with a body naming "HTTP error 429" instead of a real 429, which is
treated as transient here. Messages over 28 KB are refused by Teams, so we refuse them first. The card stays
at version 1.4: 1.5 (Universal Actions) is not rendered by older clients.
"""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import orjson

from . import signing
from .base import Action, DeliveryFailed, Outbound, Sent, http_failure

CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
CARD_VERSION = "1.4"
ACTION_TTL_SECONDS = 14 * 24 * 3600
ACTION_PATH = "/channels/teams/action/"
MAX_MESSAGE_BYTES = 28 * 1024


def _bare(communication: str) -> str:
    return communication.removeprefix("Communication/")


def action_links(key: bytes, communication_id: str, callback_base: str, actions: dict[str, str], *,
                 ttl_seconds: float = ACTION_TTL_SECONDS) -> tuple[Action, ...]:
    """One signed button per ``label -> reply text``: ``{callback_base}/channels/teams/action/{token}``.

    Opening the link records ``reply text`` as a reply to the Communication (so the waiting journey branches
    on it). The token carries the Communication id (``c``), the reply (``r``), the label (``l``, for the
    confirmation page) and an expiry."""
    cid = _bare(communication_id)
    base = callback_base.rstrip("/")
    return tuple(Action(label, base + ACTION_PATH + signing.sign(key, {"c": cid, "r": reply, "l": label},
                                                                  ttl_seconds=ttl_seconds))
                 for label, reply in actions.items())


def action_key(payload: dict[str, Any]) -> str:
    """The idempotency key of one action: the same button clicked twice (or the same action on a card that was
    posted twice after a retry, whose tokens differ in expiry) records one reply."""
    digest = hashlib.sha256(f"{payload.get('c')}\n{payload.get('r')}".encode()).hexdigest()
    return f"teams|{digest}"


def card(message: Outbound) -> dict[str, Any]:
    """The Adaptive Card: a bold title, the body text, and one ``Action.OpenUrl`` per action."""
    body: list[dict[str, Any]] = []
    if message.subject:
        body.append({"type": "TextBlock", "text": message.subject, "weight": "Bolder", "size": "Medium",
                     "wrap": True})
    body.append({"type": "TextBlock", "text": message.text, "wrap": True})
    content: dict[str, Any] = {"$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                               "type": "AdaptiveCard", "version": CARD_VERSION, "body": body}
    if message.actions:
        content["actions"] = [{"type": "Action.OpenUrl", "title": a.label, "url": a.url} for a in message.actions]
    return content


def webhook_message(message: Outbound) -> dict[str, Any]:
    return {"type": "message", "attachments": [{"contentType": CARD_CONTENT_TYPE, "contentUrl": None,
                                                "content": card(message)}]}


class TeamsChannel:
    """Posts cards to the webhook URL in ``Outbound.to``. A 2xx answer means Teams has the message (the
    webhook posts synchronously, Workflows queue it): ``Sent(delivered=True)``."""

    name = "teams"

    def __init__(self, *, client: httpx.AsyncClient | None = None, timeout: float = 10.0) -> None:
        self._own = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    async def send(self, message: Outbound) -> Sent:
        url = message.to
        if not url.startswith(("https://", "http://")):
            raise DeliveryFailed("the Teams address is not a webhook URL", permanent=True, code="no-address")
        body = orjson.dumps(webhook_message(message))
        if len(body) > MAX_MESSAGE_BYTES:
            raise DeliveryFailed(f"the card is {len(body)} bytes; Teams accepts at most {MAX_MESSAGE_BYTES}",
                                 permanent=True, code="too-large")
        try:
            resp = await self._client.post(url, content=body, headers={"Content-Type": "application/json"})
        except httpx.TimeoutException as exc:
            raise DeliveryFailed(f"Teams webhook timed out: {exc!r}", permanent=False, code="timeout") from exc
        except httpx.TransportError as exc:
            raise DeliveryFailed(f"cannot reach the Teams webhook: {exc!r}", permanent=False,
                                 code="network") from exc
        if 200 <= resp.status_code < 300:
            if "http error 429" in resp.text[:500].lower():  # a legacy connector's throttling answer
                raise http_failure(429, resp.text, retry_after=resp.headers.get("retry-after"))
            return Sent(provider_id=message.idempotency_key or _bare(message.communication), delivered=True)
        raise http_failure(resp.status_code, resp.text, retry_after=resp.headers.get("retry-after"))

    async def aclose(self) -> None:
        if self._own:
            await self._client.aclose()
