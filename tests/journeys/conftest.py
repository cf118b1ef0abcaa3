"""Journey test harness: the whole app served by uvicorn on a real socket (real HTTP for every request),
its journey engine on a ``ManualClock`` that the test moves, and explicit draining instead of background
loops, so weeks of waits run in milliseconds and every step is deterministic. Both stores."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from fhir_outreach.app import create_app
from fhir_outreach.work.clock import ManualClock
from tests.conftest import TOKEN

ROOT = Path(__file__).resolve().parents[2]
JOURNEYS = ROOT / "profiles" / "journeys"
DAY = 86400.0


class Live:
    def __init__(self, app: Any, http: httpx.AsyncClient, clock: ManualClock) -> None:
        self.app = app
        self.http = http
        self.clock = clock

    async def drain(self) -> None:
        """Run intake and journey work until both are idle."""
        for _ in range(50):
            n = await self.app.state.intake.processor.run_once()
            await asyncio.sleep(0)  # let callbacks served on this loop run
            n += await self.app.state.journeys.drain()
            if not n:
                return

    async def advance(self, days: float = 0.0, *, seconds: float = 0.0) -> None:
        """Move time forward and fire everything that became due, in order."""
        end = self.clock.now() + days * DAY + seconds
        while True:
            await self.drain()
            due = await self.next_due()
            if due is None or due > end:
                break
            self.clock.set(max(due, self.clock.now()))
        self.clock.set(end)
        await self.drain()

    async def next_due(self) -> float | None:
        store = self.app.state.store
        dues = [r.due for st in ("waiting", "awaiting", "pending") for r in await store.list_records("run", state=st,
                                                                                                      limit=1000)]
        dues += [r.due for r in await store.list_records("tick", state="pending", limit=1000)]  # periodic triggers
        dues += [r.due for r in await store.list_records("delivery", state="pending", limit=1000)]  # held sends
        return min(dues) if dues else None

    async def load(self, name: str) -> dict[str, Any]:
        text = (JOURNEYS / f"{name}.yaml").read_text()
        r = await self.http.post("/admin/journeys", content=text, headers={"Content-Type": "application/yaml"},
                                 params={"activate": "true"})
        assert r.status_code == 201, r.text
        return dict(r.json())

    async def put(self, resource: dict[str, Any]) -> dict[str, Any]:
        r = await self.http.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource)
        assert r.status_code in (200, 201), r.text
        return dict(r.json())

    async def search(self, type_: str, **params: str) -> list[dict[str, Any]]:
        r = await self.http.get(f"/fhir/{type_}", params=params)
        assert r.status_code == 200, r.text
        return [e["resource"] for e in r.json().get("entry") or []]

    async def runs(self, journey: str | None = None) -> list[dict[str, Any]]:
        r = await self.http.get("/admin/runs", params={"journey": journey} if journey else {})
        assert r.status_code == 200, r.text
        return list(r.json()["runs"])

    async def why(self, run: str) -> dict[str, Any]:
        r = await self.http.get(f"/admin/runs/{run}")
        assert r.status_code == 200, r.text
        return dict(r.json())


@contextlib.asynccontextmanager
async def serve_live(settings: Any, *, port: int = 0, start: float = 1_772_352_000.0,
                     **app_options: Any) -> AsyncIterator[Live]:
    """The app on 127.0.0.1:``port`` (0: any) with a manual clock starting at ``start`` (default
    2026-03-01T08:00:00Z) and no background loops."""
    clock = ManualClock(start)
    app = create_app(settings, run_background=False, clock=clock, **app_options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bound}", timeout=30,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            yield Live(app, http, clock)
    finally:
        server.should_exit = True
        await task


@pytest.fixture(params=["sqlite", "mongo"])
async def live(request: pytest.FixtureRequest, make_settings: Any) -> AsyncIterator[Live]:
    if request.param == "mongo":
        url = request.getfixturevalue("mongo_base_url")
        settings = make_settings(store=f"{url}/j{uuid.uuid4().hex[:12]}")
    else:
        settings = make_settings()
    async with serve_live(settings) as running:
        yield running
