"""The delivery pipeline: journey messages from ``preparation`` to sent, held, or blocked with a reason.

A message step writes its ``Communication`` and a ``delivery`` record (one per message, group = channel).
Any worker claims due delivery records under a lease and, right before sending, asks ``governance`` whether
this message may go now: consent, opt-outs, frequency caps, quiet hours in the patient's time zone, expiry.
A held message is simply due later; a blocked one becomes ``not-done`` with a ``statusReason`` (so ``journey
why`` and the care team see why). Then the address is resolved from the recipient (email, E.164 number,
Teams webhook, push subscriptions), the adapter sends, and the Communication turns ``in-progress`` with the
provider's message id. Transient failures retry with exponential backoff and jitter until the message
expires; permanent ones block it at once. A per-channel token bucket keeps each worker under
``channel_rate_per_second``.

Exactly once: providers that accept an idempotency key get the Communication id (SMS, push, Teams), so a
worker killed between the provider's answer and our status update resends harmlessly on retry. SMTP has no
such key: email is at-least-once in that window, with the same ``Message-ID`` each time.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ..fhir.client import SourceClients, SourceError, SourceUnavailable
from ..settings import Settings
from ..store import Store
from ..store.base import Record
from ..work.clock import Clock, SystemClock
from . import engagement
from .base import Action, Channel, DeliveryFailed, Outbound

log = logging.getLogger("fhir_outreach.channels")

DELIVERY = "delivery"
ACTION_URL = "http://fhir-outreach.org/StructureDefinition/message-action"
DEFAULT_SUBJECT = "Message from your care team"


class TokenBucket:
    def __init__(self, rate: float, clock: Clock) -> None:
        self.rate = rate
        self.tokens = rate
        self.clock = clock
        self.at = clock.now()

    async def take(self) -> None:
        while True:
            now = self.clock.now()
            self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.rate)


@dataclass
class Backoff:
    base: float = 10.0
    cap: float = 1800.0

    def delay(self, attempts: int) -> float:
        """Exponential with full jitter (so many failed sends do not retry in lockstep)."""
        return random.uniform(self.base / 2, min(self.cap, self.base * 2 ** max(0, attempts - 1)))


def _ref(value: Any) -> str | None:
    return value.get("reference") if isinstance(value, dict) and isinstance(value.get("reference"), str) else None


class Delivery:
    def __init__(self, store: Store, settings: Settings, channels: Mapping[str, Channel], *, key: bytes,
                 sources: SourceClients | None = None, clock: Clock | None = None, owner: str = "delivery",
                 lease_seconds: float = 60.0, backoff: Backoff | None = None) -> None:
        self.store = store
        self.settings = settings
        self.channels = dict(channels)
        self.key = key
        self.sources = sources
        self.clock = clock or SystemClock()
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.backoff = backoff or Backoff()
        self.buckets = {name: TokenBucket(settings.channel_rate_per_second, self.clock) for name in self.channels}
        self.sent = 0

    @property
    def callback_base(self) -> str:
        return self.settings.hooks_base

    async def run_once(self, limit: int = 50) -> int:
        claimed = await self.store.claim_records(DELIVERY, owner=self.owner, now=self.clock.now(),
                                                 lease_seconds=self.lease_seconds, limit=limit)
        await asyncio.gather(*(self._one(rec) for rec in claimed))  # leased messages are independent
        return len(claimed)

    async def _one(self, rec: Record) -> None:
        try:
            await self.deliver(rec)
        except (SourceUnavailable, SourceError) as exc:
            await self._retry(rec, f"reading the recipient: {exc.diagnostics}")
        except Exception as exc:  # never lose a message: log, back off, try again
            log.exception("delivery %s failed unexpectedly", rec.key)
            await self._retry(rec, f"{type(exc).__name__}: {exc}")

    # --- one message -------------------------------------------------------------------------------

    async def deliver(self, rec: Record) -> None:
        now = self.clock.now()
        comm_id = str(rec.data["communication"]).split("/", 1)[1]
        stored = await self.store.read("Communication", comm_id)
        if stored is None or stored.resource is None or stored.deleted:
            await self._finish(rec, "done", note="the Communication no longer exists")
            return
        comm = stored.resource
        if comm.get("status") != "preparation":  # already sent (a retry after a crash) or withdrawn
            await self._finish(rec, "done", note=f"status is {comm.get('status')}")
            return
        channel = str(rec.data.get("medium"))
        adapter = self.channels.get(channel)
        if adapter is None:
            await self._block(rec, comm_id, "channel-unavailable", f"the {channel} channel is not configured")
            return
        from . import governance

        patient = await self._read(_ref(comm.get("subject")), rec)
        decision = await governance.decide(self.store, comm, patient=patient, channel=channel, now=now,
                                           settings=self.settings, created=float(rec.data.get("created") or now))
        if decision.action == "block":
            await self._block(rec, comm_id, str(decision.reason), decision.detail)
            return
        if decision.action == "hold":
            rec.due = float(decision.until or now + 60.0)
            rec.lease_owner, rec.lease_until = None, 0.0
            rec.data = {**rec.data, "held": decision.detail}
            await self.store.save_record(rec, now=now)
            return
        recipient = await self._read(_ref((comm.get("recipient") or [None])[0]), rec) if comm.get("recipient") else patient
        addresses = await self._addresses(channel, recipient, patient)
        if not addresses:
            await self._block(rec, comm_id, "no-address", f"the recipient has no usable {channel} address")
            return
        message = self._outbound(comm, channel, addresses[0], patient)
        await self.buckets[channel].take()
        try:
            sent = None
            for address in addresses:  # push: every registered device; others: the one best address
                sent = await adapter.send(_with_to(message, address))
        except DeliveryFailed as exc:
            if exc.code == "subscription-gone" and channel == "push":
                from .push import unregister

                for address in addresses:
                    endpoint = orjson.loads(address).get("endpoint")
                    if endpoint:
                        await unregister(self.store, str(endpoint), now=self.clock.now())
            if exc.permanent:
                await self._block(rec, comm_id, "rejected", exc.reason)
            else:
                await self._retry(rec, exc.reason, after=exc.retry_after)
            return
        assert sent is not None
        self.sent += 1
        await engagement.record(self.store, comm_id, "sent", at=self.clock.now(), provider_id=sent.provider_id,
                                base_url=self.settings.fhir_base)
        if channel == "sms":
            from .sms import remember_sent

            await remember_sent(self.store, sent.provider_id, comm_id, addresses[0], _ref(comm.get("subject")))
        if sent.delivered:
            await engagement.record(self.store, comm_id, "delivered", at=self.clock.now(),
                                    base_url=self.settings.fhir_base)
        await self._finish(rec, "done", provider_id=sent.provider_id, to=addresses[0] if channel != "push" else None)

    def _outbound(self, comm: Mapping[str, Any], channel: str, to: str, patient: Mapping[str, Any] | None) -> Outbound:
        comm_id = str(comm["id"])
        text = str(((comm.get("payload") or [{}])[0]).get("contentString") or "")
        subject = str((comm.get("topic") or {}).get("text") or DEFAULT_SUBJECT)
        body_html = None
        extra: dict[str, Any] = {}
        if channel == "email":
            from . import signing
            from .email import text_to_html, tracked_html

            patient_ref = _ref(comm.get("subject"))
            if patient_ref and str(patient_ref).startswith("Patient/"):
                token = signing.sign(self.key, {"p": patient_ref, "c": comm_id})
                extra["unsubscribe"] = f"{self.callback_base}/channels/email/unsubscribe/{token}"
                text = f"{text}\n\nTo stop these emails: {extra['unsubscribe']}"
            body_html = tracked_html(f"<html><body>{text_to_html(text)}</body></html>", key=self.key,
                                     communication_id=comm_id, callback_base=self.callback_base)
        actions: tuple[Action, ...] = ()
        choices = {}
        for e in comm.get("extension") or []:
            if e.get("url") == ACTION_URL and "=" in str(e.get("valueString")):
                label, reply = str(e["valueString"]).split("=", 1)
                choices[label.strip()] = reply.strip()
        if choices and channel == "teams":
            from .teams import action_links

            actions = tuple(action_links(self.key, comm_id, self.callback_base, choices))
        language = None
        for c in (patient or {}).get("communication") or []:
            codes = [x.get("code") for x in (c.get("language") or {}).get("coding") or []]
            if codes and (c.get("preferred") or language is None):
                language = codes[0]
        return Outbound(communication=f"Communication/{comm_id}", channel=channel, to=to, text=text, subject=subject,
                        html=body_html, actions=actions, idempotency_key=comm_id, callback_base=self.callback_base,
                        language=language, extra=extra)

    async def _addresses(self, channel: str, recipient: Mapping[str, Any] | None,
                         patient: Mapping[str, Any] | None) -> list[str]:
        from . import governance

        if channel in ("email", "sms"):
            raw = governance.address_for(dict(recipient or {}), channel, self.settings.sms_default_region)
            if not raw:
                return []
            if channel == "sms":
                from .sms import normalize_number

                try:
                    return [normalize_number(raw, self.settings.sms_default_region)]
                except ValueError:
                    return []
            return [raw]
        if channel == "teams":
            urls = [t.get("value") for t in (recipient or {}).get("telecom") or []
                    if t.get("system") == "url" and _webhook_url(str(t.get("value", "")))]
            if urls:
                return [str(urls[0])]
            return [self.settings.teams_webhook_url] if self.settings.teams_webhook_url else []
        if channel == "push":
            from .push import subscriptions_for

            pid = (patient or {}).get("id")
            subs = await subscriptions_for(self.store, f"Patient/{pid}") if pid else []
            return [orjson.dumps(s).decode() for s in subs]
        return []

    async def _read(self, ref: str | None, rec: Record) -> dict[str, Any] | None:
        if not ref or "/" not in ref:
            return None
        rtype, rid = ref.split("/")[-2:]
        stored = await self.store.read(rtype, rid)
        if stored is not None and stored.resource is not None and not stored.deleted:
            return stored.resource
        source = rec.data.get("source")
        if self.sources is not None and source in self.sources.names():
            return await self.sources.get(str(source)).read(rtype, rid)  # type: ignore[no-any-return]
        return None

    # --- record keeping ----------------------------------------------------------------------------

    async def _block(self, rec: Record, comm_id: str, reason: str, detail: str) -> None:
        await engagement.block(self.store, comm_id, reason, at=self.clock.now(), detail=detail,
                               base_url=self.settings.fhir_base)
        await self._finish(rec, "blocked", reason=reason, detail=detail)

    async def _retry(self, rec: Record, reason: str, *, after: float | None = None) -> None:
        now = self.clock.now()
        created = float(rec.data.get("created") or now)
        rec.attempts += 1
        due = now + (after if after is not None else self.backoff.delay(rec.attempts))
        if due > created + self.settings.message_expiry_hours * 3600:
            comm_id = str(rec.data["communication"]).split("/", 1)[1]
            await self._block(rec, comm_id, "expired", f"still failing when the message expired: {reason}")
            return
        rec.due = due
        rec.lease_owner, rec.lease_until = None, 0.0
        rec.data = {**rec.data, "last_error": reason}
        await self.store.save_record(rec, now=now)

    async def _finish(self, rec: Record, state: str, **extra: Any) -> None:
        rec.state = state
        rec.lease_owner, rec.lease_until = None, 0.0
        rec.data = {**rec.data, **{k: v for k, v in extra.items() if v is not None}, "finished": self.clock.now()}
        if not await self.store.save_record(rec, now=self.clock.now()):
            log.warning("delivery %s changed while this worker held it", rec.key)


def _webhook_url(url: str) -> bool:
    """https, or plain http to this machine (a local relay or a test peer): never cleartext across a network."""
    return url.startswith("https://") or url.startswith(("http://127.0.0.1:", "http://localhost:", "http://[::1]:"))


def _with_to(message: Outbound, to: str) -> Outbound:
    from dataclasses import replace

    return replace(message, to=to)


