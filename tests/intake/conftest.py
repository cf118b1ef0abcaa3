"""Intake fixtures: an intake app whose source FHIR server is a second, real fhir-outreach FHIR API.

The source is reached through ``httpx.ASGITransport`` (a real FHIR REST server in the same process, no
network); the sekmet-fhir integration test uses a real external server instead. Background processing
is off: tests call ``Env.drain()`` so that processing is deterministic.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_outreach.app import create_app
from fhir_outreach.intake.service import IntakeService
from fhir_outreach.settings import load_settings
from fhir_outreach.store import Store
from fhir_outreach.store.base import Record
from tests.conftest import TOKEN

SOURCE_BASE = "http://source.test/fhir"


@dataclass
class Env:
    client: httpx.AsyncClient  # talks to the intake app as an operator (admin token)
    source: httpx.AsyncClient  # talks to the source FHIR server
    app: Any
    hooks: httpx.AsyncClient  # talks to the intake app as a source server would (no admin token)

    @property
    def store(self) -> Store:
        return self.app.state.store  # type: ignore[no-any-return]

    @property
    def intake(self) -> IntakeService:
        return self.app.state.intake  # type: ignore[no-any-return]

    async def hook(self, **fields: Any) -> dict[str, Any]:
        resp = await self.client.post("/admin/hooks", json={"source": "src", **fields})
        assert resp.status_code == 201, resp.text
        return resp.json()  # type: ignore[no-any-return]

    async def drain(self) -> None:
        await self.intake.drain()

    async def events(self, state: str | None = None) -> list[Record]:
        return list(reversed(await self.store.list_records("event", state=state, limit=1000)))

    async def inbox(self, state: str | None = None) -> list[Record]:
        return await self.store.list_records("inbox", state=state, limit=1000)

    async def on_source(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Create or update a resource on the source server; returns what it stored."""
        if "id" in resource:
            resp = await self.source.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource)
        else:
            resp = await self.source.post(f"/fhir/{resource['resourceType']}", json=resource)
        assert resp.status_code in (200, 201), resp.text
        return resp.json()  # type: ignore[no-any-return]


class _Lifespan:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.cm: Any = None

    async def __aenter__(self) -> Any:
        self.cm = self.app.router.lifespan_context(self.app)
        await self.cm.__aenter__()
        return self.app

    async def __aexit__(self, *exc: Any) -> None:
        await self.cm.__aexit__(*exc)


@pytest.fixture
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    """The intake app on SQLite, or on MongoDB with ``@pytest.mark.parametrize("env", ["mongo"], indirect=True)``."""
    kind = getattr(request, "param", "sqlite")
    store_url = f"sqlite:///{tmp_path}/intake.db"
    if kind == "mongo":
        store_url = f"{request.getfixturevalue('mongo_base_url')}/intake{uuid.uuid4().hex[:12]}"
    source_settings = load_settings(store=f"sqlite:///{tmp_path}/source.db", data_dir=tmp_path / "src-data",
                                    auth="off", base_url=SOURCE_BASE)
    source_app = create_app(source_settings, run_background=False)
    settings = load_settings(store=store_url, data_dir=tmp_path / "data",
                             api_tokens=[TOKEN], base_url="http://outreach.test/fhir",
                             sources=[{"name": "src", "base_url": SOURCE_BASE}],
                             hook_master_key="m" * 40)
    app = create_app(settings, run_background=False,
                     source_transport=httpx.ASGITransport(app=source_app))
    async with _Lifespan(source_app), _Lifespan(app), \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://outreach.test",
                              headers={"Authorization": f"Bearer {TOKEN}"}) as client, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=source_app), base_url="http://source.test") as source, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://outreach.test") as hooks:
        yield Env(client, source, app, hooks)
