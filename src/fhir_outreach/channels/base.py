"""The channel seam: one small interface every delivery adapter implements, and the message it is given.

The delivery pipeline (``delivery.py``) hands an adapter an ``Outbound`` — the message already rendered,
the address already resolved, consent and quiet hours already checked — and gets back the provider's
message id (``Sent``) or a ``DeliveryFailed`` that says whether trying again can help. Adapters never touch
the store; what comes back later from a provider (delivered, opened, clicked, bounced, replies) arrives on
our HTTP callbacks (``api/channel_*.py``) and is recorded by ``engagement.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

CHANNELS = ("portal", "email", "sms", "teams", "push")


@dataclass(frozen=True, slots=True)
class Action:
    """A button on a message (Teams card): its label and the signed callback URL it opens or posts to."""

    label: str
    url: str


@dataclass(frozen=True, slots=True)
class Outbound:
    communication: str  # "Communication/{id}" — the FHIR record of this message
    channel: str  # email | sms | teams | push
    to: str  # email address, E.164 number, webhook URL, or a push subscription (JSON text)
    text: str  # the plain-text body
    subject: str | None = None  # email subject / card title / notification title
    html: str | None = None  # email HTML part (open pixel and tracked links already inserted)
    actions: tuple[Action, ...] = ()
    idempotency_key: str = ""  # the Communication id: passed to providers that accept a key
    callback_base: str = ""  # public base URL of our callbacks (status, inbound, tracking)
    language: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Sent:
    provider_id: str
    delivered: bool = False  # the provider confirmed delivery while answering (e.g. a Teams webhook 200)


class DeliveryFailed(Exception):
    """A send that did not happen. ``permanent`` failures are not retried (bad address, rejected content,
    auth refused); transient ones are, with backoff (``retry_after`` seconds when the provider said)."""

    def __init__(self, reason: str, *, permanent: bool, code: str = "failed",
                 retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.code = code
        self.retry_after = retry_after


class Channel(Protocol):
    name: str

    async def send(self, message: Outbound) -> Sent: ...

    async def aclose(self) -> None: ...


def http_failure(status: int, detail: str, *, retry_after: str | None = None) -> DeliveryFailed:
    """The one rule for HTTP providers: 408, 425, 429 and 5xx are worth retrying; other 4xx are not."""
    transient = status in (408, 425, 429) or status >= 500
    after = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
    return DeliveryFailed(f"provider answered {status}: {detail[:300]}", permanent=not transient,
                          code=f"http-{status}", retry_after=after)
