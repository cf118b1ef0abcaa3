"""Shared fixtures: settings in a temporary data directory, both real stores, and an ASGI client.

The MongoDB store runs against a real wire-protocol server (``nx-27017``) started once per test session;
``store`` is parametrised so that every contract test runs unchanged against SQLite and MongoDB.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_outreach.app import create_app
from fhir_outreach.settings import ENV_PREFIX, Settings, load_settings
from fhir_outreach.store import Store
from fhir_outreach.store.sqlite import SqliteStore

TOKEN = "test-token-0123456789abcdef"
BASE = "http://testserver/fhir"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def mongo_base_url() -> Iterator[str]:
    from tests.store.mongo_server import nx27017

    with nx27017() as url:
        yield url


@pytest.fixture
def make_settings(tmp_path: Path) -> Any:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"store": f"sqlite:///{tmp_path}/store.db", "data_dir": tmp_path / "data",
                                  "api_tokens": [TOKEN], "base_url": BASE}
        values.update(overrides)
        return load_settings(**values)

    return make


async def _open(kind: str, tmp_path: Path, mongo_url: str | None) -> Store:
    if kind == "sqlite":
        store: Store = SqliteStore(f"sqlite:///{tmp_path}/contract.db", base_url=BASE)
    else:
        from fhir_outreach.store.mongo import MongoStore

        store = MongoStore(f"{mongo_url}/t{uuid.uuid4().hex[:12]}", base_url=BASE)
    await store.open()
    return store


@pytest.fixture(params=["sqlite", "mongo"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    mongo = request.getfixturevalue("mongo_base_url") if request.param == "mongo" else None
    s = await _open(request.param, tmp_path, mongo)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(params=["sqlite", "mongo"])
async def client(request: pytest.FixtureRequest, make_settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An authenticated client for the whole app on either store (lifespan run by the fixture)."""
    if request.param == "mongo":
        url = request.getfixturevalue("mongo_base_url")
        settings = make_settings(store=f"{url}/api{uuid.uuid4().hex[:12]}")
    else:
        settings = make_settings()
    async with app_client(settings) as c:
        yield c


@pytest.fixture
async def sqlite_client(make_settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(make_settings()) as c:
        yield c


class app_client:  # noqa: N801 - used like a function
    """``async with app_client(settings) as c``: the app with its lifespan, behind an httpx client."""

    def __init__(self, settings: Settings, token: str | None = TOKEN) -> None:
        self.app = create_app(settings)
        self.token = token
        self._lifespan: Any = None

    async def __aenter__(self) -> httpx.AsyncClient:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://testserver",
                                        headers=headers)
        return self.client

    async def __aexit__(self, *exc: Any) -> None:
        await self.client.aclose()
        await self._lifespan.__aexit__(*exc)


def task(patient: str = "p1", status: str = "requested", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Task", "status": status, "intent": "order",
                            "for": {"reference": f"Patient/{patient}"}}
    body.update(extra)
    return body
