"""Nothing accepted is lost or acted on twice: kill ``serve`` with SIGKILL mid-stream and restart it.

A source keeps re-sending every notification until it sees a 200 (as HAPI, Medplum and Event Grid do),
and also re-sends some that were acknowledged (as when our 200 is lost in a crash between store and ack).
After the restart every change must exist as exactly one event.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from tests.servers import Outreach, wait_for

pytestmark = pytest.mark.slow
TOKEN = "crash-test-token-0123456789"
N = 240


def enc(i: int) -> dict[str, object]:
    return {"resourceType": "Encounter", "id": f"e{i}", "status": "finished", "class": {"code": "IMP"},
            "subject": {"reference": f"Patient/p{i % 7}"}, "meta": {"versionId": "1"}}


async def send_all(url: str, key: str, secret: str, todo: set[int], acked: set[int], until: float) -> None:
    """Deliver every item in ``todo`` until acknowledged or the server dies (then return)."""
    async with httpx.AsyncClient(base_url=url, timeout=5,
                                 headers={"Authorization": f"Bearer {secret}"}) as client:
        async def one(i: int) -> None:
            while i not in acked and asyncio.get_running_loop().time() < until:
                try:
                    r = await client.put(f"/hooks/{key}/Encounter/e{i}", json=enc(i))
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    acked.add(i)
                    todo.discard(i)

        sem = asyncio.Semaphore(16)

        async def bounded(i: int) -> None:
            async with sem:
                await one(i)

        await asyncio.gather(*(bounded(i) for i in sorted(todo)))


def test_kill_between_store_and_ack_loses_and_doubles_nothing(tmp_path: Path) -> None:
    settings = {"FHIR_OUTREACH_SOURCES": json.dumps([{"name": "src", "base_url": "http://127.0.0.1:9/fhir"}]),
                "FHIR_OUTREACH_HOOK_MASTER_KEY": "c" * 40}
    first = Outreach(tmp_path, TOKEN, **settings)
    hook = first.http.post("/admin/hooks", json={"source": "src", "mode": "classic"}).json()
    todo, acked = set(range(N)), set()

    async def phase_one() -> None:
        loop = asyncio.get_running_loop()
        sender = asyncio.create_task(send_all(first.url, hook["key"], hook["secret"], todo, acked,
                                              loop.time() + 60))
        while len(acked) < N // 6 and not sender.done():  # noqa: ASYNC110 - polling a plain set
            await asyncio.sleep(0.005)
        first.proc.kill()  # SIGKILL: no shutdown, requests in flight
        first.proc.wait()
        await sender

    asyncio.run(phase_one())
    first.http.close()
    assert 0 < len(acked) < N, f"the kill should land mid-stream (acked {len(acked)} of {N})"

    second = Outreach(tmp_path, TOKEN, **settings)
    try:
        resend = set(list(acked)[:50])  # acknowledged ones the source did not see acknowledged
        todo |= resend
        acked -= resend

        async def phase_two() -> None:
            await send_all(second.url, hook["key"], hook["secret"], todo, acked,
                           asyncio.get_running_loop().time() + 120)

        asyncio.run(phase_two())
        assert acked == set(range(N))
        assert not todo

        def all_events() -> list[dict[str, object]]:
            counts = second.http.get("/admin/counts").json()
            if any(c["state"] == "pending" and c["count"] for c in counts["inbox"]):
                return []
            return second.http.get("/admin/events", params={"limit": "1000"}).json()["events"]

        events = wait_for(all_events, timeout=60)
        focuses = sorted(e["focus"] for e in events)
        assert len(focuses) == N, f"{len(focuses)} events for {N} changes"
        assert focuses == sorted(f"Encounter/e{i}" for i in range(N))
    finally:
        second.stop()
