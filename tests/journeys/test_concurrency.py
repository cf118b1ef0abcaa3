"""Exactly once under concurrency and crashes, in-process, on both stores.

Two or three journey ``Engine``s (distinct owners, 30-second leases) share one store and one ``ManualClock``
and run the patient-discharge journey; writes go through the store and the local change feed, as the FHIR
API does. Hypothesis draws the patients (high / low risk, how they can be reached) and a random interleaving
of: a round of some engines run concurrently (``asyncio.gather``), the clock moving on (a second, past a
lease, an hour, a day, past a timeout), a discharge, an engagement with an output that exists (portal
read, email opened, SMS reply YES / NO), and a worker crash — the engine dies at its k-th store call, before
or after that call took effect, or right after a chosen kind of call (an output's commit, a run's save, a
claim, a RequestGroup's commit): ``kill -9`` semantics, nothing after it runs and its leases are left to
expire, and a new engine with a new owner takes its place. Then everything is driven to completion and
``check`` asserts:

- every discharge has exactly one run, ``done`` / ``completed``, whose path is exactly the one the journey
  prescribes for that patient given the arms its awaits took (``event`` only if that engagement was
  delivered, ``timeout`` only once the timeout had passed), and whose RequestGroup says so;
- each patient has exactly the Communications (by medium) and Tasks that path produces — no duplicates,
  nothing extra — each carrying our identifier, each with exactly one Provenance; the run's outputs name
  them; a non-portal message is handed to the channel once;
- no event or waiter is left pending.

A second property stops workers mid-round (a long pause with work in hand) while the others take their
work over once the leases expire, then lets them go on. Fixed scenarios: a worker killed after each store
call of a round in turn, and three workers claiming one item at a time. The last tests pin bugs these
tests found and that are fixed: a member left active by a crash, and two ways a worker that outlived its
lease acted on a stale copy of a run.
"""

from __future__ import annotations

import asyncio
import inspect
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from fhir_outreach.fhir.search import parse_query
from fhir_outreach.intake.processor import EVENT
from fhir_outreach.intake.topics import Topic, load_topics
from fhir_outreach.journeys import catalog
from fhir_outreach.journeys.catalog import Catalog
from fhir_outreach.journeys.definition import IDENTIFIER_SYSTEM
from fhir_outreach.journeys.feed import LocalFeed
from fhir_outreach.journeys.files import read_file
from fhir_outreach.journeys.runner import DELIVERY, MEMBER, RUN, WAITER, Engine
from fhir_outreach.store import Store, Write, open_store
from fhir_outreach.store.base import prepare
from fhir_outreach.work.clock import ManualClock, fhir_instant, to_datetime

ROOT = Path(__file__).resolve().parents[2]
DISCHARGE = ROOT / "profiles" / "journeys" / "patient-discharge.yaml"
BASE = "http://testserver/fhir"
SNOMED = "http://snomed.info/sct"
ENGAGEMENT = "http://fhir-outreach.org/StructureDefinition/engagement"
START = 1_772_352_000.0  # 2026-03-01T08:00:00Z
DAY = 86400.0
LEASE = 30.0
TIMEOUT = 2 * DAY  # every await of the discharge journey

MOBILE = {"system": "phone", "use": "mobile", "value": "+1-555-0100", "rank": 1}
EMAIL = {"system": "email", "value": "x@example.org", "rank": 1}
HOME = {"system": "phone", "use": "home", "value": "+1-555-0199", "rank": 2}
CONTACTS: dict[str, list[dict[str, Any]]] = {
    "sms": [MOBILE],  # preference sms
    "email": [EMAIL, HOME],  # preference email, cannot receive SMS
    "email+sms": [EMAIL, {**MOBILE, "rank": 2}],  # preference email, SMS-capable
    "portal": [],  # no telecom: preference portal (the journey ends after the unread portal message)
}


