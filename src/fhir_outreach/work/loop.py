"""A background loop: call ``run_once`` until stopped, right away while there is work, else after the poll
interval or as soon as someone calls ``wake``. ``serve`` runs the intake and journey services this way;
``fhir-outreach worker`` calls their ``run_once`` from its own loop. A failing round is logged and retried."""

from __future__ import annotations

import asyncio
import contextlib
import logging


class BackgroundLoop:
    name = "loop"
    poll_seconds = 1.0

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> int:  # pragma: no cover - every service defines it
        raise NotImplementedError

    def wake(self) -> None:
        """Something arrived: work now instead of at the next poll."""
        self._wake.set()

    async def drain(self, rounds: int = 1000) -> int:
        """Run rounds until one finds nothing to do (tests, ``inbox process``); returns the items handled."""
        total = 0
        for _ in range(rounds):
            n = await self.run_once()
            total += n
            if not n:
                break
        return total

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"{self.name}-loop")

    async def _loop(self) -> None:
        log = logging.getLogger(f"fhir_outreach.{self.name}")
        while not self._stop.is_set():
            try:
                handled = await self.run_once()
            except Exception:
                log.exception("%s loop round failed; retrying", self.name)
                handled = 0
            if not handled:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_seconds)
                self._wake.clear()

    async def stop_loop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
