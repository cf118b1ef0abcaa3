"""Real processes: ``fhir-outreach serve`` and ``worker`` started as subprocesses, stopped and killed.

The crash test kills the server with SIGKILL in the middle of a stream of single creates and transaction
Bundles, restarts it on the same SQLite file and checks that every acknowledged write survived, that each
transaction is all-or-nothing and that the search index agrees with the stored resources.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

TOKEN = "process-test-token-0123456789"
EXE = str(Path(sys.executable).parent / "fhir-outreach")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(tmp: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_OUTREACH_")}
    env.update({"FHIR_OUTREACH_STORE": f"sqlite:///{tmp}/store.db", "FHIR_OUTREACH_DATA_DIR": str(tmp / "data"),
                "FHIR_OUTREACH_PORT": str(port), "FHIR_OUTREACH_HOST": "127.0.0.1"})
    env.update(extra)
    return env


class Server:
    def __init__(self, tmp: Path, **extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        self.proc = subprocess.Popen([EXE, "serve"], env=env_for(tmp, self.port, **extra), cwd=tmp,
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError(f"server did not start: {self.log.read_text()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path, FHIR_OUTREACH_API_TOKENS=TOKEN)
    yield srv
    if srv.proc.poll() is None:
        srv.kill()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}


def test_serve_answers_metadata_and_stops_cleanly(server: Server) -> None:
    meta = httpx.get(f"{server.url}/fhir/metadata")
    assert meta.status_code == 200 and meta.json()["fhirVersion"] == "4.0.1"
    assert httpx.get(f"{server.url}/fhir/Task").status_code == 401
    created = httpx.post(f"{server.url}/fhir/Task", headers=auth(),
                         json={"resourceType": "Task", "status": "draft", "intent": "order"})
    assert created.status_code == 201
    # uvicorn re-raises the SIGTERM it handled after a graceful shutdown, so the status is -SIGTERM
    assert server.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log.read_text()


def test_first_start_generates_owner_only_token(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    try:
        token_file = tmp_path / "data" / "api-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        ok = httpx.get(f"{srv.url}/fhir/Task", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
        assert "generated one in" in srv.log.read_text()
    finally:
        srv.stop()


def test_bad_setting_stops_startup_with_one_line(tmp_path: Path) -> None:
    env = env_for(tmp_path, free_port(), FHIR_OUTREACH_STORE="postgres://nope")
    proc = subprocess.run([EXE, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "FHIR_OUTREACH_STORE" in lines[0]


def test_worker_starts_connects_and_stops(tmp_path: Path) -> None:
    env = env_for(tmp_path, free_port(), FHIR_OUTREACH_WORKER_POLL_SECONDS="0.1")
    proc = subprocess.Popen([EXE, "worker"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert "connected to the store" in line
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert "worker stopped after" in out
    finally:
        if proc.poll() is None:  # a failed assertion must not leave the worker running
            proc.kill()
            proc.wait()


def test_worker_reports_unreachable_mongo(tmp_path: Path) -> None:
    env = env_for(tmp_path, free_port(), FHIR_OUTREACH_STORE=f"mongodb://127.0.0.1:{free_port()}/x")
    proc = subprocess.run([EXE, "worker"], env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 1
    assert "unavailable" in proc.stderr.lower() or "unreachable" in proc.stderr.lower()


async def _hammer(url: str, stop_after: float) -> tuple[list[str], list[str]]:
    """Send creates and 3-entry transactions until the server dies; return acknowledged ids and groups."""
    acked: list[str] = []
    groups: list[str] = []
    deadline = time.monotonic() + stop_after

    async def one(client: httpx.AsyncClient, n: int) -> None:
        while time.monotonic() < deadline:
            n += 1
            try:
                if n % 3:
                    r = await client.post("/fhir/Task", json={"resourceType": "Task", "status": "requested",
                                                              "intent": "order", "for": {"reference": "Patient/c"}})
                    if r.status_code == 201:
                        acked.append(r.json()["id"])
                else:
                    group = f"g{id(client)}-{n}"
                    entries: list[dict[str, Any]] = [{
                        "resource": {"resourceType": "Task", "status": "requested", "intent": "order",
                                     "for": {"reference": "Patient/c"},
                                     "groupIdentifier": {"system": "urn:crash", "value": group}},
                        "request": {"method": "POST", "url": "Task"}} for _ in range(3)]
                    r = await client.post("/fhir", json={"resourceType": "Bundle", "type": "transaction",
                                                         "entry": entries})
                    if r.status_code == 200:
                        groups.append(group)
            except httpx.HTTPError:
                return

    async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=5) as client:
        await asyncio.gather(*(one(client, i * 100000) for i in range(8)))
    return acked, groups


def test_kill_mid_write_leaves_a_consistent_store(tmp_path: Path) -> None:
    srv = Server(tmp_path, FHIR_OUTREACH_API_TOKENS=TOKEN)

    async def run() -> tuple[list[str], list[str]]:
        task = asyncio.create_task(_hammer(srv.url, stop_after=20))
        await asyncio.sleep(2.0)
        srv.kill()  # SIGKILL while writes are in flight
        return await task

    acked, groups = asyncio.run(run())
    assert len(acked) > 20, "the load did not get going before the kill"
    srv2 = Server(tmp_path, FHIR_OUTREACH_API_TOKENS=TOKEN)
    try:
        with httpx.Client(base_url=srv2.url, headers=auth(), timeout=30) as c:
            for rid in acked:  # every acknowledged create survived
                assert c.get(f"/fhir/Task/{rid}").status_code == 200
            page = c.get("/fhir/Task", params={"_count": "1000", "patient": "c", "_sort": "_id"}).json()
            total = page["total"]
            assert total >= len(acked) + 3 * len(groups)
            by_group: dict[str, int] = {}
            seen = 0
            while True:  # every page: the faster the server, the more there is
                for e in page.get("entry", []):
                    seen += 1
                    g = e["resource"].get("groupIdentifier", {}).get("value")
                    if g:
                        by_group[g] = by_group.get(g, 0) + 1
                nxt = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
                if nxt is None:
                    break
                page = c.get(nxt).json()
            assert seen == total
            assert all(n == 3 for n in by_group.values()), by_group  # transactions are all-or-nothing
            assert set(groups) <= set(by_group)
            # the index agrees with the resources: a search by status counts the same set
            hist = c.get("/fhir/Task/_history", params={"_count": "1"}).json()
            assert hist["total"] == total
            assert c.get("/fhir/Task", params={"status": "requested", "_summary": "count"}).json()["total"] == total
    finally:
        srv2.stop()