# --- a store that dies -------------------------------------------------------------------------------------

class Crash(BaseException):
    """The worker process is gone. A BaseException, so no ``except Exception`` in the engine catches it."""


class Mortal:
    """The store as one worker sees it. ``arm(k, after)``: the k-th call from now kills the worker, before
    the call reaches the store or after it took effect; every later call of this worker fails too (crashing
    before call k leaves the store as crashing after call k-1 does). ``kill_after(pred)``: die right after
    the first call ``pred(name, args)`` accepts. ``stall(k, kind)``: the k-th call after a claim of ``kind``
    records that got some (or the first call ``stall_when(name, args)`` accepts) waits for ``gate``: a
    worker stopped in its tracks with work in hand (a long GC pause, a network partition) while its leases
    run out."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.calls = 0
        self.crash_at: int | None = None
        self.after = False
        self.dead = False
        self.kill_when: Any = None
        self.stall_at: int | None = None
        self.stall_kind: str | None = None
        self.stall_when: Any = None
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()  # set while stopped at the gate

    def arm(self, k: int, after: bool) -> None:
        self.calls, self.crash_at, self.after = 0, k, after

    def kill_after(self, pred: Any) -> None:
        self.kill_when = pred

    def stall(self, k: int, kind: str) -> None:
        self.stall_at, self.stall_kind = k, kind
        self.gate.clear()
        self.waiting.clear()

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if not inspect.iscoroutinefunction(target):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.dead:
                raise Crash(name)
            self.calls += 1
            if (self.stall_at is not None and self.stall_kind is None and self.calls >= self.stall_at) or \
                    (self.stall_when is not None and self.stall_when(name, args)):
                self.stall_at = self.stall_when = None
                self.waiting.set()
                await self.gate.wait()
            fatal = self.crash_at is not None and self.calls >= self.crash_at
            if fatal and not self.after:
                self.dead = True
                raise Crash(name)
            result = await target(*args, **kwargs)
            if name == "claim_records" and args[0] == self.stall_kind and result:
                self.calls, self.stall_kind = 0, None  # count from here
            if fatal or (self.kill_when is not None and self.kill_when(name, args)):
                self.dead = True
                raise Crash(name)
            return result

        return call


# --- the world: one store, one clock, N workers -------------------------------------------------------------

@dataclass
class Person:
    pid: str
    high: bool
    contact: str
    discharged: bool = False


@dataclass
class World:
    store: Store
    clock: ManualClock
    topics: dict[str, Topic]
    feed: LocalFeed
    people: list[Person] = field(default_factory=list)
    engines: list[Engine] = field(default_factory=list)
    stores: list[Mortal] = field(default_factory=list)
    spawned: int = 0
    crashes: int = 0
    engaged: dict[str, str] = field(default_factory=dict)  # Communication id -> what was delivered
    stalled: dict[int, asyncio.Task[int]] = field(default_factory=dict)  # rounds of stopped workers

    def spawn(self, i: int) -> None:
        self.spawned += 1
        mortal = Mortal(self.store)
        engine = Engine(mortal, clock=self.clock, owner=f"worker-{i}.{self.spawned}",  # type: ignore[arg-type]
                        lease_seconds=LEASE, base_url=BASE, topics=self.topics)
        if i < len(self.engines):
            self.engines[i], self.stores[i] = engine, mortal
        else:
            self.engines.append(engine)
            self.stores.append(mortal)

    async def write(self, resource: dict[str, Any], expect: int | None = None) -> dict[str, Any]:
        """A write through our FHIR API: commit, then the local change feed (as ``Interactions`` does)."""
        w = prepare(Write(resource["resourceType"], resource["id"], resource, expect=expect), BASE)
        [res] = await self.store.commit([w], now=to_datetime(self.clock.now()))
        await self.feed([(w, res)])
        return dict(res.stored.resource or {})

    async def round(self, which: list[int], limit: int) -> int:
        """One round of the given engines, concurrently. A crashed engine is replaced by a new worker; one
        that stopped at its stall point stays stopped (holding what it claimed) until ``release``."""
        tasks = {i: asyncio.create_task(self.engines[i].run_once(limit)) for i in which if i not in self.stalled}
        handled = 0
        for i, task in tasks.items():
            stopped = asyncio.create_task(self.stores[i].waiting.wait())
            await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if task.done():
                handled += self._outcome(i, task)
            else:
                self.stalled[i] = task
        return handled

    def _outcome(self, i: int, task: asyncio.Task[int]) -> int:
        exc = task.exception()
        if isinstance(exc, Crash):
            self.crashes += 1
            self.spawn(i)
            return 0
        if exc is not None:
            raise exc
        return task.result()

    async def release(self, i: int) -> None:
        """Let a stopped worker go on (its leases may have expired meanwhile), to the end of its round."""
        self.stores[i].stall_at = self.stores[i].stall_kind = self.stores[i].stall_when = None
        self.stores[i].waiting.clear()
        task = self.stalled.pop(i, None)
        if task is not None:
            self.stores[i].gate.set()
            await asyncio.wait([task])
            self._outcome(i, task)

    async def next_due(self) -> float | None:
        """When the next piece of work becomes claimable (its due time, or when a dead worker's lease ends)."""
        moments = [max(r.due, r.lease_until) for st_ in ("pending", "waiting", "awaiting")
                   for r in await self.store.list_records(RUN, state=st_, limit=10_000)]
        moments += [max(r.due, r.lease_until) for r in await self.store.list_records(EVENT, state="pending",
                                                                                       limit=10_000)]
        return min(moments) if moments else None

    async def settle(self) -> None:
        """Drive everything to completion: all workers run until idle, then time jumps to the next due work."""
        for i in range(len(self.engines)):
            await self.release(i)
        for _ in range(2000):
            if await self.round(list(range(len(self.engines))), 50):
                continue
            due = await self.next_due()
            if due is None:
                return
            self.clock.set(max(due, self.clock.now()))
        raise AssertionError("the runs did not settle")


async def resources(store: Store, type_: str) -> list[dict[str, Any]]:
    query = parse_query(type_, [], max_count=10_000)
    query.count = 10_000
    return [r.resource for r in (await store.search(query)).resources if r.resource]


def ours(resource: dict[str, Any]) -> str | None:
    return next((i["value"] for i in resource.get("identifier") or [] if i.get("system") == IDENTIFIER_SYSTEM),
                None)


def medium(comm: dict[str, Any]) -> str:
    return str(comm["medium"][0]["coding"][0]["code"])


async def make_world(store: Store, people: list[tuple[bool, str]], workers: int) -> World:
    plan, templates = read_file(DISCHARGE)
    assert plan["status"] == "active"
    await catalog.load(store, plan, templates, base_url=BASE)
    topics = load_topics()
    world = World(store, ManualClock(START), topics, LocalFeed(store, Catalog(store), topics))
    for i in range(workers):
        world.spawn(i)
    await world.write({"resourceType": "Practitioner", "id": "coordinator", "name": [{"family": "Care"}]})
    for n, (high, contact) in enumerate(people):
        pid = f"p{n}"
        world.people.append(Person(pid, high, contact))
        await world.write({"resourceType": "Patient", "id": pid, "name": [{"given": [f"P{n}"], "family": "Test"}],
                           "telecom": CONTACTS[contact],
                           "generalPractitioner": [{"reference": "Practitioner/coordinator"}]})
        if high:
            await world.write({"resourceType": "Condition", "id": f"hf-{pid}",
                               "subject": {"reference": f"Patient/{pid}"},
                               "code": {"coding": [{"system": SNOMED, "code": "84114007"}]}})
        await world.write(encounter(pid, finished=False))
    return world


def encounter(pid: str, *, finished: bool) -> dict[str, Any]:
    enc: dict[str, Any] = {"resourceType": "Encounter", "id": f"enc-{pid}", "status": "in-progress",
                           "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
                           "subject": {"reference": f"Patient/{pid}"}, "period": {"start": "2026-02-27T09:00:00Z"}}
    if finished:
        enc["status"] = "finished"
        enc["period"] = {**enc["period"], "end": "2026-03-01T08:00:00Z"}
    return enc


async def discharge(world: World, person: Person) -> None:
    if not person.discharged:
        person.discharged = True
        await world.write(encounter(person.pid, finished=True))


async def engage(world: World, pick: int, yes: bool) -> None:
    """Engage with one of the outputs that exist and were not engaged with yet: read the portal message,
    open the email, or reply to the SMS (the awaiting run may or may not still wait for it)."""
    candidates = sorted((c for c in await resources(world.store, "Communication")
                         if ours(c) and c["id"] not in world.engaged), key=lambda c: c["id"])
    if not candidates:
        return
    comm = candidates[pick % len(candidates)]
    now = fhir_instant(world.clock.now())
    kind = medium(comm)
    if kind == "portal":
        world.engaged[comm["id"]] = "read"
        await world.write({**comm, "received": now})
    elif kind == "email":
        world.engaged[comm["id"]] = "opened"
        await world.write({**comm, "extension": [{"url": ENGAGEMENT, "valueCode": "opened"}]})
    else:
        world.engaged[comm["id"]] = "YES" if yes else "NO"
        await world.write({"resourceType": "Communication", "id": uuid.uuid4().hex, "status": "completed",
                           "subject": comm["subject"], "sent": now,
                           "inResponseTo": [{"reference": f"Communication/{comm['id']}"}],
                           "payload": [{"contentString": " yes " if yes else "No thanks"}]})


# --- what the journey prescribes --------------------------------------------------------------------------

def prescribed(person: Person, arms: Iterator[str], said_yes: bool) -> tuple[list[str], list[str]]:
    """The step path and the outputs (``task`` or a message medium, in order) of the discharge journey for
    this patient, given the arms (``event`` / ``timeout``) its awaits took."""
    if person.high:
        return ["risk", "call"], ["task"]
    path, outs = ["risk", "portal", "portal-read", "portal-read"], ["portal"]
    if next(arms) == "event":
        return [*path, "end"], outs
    path.append("prefs")
    if person.contact == "portal":
        return [*path, "end"], outs
    if person.contact.startswith("email"):
        path += ["email", "email-opened", "email-opened"]
        outs.append("email")
        if next(arms) == "event":
            return [*path, "end"], outs
        path.append("can-sms")
        if person.contact == "email":
            return [*path, "end"], outs
    path += ["sms", "sms-reply", "sms-reply"]
    outs.append("sms")
    if next(arms) == "timeout":
        return [*path, "end"], outs
    path.append("reply-yes")
    return ([*path, "call"], [*outs, "task"]) if said_yes else ([*path, "end"], outs)


async def check(world: World, *, groups: bool = True) -> None:
    store = world.store
    runs = await store.list_records(RUN, limit=10_000)
    comms = [c for c in await resources(store, "Communication") if ours(c)]
    tasks = [t for t in await resources(store, "Task") if ours(t)]
    provenance = Counter(p["target"][0]["reference"] for p in await resources(store, "Provenance"))
    deliveries = {r.key for r in await store.list_records(DELIVERY, limit=10_000)}
    by_ref = {f"{r['resourceType']}/{r['id']}": r for r in [*comms, *tasks]}

    # Exactly once, globally: one resource per identifier, one Provenance per output and none dangling.
    values = Counter(ours(r) for r in by_ref.values())
    assert all(n == 1 for n in values.values()), values
    assert provenance == Counter(list(by_ref)), "every output has exactly one Provenance, and nothing else has one"
    assert deliveries == {f"Communication/{c['id']}" for c in comms if medium(c) != "portal"}

    # One run per discharge, done, on exactly the path the journey prescribes, producing exactly its outputs.
    discharged = {f"Patient/{p.pid}": p for p in world.people if p.discharged}
    assert sorted(r.data["patient"] for r in runs) == sorted(discharged)
    produced: set[str] = set()
    for run in runs:
        person = discharged[run.data["patient"]]
        assert run.state == "done" and run.data["status"] == "completed", (run.key, run.state, run.data.get("retry"))
        path = run.data["path"]
        arms = [e["arm"] for e in path if e["kind"] == "await" and e.get("arm")]
        starts = {e["step"]: e["at"] for e in path if e["kind"] == "await" and not e.get("arm")}
        outputs = [ref for e in path for ref in e.get("outputs") or [] if not ref.startswith("Provenance/")]
        for ref in outputs:
            assert ref in by_ref, f"{run.key}: {ref} is in the path but not in the store"
        said_yes = False
        for e in path:
            if e["kind"] != "await" or not e.get("arm"):
                continue
            target = next(o for o in outputs if (e["step"] == "portal-read" and medium(by_ref[o]) == "portal") or
                          (e["step"] == "email-opened" and medium(by_ref[o]) == "email") or
                          (e["step"] == "sms-reply" and medium(by_ref[o]) == "sms"))
            delivered = world.engaged.get(target.split("/")[1])
            if e["arm"] == "event":
                assert delivered, f"{run.key}: {e['step']} took the event arm with no engagement"
                said_yes = delivered == "YES"
            else:
                assert e["at"] >= starts[e["step"]] + TIMEOUT, f"{run.key}: {e['step']} timed out early"
        steps, kinds = prescribed(person, iter(arms), said_yes)
        assert [e["step"] for e in path] == steps, (person, [e["step"] for e in path])
        got = ["task" if ref.startswith("Task/") else medium(by_ref[ref]) for ref in outputs]
        assert got == kinds, (person, got)
        mine = {ref for ref, res in by_ref.items() if (res.get("subject") or res.get("for"))["reference"] ==
                run.data["patient"]}
        assert mine == set(outputs), f"{person.pid}: the store has {sorted(mine)}, the run made {outputs}"
        assert set(run.data["outputs"]) == set(outputs)
        produced |= set(outputs)
        for ref in outputs:
            assert ours(by_ref[ref]).startswith(f"{run.key}/")
        if groups:  # the run's RequestGroup shows where it ended
            group = await store.read("RequestGroup", run.key)
            assert group is not None and group.resource is not None
            assert group.resource["status"] == "completed", (run.key, group.resource["status"])
            assert len(group.resource["action"]) == len(path)
    assert produced == set(by_ref)

    # Nothing left behind.
    assert not await store.list_records(EVENT, state="pending", limit=10)
    assert not await store.list_records(WAITER, state="pending", limit=10)
    # (members: see test_a_crash_after_a_run_ends_leaves_its_member_active)


# --- the property --------------------------------------------------------------------------------------------

WINDOWS = {  # the store calls after which dying is most interesting
    "output": lambda name, args: name == "commit" and args[0][0].type in ("Communication", "Task"),
    "run-saved": lambda name, args: name == "save_record" and args[0].kind == RUN,
    "claimed": lambda name, args: name == "claim_records",
    "group": lambda name, args: name == "commit" and args[0][0].type == "RequestGroup",
}


@st.composite
def scenarios(draw: st.DrawFn, *, engage: bool = True,
              stall: bool = False) -> tuple[int, list[tuple[bool, str]], list[tuple[Any, ...]]]:
    workers = draw(st.sampled_from([2, 3]))
    people = draw(st.lists(st.tuples(st.booleans(), st.sampled_from(sorted(CONTACTS))), min_size=2, max_size=5))
    engine = st.integers(0, workers - 1)
    ops = [
        st.tuples(st.just("round"), st.lists(engine, min_size=1, max_size=workers, unique=True),
                  st.sampled_from([1, 2, 5, 50])),
        st.tuples(st.just("advance"), st.sampled_from([1.0, LEASE + 1, 3600.0, DAY, TIMEOUT + 60])),
        st.tuples(st.just("discharge"), st.integers(0, len(people) - 1)),
        st.tuples(st.just("crash"), engine, st.integers(1, 40), st.booleans()),
        st.tuples(st.just("kill"), engine, st.sampled_from(sorted(WINDOWS))),
    ]
    if engage:
        ops.append(st.tuples(st.just("engage"), st.integers(0, 20), st.booleans()))
    if stall:
        ops.append(st.tuples(st.just("stall"), engine, st.integers(1, 12), st.sampled_from([RUN, EVENT]),
                             st.sampled_from([1, 5, 50])))
        ops.append(st.tuples(st.just("release"), engine))
    early = [("discharge", i) for i in draw(st.sets(st.integers(0, len(people) - 1)))]
    return workers, people, early + draw(st.lists(st.one_of(ops), max_size=30))


async def play(store: Store, workers: int, people: list[tuple[bool, str]], ops: list[tuple[Any, ...]],
               groups: bool = True) -> World:
    world = await make_world(store, people, workers)
    for op in ops:
        if op[0] == "round":
            await world.round(list(op[1]), op[2])
        elif op[0] == "advance":
            world.clock.advance(op[1])
        elif op[0] == "discharge":
            await discharge(world, world.people[op[1]])
        elif op[0] == "engage":
            await engage(world, op[1], op[2])
        elif op[0] == "crash":
            world.stores[op[1]].arm(op[2], op[3])
        elif op[0] == "kill":
            world.stores[op[1]].kill_after(WINDOWS[op[2]])
        elif op[0] == "stall":
            world.stores[op[1]].stall(op[2], op[3])  # in this round or a later one
            await world.round([op[1]], op[4])
            if op[1] in world.stalled:  # the others take its work over once its leases expire; then it wakes
                world.clock.advance(LEASE + 1)
                await world.round([i for i in range(workers) if i != op[1]], 50)
                await world.release(op[1])
        else:
            await world.release(op[1])
    for person in world.people:
        await discharge(world, person)
    await world.settle()
    await check(world, groups=groups)
    return world


class Stores:
    """Fresh stores of one kind, one per Hypothesis example."""

    def __init__(self, kind: str, mongo: str | None, tmp: Path) -> None:
        self.kind, self.mongo, self.tmp = kind, mongo, tmp

    def url(self) -> str:
        if self.kind == "mongo":
            return f"{self.mongo}/c{uuid.uuid4().hex[:12]}"
        return f"sqlite:///{tempfile.mkdtemp(dir=self.tmp)}/store.db"

    async def run(self, fn: Any, *args: Any) -> Any:
        store = open_store(self.url(), base_url=BASE, sqlite_synchronous="NORMAL")
        await store.open()
        try:
            return await fn(store, *args)
        finally:
            await store.close()


@pytest.fixture(scope="module", params=["sqlite", "mongo"])
def stores(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Stores:
    mongo = request.getfixturevalue("mongo_base_url") if request.param == "mongo" else None
    return Stores(request.param, mongo, tmp_path_factory.mktemp(f"concurrency-{request.param}"))


EXAMPLES = {"sqlite": 20, "mongo": 8}  # nx-27017 costs about five times as much per store call


def examples(stores: Stores) -> settings:
    return settings(max_examples=EXAMPLES[stores.kind], deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_random_interleavings_end_with_each_output_exactly_once(stores: Stores) -> None:
    @examples(stores)
    @given(scenario=scenarios())
    def prop(scenario: Any) -> None:
        workers, people, ops = scenario
        world = asyncio.run(stores.run(play, workers, people, ops))
        note(f"{workers} workers, {len(people)} patients, {len(ops)} operations, {world.crashes} crashes")

    prop()


def test_stopped_workers_whose_leases_expire_change_nothing(stores: Stores) -> None:
    """Workers stopped mid-round (their leases expire and others redo their work concurrently) and then
    resumed: without engagements the journey is deterministic, so the duplicate execution is harmless.
    (With an engagement in between it is not: see test_a_stopped_worker_acts_on_a_stale_run; and the
    RequestGroup is not checked here: see
    test_a_stopped_worker_overwrites_the_request_group_of_a_finished_run.)"""
    @examples(stores)
    @given(scenario=scenarios(engage=False, stall=True))
    def prop(scenario: Any) -> None:
        workers, people, ops = scenario
        asyncio.run(stores.run(play, workers, people, ops, False))

    prop()


# --- fixed scenarios: every crash point, and all workers at once ---------------------------------------------

async def crash_everywhere(store: Store, stride: int) -> int:
    """Pairs of patients (one high risk, one low risk) are discharged one pair at a time; for the k-th pair,
    a fresh worker 0 dies right after the k-th store call of its round took effect, and worker 1 takes over
    once the dead worker's leases expired — until worker 0 gets through a round alive. Returns the number of
    crash points tried (every ``stride``-th call)."""
    world = await make_world(store, [], 2)
    k = 1 - stride
    while True:
        k += stride
        for high in (True, False):
            pid = f"k{k}{'h' if high else 'l'}"
            person = Person(pid, high, "sms")
            world.people.append(person)
            await world.write({"resourceType": "Patient", "id": pid, "telecom": CONTACTS["sms"],
                               "generalPractitioner": [{"reference": "Practitioner/coordinator"}]})
            if high:
                await world.write({"resourceType": "Condition", "id": f"hf-{pid}",
                                   "subject": {"reference": f"Patient/{pid}"},
                                   "code": {"coding": [{"system": SNOMED, "code": "84114007"}]}})
            await world.write(encounter(pid, finished=False))
            await discharge(world, person)
        world.stores[0].arm(k, True)
        await world.round([0], 50)
        if not world.crashes:
            break
        world.crashes = 0
        world.clock.advance(LEASE + 1)
        await world.round([1], 50)
    world.clock.advance(TIMEOUT + 1)
    await world.settle()
    await check(world)
    return k // stride


def test_a_worker_killed_at_every_store_call_changes_nothing(stores: Stores) -> None:
    """Dying before call k leaves the store as dying after call k-1 does, so dying after each call covers
    both. Every call on SQLite; every other one on MongoDB (the same engine code, at five times the cost)."""
    points = asyncio.run(stores.run(crash_everywhere, 1 if stores.kind == "sqlite" else 2))
    assert points > (40 if stores.kind == "sqlite" else 20)  # events, enrolment, both runs to their first outputs


async def stampede(store: Store) -> World:
    """Three workers claim at once, round after round, with one claim at a time, on 12 patients."""
    people = [(i % 3 == 0, sorted(CONTACTS)[i % 4]) for i in range(12)]
    world = await make_world(store, people, 3)
    for person in world.people:
        await discharge(world, person)
    for _ in range(60):
        if not await world.round([0, 1, 2], 1):
            break
    for pick in range(0, 8, 2):  # some read their portal message before the timeout, some do not
        await engage(world, pick, yes=True)
    await world.settle()
    world.clock.advance(TIMEOUT + 1)
    await world.settle()
    await check(world)
    return world


def test_three_workers_at_once(stores: Stores) -> None:
    world = asyncio.run(stores.run(stampede))
    assert len(world.people) == 12


# --- known bugs ------------------------------------------------------------------------------------------------

def run_saved_done(name: str, args: tuple[Any, ...]) -> bool:
    return name == "save_record" and args[0].kind == RUN and args[0].state == "done"


async def readmission(store: Store, crash: bool) -> None:
    """A high-risk patient is discharged; the worker finishing the run dies right after storing the run as
    done (before ``_end_member``). The encounter is reopened and the patient discharged again: the journey's
    re-entry is ``always``, so a second run must start and a second call task be created."""
    world = await make_world(store, [(True, "sms")], 2)
    person = world.people[0]
    await discharge(world, person)
    if crash:
        world.stores[0].kill_after(run_saved_done)
    await world.round([0], 50)
    assert world.crashes == int(crash)
    world.clock.advance(LEASE + 1)
    await world.settle()
    [run] = await store.list_records(RUN, limit=10)
    assert run.state == "done"
    await world.write(encounter(person.pid, finished=False))  # readmitted
    await world.write(encounter(person.pid, finished=True))  # and discharged again
    await world.settle()
    tasks = [t for t in await resources(store, "Task") if ours(t)]
    assert len(await store.list_records(RUN, limit=10)) == 2
    assert len(tasks) == 2
    assert not await store.list_records(MEMBER, state="active", limit=10)


@pytest.mark.parametrize("crash", [
    False,
    True,
], ids=["no-crash", "killed-between-run-done-and-member-done"])
def test_a_crash_after_a_run_ends_leaves_its_member_active(stores: Stores, crash: bool) -> None:
    asyncio.run(stores.run(readmission, crash))


async def stale_worker(store: Store) -> World:
    """A low-risk patient's portal message is unread when its 2-day timeout is due. Worker 0 claims the run
    to time it out and stops right there (a long pause); its lease expires; the patient reads the message;
    worker 1 resumes the run with the read (event arm: the run ends). Then worker 0 wakes up and goes on
    with its stale copy of the run: timeout arm, contact preference, an SMS reminder."""
    world = await make_world(store, [(False, "sms")], 2)
    await discharge(world, world.people[0])
    await world.round([0], 50)  # the portal message; awaiting the read for 2 days
    world.clock.advance(TIMEOUT)
    world.stores[0].stall(1, RUN)  # claims the run (its timeout is due), then stops
    await world.round([0], 50)
    assert 0 in world.stalled
    world.clock.advance(LEASE + 1)
    await engage(world, 0, yes=False)  # the read
    await world.round([1], 50)
    [run] = await store.list_records(RUN, limit=10)
    assert run.state == "done" and [e["arm"] for e in run.data["path"] if e["kind"] == "await" and e.get("arm")] \
        == ["event"]
    await world.release(0)
    await world.settle()
    await check(world)
    return world


def test_a_stopped_worker_acts_on_a_stale_run(stores: Stores) -> None:
    asyncio.run(stores.run(stale_worker))


def before_group_write(name: str, args: tuple[Any, ...]) -> bool:
    return name == "commit" and args[0][0].type == "RequestGroup"


async def stale_group(store: Store) -> World:
    """Worker 0 claims a fresh run, executes it up to its first await and stops just before writing the
    RequestGroup; worker 1 takes the run over once the lease expired and runs it to its end (the message is
    never read, the patient has no other channel). Then worker 0 wakes up and writes its RequestGroup."""
    world = await make_world(store, [(False, "portal")], 2)
    await discharge(world, world.people[0])
    world.stores[0].stall_when = before_group_write
    await world.round([0], 50)
    assert 0 in world.stalled
    world.clock.advance(LEASE + 1)
    await world.round([1], 50)
    world.clock.advance(TIMEOUT)
    await world.round([1], 50)
    [run] = await store.list_records(RUN, limit=10)
    assert run.state == "done"
    await world.release(0)
    await world.settle()
    await check(world)
    return world


def test_a_stopped_worker_overwrites_the_request_group_of_a_finished_run(stores: Stores) -> None:
    asyncio.run(stores.run(stale_group))
