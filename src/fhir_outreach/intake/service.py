"""The intake service: the hook registry, source clients and processor of one process, and its loop.

``serve`` runs the loop in-process (unless ``FHIR_OUTREACH_SERVE_WORKER=false``) and every
``fhir-outreach worker`` runs it too; work is shared through leases in the store, so any number of
processes can run it side by side.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

import httpx

from ..fhir.client import SourceClients
from ..settings import Settings
from ..store import Store
from ..work.loop import BackgroundLoop
from .hooks import HookRegistry, load_master_key
from .processor import Processor
from .recovery import check_health, recover

log = logging.getLogger("fhir_outreach.intake")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class IntakeService(BackgroundLoop):
    name = "intake"
    def __init__(self, settings: Settings, store: Store, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.store = store
        self.sources = SourceClients(settings.sources, transport=transport)
        self.hooks = HookRegistry(store, load_master_key(settings.hook_master_key, settings.data_dir),
                                  settings.hooks_base)
        self.processor = Processor(store, self.hooks, self.sources, owner=worker_id())
        self._last_health = 0.0
        super().__init__()
        self.poll_seconds = settings.worker_poll_seconds
        self.on_events: Callable[[], None] | None = None  # the journey service's wake-up

    async def run_once(self) -> int:
        """One round of intake work; returns how many items it handled (0 = idle)."""
        handled = await self.processor.run_once()
        if handled and self.on_events is not None:
            self.on_events()
        handled += await recover(self.processor)
        if time.monotonic() - self._last_health >= self.settings.health_interval_seconds:
            self._last_health = time.monotonic()
            if self.settings.sources:
                await check_health(self.processor)
        return handled

    async def aclose(self) -> None:
        await self.stop_loop()
        await self.sources.aclose()
