"""The journey service of one process: catalog, engine, local change feed and write-back outbox, and the
loop that runs them. ``serve`` runs the loop in-process (unless ``FHIR_OUTREACH_SERVE_WORKER=false``);
every ``fhir-outreach worker`` runs it too. Work is shared through leases in the store.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from ..fhir.client import SourceClients
from ..intake.topics import load_topics
from ..settings import Settings
from ..store import Store
from ..work.clock import Clock
from ..work.loop import BackgroundLoop
from .catalog import Catalog
from .feed import LocalFeed
from .runner import Engine, worker_id

log = logging.getLogger("fhir_outreach.journeys")


class JourneyService(BackgroundLoop):
    name = "journeys"
    def __init__(self, settings: Settings, store: Store, sources: SourceClients, *,
                 clock: Clock | None = None, channels: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.store = store
        topics = load_topics()
        self.catalog = Catalog(store)
        self.outbox: Any = None
        writeback = None
        if settings.writeback_source:
            from ..work.outbox import Outbox, enqueue

            source = settings.writeback_source
            self.outbox = Outbox(store, sources, owner=worker_id(), clock=clock)
            the_clock = clock

            async def writeback_fn(resources: Sequence[dict[str, Any]]) -> None:
                await enqueue(store, source, resources, now=the_clock.now() if the_clock else None)

            writeback = writeback_fn
        periodic = settings.writeback_source or (settings.sources[0].name if settings.sources else None)
        self.engine = Engine(store, clock=clock, sources=sources, lease_seconds=settings.journey_lease_seconds,
                             base_url=settings.fhir_base, writeback=writeback, catalog=self.catalog, topics=topics,
                             periodic_source=periodic)
        super().__init__()
        self.poll_seconds = settings.worker_poll_seconds
        self.feed = LocalFeed(store, self.catalog, topics, wake=self.wake)
        from ..channels.delivery import Delivery
        from ..channels.registry import build_channels
        from ..channels.signing import derive_key
        from ..intake.hooks import load_master_key

        self.channel_key = derive_key(load_master_key(settings.hook_master_key, settings.data_dir))
        self.channels = channels if channels is not None else build_channels(settings)
        self.delivery = Delivery(store, settings, self.channels, key=self.channel_key, sources=sources,
                                 clock=clock, owner=worker_id())
        self.engine.portal_guard = self._portal_guard

    async def _portal_guard(self, comm: dict[str, Any], patient: dict[str, Any] | None,
                            now: float) -> tuple[str, str] | None:
        """Consent and opt-outs apply to portal messages too; quiet hours and caps do not (an inbox
        message interrupts no one), so a 'hold' is a send here."""
        from ..channels import governance

        decision = await governance.decide(self.store, comm, patient=patient, channel="portal", now=now,
                                           settings=self.settings, created=now)
        if decision.action == "block" and decision.reason in ("consent", "opted-out"):
            return str(decision.reason), decision.detail
        return None

    async def run_once(self) -> int:
        handled = await self.engine.run_once()
        handled += await self.delivery.run_once()
        if self.outbox is not None:
            handled += await self.outbox.run_once()
        return handled

    async def aclose(self) -> None:
        await self.stop_loop()
        for channel in self.channels.values():
            with contextlib.suppress(Exception):
                await channel.aclose()
