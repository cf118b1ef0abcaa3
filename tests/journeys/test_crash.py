"""Journeys survive ``kill -9``: real ``fhir-outreach worker`` processes are killed at random moments while
they run the patient-discharge journey, and each patient still gets exactly one first outcome.

A real ``fhir-outreach serve`` (no background work of its own) takes the API writes; two or three workers
share the store (SQLite file, or MongoDB on nx-27017) with 2-second leases. The journey is loaded, 60
patients (a third of them high risk) are admitted, then discharged through the FHIR API in ten bursts;
after most bursts a worker is SIGKILLed at a random moment while it holds leases on events or runs (work in
hand), and sometimes another at random, each replaced by a new worker. The survivors must finish what the
dead left behind (their leases expire). Waits are days long and the clock is
real, so every run goes only as far as its first outcome, which is the point:

- high risk: exactly one call Task (with our identifier, focused on the encounter) and its one Provenance,
  no message; the run is ``done`` / ``completed`` after ``risk`` → ``call``;
- low risk: exactly one portal Communication and its one Provenance, no task; the run is ``awaiting``
  the read after ``risk`` → ``portal`` → ``portal-read``;
- one run per patient, no event left pending, nothing else written;
- and the kills did land mid-work: some events or runs were claimed a second time.

On MongoDB this sometimes fails (a known bug, reproduced deterministically by the last test here): a worker
killed between the two writes of the commit that stores an output and its Provenance leaves a journaled,
unfinished commit; the worker retrying the step takes the resulting Conflict for "already written", and the
output is rolled back later, so the patient ends up with nothing.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fhir_outreach.intake.processor import EVENT
from fhir_outreach.journeys.runner import RUN
from fhir_outreach.store import Store, Write, open_store
from fhir_outreach.store.base import prepare
from tests.journeys.workers import Workers
from tests.servers import Outreach, wait_for

pytestmark = pytest.mark.slow
TOKEN = "journey-crash-token-0123456789"
ROOT = Path(__file__).resolve().parents[2]
DISCHARGE = ROOT / "profiles" / "journeys" / "patient-discharge.yaml"
OURS = "http://fhir-outreach.org/identifier/outreach"
PATIENTS = 60
WAVES = 10
MIN_KILLS = 6


@pytest.fixture(params=["sqlite", "mongo"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "mongo":
        return f"{request.getfixturevalue('mongo_base_url')}/jc{uuid.uuid4().hex[:12]}"
    return f"sqlite:///{tmp_path}/outreach.db"


def search(serve: Outreach, type_: str) -> list[dict[str, Any]]:
    r = serve.http.get(f"/fhir/{type_}", params={"_count": "1000"})
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry") or []]


def transaction(serve: Outreach, resources: list[dict[str, Any]]) -> None:
    """All of them in one commit: a burst of changes (and events) at once."""
    r = serve.http.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": res, "request": {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"}}
        for res in resources]})
    assert r.status_code == 200, r.text


def encounter(pid: str, status: str) -> dict[str, Any]:
    period = {"start": "2026-02-27T09:00:00Z", **({"end": "2026-03-01T08:00:00Z"} if status == "finished" else {})}
    return {"resourceType": "Encounter", "id": f"enc-{pid}", "status": status,
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
            "subject": {"reference": f"Patient/{pid}"}, "period": period}


def ours(resource: dict[str, Any]) -> bool:
    return any(i.get("system") == OURS for i in resource.get("identifier") or [])


def runs(serve: Outreach) -> list[dict[str, Any]]:
    r = serve.http.get("/admin/runs", params={"limit": "1000"})
    assert r.status_code == 200, r.text
    return list(r.json()["runs"])


def settled(serve: Outreach, high: set[str]) -> bool:
    counts = serve.http.get("/admin/counts").json()
    if any(c["state"] == "pending" and c["count"] for c in counts["events"]):
        return False
    found = runs(serve)
    return len(found) == PATIENTS and all(
        r["state"] == ("done" if r["patient"].split("/")[1] in high else "awaiting") for r in found)


async def records(store: Store) -> list[Any]:
    return [*await store.list_records(EVENT, limit=1000), *await store.list_records(RUN, limit=1000)]


class Killer:
    """SIGKILLs workers and starts replacements. ``hunt``: watch the store until some worker holds a lease on
    an event or a run (``runner.worker_id`` is ``host:pid``), wait a random moment more, and kill it — work
    in hand; ``any``: kill a random worker, whatever it is doing."""

    def __init__(self, pool: Workers, url: str, rng: random.Random) -> None:
        self.pool, self.rng = pool, rng
        self.runner = asyncio.Runner()
        self.store = open_store(url)
        self.runner.run(self.store.open())
        self.host = socket.gethostname()
        self.mid_work = 0

    def hunt(self, timeout: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = time.time()
            holders = {r.lease_owner for r in self.runner.run(records(self.store)) if r.lease_until > now}
            busy = [p for p in self.pool.running if f"{self.host}:{p.pid}" in holders]
            if busy:
                time.sleep(self.rng.uniform(0.0, 0.05))
                self.pool.kill(busy[self.rng.randrange(len(busy))])
                self.mid_work += 1
                return
            time.sleep(0.01)

    def any(self) -> None:
        self.pool.kill_one(self.rng)

    def close(self) -> None:
        self.runner.run(self.store.close())
        self.runner.close()


async def reclaimed(url: str) -> int:
    """Events and runs claimed again after their first claimer died with them in hand (or ran past its
    lease): each is added, claimed and saved once (rev 3) unless a second claim came in between."""
    store = open_store(url)
    await store.open()
    try:
        return sum(r.rev > 3 for r in await records(store))
    finally:
        await store.close()


@pytest.mark.parametrize("workers", [2, 3])
def test_killed_workers_leave_each_first_outcome_exactly_once(tmp_path: Path, store_url: str, workers: int) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    serve = Outreach(tmp_path, TOKEN, FHIR_OUTREACH_STORE=store_url, FHIR_OUTREACH_SERVE_WORKER="false",
                     FHIR_OUTREACH_JOURNEY_LEASE_SECONDS="2", FHIR_OUTREACH_WORKER_POLL_SECONDS="0.1")
    pool = Workers(serve.env, tmp_path)
    try:
        r = serve.http.post("/admin/journeys", content=DISCHARGE.read_text(),
                            headers={"Content-Type": "application/yaml"}, params={"activate": "true"})
        assert r.status_code == 201, r.text
        pool.start(workers)  # after the load, so that their first look at the catalog finds the journey
        high = {f"p{i}" for i in rng.sample(range(PATIENTS), PATIENTS // 3)}
        admitted: list[dict[str, Any]] = [{"resourceType": "Practitioner", "id": "coordinator",
                                           "name": [{"family": "Care"}]}]
        for i in range(PATIENTS):
            pid = f"p{i}"
            admitted.append({"resourceType": "Patient", "id": pid, "name": [{"given": [f"P{i}"], "family": "Test"}],
                             "generalPractitioner": [{"reference": "Practitioner/coordinator"}]})
            if pid in high:
                admitted.append({"resourceType": "Condition", "id": f"hf-{pid}",
                                 "subject": {"reference": f"Patient/{pid}"},
                                 "code": {"coding": [{"system": "http://snomed.info/sct", "code": "84114007"}]}})
            admitted.append(encounter(pid, "in-progress"))
        transaction(serve, admitted)
        wait_for(pool.ready, timeout=30)

        per_wave = PATIENTS // WAVES
        killer = Killer(pool, store_url, rng)
        try:
            for wave in range(WAVES):  # bursts of discharges; a worker dies while it has some in hand
                transaction(serve, [encounter(f"p{i}", "finished")
                                    for i in range(wave * per_wave, (wave + 1) * per_wave)])
                if rng.random() < 0.6:
                    killer.hunt()
                if rng.random() < 0.3:
                    killer.any()
                time.sleep(rng.uniform(0.0, 0.4))
            while pool.killed < MIN_KILLS:
                killer.any()
        finally:
            killer.close()
        context = f"seed {seed}, {pool.killed} workers killed ({killer.mid_work} with work in hand)"

        wait_for(lambda: settled(serve, high), timeout=60, interval=0.5)
        pool.check_alive()

        tasks = [t for t in search(serve, "Task") if ours(t)]
        comms = [c for c in search(serve, "Communication") if ours(c)]
        provenance = Counter(p["target"][0]["reference"] for p in search(serve, "Provenance"))
        def brief(res: dict[str, Any]) -> str:
            return f"{res['resourceType']}/{res['id']} {[i['value'] for i in res['identifier']]} {res['meta']}"

        want = {f"Patient/p{i}": "Task" if f"p{i}" in high else "Communication" for i in range(PATIENTS)}
        got: dict[str, list[dict[str, Any]]] = {}
        for res in [*tasks, *comms]:
            got.setdefault((res.get("for") or res.get("subject"))["reference"], []).append(res)
        wrong = {p: [brief(r) for r in got.get(p, [])] for p, kind in want.items()
                 if [r["resourceType"] for r in got.get(p, [])] != [kind]}
        assert not wrong, f"{context}: {wrong}"
        assert set(got) == set(want), context
        assert all(c["medium"][0]["coding"][0]["code"] == "portal" for c in comms)
        assert all(t["focus"]["reference"] == f"Encounter/enc-{t['for']['reference'].split('/')[1]}" for t in tasks)
        assert provenance == Counter(f"{r['resourceType']}/{r['id']}" for r in [*tasks, *comms]), context

        found = runs(serve)
        assert sorted(r["patient"] for r in found) == sorted(f"Patient/p{i}" for i in range(PATIENTS)), context
        retried = 0
        for run in found:
            why = serve.http.get(f"/admin/runs/{run['run']}").json()
            path = [s["step"] for s in why["steps"]]
            if run["patient"].split("/")[1] in high:
                assert run["state"] == "done" and run["status"] == "completed", (run, context)
                assert path == ["risk", "call"], (run, path, context)
            else:
                assert run["state"] == "awaiting" and path == ["risk", "portal", "portal-read"], (run, path, context)
            retried += "earlier attempt" in str(why["steps"])
        logs = pool.logs()
        assert "failed unexpectedly" not in logs and "Traceback" not in logs, logs
        again = asyncio.run(reclaimed(store_url))
        print(f"{context}: {again} events and runs claimed a second time, {retried} runs found an output a "
              "killed worker had written")
        assert again > 0, f"no kill landed while a worker had work in hand ({context})"
    finally:
        pool.close()
        serve.stop()


# --- known bug: MongoDB, a worker killed inside the commit of an output ------------------------------------

class Killed(BaseException):
    """The process is gone: nothing after this point runs (not even the committer's own rollback)."""


async def killed_inside_the_output_commit(url: str) -> None:
    """Worker 0 dies between the two writes of the commit that stores the portal Communication and its
    Provenance (a multi-write commit: an undo journal, then one write after the other). Worker 1 takes the
    run over once the lease expired and retries the step; later the abandoned journal goes stale and is
    rolled back, as designed."""
    from fhir_outreach.store.mongo import MongoStore
    from tests.journeys.test_concurrency import BASE, LEASE, TIMEOUT, World, check, discharge, make_world

    store, dying = MongoStore(url, base_url=BASE), MongoStore(url, base_url=BASE)
    await store.open()
    await dying.open()
    try:
        world: World = await make_world(store, [(False, "sms")], 2)
        world.engines[0].store = world.engines[0].catalog.store = dying  # worker 0's own connection
        apply = dying._apply

        async def apply_then_die(txn: Any, w: Any, now: Any) -> Any:
            result = await apply(txn, w, now)
            if w.type == "Communication":
                raise Killed
            return result

        async def no_rollback(journal: Any) -> None:  # a killed process rolls nothing back
            return None

        dying._apply = apply_then_die  # type: ignore[method-assign]
        dying._rollback = no_rollback  # type: ignore[method-assign]
        await discharge(world, world.people[0])
        [result] = await asyncio.gather(world.engines[0].run_once(50), return_exceptions=True)
        assert isinstance(result, Killed)
        world.spawn(0)  # its replacement, on the shared connection

        world.clock.advance(LEASE + 1)  # worker 1 takes over and runs the portal step again
        await world.round([1], 50)
        store.journal_timeout = 0.5  # (10 s in production) the dead worker's journal goes stale...
        await asyncio.sleep(0.6)
        await store.commit([prepare(Write("Basic", f"b{i}", {"resourceType": "Basic", "id": f"b{i}",
                                                              "code": {"text": "any"}}), BASE) for i in (1, 2)])
        # ... and the next multi-write commit rolls it back
        world.clock.advance(TIMEOUT + 1)
        await world.settle()
        await check(world)
    finally:
        await dying.close()
        await store.close()


def test_mongo_a_worker_killed_inside_the_output_commit(mongo_base_url: str) -> None:
    asyncio.run(killed_inside_the_output_commit(f"{mongo_base_url}/jk{uuid.uuid4().hex[:12]}"))
