"""The ``fhir-outreach worker`` process loop.

A worker connects to the configured store, checks it is reachable, and then polls for work until it is
asked to stop (SIGTERM/SIGINT), finishing the current round before closing the store. Each round runs the
registered jobs: today intake (inbox processing, gap recovery, source health); the journey engine adds
its own. Work is claimed under leases, so any number of workers (and ``serve``) share it safely.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable

from ..errors import StoreUnavailable
from ..settings import Settings
from ..store import Store

log = logging.getLogger("fhir_outreach.worker")

Job = Callable[[Store], Awaitable[int]]  # returns how many items it handled


class Worker:
    def __init__(self, store: Store, *, poll_seconds: float = 1.0, jobs: list[Job] | None = None) -> None:
        self.store = store
        self.poll_seconds = poll_seconds
        self.jobs = list(jobs or [])
        self.stopping = asyncio.Event()
        self.polls = 0

    def stop(self) -> None:
        self.stopping.set()

    async def run_once(self) -> int:
        await self.store.ping()
        handled = 0
        for job in self.jobs:
            handled += await job(self.store)
        self.polls += 1
        return handled

    async def run(self) -> None:
        log.info("worker started (%d job kinds registered)", len(self.jobs))
        while not self.stopping.is_set():
            try:
                handled = await self.run_once()
            except StoreUnavailable as exc:
                log.warning("store unavailable, retrying: %s", exc.diagnostics)
                handled = 0
            if handled:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=self.poll_seconds)
        log.info("worker stopped after %d polls", self.polls)


async def run_worker(settings: Settings, store: Store) -> None:
    from ..intake.service import IntakeService
    from ..journeys.service import JourneyService

    await store.open()
    intake: IntakeService | None = None
    try:
        await store.ping()
        intake = IntakeService(settings, store)
        service = intake
        journeys = JourneyService(settings, store, intake.sources)

        async def intake_job(_: Store) -> int:
            return await service.run_once()

        async def journey_job(_: Store) -> int:
            return await journeys.run_once()

        worker = Worker(store, poll_seconds=settings.worker_poll_seconds, jobs=[intake_job, journey_job])
        gc.freeze()  # start-up objects live for the whole process (see app.create_app)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        print(f"fhir-outreach worker: connected to the store; channels: {', '.join(sorted(journeys.channels))}; "
              "waiting for work (Ctrl-C to stop)", flush=True)
        await worker.run()
    finally:
        if intake is not None:
            await intake.aclose()
        await store.close()
